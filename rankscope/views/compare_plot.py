"""The plots of a comparison: decile curves, the spread of each run's modules, the sweeps side by side."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from rankscope.maths.compare import finite_values
from rankscope.views.plots import DECILE_X, figure, legend_below, plot_energy_curves, save_figure, themed, wrap

SWEEP_STYLES = {"most": "-", "least": "--", "random": ":", "spectral": "-."}


@themed
def plot_compare_deciles(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Median decile curve with its IQR band over modules, one colour per run."""
    fig, ax = figure(figsize=(7.0, 5.2))
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
    ax.set_title("Per-rank view: slot norms by decile, median over modules\n(higher and flatter = more even)")
    legend_below(fig, ncol=2)
    return save_figure(fig, path)


def _strip(ax, runs: list[dict[str, Any]], metric: str) -> None:
    """Box per run with every module as a jittered dot on top."""
    rng = np.random.default_rng(0)  # fixed jitter, so the same result always draws the same picture
    data = [finite_values(r["per_module"][metric]) for r in runs]
    positions = np.arange(1, len(runs) + 1)
    ax.boxplot([d if d.size else [np.nan] for d in data], positions=positions, widths=0.5, showfliers=False,
               medianprops={"color": "black"}, boxprops={"color": ".25"}, whiskerprops={"color": ".25"},
               capprops={"color": ".25"})
    for i, d in enumerate(data):
        ax.scatter(positions[i] + rng.uniform(-0.15, 0.15, d.size), d, s=14, color=f"C{i}", alpha=0.75, zorder=3)
    ax.set_xticks(positions, [_short(r["label"]) for r in runs], rotation=20 if len(runs) > 3 else 0, ha="center")
    ax.grid(False, axis="x")


def _short(label: str, width: int = 22) -> str:
    return label if len(label) <= width else "…" + label[-(width - 1):]


@themed
def plot_compare_spread(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per-module measures side by side per run: per-rank (top row) and, where computed, spectral (bottom row)."""
    runs = result["runs"]
    spectral = all(r["spectral_modules"] for r in runs)
    rows = 2 if spectral else 1
    width = max(8.0, 2.2 * len(runs) + 4)
    fig, axes = figure(rows, 2, figsize=(width, 4.6 * rows), squeeze=False)
    chars = int(width / 2 * 72 / (0.55 * 10.5))  # what fits a panel's width at the title size

    def title(ax, heading: str, note: str) -> None:
        ax.set_title(f"{heading}\n{wrap(note, chars)}")

    left, right = axes[0]
    _strip(left, runs, "effective_rank_ratio")
    left.axhline(1.0, color="grey", lw=0.8, ls=":")
    left.set_ylabel("effective rank / r of slot norms")
    # The dotted lines are explained in the titles: a legend box would sit on some run's dots.
    title(left, "Per-rank view: effective rank / r", "(higher = more even; dotted = all slots equal)")
    _strip(right, runs, "top10_share")
    for i, r in enumerate(runs):
        # Each run's own uniform share: ceil(0.1 r)/r depends on its rank.
        right.hlines(r["top10_share_uniform"], i + 0.6, i + 1.4, color="grey", lw=1, ls=":")
    right.set_ylabel("share of importance in the top 10% of slots")
    title(right, "Per-rank view: top-10% share", "(lower = more even; dotted = all slots equal)")
    if spectral:
        for ax, metric, label in ((axes[1][0], "energy_rank_ratio", "k95 / r"),
                                  (axes[1][1], "spectral_effective_rank_ratio", "spectral effective rank / r")):
            _strip(ax, runs, metric)
            ax.axhline(1.0, color="grey", lw=0.8, ls=":")
            ax.set_ylim(0, 1.05)
            ax.set_ylabel(f"{label} of ΔW")
            title(ax, f"Spectral view: {label}", "(higher = more of the rank in use; dotted = all directions alike)")
    fig.suptitle("How each run uses its rank (one dot per module, last snapshot)")
    return save_figure(fig, path)


@themed
def plot_compare_sweeps(result: dict[str, Any], path: str | os.PathLike) -> Path:
    """Metric against fraction pruned: one colour per run, one line style per order."""
    from matplotlib.lines import Line2D

    overlay = result["sweeps"]
    fig, ax = figure(figsize=(7.4, 4.8))
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
    ax.set_title("Pruning ranks by importance, runs overlaid\n(colour = run, line style = pruning order)")
    fig.legend(handles=handles, loc="outside right upper")
    return save_figure(fig, path)


def plot_compare(result: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """``compare_deciles.png``, ``compare_energy.png`` (with spectra), ``compare_spread.png`` and, with sweeps,
    ``compare_sweeps.png`` in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = [plot_compare_deciles(result, out_dir / "compare_deciles.png")]
    if all(run["spectral_modules"] for run in result["runs"]):

        paths.append(plot_energy_curves({run["label"]: run["energy_curve"] for run in result["runs"]},
                                        out_dir / "compare_energy.png",
                                        "Spectral view: cumulative energy of ΔW, median over modules\n"
                                        "(lower and closer to the diagonal = more of the rank in use)"))
    paths.append(plot_compare_spread(result, out_dir / "compare_spread.png"))
    if result.get("sweeps"):
        paths.append(plot_compare_sweeps(result, out_dir / "compare_sweeps.png"))
    return paths
