"""``rankscope compare``: how do several runs use their ranks, in both views?

Each run is reduced to its last snapshot. Per-rank view (the slot norms BeamLoRA acts on): effective
rank / r (entropy based, 1 = all slots equal) and the top-10% share (lower = more even). Spectral view
(singular values of ΔW, basis-independent): k95 / r, stable rank / r and spectral effective rank / r
(higher = more of the rank in use). Runs are compared two at a time with a two-sided Mann-Whitney U test
over modules on every measure: it needs no normality, and modules are the natural independent-ish units.
The paper's claim is that BeamLoRA uses more of its rank; the spectral measures test that without
depending on the A/B basis. Sweeps found beside a run are overlaid (the paper's Figure 4).

numpy and scipy only: no torch, so comparing saved analyses stays fast and light.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from rankscope.constants import ANALYSIS_SCHEMA, COMPARE_SCHEMA
from rankscope.errors import RankscopeError
from rankscope.io.documents import check_sweep_schema, find_sweep, read_sweep
from rankscope.maths.analysis import SPECTRAL_RATIOS, analyze_or_read, spectral_ratios
from rankscope.maths.importance import ENERGY_GRID, band, curve_band, decile_band, energy_curve

SCHEMA = COMPARE_SCHEMA
ALPHA = 0.05
TIE_TOLERANCE = 1e-9  # medians closer than this are the same number
METRICS = {  # name -> (words, True when higher means more even / more of the rank in use, view)
    "effective_rank_ratio": ("eff. rank / r", True, "per-rank"),
    "top10_share": ("top-10% share", False, "per-rank"),
    "energy_rank_ratio": ("k95 / r", True, "spectral"),
    "stable_rank_ratio": ("stable rank / r", True, "spectral"),
    "spectral_effective_rank_ratio": ("eff. rank / r", True, "spectral"),
}
# The measure each view's verdict speaks of: continuous, and defined the same way in both views.
VERDICT_METRICS = {"per-rank": "effective_rank_ratio", "spectral": "spectral_effective_rank_ratio"}


# ----------------------------------------------------------------------------- per run


def finite_values(values: Iterable[Any]) -> np.ndarray:
    x = np.asarray([v for v in values if v is not None], dtype=np.float64)
    return x[np.isfinite(x)]


def _usable(module: dict[str, Any]) -> bool:
    """A module counts when its importances are finite and not all zero (B = 0 at init has no spread)."""
    share = module.get("top10_share")
    return module.get("importance") is not None and share is not None and math.isfinite(share)


def _last_snapshot(document: dict[str, Any], label: str) -> dict[str, Any]:
    if not isinstance(document, dict) or document.get("schema") != ANALYSIS_SCHEMA:
        raise RankscopeError(f"run {label!r} is not a rankscope analysis: expected \"schema\": \"{ANALYSIS_SCHEMA}\"")
    if not document.get("snapshots"):
        raise RankscopeError(f"run {label!r} has no snapshots: expected at least one analysed checkpoint")
    return document["snapshots"][-1]


def run_summary(document: dict[str, Any], label: str) -> dict[str, Any]:
    """How one run's last snapshot uses its ranks, in both views, with the per-module values the tests and plots use."""
    snapshot = _last_snapshot(document, label)
    good = [m for m in snapshot["modules"] if _usable(m)]
    ranks = sorted({int(m["rank"]) for m in good})
    spectral = [spectral_ratios(m) for m in good]
    per_module = {
        "names": [m["name"] for m in good],
        "rank": [int(m["rank"]) for m in good],
        "effective_rank_ratio": [m["effective_rank"] / m["rank"] for m in good],
        "top10_share": [m["top10_share"] for m in good],
        "gini": [m["gini"] for m in good],
        # None where the module has no spectrum (analysed with --no-spectrum).
        **{name: [r[name] if r is not None else None for r in spectral] for name in SPECTRAL_RATIOS},
    }
    # What a perfectly even module would show: ceil(0.1 r) / r of the total in its top 10%.
    uniform = [math.ceil(0.1 * r - 1e-9) / r for r in per_module["rank"]]
    with_spectrum = [m for m, r in zip(good, spectral) if r is not None]
    return {
        "label": label,
        "path": str(document.get("path")),
        "snapshot": snapshot.get("path"),
        "step": snapshot.get("step"),
        "format": snapshot.get("format", document.get("format")),
        "modules": len(good),
        "modules_skipped": len(snapshot["modules"]) - len(good),
        "spectral_modules": len(with_spectrum),
        "ranks": ranks,
        "top10_share": band(per_module["top10_share"]),
        "top10_share_uniform": float(np.median(uniform)) if uniform else math.nan,
        "effective_rank_ratio": band(per_module["effective_rank_ratio"]),
        "gini": band(per_module["gini"]),
        **{name: band(per_module[name]) for name in SPECTRAL_RATIOS},
        "deciles": decile_band(np.array([m["deciles"] for m in good], dtype=np.float64)),
        "energy_curve": {"k_over_r": ENERGY_GRID.tolist(),
                         **curve_band(np.array([energy_curve(m["spectrum"]) for m in with_spectrum]), ENERGY_GRID.size)},
        "per_module": per_module,
    }


