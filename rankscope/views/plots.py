"""Plots, saved as PNG through an atomic write. matplotlib and seaborn are imported only here and in the other
plot modules of rankscope.views, inside the functions that draw, so that importing rankscope loads neither."""

from __future__ import annotations

import functools
import io
import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any, Callable, TypeVar

import numpy as np

from rankscope.io.atomic import write_bytes

DECILE_X = np.arange(0, 101, 10)

# Heatmap cells get their value written in them only up to this many columns and rows, and only when the
# cells are big enough for the text at ANNOT_MIN_PT points or more (see annotation_size).
ANNOT_MAX_COLUMNS, ANNOT_MAX_ROWS, ANNOT_MIN_PT, ANNOT_MAX_PT = 20, 30, 6.0, 9.0

_F = TypeVar("_F", bound=Callable[..., Any])
_THEME: dict[str, Any] | None = None


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def theme() -> dict[str, Any]:
    """The rc parameters every rankscope plot is drawn with, built once: seaborn's "whitegrid" style and
    "paper" context, its colour-blind palette as the colour cycle (so "C0", "C1", … name its colours), and one
    set of font sizes for titles, labels, ticks and legends. :func:`themed` applies them around each plot,
    so a caller's own matplotlib settings are left as they were."""
    global _THEME
    if _THEME is None:
        pyplot()  # the Agg backend before seaborn loads pyplot
        import seaborn as sns
        from cycler import cycler

        palette = sns.color_palette("colorblind")
        rc: dict[str, Any] = {**sns.axes_style("whitegrid"), **sns.plotting_context("paper")}
        rc.update({
            "axes.prop_cycle": cycler(color=palette), "patch.facecolor": palette[0],
            "font.size": 9.5, "axes.titlesize": 10.5, "axes.labelsize": 9.5, "figure.titlesize": 11.5,
            "xtick.labelsize": 8.5, "ytick.labelsize": 8.5, "legend.fontsize": 8.0, "legend.title_fontsize": 8.5,
            "axes.titlepad": 7.0, "axes.edgecolor": ".6", "grid.color": ".88", "lines.linewidth": 1.6,
            "lines.markersize": 4.5, "legend.frameon": False, "legend.handlelength": 2.4,
            "figure.constrained_layout.h_pad": 0.06, "figure.constrained_layout.w_pad": 0.06,
        })
        _THEME = rc
    return _THEME


def themed(plot: _F) -> _F:
    """Draw ``plot`` under :func:`theme` (a ``matplotlib.rc_context``, restored afterwards)."""

    @functools.wraps(plot)
    def draw(*args: Any, **kwargs: Any) -> Any:
        rc = theme()
        with pyplot().rc_context(rc):
            return plot(*args, **kwargs)

    return draw  # type: ignore[return-value]


def figure(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots`` with constrained layout, which keeps titles, colour bars and legends placed outside the
    axes from overlapping one another."""
    return pyplot().subplots(*args, layout="constrained", **kwargs)


def save_figure(fig, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=130, bbox_inches="tight")
    pyplot().close(fig)
    write_bytes(path, buffer.getvalue())
    return Path(path)


def legend_below(fig: Any, handles: list | None = None, ncol: int = 2, by_row: bool = False) -> None:
    """One legend under the axes of a constrained-layout figure, where it can never cover a curve. Its entries
    are ``handles``, else those of the figure's first axes, filled column by column (row by row if ``by_row``)."""
    if handles is None:
        handles, _ = fig.axes[0].get_legend_handles_labels()
    ncol = max(1, min(ncol, len(handles)))
    if by_row:  # matplotlib fills columns first: column j gets entries j, j + ncol, …
        handles = [handles[i] for j in range(ncol) for i in range(j, len(handles), ncol)]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol)


def wrap(text: str, width: int) -> str:
    """``text`` on as few lines of at most ``width`` characters as it needs, made about equally long (a title
    wrapped at a fixed width can end in one stray word)."""
    if len(text) <= width:
        return text
    lines = math.ceil(len(text) / width)
    for target in range(math.ceil(len(text) / lines), width + 1):
        wrapped = textwrap.wrap(text, target)
        if len(wrapped) <= lines:
            return "\n".join(wrapped)
    return textwrap.fill(text, width)


