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

from . import importance as imp
from .analysis import analyze_checkpoint
from .errors import RankscopeError
from .loading import Checkpoint, Series, discover

SCHEMA = "rankscope/suggest-v1"
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


def _load(path: str | os.PathLike, format: str | None) -> Checkpoint:
    """The adapter to suggest for: a checkpoint, or a run's final adapter (else its last snapshot)."""
    found = discover(path, format)
    if isinstance(found, Series):
        if found.final is None and not found.snapshots:  # a rank trace alone: no adapter configuration to adapt
            raise RankscopeError(f"{path} holds a rank trace but no adapter: expected an adapter folder, a run's "
                                 "final adapter or a snapshot (the suggestion is written for the adapter's format)")
        return (found.final or found.snapshots[-1]).load()
    return found.load()


def suggest(path: str | os.PathLike | Checkpoint, energy: float = 0.95, format: str | None = None) -> dict[str, Any]:
    """Suggested ranks for the adapter at ``path`` (see the module doc); returns ``rankscope/suggest-v1``."""
    energy = check_energy(energy)
    checkpoint = path if isinstance(path, Checkpoint) else _load(path, format)
    snapshot = analyze_checkpoint(checkpoint)
    modules = [m for m in snapshot["modules"] if m.get("spectrum") is not None]
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
    zero = [row for row in rows if row["zero"]]
    if zero:
        notes.append(f"{len(zero)} module(s) have a zero update (nothing learned there): they get rank 1 here; "
                     "consider removing them from target_modules")
    notes.append("an energy threshold is conservative against a task metric: check the suggestion on your task "
                 "(rankscope sweep, or rankscope resize --validate)")
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


def _config_lines(result: dict[str, Any]) -> list[str]:
    """Ready-to-paste configuration in the words of the tool that made the adapter."""
    peft = result["peft"]
    fmt = result["format"]
    if fmt in ("peft", "diffusers-peft", "torchtune"):
        args = ", ".join(f"{key}={value!r}" for key, value in peft.items())
        return [f"  PEFT           LoraConfig({args})"]
    if fmt == "mlx":
        scale = peft["lora_alpha"] / peft["r"]
        return [f"  mlx-lm         \"lora_parameters\": {{\"rank\": {peft['r']}, \"scale\": {scale:g}}}   "
                "(mlx-lm takes one rank for all modules; rank_pattern below is per module)",
                f"  rank_pattern   {peft['rank_pattern']!r}"]
    kohya = result["kohya"]
    if len({(v["rank"], v["alpha"]) for v in kohya.values()}) == 1:
        v = next(iter(kohya.values()))
        return [f"  kohya          all {len(kohya)} modules: network_dim {v['rank']}, network_alpha {v['alpha']:g}"]
    return ["  kohya          " + ", ".join(f"{name}: dim {v['rank']} alpha {v['alpha']:g}" for name, v in kohya.items())]


def suggest_lines(result: dict[str, Any]) -> list[str]:
    """The terminal summary: the rule, the per-module and global ranks with their errors, ready-to-paste configs."""
    rows = result["modules"]
    ks = [row["suggested"] for row in rows]
    energy, err = result["energy"], result["error"]
    k = result["energy_ranks"]
    lines = [f"suggest: {result['path']} ({result['format']}, {len(rows)} modules, r = {result['current_r']}) for "
             f"{energy:.0%} of ΔW's energy",
             f"  energy ranks   median {k['median']:g} (range {k['min']:g}–{k['max']:g}) directions hold {energy:.0%}; "
             f"k = r in {result['full_rank_modules']} of {len(rows)} modules",
             f"  suggested      rank per module median {np.median(ks):g} (range {min(ks)}–{max(ks)}); relative "
             f"Frobenius error median {err['per_module']['median']:.3f}, worst {err['per_module']['max']:.3f}",
             f"  global r       {result['global_r']} ({result['advice']} than r = {result['current_r']})"
             if result["advice"] != "keep" else f"  global r       {result['global_r']} (keep r = {result['current_r']})"]
    lines[-1] += (f"; one uniform r = {result['global_r']} gives error median {err['at_global_r']['median']:.3f}, "
                  f"worst {err['at_global_r']['max']:.3f}")
    lines += [f"  because        {reason}" for reason in result["reasons"]]
    lines += [f"  note           {note}" for note in result["notes"]]
    return lines + _config_lines(result)


__all__ = ["SCHEMA", "suggest", "suggest_lines", "module_rank", "global_rank", "peft_fragment", "check_energy"]
