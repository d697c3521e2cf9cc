"""Are the ranks moving? A dynamic-rank run whose schedule never runs, caught at the step it should have.

A frequent silent failure of dynamic-rank training is a schedule that never runs: AdaLoRA trains as a
fixed-rank adapter when ``update_and_allocate`` is never called (PEFT issues #1327, #1801, #3373), and a
BeamLoRA model whose controller is never stepped never prunes or expands. :class:`AllocationWatch`
recognises both without importing either (AdaLoRA by its PEFT config's ``peft_type``, BeamLoRA by the
duck-typed :data:`rankscope.telemetry.monitor.TELEMETRY_ATTR`), works out the step by which the
allocation must have changed, and returns one warning, once, when it has not.

The check runs at the first step after that step (or at the end of training), so the order in which a
trainer calls its callbacks at the due step does not matter.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from rankscope.tasks.layers import unwrap_model

STALE_SCALAR = "rank/allocation_stale"  # 1 in the training log that follows the warning
_TELEMETRY_ATTR = "rankscope_telemetry"  # rankscope.telemetry.monitor.TELEMETRY_ATTR (no import: monitor imports numpy)


@dataclass
class _Expected:
    method: str  # "adalora" or "beamlora"
    due: int  # the optimizer step by which the allocation must have changed
    why: str  # how the step follows from the method's settings


def _adalora_config(model: Any) -> tuple[str, Any] | None:
    """(adapter name, config) of the model's AdaLoRA adapter, from PEFT's ``peft_config``; None if there is none."""
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        return None
    for name, config in configs.items():
        kind = getattr(config, "peft_type", None)
        if str(getattr(kind, "value", kind)).upper() == "ADALORA":
            return name, config
    return None


def adalora_due_step(tinit: int, delta_t: int, total_step: int | None, tfinal: int) -> int:
    """The first step at which PEFT's AdaLoRA masks: the first multiple of ``deltaT`` after ``tinit`` (at most
    ``tinit + deltaT``), or ``total_step - tfinal`` (where it forces the final mask) if that comes first."""
    first = (tinit // delta_t + 1) * delta_t
    return first if total_step is None else min(first, total_step - tfinal)


def _beamlora_schedule(model: Any) -> tuple[int | None, int | None]:
    """(first operation step, Δt) from the telemetry provider: its ``first_operation_step`` / ``delta_t`` keys,
    or the controller behind it (``operation_steps()``, ``config.delta_t``) for a provider without them."""
    provider = getattr(model, _TELEMETRY_ATTR, None)
    owner = getattr(provider, "__self__", None)
    steps = getattr(owner, "operation_steps", None)
    if callable(steps):
        found = list(steps())
        return (found[0] if found else None), getattr(getattr(owner, "config", None), "delta_t", None)
    telemetry = provider() if callable(provider) else {}
    return telemetry.get("first_operation_step"), telemetry.get("delta_t")


class AllocationWatch:
    """Watches one training run; :meth:`check` returns the warning line once, when it is due and nothing moved."""

    def __init__(self) -> None:
        self.expected: _Expected | None = None
        self.warned = False
        self._started = False
        self._done = False
        self._rank_pattern: Any = None

    def start(self, model: Any, step: int) -> None:
        """Recognise the method at the run's first step ``step`` (a resumed run past the due step is not watched).

        Each call starts a new watch (a callback reused for another ``train()`` warns again if that run stalls)."""
        self.expected, self.warned, self._done, self._started = None, False, False, True
        model = unwrap_model(model)
        found = _adalora_config(model)
        if found is not None:
            _, config = found
            tinit, delta_t = int(config.tinit), int(config.deltaT)
            total = None if config.total_step is None else int(config.total_step)
            due = adalora_due_step(tinit, delta_t, total, int(config.tfinal))
            self.expected = _Expected("adalora", due, f"tinit {tinit} + deltaT {delta_t}")
            self._rank_pattern = copy.deepcopy(config.rank_pattern)
        elif getattr(model, _TELEMETRY_ATTR, None) is not None:
            first, delta_t = _beamlora_schedule(model)
            if first is not None:
                self.expected = _Expected("beamlora", int(first), f"Δt {delta_t}, its first operation")
        if self.expected is None or self.expected.due < 1 or step >= self.expected.due:
            self._done = True

    def check(self, model: Any, step: int, final: bool = False) -> str | None:
        """The warning when ``step`` is past the due step (or ``final`` at or past it) and nothing has moved."""
        if model is None:
            return None
        if not self._started:
            self.start(model, step)
        if self._done or self.expected is None:
            return None
        due = self.expected.due
        if step <= due and not (final and step == due):
            return None
        self._done = True
        model = unwrap_model(model)
        message = self._adalora(model, step == due) if self.expected.method == "adalora" else self._beamlora(model)
        self.warned = message is not None
        return message

    def _adalora(self, model: Any, at_due: bool) -> str | None:
        _, config = _adalora_config(model) or (None, None)
        if config is None or config.rank_pattern != self._rank_pattern:
            return None  # masked: the allocation moved
        allocator = getattr(getattr(model, "base_model", None), "rankallocator", None)
        called = bool(getattr(allocator, "ipt", None))  # update_and_allocate's importances, empty until it runs
        if called and at_due:
            return None  # a run that ends at the due step, called with 0-based steps, masks one step later
        start = (f"rankscope: the ranks are not moving: AdaLoRA's allocation has not changed by step "
                 f"{self.expected.due} ({self.expected.why}), ")
        if called:
            return start + ("although update_and_allocate was called: pass it the Trainer's global_step after each "
                            "optimizer step, and check tinit, deltaT and total_step")
        return start + ("so AdaLoRA's update_and_allocate was never called: call model.base_model.update_and_allocate("
                        "global_step) after each optimizer step, before the gradients are zeroed (with a Trainer: in a "
                        "callback's on_optimizer_step), as PEFT's docs say")

    def _beamlora(self, model: Any) -> str | None:
        provider = getattr(model, _TELEMETRY_ATTR, None)
        telemetry = provider() if callable(provider) else {}
        if telemetry.get("operation_step") is not None:
            return None
        return (f"rankscope: the ranks are not moving: no BeamLoRA operation by step {self.expected.due} "
                f"({self.expected.why}): is the BeamLoRA callback attached (BeamLoraCallback(controller) in the "
                "Trainer's callbacks, or controller.step(optimizer) after each optimizer step)?")


__all__ = ["AllocationWatch", "STALE_SCALAR", "adalora_due_step"]
