"""Plots, saved as PNG through an atomic write. matplotlib is imported only here."""

from __future__ import annotations

import io
import math
import os
import re
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
    return _finish_curves(fig, ax, path, title)


def plot_energy_curves(curves: dict[str, dict[str, list[float]]], path: str | os.PathLike, title: str) -> Path:
    """Cumulative share of ΔW's energy (Σσ²) against k / r: median over modules with its IQR band, one line per run.

    The diagonal is an update whose r singular values are all equal (every direction used alike).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (label, band) in enumerate(curves.items()):
        color = f"C{i}"
        x = np.asarray(band["k_over_r"]) * 100
        ax.plot(x, band["median"], "-", color=color, lw=2, label=f"{label} (median)")
        ax.fill_between(x, band["q25"], band["q75"], color=color, alpha=0.2, label=f"{label} (IQR over modules)")
    ax.plot([0, 100], [0, 1], color="grey", lw=0.8, ls=":", label="all directions equal")
    ax.axhline(0.95, color="grey", lw=0.6, ls="--")
    ax.text(1, 0.955, "95% of the energy", fontsize=7, color="grey", va="bottom")
    ax.set_xlabel("top singular directions kept, k / r (%)")
    ax.set_ylabel("share of ΔW's energy Σσ² kept")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    return _finish_curves(fig, ax, path, title)


def _finish_curves(fig: Any, ax: Any, path: str | os.PathLike, title: str) -> Path:
    """Decile ticks, title, legend and grid shared by the decile and energy curves; then save."""
    ax.set_xticks(DECILE_X)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def _natural_key(text: str) -> list:
    # layers.2 before layers.10: digit runs compare as numbers.
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _layer_kind_grid(modules: list[dict[str, Any]], value) -> tuple[np.ndarray, list[str], list[str]]:
    layers = sorted(dict.fromkeys(m["layer"] for m in modules), key=_natural_key)
    kinds = list(dict.fromkeys(m["kind"] for m in modules))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for m in modules:
        v = value(m)
        grid[layers.index(m["layer"]), kinds.index(m["kind"])] = np.nan if v is None else v
    return grid, layers, kinds


def plot_layer_kind_heatmap(summary: dict[str, Any], modules: list[dict[str, Any]], path: str | os.PathLike,
                            title: str) -> Path:
    """Per (layer, module kind), both views side by side: the top-10% share of the slot norms (left;
    darker = more even) and k95 / r, the share of the rank holding 95% of ΔW's energy (right; darker =
    fewer directions). The right panel is left out when no spectrum was computed."""
    plt = _pyplot()
    good = [m for m in modules if m.get("importance") is not None]
    spectral = [m for m in good if m.get("energy_rank")]
    shares, layers, kinds = _layer_kind_grid(good, lambda m: m["top10_share"])
    panels = [(shares, "Per-rank view: top-10% share of slot norms", "top-10% share (bottom = all slots equal)", "viridis",
               float(summary.get("top10_share_uniform", np.nanmin(shares) if np.isfinite(shares).any() else 0)),
               float(np.nanmax(shares)) if np.isfinite(shares).any() else 1.0)]
    if spectral:
        energy, _, _ = _layer_kind_grid(good, lambda m: m["energy_rank"]["0.95"] / m["rank"]
                                        if m.get("energy_rank") else None)
        panels.append((energy, "Spectral view: k95 / r", "share of the rank holding 95% of ΔW's energy", "magma",
                       0.0, 1.0))
    prefix = _common_prefix(layers) if len(layers) > 1 else ""
    row_labels = [layer[len(prefix):] or "(none)" for layer in layers]
    height = min(14.0, 1.9 + 0.28 * len(layers))
    width = min(24.0, len(panels) * (3.6 + 0.9 * len(kinds)))
    fig, axes = plt.subplots(1, len(panels), figsize=(width, height), squeeze=False)
    step = max(1, math.ceil(len(layers) / 40))
    for ax, (grid, heading, label, cmap, vmin, vmax) in zip(axes[0], panels):
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=vmin, vmax=max(vmax, vmin + 1e-6), interpolation="nearest")
        ax.set_xticks(range(len(kinds)), kinds, rotation=35, ha="right", fontsize=8)
        ax.set_yticks(range(0, len(layers), step), row_labels[::step], fontsize=7)
        ax.set_xlabel("module kind")
        ax.set_title(heading, fontsize=10)
        fig.colorbar(image, ax=ax, label=label, fraction=0.08, pad=0.03)
    axes[0][0].set_ylabel(f"layer ({prefix}…)" if prefix else "layer")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_analysis(document: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """The analyse plots for the last snapshot: the decile curve (per-rank view), the cumulative-energy
    curve (spectral view, when computed) and the layer × kind heatmap of both."""
    out_dir = Path(out_dir)
    last = document["snapshots"][-1]
    step = f" at step {last['step']}" if last["step"] is not None else ""
    name = Path(document["path"]).name or document["path"]
    paths = [plot_decile_curves({name: last["summary"]["deciles"]}, out_dir / "deciles.png",
                                f"Per-rank view: slot norms by decile{step}\n{name}")]
    if last["summary"].get("spectral_modules"):
        paths.append(plot_energy_curves({name: last["summary"]["energy_curve"]}, out_dir / "energy.png",
                                        f"Spectral view: cumulative energy of ΔW{step}\n{name}"))
    paths.append(plot_layer_kind_heatmap(last["summary"], last["modules"], out_dir / "heatmap.png",
                                         f"How each module uses its rank{step}"))
    return paths
