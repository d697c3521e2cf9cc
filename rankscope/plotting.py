"""Plots, saved as PNG through an atomic write. matplotlib is imported only here."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_bytes

DECILE_X = np.arange(0, 101, 10)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    _pyplot().close(fig)
    write_bytes(path, buffer.getvalue())
    return Path(path)


def _common_prefix(labels: list[str]) -> str:
    prefix = os.path.commonprefix(labels)
    return prefix[: prefix.rfind(".") + 1] if "." in prefix else ""


def plot_decile_curves(curves: dict[str, dict[str, list[float]]], path: str | os.PathLike, title: str) -> Path:
    """Normalised importance at each decile: median over modules with its inter-quartile band, one line per run."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, band) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(DECILE_X, band["median"], "-o", color=color, label=f"{label} (median)", markersize=4)
        ax.fill_between(DECILE_X, band["q25"], band["q75"], color=color, alpha=0.2, label=f"{label} (IQR over modules)")
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="all ranks equal")
    ax.set_xlabel("rank percentile within module (0% = least important)")
    ax.set_ylabel("importance / module's largest")
    ax.set_ylim(0, 1.05)
    ax.set_xticks(DECILE_X)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_layer_kind_heatmap(summary: dict[str, Any], modules: list[dict[str, Any]], path: str | os.PathLike,
                            title: str) -> Path:
    """Top-10% share of importance per (layer, module kind); darker = more unequal."""
    plt = _pyplot()
    good = [m for m in modules if m.get("importance") is not None]
    layers = list(dict.fromkeys(m["layer"] for m in good))
    kinds = list(dict.fromkeys(m["kind"] for m in good))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for m in good:
        grid[layers.index(m["layer"]), kinds.index(m["kind"])] = m["top10_share"]
    prefix = _common_prefix(layers) if len(layers) > 1 else ""
    row_labels = [layer[len(prefix):] or "(none)" for layer in layers]
    height = min(14.0, 1.6 + 0.28 * len(layers))
    width = min(16.0, 3.5 + 0.9 * len(kinds))
    fig, ax = plt.subplots(figsize=(width, height))
    finite = grid[np.isfinite(grid)]
    vmin = float(summary.get("top10_share_uniform", finite.min() if finite.size else 0))
    vmax = float(finite.max()) if finite.size else 1.0
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=vmin, vmax=max(vmax, vmin + 1e-6), interpolation="nearest")
    ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
    step = max(1, math.ceil(len(layers) / 40))
    ax.set_yticks(range(0, len(layers), step), row_labels[::step], fontsize=7)
    ax.set_xlabel("module kind")
    ax.set_ylabel(f"layer ({prefix}…)" if prefix else "layer")
    fig.colorbar(image, ax=ax, label="top-10% share of importance (left end = uniform)")
    ax.set_title(title)
    return save_figure(fig, path)


def plot_analysis(document: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """The analyse plots for the last snapshot: the decile curve and the layer × kind heatmap."""
    out_dir = Path(out_dir)
    last = document["snapshots"][-1]
    step = f" at step {last['step']}" if last["step"] is not None else ""
    name = Path(document["path"]).name or document["path"]
    paths = [
        plot_decile_curves({name: last["summary"]["deciles"]}, out_dir / "deciles.png",
                           f"Per-rank importance by decile{step}\n{name}"),
        plot_layer_kind_heatmap(last["summary"], last["modules"], out_dir / "heatmap.png",
                                f"How unequal each module's ranks are{step}"),
    ]
    return paths