def annotation_size(rows: int, columns: int, width_in: float, height_in: float, chars: int = 4) -> float | None:
    """Font size (points) to write each cell's value in a heatmap of ``rows`` × ``columns`` cells filling about
    ``width_in`` × ``height_in`` inches, or None to write none: past ANNOT_MAX_COLUMNS columns or ANNOT_MAX_ROWS
    rows, or when ``chars`` characters would not fit a cell at ANNOT_MIN_PT points."""
    if rows > ANNOT_MAX_ROWS or columns > ANNOT_MAX_COLUMNS or rows < 1 or columns < 1:
        return None
    cell_w, cell_h = 72 * width_in / columns, 72 * height_in / rows
    size = min(ANNOT_MAX_PT, 0.55 * cell_h, cell_w / (0.62 * chars + 1.0))
    return round(size, 1) if size >= ANNOT_MIN_PT else None


def heatmap(ax: Any, data: np.ndarray, *, cmap: Any, label: str, area: tuple[float, float], fmt: str = ".2f",
            cbar_ax: Any = None, **kwargs: Any) -> Any:
    """``seaborn.heatmap`` of ``data`` on ``ax`` with a labelled colour bar (beside ``ax``, or in ``cbar_ax``),
    thin white lines between cells, missing (NaN) cells left light grey, and each value written in its cell
    when :func:`annotation_size` finds room in ``area`` (inches the cells fill, about). Ticks are left to the
    caller: cell (i, j) spans [j, j + 1] × [i, i + 1] with row 0 at the top. Returns the colour bar."""
    import seaborn as sns

    finite = data[np.isfinite(data)]
    chars = max((len(format(float(v), fmt)) for v in np.unique(finite)), default=1)
    size = annotation_size(data.shape[0], data.shape[1], *area, chars=chars)
    wrapped = wrap(label, max(18, int(area[1] * 72 * 0.95 / (0.56 * float(theme()["axes.labelsize"])))))
    sns.heatmap(data, ax=ax, cmap=cmap, annot=size is not None, fmt=fmt, annot_kws={"fontsize": size or 1},
                linewidths=0.5 if max(data.shape) <= 60 else 0, linecolor="white", cbar_ax=cbar_ax,
                cbar_kws={"label": wrapped}, xticklabels=False, yticklabels=False, **kwargs)
    ax.grid(False)
    ax.set_facecolor("#e4e4e4")
    ax.tick_params(length=0)
    return ax.collections[0].colorbar


def _common_prefix(labels: list[str]) -> str:
    prefix = os.path.commonprefix(labels)
    return prefix[: prefix.rfind(".") + 1] if "." in prefix else ""


@themed
def plot_decile_curves(curves: dict[str, dict[str, list[float]]], path: str | os.PathLike, title: str) -> Path:
    """Normalised importance at each decile: median over modules with its inter-quartile band, one line per run."""
    fig, ax = figure(figsize=(6.4, 4.6))
    for i, (label, band) in enumerate(curves.items()):
        color = f"C{i}"
        ax.plot(DECILE_X, band["median"], "-o", color=color, label=f"{label} (median)")
        ax.fill_between(DECILE_X, band["q25"], band["q75"], color=color, alpha=0.2, lw=0,
                        label=f"{label} (IQR over modules)")
    ax.axhline(1.0, color="grey", lw=0.9, ls=":", label="all ranks equal")
    ax.set_xlabel("rank percentile within module (0% = least important)")
    ax.set_ylabel("importance / module's largest")
    ax.set_ylim(0, 1.05)
    return _finish_curves(fig, ax, path, title)


@themed
def plot_energy_curves(curves: dict[str, dict[str, list[float]]], path: str | os.PathLike, title: str) -> Path:
    """Cumulative share of ΔW's energy (Σσ²) against k / r: median over modules with its IQR band, one line per run.

    The diagonal is an update whose r singular values are all equal (every direction used alike).
    """
    fig, ax = figure(figsize=(6.4, 4.6))
    for i, (label, band) in enumerate(curves.items()):
        color = f"C{i}"
        x = np.asarray(band["k_over_r"]) * 100
        ax.plot(x, band["median"], "-", color=color, lw=2, label=f"{label} (median)")
        ax.fill_between(x, band["q25"], band["q75"], color=color, alpha=0.2, lw=0, label=f"{label} (IQR over modules)")
    ax.plot([0, 100], [0, 1], color="grey", lw=0.9, ls=":", label="all directions equal")
    ax.axhline(0.95, color="grey", lw=0.7, ls="--")
    ax.text(1, 0.955, "95% of the energy", fontsize="small", color="dimgrey", va="bottom")
    ax.set_xlabel("top singular directions kept, k / r (%)")
    ax.set_ylabel("share of ΔW's energy Σσ² kept")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 1.02)
    return _finish_curves(fig, ax, path, title)


