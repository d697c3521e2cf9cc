"""``BeamLoraConfig``: every knob of a BeamLoRA run, with the paper's and the authors' defaults."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BeamLoraError

SCOPES = ("global", "module")
OPTIMIZER_STATES = ("history", "official", "reset")


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
        seed: recorded with the run; the controller itself draws no random numbers.
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
    seed: int = 0
    snapshot_every: int | None = None
    output_dir: str | Path | None = None

    def __post_init__(self) -> None:
        checks = [
            (0.0 < self.p_init <= 1.0, f"p_init={self.p_init!r}, expected a number in (0, 1]"),
            (isinstance(self.delta_t, int) and self.delta_t >= 2, f"delta_t={self.delta_t!r}, expected an integer ≥ 2"),
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
            (self.snapshot_every is None or (isinstance(self.snapshot_every, int) and self.snapshot_every >= 1),
             f"snapshot_every={self.snapshot_every!r}, expected None or a positive integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise BeamLoraError(message)

    @property
    def resolved_end_step(self) -> int:
        return self.end_step if self.end_step is not None else (2 * self.total_steps) // 3

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["output_dir"] = None if self.output_dir is None else str(self.output_dir)
        return out
