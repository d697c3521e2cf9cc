"""``BeamLoraController``: counts optimizer steps and runs assess → prune → expand every Δt.

Timeline for Δt = 100: the historical snapshot (A, B and their Adam moments) is taken at step
50, the operation runs at step 100 and copies a source's step-50 values into each pruned slot,
the next snapshot is at 150, and so on until ``end_step`` (p reaches 1) or until fewer than Δt
steps remain.

Ablations (``BeamLoraConfig.ablation``, the paper's Table 3) change one part each: "no-expansion"
zeroes the pruned slots for good instead of refilling them, "random" draws which slots are pruned
and which feed them, "fixed-p" holds p at p_init. Every event records the ablation it ran under.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from beamlora.config import BeamLoraConfig
from beamlora.errors import BeamLoraError
from beamlora.files import writing
from beamlora.layer import ScoredLayer, add_scores, rank_weights
from beamlora.snapshots import is_main_process, snapshot_dir, write_adapter
from rankscope.constants import EVENTS_FILE
from rankscope.io.atomic import write_text
from rankscope.maths.schedule import is_operation_step, plan_operation, top_p
from rankscope.tasks import sharded

MOMENTS = ("exp_avg", "exp_avg_sq")


def _unwrap(optimizer: Any) -> torch.optim.Optimizer:
    # accelerate's AcceleratedOptimizer (what Trainer hands to callbacks) wraps the real one.
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


@dataclass
class History:
    """One layer's parameters and Adam moments, taken Δt/2 steps before an operation."""

    A: torch.Tensor
    B: torch.Tensor
    moments: dict[str, torch.Tensor]  # "A.exp_avg", "A.exp_avg_sq", "B.exp_avg", "B.exp_avg_sq"