# ----------------------------------------------------------------------------- tests and verdict


def mann_whitney(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    """Two-sided Mann-Whitney U of a against b; NaN when a side is empty."""
    from scipy.stats import mannwhitneyu

    x, y = finite_values(a), finite_values(b)
    if x.size == 0 or y.size == 0:
        return {"statistic": math.nan, "p_value": math.nan, "n_a": int(x.size), "n_b": int(y.size)}
    result = mannwhitneyu(x, y, alternative="two-sided")
    return {"statistic": float(result.statistic), "p_value": float(result.pvalue), "n_a": int(x.size), "n_b": int(y.size)}


def _more_even(metric: str, a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The label of the run whose median is on the even side (per-rank) or uses more of its rank
    (spectral); None when the medians match (or are NaN)."""
    ma, mb = a[metric]["median"], b[metric]["median"]
    if not (math.isfinite(ma) and math.isfinite(mb)) or abs(ma - mb) <= TIE_TOLERANCE:
        return None
    higher_is_even = METRICS[metric][1]
    return a["label"] if (ma > mb) == higher_is_even else b["label"]


def pair_test(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Every measure's test for one pair of run summaries (spectral ones only where both runs have spectra)."""
    entry: dict[str, Any] = {"a": a["label"], "b": b["label"]}
    for metric, (_, _, view) in METRICS.items():
        if view == "spectral" and not (a["spectral_modules"] and b["spectral_modules"]):
            continue
        test = mann_whitney(a["per_module"][metric], b["per_module"][metric])
        test.update(median_a=a[metric]["median"], median_b=b[metric]["median"], more_even=_more_even(metric, a, b),
                    significant=bool(test["p_value"] < ALPHA), view=view)
        entry[metric] = test
    if a["ranks"] != b["ranks"]:
        # ceil(0.1 r)/r differs with r, so raw shares of different ranks are not on one scale.
        entry["top10_share"]["note"] = (f"ranks differ ({ranks_text(a)} vs {ranks_text(b)}): top-10% shares are not on the "
                                        "same scale; effective rank / r is the fairer comparison")
    return entry


def _find_test(tests: list[dict[str, Any]], x: str, y: str) -> dict[str, Any]:
    return next(t for t in tests if {t["a"], t["b"]} == {x, y})


def p_text(p: float) -> str:
    if not math.isfinite(p):
        return "n/a"
    return f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def _two(a: float, b: float) -> tuple[str, str]:
    """a and b with just enough decimals (3 to 6) to tell them apart."""
    digits = next((d for d in range(3, 7) if f"{a:.{d}f}" != f"{b:.{d}f}"), 6)
    return f"{a:.{digits}f}", f"{b:.{digits}f}"


def _view_verdict(runs: list[dict[str, Any]], tests: list[dict[str, Any]], view: str) -> dict[str, Any]:
    """Which run has the highest median of the view's measure, checked against the runner-up."""
    metric = VERDICT_METRICS[view]
    words = f"{view} {METRICS[metric][0]}"
    ranked = sorted((r for r in runs if math.isfinite(r[metric]["median"])), key=lambda r: -r[metric]["median"])
    base = {"view": view, "measure": metric}
    if len(ranked) < 2:
        what = "a module with non-zero importance" if view == "per-rank" else "a spectrum"
        return {**base, "most_even": None, "runner_up": None, "tie": False, "significant": False, "p_value": math.nan,
                "sentence": f"fewer than two runs have {what}, so the {view} view cannot be compared"}
    best, second = ranked[0], ranked[1]
    test = _find_test(tests, best["label"], second["label"])[metric]
    mb, ms, p = best[metric]["median"], second[metric]["median"], test["p_value"]
    tie = abs(mb - ms) <= TIE_TOLERANCE
    significant = not tie and bool(p < ALPHA)
    stats = f"Mann-Whitney p = {p_text(p)}, {test['n_a']} vs {test['n_b']} modules"
    tb, ts = _two(mb, ms)
    claim = "spreads importance over its slots most evenly" if view == "per-rank" else "uses the most of its rank"
    if tie:
        sentence = f"{best['label']} and {second['label']} have the same median {words} ({tb} each; {stats})."
    elif significant:
        sentence = f"{best['label']} {claim}: median {words} {tb} against {ts} for {second['label']} ({stats})."
    else:
        sentence = (f"{best['label']} has the highest median {words} ({tb} against {ts} for {second['label']}), "
                    f"but the difference is not significant ({stats}).")
    return {**base, "most_even": None if tie else best["label"], "runner_up": second["label"], "tie": tie,
            "significant": significant, "p_value": p, "sentence": sentence}


def verdict(runs: list[dict[str, Any]], tests: list[dict[str, Any]]) -> dict[str, Any]:
    """Both views' verdicts: the per-rank one at the top level (as before), the spectral one under ``spectral``.

    The sentence names each view and its measure: per-rank by effective rank / r of the slot norms,
    spectral by the spectral effective rank / r of ΔW.
    """
    per_rank = _view_verdict(runs, tests, "per-rank")
    sentence = f"Per-rank view (slot norms): {per_rank['sentence']}"
    result = {**per_rank, "per_rank_sentence": per_rank["sentence"], "spectral": None}
    if sum(1 for r in runs if r["spectral_modules"]) >= 2:
        spectral = _view_verdict(runs, tests, "spectral")
        result["spectral"] = spectral
        sentence += f" Spectral view (ΔW, basis-independent): {spectral['sentence']}"
    result["sentence"] = sentence
    return result


# ----------------------------------------------------------------------------- sweeps


def sweep_curves(sweep: dict[str, Any], label: str) -> dict[str, Any]:
    """Mean metric per (order, fraction), averaged over seeds, and how much worse than unpruned for most/least."""
    values: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in sweep["points"]:
        # The compression view's "energy" points have no per-module fraction: they stay out of the overlay.
        if p.get("order") != "energy" and p.get("value") is not None and math.isfinite(p["value"]):
            values[p["order"]][float(p["fraction"])].append(float(p["value"]))
    baseline, higher = sweep.get("baseline"), sweep.get("higher_is_better", True)
    curves, drops = {}, {}
    for order, by_fraction in values.items():
        fractions = sorted(by_fraction)
        means = [float(np.mean(by_fraction[f])) for f in fractions]
        curves[order] = {"fraction": fractions, "mean": means, "n": [len(by_fraction[f]) for f in fractions]}
        if order in ("most", "least") and baseline is not None:
            # "drop" is always how much worse, so it is positive for a loss whichever way the metric points.
            drops[order] = {"fraction": fractions,
                            "drop": [(baseline - m) if higher else (m - baseline) for m in means]}
    return {"label": label, "metric": sweep.get("metric", "metric"), "baseline": baseline,
            "higher_is_better": bool(higher), "curves": curves, "drops": drops}


def sweep_overlay(labels: list[str], sweeps: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Overlay data when at least two runs have a sweep; None otherwise."""
    present = [sweep_curves(check_sweep_schema(s, label), label) for label, s in zip(labels, sweeps) if s is not None]
    if len(present) < 2:
        return None
    metrics = sorted({p["metric"] for p in present})
    return {"runs": present, "metric": metrics[0] if len(metrics) == 1 else " / ".join(metrics),
            "same_metric": len(metrics) == 1}


# ----------------------------------------------------------------------------- compare


def _default_labels(documents: list[dict[str, Any]]) -> list[str]:
    """The folder or file name of each run; made unique with the parent, then an index, when names repeat."""
    paths = [Path(str(d.get("path", f"run{i + 1}"))) for i, d in enumerate(documents)]
    labels = [p.name or str(p) for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{p.parent.name}/{p.name}" if p.parent.name else p.name for p in paths]
    if len(set(labels)) < len(labels):
        labels = [f"{label} #{i + 1}" for i, label in enumerate(labels)]
    return labels


def _check_inputs(documents: list[dict[str, Any]], labels: list[str] | None,
                  sweeps: Sequence[dict[str, Any] | None] | None) -> tuple[list[str], list[dict[str, Any] | None]]:
    if len(documents) < 2:
        raise RankscopeError(f"got {len(documents)} run(s): expected at least two to compare")
    labels = list(labels) if labels is not None else _default_labels(documents)
    sweeps = list(sweeps) if sweeps is not None else [None] * len(documents)
    if len(labels) != len(documents) or len(sweeps) != len(documents):
        raise RankscopeError(f"got {len(documents)} runs, {len(labels)} labels and {len(sweeps)} sweeps: "
                             "expected one label and one sweep (or None) per run")
    if len(set(labels)) != len(labels):
        raise RankscopeError(f"labels {labels} repeat: expected one distinct label per run")
    return labels, sweeps


def compare(documents: list[dict[str, Any]], labels: list[str] | None = None,
            sweeps: list[dict[str, Any] | None] | None = None) -> dict[str, Any]:
    """Compare the last snapshots of several analysis documents; returns the ``rankscope/compare-v1`` document."""
    labels, sweeps = _check_inputs(documents, labels, sweeps)
    runs = [run_summary(d, label) for d, label in zip(documents, labels)]
    tests = [pair_test(a, b) for a, b in combinations(runs, 2)]
    return {
        "schema": SCHEMA,
        "alpha": ALPHA,
        "runs": runs,
        "tests": tests,
        "verdict": verdict(runs, tests),
        "sweeps": sweep_overlay(labels, sweeps),
    }


# ----------------------------------------------------------------------------- loading


def load_run_for_compare(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(analysis document, sweep document or None) for a checkpoint, run folder or analysis JSON."""

    document = analyze_or_read(path, progress=False, last_only=True)  # compare reads only the last snapshot
    found = find_sweep(path)
    return document, read_sweep(found) if found is not None else None


# ----------------------------------------------------------------------------- words


def ranks_text(run: dict[str, Any]) -> str:
    return "r=" + ",".join(map(str, run["ranks"])) if run["ranks"] else "r=?"


# ----------------------------------------------------------------------------- plots


__all__ = ["SCHEMA", "compare", "load_run_for_compare", "find_sweep", "read_sweep",
           "mann_whitney", "run_summary", "verdict", "sweep_overlay"]
