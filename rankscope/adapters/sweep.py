"""``rankscope.sweep(...)``: prune ranks by importance and watch the metric (the paper's Figures 1 and 4).

For each fraction f, every adapted module loses its round(f·r) least (or most, or randomly
chosen) important ranks by its own importance: row i of A and column i of B are zeroed in place
on the loaded model, the model is evaluated, and the saved A and B are copied back, so nothing
is reloaded and the restore is bit-exact. A second family ("spectral") keeps each update's top
singular directions instead, written into the same r slots so no shape changes.

Importances come from the checkpoint with :func:`rankscope.importance.rank_importance`, so the
order is exactly the one ``rankscope analyze`` reports.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch

from rankscope.constants import SWEEP_SCHEMA as SCHEMA
from rankscope.errors import RankscopeError
from rankscope.io.documents import to_json
from rankscope.io.loading import Checkpoint, Series, resolve_adapter
from rankscope.maths.importance import rank_importance, truncated_factors, update_spectrum
from rankscope.maths.suggest import module_rank
from rankscope.progress import progress_bar
from rankscope.tasks.layers import LoraLayer, lora_layers

RANK_ORDERS = ("least", "most", "random")
ORDERS = RANK_ORDERS + ("spectral",)
DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(11))
# The compression view: each module keeps the directions holding this share of its energy (rankscope resize).
DEFAULT_ENERGIES = (0.8, 0.9, 0.95, 0.99)
_PEFT_PREFIX = "base_model.model."


# ----------------------------------------------------------------------------- which ranks


def drop_count(rank: int, fraction: float) -> int:
    """round(f·r), halves rounded up (0.5·5 → 3), robust to 0.3·10 = 3.0000000000000004."""
    return min(rank, int(math.floor(fraction * rank + 0.5 + 1e-9)))


def ranks_to_drop(importance: np.ndarray, fraction: float, order: str,
                  rng: np.random.Generator | None = None) -> np.ndarray:
    """Indices (sorted) of the round(f·r) ranks to zero in one module.

    ``least``/``most`` rank by ``importance`` (ties broken by index, so the choice is
    reproducible); ``random`` takes the first k of ``rng.permutation(r)``: with a fresh
    generator of the same seed for every fraction, the dropped sets grow nested.
    """
    importance = np.asarray(importance, dtype=np.float64).reshape(-1)
    k = drop_count(importance.size, fraction)
    if order == "least":
        chosen = np.argsort(importance, kind="stable")[:k]
    elif order == "most":
        chosen = np.argsort(-importance, kind="stable")[:k]
    elif order == "random":
        if rng is None:
            raise ValueError("order 'random' needs an rng")
        chosen = rng.permutation(importance.size)[:k]
    else:
        raise RankscopeError(f"unknown order {order!r}: expected one of {', '.join(RANK_ORDERS)}")
    return np.sort(chosen)


# ----------------------------------------------------------------------------- the model's LoRA layers


def _bare(name: str) -> tuple[str, str | None]:
    """Checkpoint or model name -> (name without PEFT's wrapper prefix, adapter named in [brackets])."""
    adapter = None
    if name.endswith("]") and "[" in name:
        name, adapter = name[:-1].split("[", 1)
    return name.removeprefix(_PEFT_PREFIX), adapter


def _layer_importance(layer: LoraLayer) -> np.ndarray:
    return rank_importance(layer.A.float().cpu().numpy(), layer.B.float().cpu().numpy(), layer.scale)


def match_checkpoint(layers: list[LoraLayer], checkpoint: Checkpoint) -> tuple[list[np.ndarray], list[str]]:
    """Each model layer's importance from its checkpoint module, checking the adapter fits the model.

    Returns the importances in the order of ``layers`` and notes for the reader. Raises a
    :class:`RankscopeError` naming the first module that is missing on either side or whose shapes differ.
    """
    by_bare = {_bare(layer.name): layer for layer in layers}
    by_name_only = {}
    for key, layer in by_bare.items():
        by_name_only.setdefault(key[0], []).append(layer)
    importances: dict[int, np.ndarray] = {}
    differ = []
    for module in checkpoint.modules:
        name, adapter = _bare(module.name)
        candidates = [by_bare[(name, adapter)]] if (name, adapter) in by_bare else by_name_only.get(name, [])
        if len(candidates) != 1:
            where = f"{len(candidates)} LoRA layers" if candidates else "no LoRA layer"
            raise RankscopeError(f"the adapter's module {module.name} matches {where} in the model: the adapter does not "
                                 "fit this model (expected the same target modules as the base model the adapter was "
                                 "loaded onto)")
        layer = candidates[0]
        if id(layer) in importances:
            raise RankscopeError(f"the adapter names {name} twice: expected one LoRA pair per module")
        model_shape = (layer.rank, layer.A.shape[1], layer.B.shape[0])
        if model_shape != (module.rank, module.in_features, module.out_features):
            raise RankscopeError(
                f"the adapter's module {module.name} has rank {module.rank}, in {module.in_features}, out "
                f"{module.out_features}, but the model's LoRA layer {layer.name} has rank {model_shape[0]}, in "
                f"{model_shape[1]}, out {model_shape[2]}: the adapter does not fit this model"
            )
        A, B = module.A, module.B
        values = rank_importance(A, B, module.scale, module.coefficients)
        if not np.isfinite(values).all():
            raise RankscopeError(f"the adapter's module {module.name} holds NaN or Inf: its ranks cannot be ordered")
        importances[id(layer)] = values
        live_A, live_B = layer.A.float().cpu().numpy(), layer.B.float().cpu().numpy()
        if not (np.allclose(live_A, A, rtol=1e-2, atol=1e-6) and np.allclose(live_B, B, rtol=1e-2, atol=1e-6)):
            differ.append(module.name)
    unmatched = [layer.name for layer in layers if id(layer) not in importances]
    if unmatched:
        raise RankscopeError(f"the model's LoRA layer {unmatched[0]} has no module in the adapter "
                             f"({len(unmatched)} such layers): the adapter does not fit this model")
    notes = []
    if differ:
        notes.append(f"the adapter's weights differ from the model's loaded LoRA weights in {len(differ)} modules "
                     f"(first: {differ[0]}): ranks are ordered by the adapter's importances")
    return [importances[id(layer)] for layer in layers], notes


# ----------------------------------------------------------------------------- masking


class Masker:
    """Zero ranks (or truncate spectra) of every LoRA layer in place, and put the weights back bit-exactly."""

    def __init__(self, layers: list[LoraLayer]):
        self.layers = layers
        # One saved copy of every A and B: restoring with copy_ is exact whatever was written.
        self._saved = [(layer.A.clone(), layer.B.clone()) for layer in layers]
        self._dirty = [False] * len(layers)
        self._svd: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def drop(self, index: int, ranks: np.ndarray) -> None:
        if len(ranks) == 0:
            return
        layer = self.layers[index]
        idx = torch.as_tensor(ranks, dtype=torch.long, device=layer.A.device)
        layer.A.index_fill_(0, idx, 0)
        layer.B.index_fill_(1, idx, 0)
        self._dirty[index] = True

    @torch.no_grad()
    def keep_spectral(self, index: int, keep: int) -> None:
        """Replace the update by its best rank-``keep`` approximation (nothing to do when keep = r)."""
        layer = self.layers[index]
        if keep >= layer.rank:
            return
        if index not in self._svd:  # once per module: the SVD of the original update
            A0, B0 = self._saved[index]
            A_full, B_full, _ = truncated_factors(A0.double().cpu().numpy(), B0.double().cpu().numpy(), layer.rank)
            # Directions beyond min(out, in, r) do not exist: their slots stay zero.
            A_pad, B_pad = torch.zeros_like(A0), torch.zeros_like(B0)
            A_pad[:A_full.shape[0]] = torch.from_numpy(A_full).to(A0)
            B_pad[:, :B_full.shape[1]] = torch.from_numpy(B_full).to(B0)
            self._svd[index] = (A_pad, B_pad)
        A_full, B_full = self._svd[index]
        layer.A.zero_()
        layer.B.zero_()
        layer.A[:keep] = A_full[:keep]
        layer.B[:, :keep] = B_full[:, :keep]
        self._dirty[index] = True

    @torch.no_grad()
    def restore(self) -> None:
        for index, dirty in enumerate(self._dirty):
            if dirty:
                A0, B0 = self._saved[index]
                self.layers[index].A.copy_(A0)
                self.layers[index].B.copy_(B0)
                self._dirty[index] = False

    def is_restored(self) -> bool:
        return all(torch.equal(layer.A, A0) and torch.equal(layer.B, B0)
                   for layer, (A0, B0) in zip(self.layers, self._saved))


# ----------------------------------------------------------------------------- results


@dataclass
class SweepPoint:
    order: str  # "least", "most", "random", "spectral" or "energy"
    fraction: float  # share of all ranks removed (per module for the first four, overall for "energy")
    seed: int | None
    value: float
    params_kept: float | None = None  # share of the adapter's LoRA parameters still in use: Σ k·(in+out) / Σ r·(in+out)
    energy: float | None = None  # "energy" points: the share of each module's Σσ² kept


@dataclass
class SweepResult:
    metric: str
    baseline: float
    points: list[SweepPoint]
    higher_is_better: bool = True
    modules: int = 0
    ranks: list[int] = field(default_factory=list)
    adapter: str | None = None
    notes: list[str] = field(default_factory=list)
    restored_value: float | None = None  # the metric re-measured after the sweep (None if not checked)
    evaluations: int = 0  # evaluate() calls, baseline and check included

    def curve(self, order: str, seed: int | None = None) -> list[tuple[float, float]]:
        return [(p.fraction, p.value) for p in self.points if p.order == order and (seed is None or p.seed == seed)]

    def value(self, order: str, fraction: float) -> float | None:
        """The point's value, averaged over seeds for ``random``; None if the sweep has no such point."""
        values = [p.value for p in self.points if p.order == order and abs(p.fraction - fraction) < 1e-12]
        return float(np.mean(values)) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "metric": self.metric,
            "baseline": self.baseline,
            "higher_is_better": self.higher_is_better,
            "adapter": self.adapter,
            "modules": self.modules,
            "ranks": self.ranks,
            "restored_value": self.restored_value,
            "evaluations": self.evaluations,
            "summary": self.summary_line(),
            "notes": self.notes,
            "points": [{"order": p.order, "fraction": p.fraction, "seed": p.seed, "value": p.value,
                        "params_kept": p.params_kept, "energy": p.energy} for p in self.points],
        }

    def to_json(self, indent: int | None = 1) -> str:

        return to_json(self.to_dict(), indent=indent)

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["order", "fraction", "seed", "value", "params_kept", "energy"])
        for p in self.points:
            writer.writerow([p.order, repr(p.fraction), "" if p.seed is None else p.seed, repr(p.value),
                             "" if p.params_kept is None else repr(p.params_kept), "" if p.energy is None else p.energy])
        return buffer.getvalue()

    def _cost(self, value: float) -> str:
        """How much worse ``value`` is than the baseline, in points for accuracies."""
        worse = (self.baseline - value) if self.higher_is_better else (value - self.baseline)
        if self.metric in ("accuracy", "exact_match") and -1e-9 <= self.baseline <= 1 + 1e-9:
            return f"{_fmt(worse * 100)} points"
        return f"{_fmt(worse)}"

    def summary_line(self) -> str:
        """e.g. "pruning the least important 50% of ranks costs 0.4 points; the most important 10% costs 31;
        keeping 95% of each module's energy (34% of the parameters) costs 0.2 points"."""
        swept = sorted({p.fraction for p in self.points if p.fraction > 0 and p.order != "energy"})
        inner = [f for f in swept if f < 1] or swept
        tail = f"{self.metric} {_fmt(self.baseline)} unpruned" + ("" if self.higher_is_better else ", lower is better")
        have = {p.order for p in self.points}
        parts = []
        for order, target, words in (("least", 0.5, "the least important {} of ranks"), ("most", 0.1, "the most important {}"),
                                     ("random", 0.5, "a random {}"), ("spectral", 0.5, "the weakest {} of singular directions")):
            if order in have and inner:
                f = min(inner, key=lambda x: (abs(x - target), x))
                parts.append(words.format(f"{f * 100:.0f}%") + f" costs {self._cost(self.value(order, f))}")
        line = "pruning " + "; ".join(parts) if parts else ""
        energy = {p.energy: p for p in self.points if p.order == "energy"}
        if 0.95 in energy:
            e = energy[0.95]
            line += ("; " if line else "") + (f"keeping 95% of each module's energy ({e.params_kept:.0%} of the "
                                              f"parameters) costs {self._cost(e.value)}")
        return f"{line} ({tail})" if line else f"no fraction above 0 was swept ({tail})"



