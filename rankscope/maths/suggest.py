"""``rankscope suggest``: a rank per module, and a global r, from the spectrum of each update.

The rule (shared with ``rankscope resize``): a module's suggested rank is the smallest k whose top k
singular directions hold ``energy`` of ΔW's energy Σσ² (its energy rank), never below ``module_min``.
Keeping k directions leaves the relative Frobenius error ``sqrt(1 − kept share)`` (Eckart–Young: no
rank-k update does better). The global r is the 90th percentile of the per-module ranks, so that nine
modules in ten keep at least ``energy`` at one uniform r; ``rank_pattern`` gives every module its own.

An energy threshold is conservative against a task metric (a module often needs fewer directions than
k95 to keep its accuracy), so a suggestion is a starting point to check on the task (``rankscope sweep``).
Where most modules need all of their rank, the suggestion is the opposite: try a larger r.

Pure functions on the analysis document's spectra (numpy only).
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

import numpy as np

from rankscope.constants import SUGGEST_SCHEMA
from rankscope.errors import RankscopeError
from rankscope.io.loading import Checkpoint, resolve_adapter
from rankscope.maths import importance as imp
from rankscope.maths.analysis import analyze_checkpoint

SCHEMA = SUGGEST_SCHEMA
GLOBAL_QUANTILE = 0.9  # the global r keeps `energy` in this share of modules
FULL_RANK_SHARE = 0.5  # more modules than this needing every direction: suggest a larger r
_PEFT_PREFIX = "base_model.model."


def check_energy(energy: float) -> float:
    if not (isinstance(energy, (int, float)) and math.isfinite(energy) and 0 < energy <= 1):
        raise RankscopeError(f"energy {energy!r}: expected a share of ΔW's energy in (0, 1], e.g. 0.95")
    return float(energy)


def module_rank(spectrum: Sequence[float], rank: int, *, energy: float | None = None, fixed: int | None = None,
                max_error: float | None = None, module_min: int = 1) -> int:
    """The rank one module keeps under exactly one rule: ``energy`` share, a ``fixed`` rank, or a ``max_error``.

    Never below ``module_min`` nor above the module's own rank; a zero update keeps ``module_min``.
    """
    rules = [x is not None for x in (energy, fixed, max_error)]
    if sum(rules) != 1:
        raise RankscopeError("choose exactly one rule: an energy share, a fixed rank or a maximum error")
    if energy is not None:
        k = imp.energy_rank(spectrum, energy)
    elif fixed is not None:
        k = fixed
    else:
        k = imp.rank_for_error(spectrum, max_error)
    return int(min(rank, max(module_min, k)))


def global_rank(ranks: Sequence[int]) -> int:
    """The 90th percentile of the per-module ranks (the higher of two neighbours, so always one of them)."""
    return int(np.quantile(np.asarray(ranks), GLOBAL_QUANTILE, method="higher"))


def _bare(name: str) -> str:
    """A PEFT ``rank_pattern`` key: the module path as PEFT's tuner names it (no wrapper prefix)."""
    return name.split("[", 1)[0].removeprefix(_PEFT_PREFIX)


def _alpha_for(scale: float, rank: int, rslora: bool) -> float:
    """The lora_alpha that gives ``scale`` at ``rank``: scale·r, or scale·√r under rsLoRA."""
    alpha = scale * (math.sqrt(rank) if rslora else rank)
    return round(alpha, 10)


