"""Checks on a training run: settings that would do nothing, and numbers that stop being numbers.

A run whose training loss (or a held-out metric) becomes NaN or infinite stops at once with an
error that names the step; the snapshots written so far stay, and no NaN reaches any JSON file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from beamlora.config import BeamLoraConfig
from beamlora.errors import BeamLoraError
from rankscope.maths.schedule import operation_steps


class NonFiniteError(BeamLoraError):
    """The training loss or a held-out metric is NaN or infinite: the run has diverged."""


def _diverged(what: str, value: float, step: int, run_dir: str | Path) -> NonFiniteError:
    snapshots = sorted(p.name for p in Path(run_dir).glob("step-*") if p.is_dir() and not p.name.startswith("."))
    kept = f"the snapshots up to {snapshots[-1]} are kept in {run_dir}" if snapshots else "no snapshot was written yet"
    return NonFiniteError(f"{what} is {value} at step {step}: the run diverged and was stopped ({kept}); "
                          "expected a finite value (a smaller --lr usually helps)")


def check_metrics(record: dict[str, Any], step: int, run_dir: str | Path) -> None:
    """Raise :class:`NonFiniteError` if any number in a metrics record is NaN or infinite."""
    for key, value in record.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise _diverged(f"held-out {key}", value, step, run_dir)


def guard_loss(trainer: Any, run_dir: str | Path, on_loss: Callable[[float], None] | None = None) -> None:
    """Make ``trainer`` stop with :class:`NonFiniteError` at the first non-finite training loss.

    Trainer itself would go on (its ``logging_nan_inf_filter`` hides such losses from the logs);
    the check runs before the optimizer step, so the weights stay finite. ``on_loss`` receives every
    finite training-step loss.
    """
    training_step = trainer.training_step

    def checked(*args: Any, **kwargs: Any):
        loss = training_step(*args, **kwargs)
        value = float(loss)
        if not math.isfinite(value):
            raise _diverged("the training loss", value, trainer.state.global_step + 1, run_dir)
        if on_loss is not None:
            on_loss(value)
        return loss

    trainer.training_step = checked


def schedule_warning(config: BeamLoraConfig) -> str | None:
    """A warning when no BeamLoRA operation can run in this many steps, else None."""
    end_step = config.resolved_end_step
    if operation_steps(config.delta_t, end_step, config.total_steps) and config.p_init < 1.0:
        return None
    if config.total_steps < config.delta_t:
        why = f"--steps {config.total_steps} is below --delta-t {config.delta_t}"
    elif config.p_init >= 1.0:
        why = "p_init is 1, so the top-p cut never prunes"
    else:
        why = (f"operations need a multiple of Δt={config.delta_t} before end_step {end_step} with Δt steps "
               f"still to go, and {config.total_steps} steps leave none")
    return f"Warning: {why}: no BeamLoRA operation runs, this trains plain LoRA with rank scores"


def width_warning(model: Any, rank: int) -> str | None:
    """A warning when r exceeds min(in, out) of some LoRA layer: the extra ranks add nothing."""
    narrow = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and hasattr(module, "in_features") and hasattr(module, "out_features"):
            width = min(int(module.in_features), int(module.out_features))
            if rank > width:
                narrow.append((width, name))
    if not narrow:
        return None
    width, name = min(narrow)
    return (f"Warning: r={rank} exceeds the width of {len(narrow)} target layer(s) (narrowest: {name}, "
            f"min(in, out) = {width}): ranks beyond the width add parameters but cannot raise the update's rank")
