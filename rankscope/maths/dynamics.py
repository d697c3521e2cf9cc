"""How the ranks evolve over a run, in both views: spread per step, stability, separation.

Per-rank view: the slot norms' spread and the Spearman stability of their order. Spectral view:
the energy ranks and stable rank of ΔW per step, and the steadiness of k95 between snapshots.

Pure functions on the ``rankscope/analysis-v1`` document (numpy only), so they work
the same on a fresh ``analyze(path)`` and on a JSON file written earlier. The output of
:func:`dynamics` is JSON-ready (NaN only where a value is undefined; ``report.to_json`` turns
those into null).

Modules are matched between snapshots by name; a module whose importance is null (NaN/Inf
weights) or all zero (B = 0 at initialisation) is skipped where an ordering is needed, and
modules that appear or disappear are compared only on the snapshots that hold both.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from rankscope.constants import DYNAMICS_SCHEMA
from rankscope.maths.analysis import ENERGY_KEY, SPECTRAL_RATIOS, spectral_ratios
from rankscope.maths.importance import band
from rankscope.maths.verdict import CONCENTRATED_ENERGY_RATIO, FLAT_EFFECTIVE_RANK_RATIO, FLAT_TOP_RATIO

TOP_FRACTION = 0.1
STABLE_THRESHOLD = 0.9
# Spectral steadiness: a module's k95 counts as unchanged between two snapshots when it moves by at most
# one direction or 5% of r, whichever is more (k95 is an integer and flickers by one near a boundary).
STEADY_K95_FRACTION = 0.05

Band = dict[str, float]


def uniform_top_share(rank: int, fraction: float = TOP_FRACTION) -> float:
    """Top-share of equal importances: ceil(fraction·r)/r (at least one rank), as importance.top_share."""
    return min(1.0, max(1, math.ceil(fraction * rank - 1e-9)) / rank)


def usable(module: dict[str, Any]) -> bool:
    """A module whose importances can be ordered: present, finite, not all zero."""
    values = module.get("importance")
    if values is None or len(values) == 0:
        return False
    x = np.asarray(values, dtype=np.float64)
    return bool(np.isfinite(x).all() and x.sum() > 0)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their mean rank (scipy's rankdata, without importing scipy)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size, dtype=np.float64)
    ranks[order] = np.arange(1, x.size + 1)
    _, group, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.bincount(group, weights=ranks) / counts)[group]


def spearman(x: Iterable[float], y: Iterable[float]) -> float:
    """Spearman's rho in float64: Pearson correlation of average ranks (ties share their mean rank).

    NaN when either side has fewer than two ranks or is constant (no ordering to compare).
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.size != b.size or a.size < 2:
        return float("nan")
    ra, rb = average_ranks(a) - (a.size + 1) / 2, average_ranks(b) - (b.size + 1) / 2
    denominator = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    if denominator == 0:
        return float("nan")
    return float(np.clip((ra * rb).sum() / denominator, -1.0, 1.0))


def _x_axis(steps: list[int | None]) -> tuple[list[float], str]:
    # Plots need numbers: steps when every snapshot has one, else the snapshot index.
    if steps and all(s is not None for s in steps):
        return [float(s) for s in steps], "step"
    return [float(i) for i in range(len(steps))], "snapshot (index; steps unknown)"


def _by_name(snapshot: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in snapshot.get("modules", []) if usable(m)}


def spread_at(snapshot: dict[str, Any]) -> dict[str, Band]:
    """Spread over modules at one snapshot, both views.

    Per rank: top-10% share, Gini, effective rank / r, uniform top share. Spectral: k95 / r,
    stable rank / r, spectral effective rank / r (bands with n = 0 when no spectrum was computed).
    """
    good = list(_by_name(snapshot).values())
    ratios = [r for m in good if (r := spectral_ratios(m)) is not None]
    return {
        "top10_share": band(m.get("top10_share") for m in good),
        "top10_share_uniform": band(uniform_top_share(m["rank"]) for m in good),
        "gini": band(m.get("gini") for m in good),
        "effective_rank_ratio": band(
            (m["effective_rank"] / m["rank"]) if m.get("effective_rank") is not None else None for m in good),
        **{name: band(r[name] for r in ratios) for name in SPECTRAL_RATIOS},
    }


def steady_tolerance(rank: int) -> int:
    """How far k95 may move between snapshots and still count as unchanged: max(1, round(5% of r))."""
    return max(1, round(STEADY_K95_FRACTION * rank))