class BeamLoraController:
    """Owns the score vectors of a PEFT LoRA model and performs BeamLoRA's operations.

    Create it with :func:`beamlora.attach`, then build the optimizer (so it sees the scores),
    and call :meth:`step` after every ``optimizer.step()``.
    """

    def __init__(self, model: nn.Module, config: BeamLoraConfig):
        self.model = model
        self.config = config
        self.layers: list[ScoredLayer] = add_scores(model, config.temperature)
        self.step_count = 0
        self.history: dict[str, History] | None = None
        self.events: list[dict[str, Any]] = []
        self.dead: dict[str, set[int]] = {}  # "no-expansion": slots pruned for good, per module
        self._checked_optimizer = False
        # rankscope.monitor (any trainer's rank telemetry) reads w, the scores and the last operation from here.
        model.rankscope_telemetry = self.telemetry

    # ------------------------------------------------------------------ schedule

    @property
    def end_step(self) -> int:
        return self.config.resolved_end_step

    def p(self, step: int) -> float:
        return top_p(step, self.config.p_init, self.end_step, dynamic=self.config.ablation != "fixed-p")

    def operation_due(self, step: int) -> bool:
        """At multiples of Δt, before end_step, with at least Δt steps left in the run."""
        c = self.config
        return is_operation_step(step, c.delta_t, self.end_step, c.total_steps) and self.p(step) < 1.0

    def operation_steps(self) -> list[int]:
        return [t for t in range(self.config.delta_t, self.config.total_steps + 1, self.config.delta_t)
                if self.operation_due(t)]

    def history_due(self, step: int) -> bool:
        if self.config.ablation == "no-expansion":
            return False  # nothing is refilled, so no historical values are needed
        half = self.config.delta_t // 2
        return self.operation_due(step + half)

    # ------------------------------------------------------------------ the step

    def scores(self) -> list[nn.Parameter]:
        """The score vectors: the optimizer must hold them (create it after ``attach``)."""
        return [layer.score for layer in self.layers]

    def step(self, optimizer: Any) -> list[dict[str, Any]]:
        """Call once after every ``optimizer.step()``. Returns the events of this step (if any)."""
        optimizer = _unwrap(optimizer)
        if not self._checked_optimizer:
            self._check_optimizer(optimizer)
        self.step_count += 1
        t = self.step_count
        new_events: list[dict[str, Any]] = []
        if self.history_due(t):
            self.history = self._take_history(optimizer)
        if self.operation_due(t):
            new_events = self._operate(optimizer, t)
        if self.config.snapshot_every and t % self.config.snapshot_every == 0 and self.config.output_dir:
            self.save_snapshot()
        return new_events

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [layer.name for layer in self.layers if id(layer.score) not in held]
        if missing:
            raise BeamLoraError(f"the optimizer does not hold the BeamLoRA score of {missing[0]} "
                                f"({len(missing)} of {len(self.layers)} missing); create the optimizer after "
                                "beamlora.attach(model, config)")
        self._checked_optimizer = True

    def _moment(self, optimizer: torch.optim.Optimizer, param: nn.Parameter, key: str, where: str) -> torch.Tensor:
        state = optimizer.state.get(param, {})
        if key not in state:
            raise BeamLoraError(f"{type(optimizer).__name__} keeps no {key!r} state for {where}; BeamLoRA copies "
                                "Adam moments, expected torch.optim.Adam or AdamW holding the LoRA parameters")
        return state[key]

    def _take_history(self, optimizer: torch.optim.Optimizer) -> dict[str, History]:
        history = {}
        for layer in self.layers:
            moments = {f"{side}.{key}": self._moment(optimizer, param, key, f"{layer.name}.lora_{side}").detach().clone()
                       for side, param in (("A", layer.A), ("B", layer.B)) for key in MOMENTS}
            history[layer.name] = History(layer.A.detach().clone(), layer.B.detach().clone(), moments)
        return history

    def _importances(self) -> list[np.ndarray]:
        """softmax(s/T) per layer, identical on every process of a distributed run (one transfer to the host)."""
        with torch.no_grad():
            scores = [layer.score.detach() for layer in self.layers]
            if sharded.any_sharded(scores):  # FSDP2: every process gathers the (tiny) score vectors, one collective
                flat = torch.cat([s.float() for s in sharded.full_tensors(scores)])
            else:
                flat = torch.cat([s.float() for s in scores])
                if torch.distributed.is_available() and torch.distributed.is_initialized():
                    # DDP keeps the scores equal already; broadcasting rank 0's makes the decision provably shared.
                    torch.distributed.broadcast(flat, src=0)
            host = flat.double().cpu()
            out, start = [], 0
            for layer in self.layers:
                s = host[start:start + layer.rank]
                start += layer.rank
                out.append(torch.softmax(s / layer.temperature, dim=0).numpy())
        return out

    def _rng(self, t: int) -> np.random.Generator:
        """The "random" ablation's draws for the operation at step t: a private Generator, the same
        on every process and after a resume (seeded from the config's seed and the step alone)."""
        return np.random.default_rng([self.config.seed, t])

    def _operate(self, optimizer: torch.optim.Optimizer, t: int) -> list[dict[str, Any]]:
        ablation = self.config.ablation
        expand = ablation != "no-expansion"
        if expand and self.history is None:
            raise BeamLoraError(f"step {t}: no historical snapshot to expand from (the controller missed step "
                                f"{t - self.config.delta_t // 2}); call controller.step after every optimizer step")
        importances = self._importances()
        for layer, values in zip(self.layers, importances):
            if not np.isfinite(values).all():
                raise BeamLoraError(f"step {t}: the BeamLoRA scores of {layer.name} are not finite (the run has "
                                    "diverged); expected finite scores to assess the ranks (a smaller lr usually helps)")
        p = self.p(t)
        live = [self._live(layer) for layer in self.layers]
        plans = plan_operation(importances, p, self.config.scope, self.config.max_fraction, live=live,
                               rng=self._rng(t) if ablation == "random" else None)
        events = []
        if expand:
            self._expand(optimizer, [(layer, self.history[layer.name], slots, sources)
                                     for layer, (slots, sources) in zip(self.layers, plans) if slots.size])
        for layer, values, (slots, sources) in zip(self.layers, importances, plans):
            if not expand:
                sources = sources[:0]
                if slots.size:
                    self._prune_for_good(optimizer, layer, slots)
            events.append({"step": t, "p": p, "module": layer.name, "pruned": slots.tolist(),
                           "sources": sources.tolist(), "importance": (values * layer.rank).tolist(),
                           "ablation": ablation})
        self.history = None  # the next operation expands from a fresh snapshot
        self.events.extend(events)
        self.write_events()
        return events

    def _live(self, layer: ScoredLayer) -> np.ndarray:
        mask = np.ones(layer.rank, dtype=bool)
        mask[sorted(self.dead.get(layer.name, ()))] = False
        return mask

    def _prune_for_good(self, optimizer: torch.optim.Optimizer, layer: ScoredLayer, slots: np.ndarray) -> None:
        """The "no-expansion" ablation: a_i = b_i = 0 and their Adam moments too. Each one's gradient is
        proportional to the other, so the slot gets no gradient, and with no momentum left Adam does not
        move it: it stays exactly zero for the rest of the run (weight decay keeps zero at zero).

        Rows of A (and its moments) are written by the process that holds them; B's columns are local to
        every process (FSDP2 splits B along its output rows)."""
        dst = sharded.index_tensor(slots, sharded.local(layer.B).device)
        with torch.no_grad():
            sharded.set_rows(layer.A, slots, 0.0)
            sharded.columns(layer.B)[:, dst] = 0
            for key in (*MOMENTS, "max_exp_avg_sq"):  # max_exp_avg_sq: AMSGrad
                if key in optimizer.state.get(layer.A, {}):
                    sharded.set_rows(optimizer.state[layer.A][key], slots, 0.0)
                if key in optimizer.state.get(layer.B, {}):
                    sharded.columns(optimizer.state[layer.B][key])[:, dst] = 0
            self._reset_score_moments(optimizer, layer)
        self.dead.setdefault(layer.name, set()).update(int(i) for i in slots)

    @staticmethod
    def _reset_score_moments(optimizer: torch.optim.Optimizer, layer: ScoredLayer) -> None:
        for key in MOMENTS:  # the authors zero the score vector's moments after every operation
            state = optimizer.state.get(layer.score, {})
            if key in state:
                sharded.local(state[key]).zero_()

    def _expand(self, optimizer: torch.optim.Optimizer,
                work: list[tuple[ScoredLayer, History, np.ndarray, np.ndarray]]) -> None:
        """Refill each layer's pruned slots from its sources' historical values (and moments), then average
        each pair's scores.

        Everything an operation reads across processes (the source rows of the historical A and of its
        moments, the pair's scores) is gathered for all layers at once: under FSDP2 one ``all_reduce`` of
        those few rows (a pruned slot and its source may live on different processes); otherwise plain
        indexing. B's columns are local on every process. No value travels to the host.
        """
        mode = self.config.optimizer_state
        requests: list[tuple[torch.Tensor, np.ndarray]] = []
        for layer, history, slots, sources in work:
            requests.append((history.A, sources))
            if mode == "history":
                requests += [(history.moments[f"A.{key}"], sources) for key in MOMENTS]
            requests.append((layer.score.detach(), np.concatenate([slots, sources])))
        with torch.no_grad():
            rows = iter(sharded.gather_rows(requests))
            for layer, history, slots, sources in work:
                device = sharded.local(layer.B).device
                # Index arrays reach the device without a host sync (pinned, non-blocking on CUDA): no per-module wait.
                dst, src = sharded.index_tensor(slots, device), sharded.index_tensor(sources, device)
                # Historical values, not current ones: two identical ranks would never separate.
                sharded.set_rows(layer.A, slots, next(rows))
                sharded.columns(layer.B)[:, dst] = sharded.columns(history.B)[:, src]
                for key in MOMENTS:
                    state_A = self._moment(optimizer, layer.A, key, f"{layer.name}.lora_A")
                    state_B = sharded.columns(self._moment(optimizer, layer.B, key, f"{layer.name}.lora_B"))
                    if mode == "history":
                        sharded.set_rows(state_A, slots, next(rows))
                        state_B[:, dst] = sharded.columns(history.moments[f"B.{key}"])[:, src]
                    elif mode == "reset":
                        sharded.set_rows(state_A, slots, 0.0)
                        state_B[:, dst] = 0
                    elif not sharded.is_sharded(state_A):
                        # "official": the authors' boolean-mask copy_, which writes into a temporary copy. (Under
                        # FSDP2 it is left out: it changes nothing either way.)
                        mask = torch.zeros(layer.rank, dtype=torch.bool, device=dst.device)
                        mask[dst] = True
                        order = torch.argsort(dst)  # a boolean mask visits slots in ascending order
                        state_A[mask, :].copy_(history.moments[f"A.{key}"][src[order]])
                        state_B[:, mask].copy_(history.moments[f"B.{key}"][:, src[order]])
                pair = next(rows)  # s[dst] then s[src], whole on every process
                mean = (pair[:len(slots)] + pair[len(slots):]) / 2
                sharded.set_rows(layer.score, slots, mean)
                sharded.set_rows(layer.score, sources, mean)
                self._reset_score_moments(optimizer, layer)

    # ------------------------------------------------------------------ files

    def write_events(self) -> None:
        if self.config.output_dir and is_main_process():
            lines = "".join(json.dumps(event, allow_nan=False) + "\n" for event in self.events)
            path = Path(self.config.output_dir) / EVENTS_FILE
            with writing(path):
                write_text(path, lines)

    def save_snapshot(self, step: int | None = None) -> Path | None:
        """Write ``output_dir/step-NNNNNN/``: the plain adapter and the raw scores (rank 0 only)."""
        step = self.step_count if step is None else step
        if not self.config.output_dir:
            raise BeamLoraError("snapshots need config.output_dir, found None")
        if not (is_main_process() or sharded.any_sharded(self.model.parameters())):  # FSDP2: every process gathers
            return None
        return write_adapter(self.model, snapshot_dir(self.config.output_dir, step), self.layers, step)

    def export(self, path: str | os.PathLike) -> Path | None:
        """A plain PEFT LoRA adapter with w folded into A; vanilla ``PeftModel.from_pretrained`` loads it."""
        if not (is_main_process() or sharded.any_sharded(self.model.parameters())):  # FSDP2: every process gathers
            return None
        return write_adapter(self.model, path, self.layers, self.step_count, with_scores=False)

    def telemetry(self) -> dict[str, Any]:
        """Per-rank weights w and raw scores of every layer, and the ranks operated at the last operation.

        The duck-typed protocol of ``rankscope.monitor.TELEMETRY_ATTR``. Without sharding it is read on one
        process (no collective); under FSDP2 the monitor measures on every process, and so reads it on every one.
        """
        last = self.events[-1]["step"] if self.events else None
        operated = 0
        for event in reversed(self.events):
            if event["step"] != last:
                break
            operated += len(event["pruned"])
        with torch.no_grad():
            scores = self._full_scores()
            layers = {layer.module: {"weights": rank_weights(score, layer.temperature), "scores": score}
                      for layer, score in zip(self.layers, scores)}
        return {"method": "beamlora", "layers": layers, "ranks_operated": operated if last is not None else None,
                "operation_step": last}

    def _full_scores(self) -> list[torch.Tensor]:
        """Every layer's score vector whole (under FSDP2 one collective: call it on every process)."""
        scores = [layer.score.detach() for layer in self.layers]
        return sharded.full_tensors(scores) if sharded.any_sharded(scores) else scores

    def weights(self) -> dict[str, torch.Tensor]:
        """Current ``w = r · softmax(s / T)`` per module."""
        with torch.no_grad():
            return {layer.name: rank_weights(score, layer.temperature)
                    for layer, score in zip(self.layers, self._full_scores())}

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed run needs: step, scores, the pending historical snapshot, events (whole tensors:
        under FSDP2 call it on every process).

        The "random" ablation seeds a fresh Generator from (seed, step) at each operation, so there
        is no random state to save; "no-expansion"'s dead slots are read back from the events.
        """
        def whole(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: (v.full_tensor() if sharded.is_sharded(v) else v).detach().clone() for k, v in tensors.items()}

        history = None if self.history is None else {
            name: whole({"A": h.A, "B": h.B, **h.moments}) for name, h in self.history.items()}
        return {"step": self.step_count, "config": self.config.to_dict(),
                "scores": {layer.name: score.clone() for layer, score in zip(self.layers, self._full_scores())},
                "history": history, "events": json.dumps(self.events)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {layer.name for layer in self.layers}
        if set(state["scores"]) != names:
            extra = sorted(set(state["scores"]) ^ names)
            raise BeamLoraError(f"saved BeamLoRA state does not match this model: module {extra[0]} differs, "
                                "expected the same LoRA layers")
        self.step_count = int(state["step"])
        with torch.no_grad():
            for layer in self.layers:
                saved = sharded.shard_like(state["scores"][layer.name], layer.score)
                sharded.local(layer.score).copy_(sharded.local(saved))
        self.history = None
        if state["history"] is not None:  # whole tensors, split again as the live parameters are (FSDP2)
            by_name = {layer.name: layer for layer in self.layers}
            self.history = {}
            for name, h in state["history"].items():
                A, B = by_name[name].A, by_name[name].B
                moments = {k: sharded.shard_like(v, A if k.startswith("A.") else B) for k, v in h.items()
                           if k not in ("A", "B")}
                self.history[name] = History(sharded.shard_like(h["A"], A), sharded.shard_like(h["B"], B), moments)
        self.events = json.loads(state["events"])
        self.dead = {}
        if self.config.ablation == "no-expansion":  # the dead slots are the union of all pruned ones
            for event in self.events:
                self.dead.setdefault(event["module"], set()).update(event["pruned"])

    def detach(self) -> None:
        """Remove the forward hooks (the scores stay on the layers)."""
        for layer in self.layers:
            layer.remove()


def attach(model: nn.Module, config: BeamLoraConfig | None = None) -> BeamLoraController:
    """Add BeamLoRA scores to every LoRA layer of ``model``'s active adapter; returns the controller.

    Create the optimizer *after* this call so it holds the new score parameters, and call
    ``controller.step(optimizer)`` after every ``optimizer.step()`` (or use ``BeamLoraCallback``).
    """
    return BeamLoraController(model, config or BeamLoraConfig())
