"""The sweep plots: metric against the fraction of ranks pruned, one line per order (the paper's Figures 1
and 4), and the compression view: metric against the share of the adapter's parameters kept."""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from rankscope.views.plots import figure, legend_below, save_figure, themed

_STYLE = {
    "least": ("C0", "-o", "least important first"),
    "most": ("C3", "-s", "most important first"),
    "random": ("C7", "-^", "random"),
    "spectral": ("C2", "--d", "weakest singular directions first"),
}


@themed
def plot_sweep(document: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Plot a ``rankscope/sweep-v1`` document; random is its mean over seeds with the min–max band."""
    fig, ax = figure(figsize=(6.4, 4.8))
    series: dict[str, dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for p in document["points"]:
        if p["value"] is not None:
            series[p["order"]][p["fraction"]].append(p["value"])
    series.pop("energy", None)  # drawn in the compression view, whose x axis fits it
    for order in sorted(series, key=lambda o: list(_STYLE).index(o) if o in _STYLE else len(_STYLE)):
        color, style, label = _STYLE.get(order, ("C4", "-x", order))
        fractions = sorted(series[order])
        x = np.array(fractions) * 100
        values = [series[order][f] for f in fractions]
        mean = np.array([np.mean(v) for v in values])
        seeds = max(len(v) for v in values)
        if seeds > 1:
            label += f" (mean, min–max over {seeds} seeds)"
            ax.fill_between(x, [min(v) for v in values], [max(v) for v in values], color=color, alpha=0.2, lw=0)
        ax.plot(x, mean, style, color=color, label=label, markersize=4)
    return _finish(fig, ax, document, path, "ranks pruned in every module (%)", title or "Pruning ranks by importance")


@themed
def plot_compression(document: dict[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """Metric against the share of the adapter's parameters kept: least-important slots pruned (per-rank view),
    the same number of weakest directions cut in every module (spectral), and per-module energy thresholds
    (each module keeps the directions holding a share f of its energy: what ``rankscope resize`` writes)."""
    fig, ax = figure(figsize=(6.6, 4.9))
    for order in ("least", "spectral"):
        pts = sorted((p["params_kept"], p["value"]) for p in document["points"]
                     if p["order"] == order and p.get("params_kept") is not None and p["value"] is not None)
        if pts:
            color, style, label = _STYLE[order]
            ax.plot([x * 100 for x, _ in pts], [y for _, y in pts], style, color=color, markersize=4, label=label)
    energy = sorted((p["params_kept"], p["value"], p["energy"]) for p in document["points"]
                    if p["order"] == "energy" and p["value"] is not None)
    if energy:
        ax.plot([x * 100 for x, _, _ in energy], [y for _, y, _ in energy], "-*", color="C4", markersize=9,
                label="each module keeps f of its energy")
        for i, (x, y, f) in enumerate(energy):
            # Alternately below-right and above-left of the point, so that neighbouring labels do not collide.
            ax.annotate(f"f={f:g}", (x * 100, y), textcoords="offset points", xytext=(5, -12) if i % 2 == 0 else (-5, 6),
                        ha="left" if i % 2 == 0 else "right", fontsize="small", color="C4",
                        bbox={"boxstyle": "round,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.75})
        ax.margins(y=0.1)  # room for a label above the top point
    return _finish(fig, ax, document, path, "LoRA parameters kept (%)", title or "How small can the adapter get?")


def _finish(fig: Any, ax: Any, document: dict[str, Any], path: str | os.PathLike, xlabel: str, title: str) -> Path:
    """The unpruned baseline, axes labels on a 0–100% x axis and the legend (below the axes); then save."""
    if document.get("baseline") is not None:
        ax.axhline(document["baseline"], color="grey", lw=0.8, ls=":", label="unpruned")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(document["metric"] + ("" if document.get("higher_is_better", True) else " (lower is better)"))
    ax.set_xlim(-2, 102)
    ax.set_title(title)
    legend_below(fig, ncol=2)
    return save_figure(fig, path)