def peft_fragment(modules: list[dict[str, Any]], ranks: list[int], r: int, rslora: bool) -> dict[str, Any]:
    """``LoraConfig`` fields giving each module its rank and keeping its trained scale (lora_alpha / r).

    ``lora_alpha`` keeps the most common scale at the global r; ``rank_pattern`` and ``alpha_pattern``
    list only the modules that differ from those defaults.
    """
    scales = [m["scale"] for m in modules]
    common = max(set(scales), key=scales.count)
    lora_alpha = _alpha_for(common, r, rslora)
    rank_pattern, alpha_pattern = {}, {}
    for m, k in zip(modules, ranks):
        if k != r:
            rank_pattern[_bare(m["name"])] = k
        alpha = _alpha_for(m["scale"], k, rslora)
        if alpha != lora_alpha:  # PEFT would give lora_alpha / k: not this module's trained scale
            alpha_pattern[_bare(m["name"])] = alpha
    fragment = {"r": r, "lora_alpha": lora_alpha, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    if rslora:
        fragment["use_rslora"] = True
    return fragment


def suggest(path: str | os.PathLike | Checkpoint, energy: float = 0.95, format: str | None = None,
            step: int | None = None) -> dict[str, Any]:
    """Suggested ranks for the adapter at ``path`` (a run folder: its final adapter, or the snapshot at ``step``);
    see the module doc. Returns ``rankscope/suggest-v1``."""
    energy = check_energy(energy)
    checkpoint = resolve_adapter(path, step, format)
    snapshot = analyze_checkpoint(checkpoint)
    modules = [m for m in snapshot["modules"] if m.get("spectrum") is not None]
    broken = [m["name"] for m in snapshot["modules"] if m.get("spectrum") is None]
    if not modules:
        raise RankscopeError(f"{checkpoint.path}: no module has a finite spectrum (all hold NaN or Inf): "
                             "nothing to suggest from")
    rows = []
    for m in modules:
        k_energy = imp.energy_rank(m["spectrum"], energy)
        rows.append({"name": m["name"], "rank": m["rank"], "scale": m["scale"], "energy_rank": k_energy,
                     "suggested": module_rank(m["spectrum"], m["rank"], energy=energy), "zero": k_energy == 0})
    live = [row for row in rows if not row["zero"]]
    full = [row for row in live if row["energy_rank"] == row["rank"]]
    current = max(m["rank"] for m in modules)
    reasons, notes = [], []
    if live and len(full) > FULL_RANK_SHARE * len(live):
        advice = "larger"
        for row in rows:
            row["suggested"] = 2 * row["rank"]
        r = 2 * current
        reasons.append(f"{len(full)} of {len(live)} modules need all of their rank to hold {energy:.0%} of ΔW's energy "
                       f"(k = r): the adapter uses all of its rank, so try a larger r (here 2× each module's rank, "
                       f"r = {r}) rather than a smaller one")
    else:
        r = global_rank([row["suggested"] for row in rows])
        advice = "smaller" if r < current else "keep"
        reasons.append(f"each module keeps the smallest k whose top singular directions hold {energy:.0%} of ΔW's "
                       f"energy (relative Frobenius error ≤ {math.sqrt(1 - energy):.3f}, the best any rank-k update "
                       "can do)")
        reasons.append(f"global r {r}: the {GLOBAL_QUANTILE:.0%} quantile of the per-module ranks, so "
                       f"{GLOBAL_QUANTILE:.0%} of the modules keep at least {energy:.0%} at one uniform r; rank_pattern "
                       "gives every module its own rank")
        if full:
            notes.append(f"{len(full)} module(s) need all of their rank ({', '.join(row['name'] for row in full[:3])}"
                         f"{', ...' if len(full) > 3 else ''}): a larger r may help there")
    for row, m in zip(rows, modules):
        # Growing a rank loses nothing; truncating loses the energy beyond the kept directions.
        row["error"] = imp.truncation_error(m["spectrum"], row["suggested"])
        row["energy_kept"] = 1.0 - row["error"] ** 2
    if broken:
        notes.append(f"{len(broken)} module(s) hold NaN or Inf and get no suggestion ({broken[0]}"
                     f"{', ...' if len(broken) > 1 else ''})")
    zero = [row for row in rows if row["zero"]]
    if zero:
        notes.append(f"{len(zero)} module(s) have a zero update (nothing learned there): they get rank 1 here; "
                     "consider removing them from target_modules")
    notes.append("an energy threshold is conservative against a task metric: check the suggestion on your task "
                 "(rankscope sweep, or rankscope resize --validate)")
    if any(m.method != "lora" for m in checkpoint.modules):
        notes.append("LoHa / LoKr modules: the ranks are those of the LoRA that rankscope resize writes from them "
                     "(ΔW's rank, out of the largest it can have), not a LoHa / LoKr r")
    uniform_errors = [imp.truncation_error(m["spectrum"], min(r, m["rank"])) for m in modules]
    ranks = [row["suggested"] for row in rows]
    rslora = bool((checkpoint.config or {}).get("use_rslora"))
    return {
        "schema": SCHEMA,
        "path": str(checkpoint.path),
        "format": checkpoint.format,
        "energy": energy,
        "advice": advice,
        "current_r": current,
        "global_r": r,
        "rule": f"per module: smallest k holding {energy:g} of Σσ²; global: {GLOBAL_QUANTILE:g} quantile of those k",
        "modules": rows,
        "energy_ranks": imp.band(row["energy_rank"] for row in rows),
        "full_rank_modules": len(full),
        "error": {"per_module": imp.band(row["error"] for row in rows), "at_global_r": imp.band(uniform_errors)},
        "peft": peft_fragment(modules, ranks, r, rslora),
        # kohya keeps alpha / r per module: the network_alpha that keeps each trained scale at its new rank.
        "kohya": {row["name"]: {"rank": k, "alpha": _alpha_for(row["scale"], k, False)} for row, k in zip(rows, ranks)},
        "reasons": reasons,
        "notes": notes,
    }


__all__ = ["SCHEMA", "suggest", "module_rank", "global_rank", "peft_fragment", "check_energy"]