def _fmt(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "n/a"
    x += 0.0  # -0.0 prints as 0
    return f"{x:.2g}" if abs(x) < 1 else f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


# ----------------------------------------------------------------------------- the sweep


def _plan(fractions: Sequence[float], orders: Sequence[str], seeds: Sequence[int]) -> list[tuple[str, float, int | None]]:
    plan = []
    for order in orders:
        for seed in (seeds if order == "random" else [None]):
            plan += [(order, f, seed) for f in fractions]
    return plan


def _check_fractions(fractions: Iterable[float]) -> list[float]:
    out = []
    for f in fractions:
        f = float(f)
        if not 0.0 <= f <= 1.0:
            raise RankscopeError(f"fraction {f:g} is outside [0, 1]: expected fractions of each module's ranks to prune")
        out.append(f)
    if not out:
        raise RankscopeError("no fractions given: expected for example 0,0.1,...,1")
    return sorted(set(out))


def _energy_drops(layers: list[LoraLayer], energies: Sequence[float]) -> dict[float, list[int]]:
    """Per energy share f: how many directions each layer drops when it keeps the fewest holding f of its energy."""

    if not energies:
        return {}
    spectra = [update_spectrum(layer.A.double().cpu().numpy(), layer.B.double().cpu().numpy()) for layer in layers]
    return {f: [layer.rank - module_rank(s, layer.rank, energy=f) for layer, s in zip(layers, spectra)] for f in energies}


def _built_task(model_spec: str | os.PathLike | None, adapter: Any, step: int | None, data: str | None,
                metric: str | None, examples: int | None, device: str | None, precision: str | None,
                batch_size: int | None) -> tuple[Checkpoint, Any]:
    """The checkpoint and ``rankscope sweep``'s evaluation of it (base model loaded on the asked device and dtype)."""
    from pathlib import Path

    from rankscope.tasks.evaluate import build_evaluation
    from rankscope.tasks.placement import resolve_placement
    from rankscope.tasks.runconfig import read_run_config

    placement = resolve_placement(device, precision, batch_size)  # before anything loads
    if adapter is None:
        raise RankscopeError("a model spec needs the adapter: expected sweep(model_spec, adapter_path, ...)")
    checkpoint = resolve_adapter(adapter, step)
    folder = Path(adapter) if isinstance(adapter, (str, os.PathLike)) else None
    run_config = read_run_config(folder) if folder is not None and folder.is_dir() else None
    spec = None if model_spec is None else str(model_spec)
    return checkpoint, build_evaluation(checkpoint, spec, data, metric, examples, run_config, placement)


def sweep(model: torch.nn.Module | str | os.PathLike | None, adapter: str | os.PathLike | Checkpoint | Series | None,
          evaluate: Callable[[torch.nn.Module], float] | None = None, fractions: Sequence[float] = DEFAULT_FRACTIONS,
          orders: Sequence[str] = RANK_ORDERS, seeds: int | Sequence[int] = 3, spectral: bool = True,
          progress: bool | None = None, metric: str | None = None, higher_is_better: bool = True,
          step: int | None = None, check_restore: bool = True,
          energies: Sequence[float] = DEFAULT_ENERGIES, *, data: str | None = None, examples: int | None = None,
          device: str | None = None, precision: str | None = None, batch_size: int | None = None) -> SweepResult:
    """Prune each module's least / most / random ranks (and spectral directions) at each fraction and evaluate.

    ``model`` is either a loaded model with ``evaluate``, or, as ``rankscope sweep`` does, a base model spec
    (``"minilm"``, ``"smollm2"``, a folder, a hub id; None: a run folder's own) without ``evaluate``: the base
    is then loaded on ``device`` (auto, cpu, cuda, mps) in ``precision`` (fp32, bf16, fp16) and evaluated
    with ``data``, ``metric``, ``examples`` and ``batch_size`` as the command's options. A loaded model stays
    where it is: ``device``, ``precision`` and ``batch_size`` are refused with it.

    ``energies`` adds the compression view: for each share f, every module keeps the fewest singular
    directions holding f of its energy (what ``rankscope resize --energy f`` writes), and each point records
    the share of the adapter's parameters kept (so do all other points).

    ``model`` carries the adapter's LoRA layers (a PeftModel, or any model whose layers have
    lora_A/lora_B); ``adapter`` is the checkpoint it was loaded from (path, run folder, Checkpoint),
    or None to rank by the model's own LoRA weights. ``evaluate(model) -> float`` must be
    deterministic: the model is put in eval mode, and identical masks (f=0, f=1 for every order)
    are evaluated once. Masking is in place, under no_grad, and every weight is restored bit-exactly.
    """
    if not isinstance(model, torch.nn.Module):
        if evaluate is not None:
            raise RankscopeError("evaluate is given but model is not a loaded model: expected a torch module with "
                                 "evaluate, or a base model spec without it")
        adapter, task = _built_task(model, adapter, step, data, metric, examples, device, precision, batch_size)
        model, evaluate, metric, higher_is_better = task.model, task.evaluate, task.metric, task.higher_is_better
    elif any(v is not None for v in (device, precision, batch_size, data, examples)):
        raise RankscopeError("device, precision, batch_size, data and examples apply when rankscope loads the base "
                             "model: expected a base model spec (e.g. sweep('smollm2', adapter, device='cuda')), or "
                             "move and cast a loaded model yourself")
    elif evaluate is None:
        raise RankscopeError("a loaded model needs evaluate(model) -> float")
    orders = list(dict.fromkeys(list(orders) + (["spectral"] if spectral else [])))
    for order in orders:
        if order not in ORDERS:
            raise RankscopeError(f"unknown order {order!r}: expected some of {', '.join(ORDERS)}")
    fractions = _check_fractions(fractions)
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if "random" in orders and not seed_list:
        raise RankscopeError("order 'random' needs at least one seed")
    layers = lora_layers(model, strict=True)
    if not layers:
        raise RankscopeError(f"{type(model).__name__} has no LoRA layers: expected a PeftModel with the adapter loaded")
    notes: list[str] = []
    checkpoint = None
    if adapter is not None:
        checkpoint = resolve_adapter(adapter, step)
        importances, notes = match_checkpoint(layers, checkpoint)
        if "spectral" in orders and any(m.E is not None for m in checkpoint.modules):
            # AdaLoRA's update is B diag(E) A: truncating B A alone would not be its spectrum.
            orders.remove("spectral")
            notes.append("AdaLoRA adapter: the spectral family is skipped (its update is B·diag(E)·A)")
    else:
        importances = [_layer_importance(layer) for layer in layers]
    metric = metric or getattr(evaluate, "__name__", None) or "metric"
    if metric == "<lambda>":
        metric = "metric"

    was_training = model.training
    model.eval()
    masker = Masker(layers)
    cache: dict[Any, float] = {}
    evaluations = 0

    def measure() -> float:
        nonlocal evaluations
        evaluations += 1
        with torch.no_grad():
            value = evaluate(model)
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RankscopeError(f"evaluate returned {type(value).__name__} {value!r}: expected a number") from None

    unpruned = ("rank", tuple(() for _ in layers))
    everything = ("rank", tuple(tuple(range(layer.rank)) for layer in layers))
    widths = np.array([layer.A.shape[1] + layer.B.shape[0] for layer in layers], dtype=np.float64)
    full = float(sum(layer.rank * w for layer, w in zip(layers, widths)))

    def kept(drops: Sequence[int]) -> float:
        return float(sum((layer.rank - d) * w for layer, d, w in zip(layers, drops, widths)) / full)

    energy_drops = _energy_drops(layers, _check_fractions(energies) if energies else [])
    points: list[SweepPoint] = []
    try:
        baseline = cache[unpruned] = measure()
        plan = _plan(fractions, orders, seed_list) + [("energy", f, None) for f in energy_drops]
        with progress_bar(len(plan), progress, "sweeping", "point") as bar:
            for order, fraction, seed in plan:
                if order in ("spectral", "energy"):
                    drops = (energy_drops[fraction] if order == "energy"
                             else [drop_count(layer.rank, fraction) for layer in layers])
                    key = (unpruned if not any(drops) else everything if all(d == layer.rank for d, layer in zip(drops, layers))
                           else ("spectral", tuple(drops)))
                else:
                    chosen = [ranks_to_drop(imp, fraction, order,
                                            np.random.default_rng([seed, i]) if order == "random" else None)
                              for i, imp in enumerate(importances)]
                    drops = [len(c) for c in chosen]
                    key = ("rank", tuple(tuple(c.tolist()) for c in chosen))
                if key not in cache:
                    try:
                        for i, layer in enumerate(layers):
                            if order in ("spectral", "energy"):
                                masker.keep_spectral(i, layer.rank - drops[i])
                            else:
                                masker.drop(i, chosen[i])
                        cache[key] = measure()
                    finally:
                        masker.restore()
                if order == "energy":
                    share = sum(drops) / sum(layer.rank for layer in layers)  # of all ranks, removed
                    points.append(SweepPoint(order, share, None, cache[key], kept(drops), fraction))
                else:
                    points.append(SweepPoint(order, fraction, seed, cache[key], kept(drops)))
                bar.update(1)
        restored_value = measure() if check_restore else None
    finally:
        masker.restore()
        model.train(was_training)
    if not masker.is_restored():  # cannot happen through the masker; evaluate itself changed the LoRA weights
        notes.append("the LoRA weights differ from the originals after the sweep: evaluate() must not train the model")
    if restored_value is not None and restored_value != baseline:
        notes.append(f"the metric after restoring ({restored_value!r}) differs from the baseline ({baseline!r}) although "
                     "the weights are identical: evaluate() is not deterministic (dropout, sampling, shuffling?)")
    return SweepResult(
        metric=metric, baseline=baseline, points=points, higher_is_better=higher_is_better, modules=len(layers),
        ranks=sorted({layer.rank for layer in layers}),
        adapter=str(checkpoint.path) if checkpoint is not None else None, notes=notes,
        restored_value=restored_value, evaluations=evaluations,
    )


__all__ = ["SCHEMA", "ORDERS", "RANK_ORDERS", "DEFAULT_FRACTIONS", "DEFAULT_ENERGIES", "sweep", "SweepResult", "SweepPoint",
           "ranks_to_drop", "drop_count", "lora_layers", "LoraLayer", "match_checkpoint",
           "resolve_adapter", "Masker"]
