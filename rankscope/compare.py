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

from .analysis import SPECTRAL_RATIOS, spectral_ratios
from .errors import RankscopeError
from .importance import ENERGY_GRID, band, curve_band, decile_band, energy_curve
from .report import SWEEP_SCHEMA
from .validate import check_sweep, read_json

SCHEMA = "rankscope/compare-v1"
ANALYSIS_SCHEMA = "rankscope/analysis-v1"
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
SWEEP_STYLES = {"most": "-", "least": "--", "random": ":", "spectral": "-."}


# ----------------------------------------------------------------------------- per run


def _finite(values: Iterable[Any]) -> np.ndarray:
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

    x, y = _finite(a), _finite(b)
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
        entry["top10_share"]["note"] = (f"ranks differ ({_ranks(a)} vs {_ranks(b)}): top-10% shares are not on the "
                                        "same scale; effective rank / r is the fairer comparison")
    return entry


def _find_test(tests: list[dict[str, Any]], x: str, y: str) -> dict[str, Any]:
    return next(t for t in tests if {t["a"], t["b"]} == {x, y})


def _fmt_p(p: float) -> str:
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
    stats = f"Mann-Whitney p = {_fmt_p(p)}, {test['n_a']} vs {test['n_b']} modules"
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


def _check_sweep(sweep: dict[str, Any], label: str) -> dict[str, Any]:
    if not isinstance(sweep, dict) or sweep.get("schema", SWEEP_SCHEMA) != SWEEP_SCHEMA or "points" not in sweep:
        raise RankscopeError(f"the sweep given for run {label!r} is not a rankscope sweep: "
                             f"expected \"schema\": \"{SWEEP_SCHEMA}\" with \"points\"")
    return sweep


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
    present = [sweep_curves(_check_sweep(s, label), label) for label, s in zip(labels, sweeps) if s is not None]
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


def find_sweep(path: str | os.PathLike) -> Path | None:
    """``sweep.json`` in the run's folder (the file's folder for a file), or in its ``sweep/`` subfolder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "sweep.json", folder / "sweep" / "sweep.json"):
        if candidate.is_file():
            return candidate
    return None


def read_sweep(path: str | os.PathLike) -> dict[str, Any]:
    return check_sweep(_check_sweep(read_json(path, "a sweep JSON"), str(path)), path)


def load_run_for_compare(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(analysis document, sweep document or None) for a checkpoint, run folder or analysis JSON."""
    from .analysis import analyze_or_read

    document = analyze_or_read(path, progress=False, last_only=True)  # compare reads only the last snapshot
    found = find_sweep(path)
    return document, read_sweep(found) if found is not None else None


# ----------------------------------------------------------------------------- words


def _ranks(run: dict[str, Any]) -> str:
    return "r=" + ",".join(map(str, run["ranks"])) if run["ranks"] else "r=?"


def _band_text(band: dict[str, float]) -> str:
    if not math.isfinite(band["median"]):
        return "n/a"
    return f"{band['median']:.3f} (IQR {band['q25']:.3f}–{band['q75']:.3f})"


def _cost(curves: dict[str, Any], drop: float) -> str:
    """Accuracies in [0, 1] read best as points, as ``rankscope sweep`` prints them."""
    baseline = curves["baseline"]
    if curves["metric"] == "accuracy" and baseline is not None and -1e-9 <= baseline <= 1 + 1e-9:
        return f"{drop * 100:.3g} points"
    return f"{drop:.3g}"


def _sweep_line(curves: dict[str, Any]) -> str | None:
    """Cost of pruning the most and least important ranks at the fraction nearest one half."""
    parts = []
    for order in ("most", "least"):
        drop = curves["drops"].get(order)
        inner = [f for f in (drop["fraction"] if drop else []) if 0 < f < 1]
        if inner:
            f = min(inner, key=lambda x: (abs(x - 0.5), x))
            parts.append(f"{order} important {f * 100:.0f}% costs {_cost(curves, drop['drop'][drop['fraction'].index(f)])}")
    if not parts:
        return None
    return f"  sweep  {curves['label']}: pruning the " + "; the ".join(parts) + f" ({curves['metric']})"