def spectral_pair(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Steadiness of the energy ranks between two snapshots: the share of modules whose k95 stayed put.

    ``median`` holds that share (so :func:`stable_from` reads both views alike); ``median_change``
    is the median of |Δk95| / r over the modules present in both with the same rank.
    """
    a, b = _by_name(before), _by_name(after)
    changes, steady = {}, 0
    for name in sorted(a.keys() & b.keys()):
        ka, kb = (a[name].get("energy_rank") or {}).get(ENERGY_KEY), (b[name].get("energy_rank") or {}).get(ENERGY_KEY)
        if ka is None or kb is None or a[name]["rank"] != b[name]["rank"]:
            continue
        change = abs(kb - ka)
        changes[name] = change / a[name]["rank"]
        steady += change <= steady_tolerance(a[name]["rank"])
    share = steady / len(changes) if changes else float("nan")
    return {"from_step": before.get("step"), "to_step": after.get("step"), "median": share,
            "steady_share": share, "median_change": band(changes.values())["median"], "modules": len(changes)}


def stability_pair(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Spearman rho per module between two snapshots (modules present in both, same rank)."""
    a, b = _by_name(before), _by_name(after)
    rhos = {}
    for name in a.keys() & b.keys():
        if a[name]["rank"] == b[name]["rank"]:
            rho = spearman(a[name]["importance"], b[name]["importance"])
            if math.isfinite(rho):
                rhos[name] = rho
    entry: dict[str, Any] = {"from_step": before.get("step"), "to_step": after.get("step")}
    entry.update(band(rhos.values()))
    entry["modules"] = entry.pop("n")
    entry["per_module"] = dict(sorted(rhos.items()))
    return entry


def stable_from(pairs: list[dict[str, Any]], threshold: float = STABLE_THRESHOLD) -> int | None:
    """Index of the first snapshot from which every later consecutive pair has median rho ≥ threshold.

    A pair without any defined rho (flat or missing modules) counts as not stable. None when
    the last pair is not stable, or when there is no pair at all.
    """
    start = None
    for i in range(len(pairs) - 1, -1, -1):
        median = pairs[i]["median"]
        if not (math.isfinite(median) and median >= threshold):
            break
        start = i
    return start


def trajectories(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per module: the snapshots that hold it (index, step) and its importance matrix (snapshots × r)."""
    out: dict[str, dict[str, Any]] = {}
    for index, snapshot in enumerate(document.get("snapshots", [])):
        for name, m in _by_name(snapshot).items():
            entry = out.setdefault(name, {"rank": m["rank"], "layer": m.get("layer"), "kind": m.get("kind"),
                                          "indices": [], "steps": [], "importance": []})
            if m["rank"] != entry["rank"]:  # a rank change (resized adapter): keep the first run of equal rank
                continue
            entry["indices"].append(index)
            entry["steps"].append(snapshot.get("step"))
            entry["importance"].append([float(v) for v in m["importance"]])
    return out


def separation(spread: list[dict[str, Band]]) -> dict[str, Any]:
    """Have the ranks separated? Per-rank view (what BeamLoRA acts on) and the spectral view beside it.

    ``separated`` is the per-rank answer: the final median top-10% share against uniform and the
    effective rank / r. ``spectral`` says how many directions ΔW needs at the end (k95 / r) and how that
    changed since the first snapshot; the verdict never calls flat slot norms "barely separated" when the
    spectrum is concentrated.
    """
    if not spread:
        return {"separated": False, "verdict": "no snapshot"}
    first, last = spread[0], spread[-1]
    share, uniform = last["top10_share"]["median"], last["top10_share_uniform"]["median"]
    ratio = last["effective_rank_ratio"]["median"]
    excess = share / uniform - 1 if math.isfinite(share) and uniform > 0 else float("nan")
    k95 = last["energy_rank_ratio"]["median"]
    concentrated = math.isfinite(k95) and k95 <= CONCENTRATED_ENERGY_RATIO
    if not math.isfinite(excess):
        verdict, separated = "no module has a non-zero update: nothing to compare", False
    elif ratio > FLAT_EFFECTIVE_RANK_RATIO and excess < FLAT_TOP_RATIO - 1:
        separated = False
        verdict = ("slot norms nearly flat (per-rank view), yet ΔW's energy concentrates in a minority of directions "
                   f"(k95 / r {k95:.2f}, spectral view)" if concentrated else
                   "nearly flat: the ranks have barely separated in either view (typical of short runs)"
                   if math.isfinite(k95) else "nearly flat: the slot norms have barely separated (typical of short runs)")
    else:
        verdict, separated = "separated: a minority of slots carries more of each update (per-rank view)", True
        if concentrated:
            verdict += f"; ΔW's energy concentrates in a minority of directions (k95 / r {k95:.2f}, spectral view)"
    return {
        "separated": separated,
        "verdict": verdict,
        "final_top10_share": share,
        "uniform_top10_share": uniform,
        "relative_excess": excess,
        "final_effective_rank_ratio": ratio,
        "final_gini": last["gini"]["median"],
        "top10_share_change": share - first["top10_share"]["median"],
        "spectral": {
            "concentrated": concentrated,
            "final_energy_rank_ratio": k95,
            "energy_rank_ratio_change": k95 - first["energy_rank_ratio"]["median"],
            "final_stable_rank_ratio": last["stable_rank_ratio"]["median"],
            "final_spectral_effective_rank_ratio": last["spectral_effective_rank_ratio"]["median"],
        },
    }


def dynamics(document: dict[str, Any], threshold: float = STABLE_THRESHOLD,
             include_trajectories: bool = True) -> dict[str, Any]:
    """The dynamics of a run (``rankscope/dynamics-v1``), from its analysis document.

    Snapshots are taken in the document's order (``analyze`` sorts them by step, unknown last).
    ``stable_from`` is the step (``stable_from_index`` the snapshot index) from which the
    median Spearman rho between consecutive snapshots stays ≥ ``threshold`` for all later pairs
    (per-rank view); ``spectral_stable_from`` is the same test on the share of modules whose k95
    stayed put (:func:`spectral_pair`).
    """
    snapshots = document.get("snapshots", [])
    steps = [s.get("step") for s in snapshots]
    x, x_label = _x_axis(steps)
    spread = [spread_at(s) for s in snapshots]
    pairs = [stability_pair(a, b) for a, b in zip(snapshots, snapshots[1:])]
    start = stable_from(pairs, threshold)
    spectral_pairs = [spectral_pair(a, b) for a, b in zip(snapshots, snapshots[1:])]
    spectral_start = stable_from(spectral_pairs, threshold)
    result: dict[str, Any] = {
        "schema": DYNAMICS_SCHEMA,
        "path": document.get("path"),
        "steps": steps,
        "x": x,
        "x_label": x_label,
        "snapshots": len(snapshots),
        "spread": spread,
        "stability": pairs,
        "threshold": threshold,
        "stable_from_index": start,
        "stable_from": steps[start] if start is not None else None,
        "spectral_stability": spectral_pairs,
        "spectral_stable_from_index": spectral_start,
        "spectral_stable_from": steps[spectral_start] if spectral_start is not None else None,
        "separation": separation(spread),
        "operations": operations(document),
    }
    if include_trajectories:
        result["modules"] = trajectories(document)
    return result


def slot_count(value: Any) -> int:
    # events.jsonl may give the pruned slots as a list or as a count.
    if value is None:
        return 0
    if isinstance(value, (list, tuple)):
        return len(value)
    return int(value)


def operations(document: dict[str, Any]) -> list[dict[str, Any]]:
    """BeamLoRA events (``events.jsonl``) summarised per step: p, modules operated, ranks pruned."""
    by_step: dict[Any, list[dict[str, Any]]] = {}
    for event in document.get("events") or []:
        if isinstance(event, dict):
            by_step.setdefault(event.get("step"), []).append(event)
    out = []
    for step in sorted(by_step, key=lambda s: (s is None, s or 0)):
        events = by_step[step]
        counts = {e.get("module", f"#{i}"): slot_count(e.get("pruned")) for i, e in enumerate(events)}
        ps = [e["p"] for e in events if isinstance(e.get("p"), (int, float))]
        out.append({
            "step": step,
            "p": ps[0] if ps else None,
            "events": len(events),
            "modules_operated": sum(1 for c in counts.values() if c > 0),
            "pruned_total": int(sum(counts.values())),
            "pruned_per_module": band(counts.values()),
            "pruned": {k: v for k, v in counts.items() if v > 0},
        })
    return out


def largest_final_spread(document: dict[str, Any]) -> str | None:
    """The module whose last usable importances are most unequal (highest Gini): the default to plot."""
    for snapshot in reversed(document.get("snapshots", [])):
        good = list(_by_name(snapshot).values())
        if good:
            return max(good, key=lambda m: (m.get("gini") if m.get("gini") is not None else -1, m["name"]))["name"]
    return None


__all__ = ["dynamics", "operations", "spearman", "stable_from", "separation", "trajectories", "spread_at", "spectral_pair",
           "largest_final_spread", "uniform_top_share", "band"]