def _finish_curves(fig: Any, ax: Any, path: str | os.PathLike, title: str) -> Path:
    """Decile ticks, title and the legend (below the axes) shared by the decile and energy curves; then save."""
    ax.set_xticks(DECILE_X)
    ax.set_title(title)
    legend_below(fig, ncol=2, by_row=True)  # each run's median and band side by side
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


@themed
def plot_layer_kind_heatmap(summary: dict[str, Any], modules: list[dict[str, Any]], path: str | os.PathLike,
                            title: str) -> Path:
    """Per (layer, module kind), both views side by side: the top-10% share of the slot norms (left;
    darker = more even) and k95 / r, the share of the rank holding 95% of ΔW's energy (right; darker =
    fewer directions). The right panel is left out when no spectrum was computed. Each cell holds its
    value when the grid is small enough to read it (see :func:`annotation_size`)."""
    good = [m for m in modules if m.get("importance") is not None]
    spectral = [m for m in modules if m.get("energy_rank") and "error" not in m]  # LoHa / LoKr: spectral only
    shown = [m for m in modules if m.get("importance") is not None or (m.get("energy_rank") and "error" not in m)]
    shares, layers, kinds = _layer_kind_grid(shown, lambda m: m["top10_share"])
    panels = [] if spectral and not good else [(shares, "Per-rank view: top-10% share of slot norms", "top-10% share (bottom = all slots equal)", "viridis",
               float(summary.get("top10_share_uniform", np.nanmin(shares) if np.isfinite(shares).any() else 0)),
               float(np.nanmax(shares)) if np.isfinite(shares).any() else 1.0, ".3f")]
    if spectral:
        energy, _, _ = _layer_kind_grid(shown, lambda m: m["energy_rank"]["0.95"] / m["rank"]
                                        if m.get("energy_rank") else None)
        panels.append((energy, "Spectral view: k95 / r", "share of the rank holding 95% of ΔW's energy", "magma",
                       0.0, 1.0, ".3g"))  # k / r exactly: 1, 0.5, 0.125
    prefix = _common_prefix(layers) if len(layers) > 1 else ""
    row_labels = [layer[len(prefix):] or "(none)" for layer in layers]
    height = min(14.0, 3.0 + 0.3 * len(layers))
    width = min(24.0, len(panels) * (3.6 + 0.9 * len(kinds)))
    fig, axes = figure(1, len(panels), figsize=(width, height), squeeze=False)
    step = max(1, math.ceil(len(layers) / 40))
    tick_pt = 8.0 if len(layers) <= 20 else 7.0
    label_in = max(len(label) for label in row_labels) * 0.6 * tick_pt / 72
    kind_in = max(len(kind) for kind in kinds) * 0.45 * 8.0 / 72  # rotated 35°: about half its length downwards
    area = (width / len(panels) - label_in - 1.4, height - 1.2 - kind_in)
    for ax, (grid, heading, label, cmap, vmin, vmax, fmt) in zip(axes[0], panels):
        heatmap(ax, grid, cmap=cmap, label=label, area=area, fmt=fmt, vmin=vmin, vmax=max(vmax, vmin + 1e-6))
        ax.set_xticks(np.arange(len(kinds)) + 0.5, kinds, rotation=35, ha="right", rotation_mode="anchor",
                      fontsize=8)
        ax.set_yticks(np.arange(0, len(layers), step) + 0.5, row_labels[::step], rotation=0, fontsize=tick_pt)
        ax.set_xlabel("module kind")
        ax.set_title(heading)
    axes[0][0].set_ylabel(f"layer ({prefix}…)" if prefix else "layer")
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_analysis(document: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """The analyse plots for the last snapshot: the decile curve (per-rank view), the cumulative-energy
    curve (spectral view, when computed) and the layer × kind heatmap of both."""
    out_dir = Path(out_dir)
    last = document["snapshots"][-1]
    step = f" at step {last['step']}" if last["step"] is not None else ""
    name = Path(document["path"]).name or document["path"]
    paths = []
    if last["summary"].get("per_rank_undefined", 0) < last["summary"]["modules"]:  # LoHa / LoKr: no slot norms
        paths.append(plot_decile_curves({name: last["summary"]["deciles"]}, out_dir / "deciles.png",
                                        f"Per-rank view: slot norms by decile{step}\n{name}"))
    if last["summary"].get("spectral_modules"):
        paths.append(plot_energy_curves({name: last["summary"]["energy_curve"]}, out_dir / "energy.png",
                                        f"Spectral view: cumulative energy of ΔW{step}\n{name}"))
    paths.append(plot_layer_kind_heatmap(last["summary"], last["modules"], out_dir / "heatmap.png",
                                         f"How each module uses its rank{step}"))
    return paths