def compare_lines(result: dict[str, Any]) -> list[str]:
    """The terminal summary: one line per run, one per test, the sweeps' costs, the verdict."""
    runs = result["runs"]
    width = max(len(r["label"]) for r in runs)
    lines = [f"rankscope compare: {len(runs)} runs, last snapshot of each"]
    for r in runs:
        skipped = f", {r['modules_skipped']} without importance" if r["modules_skipped"] else ""
        lines.append(f"  run    {r['label']:<{width}}  {r['modules']} modules{skipped}  {_ranks(r)}")
        lines.append(f"         per-rank  eff. rank / r {_band_text(r['effective_rank_ratio'])}  "
                     f"top-10% share {_band_text(r['top10_share'])}  gini {_band_text(r['gini'])}")
        if r["spectral_modules"]:
            lines.append(f"         spectral  k95 / r {_band_text(r['energy_rank_ratio'])}  "
                         f"stable rank / r {_band_text(r['stable_rank_ratio'])}  "
                         f"spectral eff. rank / r {_band_text(r['spectral_effective_rank_ratio'])}")
    for t in result["tests"]:
        for metric, (words, _, view) in METRICS.items():
            if metric not in t:
                continue
            s = t[metric]
            side = "more even" if view == "per-rank" else "uses more of its rank"
            who = f"{s['more_even']} {side}" if s["more_even"] else "same median"
            sig = "" if s["significant"] else ", not significant"
            lines.append(f"  test   {t['a']} vs {t['b']}  {view} {words}: U = {s['statistic']:.1f}, "
                         f"p = {_fmt_p(s['p_value'])}, n = {s['n_a']}/{s['n_b']} -> {who}{sig}")
    for curves in (result.get("sweeps") or {}).get("runs", []):
        line = _sweep_line(curves)
        if line:
            lines.append(line)
    v = result["verdict"]
    lines.append(f"  verdict  per-rank view (slot norms): {v['per_rank_sentence']}")
    if v.get("spectral"):
        lines.append(f"  verdict  spectral view (ΔW, basis-independent): {v['spectral']['sentence']}")
    return lines


# ----------------------------------------------------------------------------- plots


def _legend_below(ax, ncol: int) -> None:
    # Below the axes, so a legend never sits on a curve whatever shape the curves take.
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=max(1, ncol), frameon=False)


