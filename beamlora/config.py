"""``BeamLoraConfig``: every knob of a BeamLoRA run, with the paper's and the authors' defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from beamlora.errors import BeamLoraError
from rankscope.maths.schedule import MIN_DELTA_T, default_end_step
from rankscope.tasks.placement import DEVICES, PRECISIONS
from rankscope.tasks.runconfig import TASK_DEFAULTS, TASKS

SCOPES = ("global", "module")
OPTIMIZER_STATES = ("history", "official", "reset")
ABLATIONS = ("none", "no-expansion", "random", "fixed-p")  # the paper's Table 3
MAX_SEED = 2**32 - 1  # numpy's and transformers' set_seed accept 0 … 2**32 − 1


@dataclass
class BeamLoraConfig:
    """How BeamLoRA assesses, prunes and expands the ranks of a PEFT LoRA model.

    Args:
        p_init: top-p threshold at the first operation; p(t) rises from it to 1 on a cosine.
            The paper's best: 0.95 at r=64, 0.96 at r=32. Smaller values operate more ranks.
        delta_t: optimizer steps between operations (Δt). The paper picks it so that about
            five operations happen before ``end_step``.
        total_steps: optimizer steps of the whole run; no operation happens within the last Δt.
        end_step: step at which p reaches 1 and operations stop; ``None`` means two thirds of
            ``total_steps`` (the authors prune in the first two of three epochs).
        temperature: T in ``w = r · softmax(s / T)``. The authors use 0.05 (0.03 below lr 1e-4).
        scope: ``"global"``: one cumulative-mass cut over all modules' importances together
            (the authors' code); ``"module"``: the same cut inside each module (the paper's text).
        optimizer_state: what a pruned slot gets of its source's Adam moments. ``"history"``:
            the moments from the historical snapshot (the paper's Eq. 12); ``"official"``: what
            the authors' code does (a boolean-mask ``copy_`` into a temporary, i.e. nothing);
            ``"reset"``: zeros.
        max_fraction: at most this share of a module's ranks is pruned in one operation. At 0.5 or
            below there are always enough kept ranks to serve as sources.
        ablation: the paper's Table 3 controls. ``"none"``: BeamLoRA as described. ``"no-expansion"``:
            prune only: each pruned slot's a_i and b_i and their Adam moments are set to zero, and
            with a_i = b_i = 0 the slot receives no gradient (each one's gradient is proportional to
            the other), so it stays exactly zero for the rest of the run (weight decay keeps zero at
            zero); dead slots take no part in later operations (not assessed, not pruned again,
            never a source) and the cap counts live slots only, so every module keeps at least one;
            their scores stay trainable but no longer matter to the output. ``"random"``: each
            module prunes as many slots as the top-p cut and cap decide, but which slots, and which
            kept slots feed them, is drawn at random from a numpy Generator seeded with
            (``seed``, step): the same on every process, and the global RNG is left alone.
            ``"fixed-p"``: p stays at ``p_init`` until ``end_step`` instead of rising on the cosine.
        seed: seeds the "random" ablation's draws (with the step); otherwise only recorded.
            An integer in 0 … 2**32 − 1.
        snapshot_every: write ``output_dir/step-NNNNNN/`` (plain PEFT adapter plus raw scores)
            every this many steps; ``None`` writes none.
        output_dir: where snapshots and ``events.jsonl`` go; ``None`` keeps events in memory only.
    """

    p_init: float = 0.95
    delta_t: int = 100
    total_steps: int = 1000
    end_step: int | None = None
    temperature: float = 0.05
    scope: str = "global"
    optimizer_state: str = "history"
    max_fraction: float = 0.5
    ablation: str = "none"
    seed: int = 0
    snapshot_every: int | None = None
    output_dir: str | Path | None = None

    def __post_init__(self) -> None:
        checks = [
            (0.0 < self.p_init <= 1.0, f"p_init={self.p_init!r}, expected a number in (0, 1]"),
            (isinstance(self.delta_t, int) and self.delta_t >= MIN_DELTA_T,
             f"delta_t={self.delta_t!r}, expected an integer ≥ {MIN_DELTA_T}"),
            (isinstance(self.total_steps, int) and self.total_steps >= 1,
             f"total_steps={self.total_steps!r}, expected a positive integer"),
            (self.end_step is None or (isinstance(self.end_step, int) and 1 <= self.end_step <= self.total_steps),
             f"end_step={self.end_step!r}, expected None or an integer in [1, total_steps={self.total_steps}]"),
            (self.temperature > 0 and math.isfinite(self.temperature),
             f"temperature={self.temperature!r}, expected a positive number"),
            (self.scope in SCOPES, f"scope={self.scope!r}, expected one of {', '.join(SCOPES)}"),
            (self.optimizer_state in OPTIMIZER_STATES,
             f"optimizer_state={self.optimizer_state!r}, expected one of {', '.join(OPTIMIZER_STATES)}"),
            (0.0 < self.max_fraction < 1.0, f"max_fraction={self.max_fraction!r}, expected a number in (0, 1)"),
            (self.ablation in ABLATIONS, f"ablation={self.ablation!r}, expected one of {', '.join(ABLATIONS)}"),
            (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_SEED,
             f"seed={self.seed!r}, expected an integer in 0 … {MAX_SEED} (2**32 − 1)"),
            (self.snapshot_every is None or (isinstance(self.snapshot_every, int) and self.snapshot_every >= 1),
             f"snapshot_every={self.snapshot_every!r}, expected None or a positive integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise BeamLoraError(message)

    @property
    def resolved_end_step(self) -> int:
        return self.end_step if self.end_step is not None else default_end_step(self.total_steps)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["output_dir"] = None if self.output_dir is None else str(self.output_dir)
        return out


METHODS = ("lora", "beamlora")
# PRECISIONS: --precision (autocast) and --weights-dtype (the frozen base weights); DEVICES: --device. The same
# choices as rankscope sweep / resize --validate (rankscope.tasks.placement).
LR_SCHEDULERS = ("linear", "cosine", "constant")
ALL_LINEAR = "all-linear"  # PEFT's target_modules="all-linear": every Linear / Conv1D but the output head


@dataclass
class TrainConfig:
    """One training run. The defaults are the embedded default task (a few minutes on 2 CPU cores).

    Fields left at None take the task's default (``TASK_DEFAULTS``); after construction every one
    holds a value, so ``config.json`` records what ran.

    Args:
        task: "classification" (a label per text) or "sft" (instruction tuning of a causal LM:
            prompt / response pairs, loss on the response, exact match of the final answer).
        model: "minilm" (sequence classification), "smollm2" (causal LM: prompt, label word as
            target; the sft default), a local folder with a transformers model, or a hub id.
        data: classification: "rotten-tomatoes" or a .csv/.jsonl file with text and label columns;
            sft: "arithmetic" (built in) or a .jsonl of {"prompt", "response"} or {"messages"}.
        method: "lora" or "beamlora".
        ablation: BeamLoRA only: "none", or one of the paper's Table 3 controls, "no-expansion",
            "random" or "fixed-p" (see :class:`beamlora.BeamLoraConfig`).
        targets: LoRA target modules; None picks the model's attention projections.
        held_out: examples kept out of training for evaluation (a fixed, seeded split).
        seed: an integer in 0 … 2**32 − 1 (what numpy and transformers' set_seed accept).
        max_length: tokens per training sequence (sft: prompt and response together).
        eval_every / snapshot_every: steps between held-out evaluations / adapter snapshots.
        checkpoint_every: steps between the checkpoints a killed run resumes from (``--resume``); None:
            at each snapshot (or every tenth of the run without snapshots); 0: none.
        trace_every: steps between rank-trace records (``rank_trace.jsonl``: importances and spectra,
            read by ``rankscope analyze`` as the dense time axis); None: no trace.
        steps / epochs: the run's length in optimizer steps, or in passes over the training split (then
            ``steps = ceil(ceil(train examples / batch_size) · epochs)``, resolved once the data is read by
            :func:`resolve_steps`); give one of the two (neither: the task's default steps).
        batch_size: the GLOBAL batch of one optimizer step: micro-batch × ``grad_accum`` × processes.
        grad_accum: micro-batches accumulated per optimizer step (``batch_size`` must divide by it). Every step
            count (Δt, end_step, snapshots, traces, events, checkpoints) counts optimizer steps.
        precision: "fp32", or mixed precision through Trainer: "bf16" (autocast; CPUs support it too) or "fp16"
            (autocast with loss scaling; CUDA only). Trainable weights (LoRA, scores) stay float32.
        weights_dtype: the dtype the frozen base weights are loaded in ("fp32", "bf16", "fp16"): what makes a 7B
            model fit; the LoRA weights and BeamLoRA scores stay float32 whatever it is.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% more time).
        lr_scheduler: "linear" (decay to 0), "cosine" or "constant", each after ``warmup_steps`` (or
            ``warmup_ratio`` of the steps, rounded up) of linear warm-up from 0; give at most one of the two.
        end_step: BeamLoRA: the step where p reaches 1 and operations stop (None: two thirds of the steps).
        temperature / scope / optimizer_state: BeamLoRA: see :class:`BeamLoraConfig`.
        device: "auto" (CUDA where there is one, else the CPU), "cpu", "cuda" or "mps".
    """

    task: str = "classification"
    model: str | None = None
    data: str | None = None
    method: str = "beamlora"
    rank: int | None = None
    alpha: float | None = None
    targets: list[str] | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    p_init: float = 0.95
    delta_t: int | None = None
    temperature: float = 0.05
    scope: str = "global"
    optimizer_state: str = "history"
    ablation: str = "none"
    snapshot_every: int | None = 50
    eval_every: int | None = 100
    trace_every: int | None = 10
    checkpoint_every: int | None = None
    seed: int = 0
    held_out: int | None = None
    max_length: int | None = None
    out: str = "runs/default"
    epochs: float | None = None
    grad_accum: int = 1
    precision: str = "fp32"
    weights_dtype: str = "fp32"
    gradient_checkpointing: bool = False
    lr_scheduler: str = "linear"
    warmup_steps: int | None = None
    warmup_ratio: float | None = None
    end_step: int | None = None
    device: str = "auto"
    fsdp: bool = False  # FSDP2 under torchrun / accelerate launch (beamlora.distributed)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise BeamLoraError(f"task {self.task!r}, expected one of {', '.join(TASKS)}")
        if self.epochs is not None:
            if self.steps is not None:
                raise BeamLoraError(f"steps={self.steps} and epochs={self.epochs}: expected one of the two "
                                    "(the run's length in optimizer steps or in passes over the data)")
            if isinstance(self.epochs, bool) or not isinstance(self.epochs, (int, float)) or not (
                    math.isfinite(self.epochs) and self.epochs > 0):
                raise BeamLoraError(f"epochs={self.epochs!r}, expected a positive, finite number")
        for name, value in TASK_DEFAULTS[self.task].items():
            if getattr(self, name) is None and not (name == "steps" and self.epochs is not None):
                setattr(self, name, value)
        if self.method not in METHODS:
            raise BeamLoraError(f"method {self.method!r}, expected one of {', '.join(METHODS)}")
        for name in ("rank", "steps", "batch_size", "held_out", "max_length", "grad_accum"):
            value = getattr(self, name)
            if value is None and name == "steps" and self.epochs is not None:
                continue  # resolved from the data by resolve_steps
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BeamLoraError(f"{name}={value!r}, expected a positive integer")
        if self.batch_size % self.grad_accum:
            raise BeamLoraError(f"batch_size={self.batch_size} with grad_accum={self.grad_accum}: the global batch "
                                "is micro-batch × grad_accum, expected a batch_size that grad_accum divides")
        for name, allowed in (("precision", PRECISIONS), ("weights_dtype", PRECISIONS),
                              ("lr_scheduler", LR_SCHEDULERS), ("device", DEVICES)):
            if getattr(self, name) not in allowed:
                raise BeamLoraError(f"{name}={getattr(self, name)!r}, expected one of {', '.join(allowed)}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise BeamLoraError(f"gradient_checkpointing={self.gradient_checkpointing!r}, expected true or false")
        if self.warmup_steps is not None and self.warmup_ratio is not None:
            raise BeamLoraError(f"warmup_steps={self.warmup_steps} and warmup_ratio={self.warmup_ratio}: expected "
                                "at most one of the two")
        if self.warmup_steps is not None and (isinstance(self.warmup_steps, bool) or not isinstance(
                self.warmup_steps, int) or self.warmup_steps < 0):
            raise BeamLoraError(f"warmup_steps={self.warmup_steps!r}, expected an integer ≥ 0")
        if self.warmup_ratio is not None and (isinstance(self.warmup_ratio, bool) or not isinstance(
                self.warmup_ratio, (int, float)) or not 0 <= self.warmup_ratio < 1):
            raise BeamLoraError(f"warmup_ratio={self.warmup_ratio!r}, expected a number in [0, 1)")
        for name in ("lr", "alpha"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise BeamLoraError(f"{name}={value!r}, expected a positive, finite number")
        if self.max_length < 8:
            raise BeamLoraError(f"max_length={self.max_length}, expected at least 8 tokens")
        if self.ablation != "none" and self.method != "beamlora":
            raise BeamLoraError(f"ablation={self.ablation!r} with method={self.method!r}: the ablations change "
                                "BeamLoRA's operations, expected method 'beamlora' (or ablation 'none')")
        if self.targets is not None and ALL_LINEAR in self.targets and len(self.targets) > 1:
            raise BeamLoraError(f"targets={self.targets!r}: {ALL_LINEAR!r} stands alone, expected it or module names")
        # The BeamLoRA fields (p_init, Δt, ablation, seed, ...) are checked now, whatever the method, so
        # a bad option fails before anything is written (with epochs, the steps are checked once resolved).
        self.beamlora_config(None)

    @property
    def peft_targets(self) -> list[str] | str | None:
        """``target_modules`` as PEFT takes it: the string ``"all-linear"`` or a list of names (None: the model's)."""
        return ALL_LINEAR if self.targets == [ALL_LINEAR] else self.targets

    def beamlora_config(self, output_dir: Path | None):
        # Before resolve_steps an epochs-based run has no step count: the other fields are checked against a
        # stand-in length that end_step and Δt fit in.
        total = self.steps if self.steps is not None else max(self.delta_t, self.end_step or 1)
        return BeamLoraConfig(p_init=self.p_init, delta_t=self.delta_t, total_steps=total, end_step=self.end_step,
                              temperature=self.temperature, scope=self.scope, optimizer_state=self.optimizer_state,
                              ablation=self.ablation, seed=self.seed, snapshot_every=self.snapshot_every,
                              output_dir=output_dir)

    @property
    def warmup(self) -> int:
        """Warm-up in optimizer steps: ``warmup_steps``, or ``ceil(warmup_ratio · steps)`` (as transformers rounds)."""
        if self.warmup_ratio is not None:
            return math.ceil(self.warmup_ratio * self.steps)
        return self.warmup_steps or 0


def steps_per_epoch(train_examples: int, batch_size: int) -> int:
    """Optimizer steps in one pass over ``train_examples`` with a global batch of ``batch_size`` (the last one short)."""
    return -(-train_examples // batch_size)


def resolve_steps(config: TrainConfig, train_examples: int) -> TrainConfig:
    """``config`` with its steps fixed: from ``epochs`` and the training split's size where given, else as is.

    An epochs-based BeamLoRA run shorter than one Δt is refused (no operation could run)."""
    if config.epochs is None:
        return config
    per_epoch = steps_per_epoch(train_examples, config.batch_size)
    steps = max(1, math.ceil(per_epoch * config.epochs - 1e-9))
    if config.method == "beamlora" and steps < config.delta_t:
        raise BeamLoraError(f"epochs={config.epochs} gives {steps} optimizer steps ({train_examples} training examples, "
                            f"batch {config.batch_size}: {per_epoch} an epoch), fewer than one delta_t={config.delta_t}; "
                            "expected at least Δt steps so that BeamLoRA can operate")
    return _with_steps(config, steps)


def _with_steps(config: TrainConfig, steps: int) -> TrainConfig:
    # The run records both: epochs (what was asked) and steps (what it resolved to). replace() would refuse both.
    resolved = dataclasses.replace(config, epochs=None, steps=steps)
    resolved.epochs = config.epochs
    return resolved