def plot_compare_deciles(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Median decile curve with its IQR band over modules, one colour per run."""
    from .plotting import DECILE_X, _pyplot, save_figure

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    for i, run in enumerate(result["runs"]):
        band, color = run["deciles"], f"C{i}"
        ax.fill_between(DECILE_X, band["q25"], band["q75"], color=color, alpha=0.18, lw=0)
        ax.plot(DECILE_X, band["median"], "-o", color=color, markersize=4,
                label=f"{run['label']} ({run['modules']} modules; band = IQR)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="all ranks equal")
    ax.set_xlabel("rank percentile within module (0% = least important)")
    ax.set_ylabel("importance / module's largest")
    ax.set_xticks(DECILE_X)
    ax.set_ylim(0, 1.05)
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title("Per-rank view: slot norms by decile, median over modules\n(higher and flatter = more even)")
    _legend_below(ax, 2)
    return save_figure(fig, path)


def _strip(ax, runs: list[dict[str, Any]], metric: str) -> None:
    """Box per run with every module as a jittered dot on top."""
    rng = np.random.default_rng(0)  # fixed jitter, so the same result always draws the same picture
    data = [_finite(r["per_module"][metric]) for r in runs]
    positions = np.arange(1, len(runs) + 1)
    ax.boxplot([d if d.size else [np.nan] for d in data], positions=positions, widths=0.5, showfliers=False,
               medianprops={"color": "black"})
    for i, d in enumerate(data):
        ax.scatter(positions[i] + rng.uniform(-0.15, 0.15, d.size), d, s=14, color=f"C{i}", alpha=0.75, zorder=3)
    ax.set_xticks(positions, [_short(r["label"]) for r in runs], rotation=20 if len(runs) > 3 else 0, ha="center")
    ax.grid(alpha=0.3, axis="y")


def _short(label: str, width: int = 22) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]


def plot_compare_spread(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per-module measures side by side per run: per-rank (top row) and, where computed, spectral (bottom row)."""
    from .plotting import _pyplot, save_figure

    plt = _pyplot()
    runs = result["runs"]
    spectral = all(r["spectral_modules"] for r in runs)
    rows = 2 if spectral else 1
    fig, axes = plt.subplots(rows, 2, figsize=(max(8.0, 2.2 * len(runs) + 4), 4.4 * rows), squeeze=False)
    left, right = axes[0]
    _strip(left, runs, "effective_rank_ratio")
    left.axhline(1.0, color="grey", lw=0.8, ls=":")
    left.set_ylabel("effective rank / r of slot norms")
    # The dotted lines are explained in the titles: a legend box would sit on some run's dots.
    left.set_title("Per-rank view: effective rank / r\n(higher = more even; dotted = all slots equal)", fontsize=10)
    _strip(right, runs, "top10_share")
    for i, r in enumerate(runs):
        # Each run's own uniform share: ceil(0.1 r)/r depends on its rank.
        right.hlines(r["top10_share_uniform"], i + 0.6, i + 1.4, color="grey", lw=1, ls=":")
    right.set_ylabel("share of importance in the top 10% of slots")
    right.set_title("Per-rank view: top-10% share\n(lower = more even; dotted = all slots equal)", fontsize=10)
    if spectral:
        for ax, metric, label in ((axes[1][0], "energy_rank_ratio", "k95 / r"),
                                  (axes[1][1], "spectral_effective_rank_ratio", "spectral effective rank / r")):
            _strip(ax, runs, metric)
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.set_ylim(0, 1.05)
            ax.set_ylabel(f"{label} of ΔW")
            ax.set_title(f"Spectral view: {label}\n(higher = more of the rank in use; dotted = all directions alike)",
                         fontsize=10)
    fig.suptitle("How each run uses its rank (one dot per module, last snapshot)", fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_compare_sweeps(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Metric against fraction pruned: one colour per run, one line style per order."""
    from matplotlib.lines import Line2D

    from .plotting import _pyplot, save_figure

    plt = _pyplot()
    overlay = result["sweeps"]
    fig, ax = plt.subplots(figsize=(7.4, 4.6))
    orders_seen: list[str] = []
    for i, run in enumerate(overlay["runs"]):
        for order, curve in run["curves"].items():
            orders_seen += [order] if order not in orders_seen else []
            ax.plot(np.array(curve["fraction"]) * 100, curve["mean"], SWEEP_STYLES.get(order, (0, (1, 3))),
                    color=f"C{i}", marker="o", markersize=3)
    handles = [Line2D([], [], color=f"C{i}", lw=2, label=run["label"]) for i, run in enumerate(overlay["runs"])]
    handles += [Line2D([], [], color="black", ls=SWEEP_STYLES.get(o, (0, (1, 3))),
                       label=f"{o} important first" if o in ("most", "least") else o) for o in orders_seen]
    higher = all(r["higher_is_better"] for r in overlay["runs"])
    ax.set_xlabel("ranks pruned in every module (%)")
    ax.set_ylabel(overlay["metric"] + ("" if higher else " (lower is better)"))
    ax.set_xlim(-2, 102)
    ax.grid(alpha=0.3)
    ax.set_title("Pruning ranks by importance, runs overlaid\n(colour = run, line style = pruning order)")
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    return save_figure(fig, path)


def plot_compare(result: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """``compare_deciles.png``, ``compare_energy.png`` (with spectra), ``compare_spread.png`` and, with sweeps,
    ``compare_sweeps.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [plot_compare_deciles(result, out_dir / "compare_deciles.png")]
    if all(run["spectral_modules"] for run in result["runs"]):
        from .plotting import plot_energy_curves

        paths.append(plot_energy_curves({run["label"]: run["energy_curve"] for run in result["runs"]},
                                        out_dir / "compare_energy.png",
                                        "Spectral view: cumulative energy of ΔW, median over modules\n"
                                        "(lower and closer to the diagonal = more of the rank in use)"))
    paths.append(plot_compare_spread(result, out_dir / "compare_spread.png"))
    if result.get("sweeps"):
        paths.append(plot_compare_sweeps(result, out_dir / "compare_sweeps.png"))
    return paths


__all__ = ["SCHEMA", "compare", "compare_lines", "plot_compare", "load_run_for_compare", "find_sweep", "read_sweep",
           "mann_whitney", "run_summary", "verdict", "sweep_overlay"]
