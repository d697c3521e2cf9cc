"""Plots of how rank importances evolve over a run (matplotlib Agg and seaborn, themed through rankscope.views.plots)."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from rankscope.errors import RankscopeError
from rankscope.maths.dynamics import Band, dynamics, largest_final_spread, slot_count, trajectories
from rankscope.views.plots import figure, heatmap, legend_below, pyplot, save_figure, themed, wrap


def _edges(x: np.ndarray) -> np.ndarray:
    """Cell edges around each x (midpoints between neighbours): where each snapshot's column starts and ends."""
    if x.size == 1:
        half = max(0.5, abs(float(x[0])) * 0.1)
        return np.array([x[0] - half, x[0] + half])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def _column_position(steps: list[float], x: np.ndarray) -> list[float]:
    """Where each step falls on a heatmap with one column per snapshot (column i spans [i, i + 1]): linear within
    the column whose edges (see :func:`_edges`) hold it, extended past the ends with the end columns' widths."""
    edges = _edges(x)
    positions = []
    for s in steps:
        i = int(np.clip(np.searchsorted(edges, s, side="right") - 1, 0, len(edges) - 2))
        positions.append(i + (s - edges[i]) / (edges[i + 1] - edges[i]))
    return positions


def _event_steps(events: Iterable[dict[str, Any]] | None, module: str | None = None) -> list[float]:
    """Steps of BeamLoRA operations (for one module if named; operations() rows have no module key)."""
    steps = set()
    for e in events or []:
        if e.get("step") is None:
            continue
        if module is not None and "module" in e and e["module"] != module:
            continue
        pruned = e.get("pruned_total", e.get("pruned"))
        if pruned is not None and not isinstance(pruned, dict) and slot_count(pruned) == 0:
            continue  # an operation that pruned nothing (p = 1) would only clutter the plot
        steps.add(float(e["step"]))
    return sorted(steps)


def _mark_events(axes, steps: list[float], label: str = "BeamLoRA operation") -> None:
    for ax in axes:
        for i, s in enumerate(steps):
            ax.axvline(s, color="k", ls="--", lw=0.9, alpha=0.6, label=label if (i == 0 and ax is axes[0]) else None)


def _short(name: str, limit: int = 70) -> str:
    return name if len(name) <= limit else "…" + name[-(limit - 1):]


@themed
def plot_rank_heatmap(document: dict[str, Any], module_name: str, path: str | os.PathLike) -> Path:
    """Each rank's importance over the snapshots for one module, ranks sorted by final importance.

    Top: the module's total importance (how large the update is). Bottom: a heatmap, one column per snapshot
    (labelled with its step), of each rank's importance divided by the module's mean at that snapshot (1 = equal
    share), so the ordering stays visible while the update grows from B = 0; each cell holds its value when the
    grid is small enough to read it (see :func:`rankscope.views.plots.annotation_size`).
    """
    traj = trajectories(document).get(module_name)
    if traj is None or not traj["importance"]:
        raise RankscopeError(f"module {module_name} has no usable importance in any snapshot")
    plt = pyplot()
    matrix = np.asarray(traj["importance"], dtype=np.float64)  # snapshots × r
    x = np.asarray(_module_x(document, traj), dtype=np.float64)
    order = np.argsort(-matrix[-1], kind="stable")  # most important (finally) on top
    relative = (matrix / matrix.mean(axis=1, keepdims=True))[:, order].T
    r, n = matrix.shape[1], matrix.shape[0]
    map_height = min(7.0, max(2.2, 0.9 + 0.16 * r))
    fig = plt.figure(figsize=(7.6, 1.9 + map_height), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[1.3, map_height], width_ratios=[1, 0.03])
    top = fig.add_subplot(grid[0, 0])
    ax = fig.add_subplot(grid[1, 0], sharex=top)
    top.plot(np.arange(n) + 0.5, matrix.sum(axis=1), "-o", color="C0", markersize=3.5)
    top.set_ylabel("sum of\nimportances")
    top.tick_params(labelbottom=False)
    spread = max(float(np.abs(relative - 1).max()), 1e-3)
    from matplotlib.colors import TwoSlopeNorm

    norm = TwoSlopeNorm(vcenter=1.0, vmin=max(0.0, 1 - spread), vmax=1 + spread)
    heatmap(ax, relative, cmap="RdBu_r", norm=norm, label="importance / module mean at that step (1 = equal)",
            area=(5.6, map_height - 0.3), cbar_ax=fig.add_subplot(grid[1, 1]))
    step = max(1, math.ceil(r / 24))
    ax.set_yticks(np.arange(0, r, step) + 0.5, [f"#{order[i]}" for i in range(0, r, step)], rotation=0,
                  fontsize=8 if r <= 16 else 7)
    every = max(1, math.ceil(n / 12))
    ax.set_xticks(np.arange(0, n, every) + 0.5, [f"{v:g}" for v in x[::every]], rotation=0)
    ax.set_ylabel("rank slot, sorted by\nfinal importance (top = largest)")
    ax.set_xlabel(_x_label(document) + (" (one column per snapshot)" if n > 1 else ""))
    events = _event_steps(document.get("events"), module_name)
    positions = _column_position(events, x)
    _mark_events([top, ax], positions)
    # An operation before the first snapshot or after the last widens the axis to show it, as a step axis would;
    # the widened part stays white (the axes' grey marks missing cells).
    low, high = min([0.0] + [p - 0.25 for p in positions if p < 0]), max([float(n)] + [p + 0.25 for p in positions if p > n])
    for start, end in ((low, 0.0), (float(n), high)):
        if end > start:
            ax.axvspan(start, end, facecolor="white", lw=0, zorder=0.5)
    ax.set_xlim(low, high)
    if events:
        top.legend(loc="best", frameon=True)
    top.set_title(f"Per-rank importance over training, r = {r}\n{_short(module_name)}")
    fig.align_ylabels([top, ax])
    return save_figure(fig, path)


def _x_label(document: dict[str, Any]) -> str:
    steps = [s.get("step") for s in document.get("snapshots", [])]
    return "step" if steps and all(s is not None for s in steps) else "snapshot (index; steps unknown)"


def _module_x(document: dict[str, Any], traj: dict[str, Any]) -> list[float]:
    # Same axis as dynamics(): steps when all are known, else the snapshot index.
    if _x_label(document) == "step":
        return [float(s) for s in traj["steps"]]
    return [float(i) for i in traj["indices"]]


def _band_line(ax, x: np.ndarray, bands: list[Band], color: str, label: str) -> None:
    median = np.array([b["median"] for b in bands], dtype=np.float64)
    ax.fill_between(x, [b["q25"] for b in bands], [b["q75"] for b in bands], color=color, alpha=0.2, lw=0,
                    label="IQR over modules")
    ax.plot(x, median, "-o", color=color, markersize=4, label=label)


@themed
def plot_spread_over_time(dyn: dict[str, Any], path: str | os.PathLike,
                          events: Iterable[dict[str, Any]] | None = None) -> Path:
    """Both views over steps, median over modules with the IQR band: per-rank (left: top-10% share and
    effective rank / r of the slot norms) and spectral (right: k95 / r and stable rank / r of ΔW). One legend
    below the panels, in neutral grey: each panel's colour is named by its y label."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    x = np.asarray(dyn["x"], dtype=np.float64)
    spectral = any(s["energy_rank_ratio"]["n"] for s in dyn["spread"])
    columns = 2 if spectral else 1
    fig, axes = figure(2, columns, figsize=(6.0 * columns + 0.8, 6.2), sharex=True, squeeze=False)
    panels = [(axes[0][0], "top10_share", "top-10% share of slot norms", "C3"),
              (axes[1][0], "effective_rank_ratio", "effective rank / r of slot norms", "C0")]
    if spectral:
        panels += [(axes[0][1], "energy_rank_ratio", "k95 / r (95% of ΔW's energy)", "C2"),
                   (axes[1][1], "stable_rank_ratio", "stable rank / r of ΔW", "C4")]
    for ax, key, label, color in panels:
        _band_line(ax, x, [s[key] for s in dyn["spread"]], color, "median over modules")
        ax.set_ylabel(label)
    uniform = [s["top10_share_uniform"]["median"] for s in dyn["spread"]]
    axes[0][0].plot(x, uniform, color="grey", ls=":", lw=1.2, label="all slots equal")
    axes[1][0].axhline(1.0, color="grey", ls=":", lw=1.2, label="all slots equal")
    axes[0][0].set_title("Per-rank view (slot norms; the paper's measure)")
    if spectral:
        for ax in axes[:, 1]:
            ax.set_ylim(0, 1.05)
            ax.axhline(1.0, color="grey", ls=":", lw=1.2, label="all r directions used alike")
        axes[0][1].set_title("Spectral view (singular values of ΔW; basis-independent)")
    operations = _event_steps(events if events is not None else dyn.get("operations"))
    _mark_events(list(axes.flat), operations)
    for ax in axes[1]:
        ax.set_xlabel(dyn["x_label"])
    handles = [Patch(color="grey", alpha=0.3, lw=0, label="IQR over modules"),
               Line2D([], [], color="dimgrey", marker="o", markersize=4, label="median over modules"),
               Line2D([], [], color="grey", ls=":", lw=1.2,
                      label="all slots equal / all r directions used alike" if spectral else "all slots equal")]
    if operations:
        handles.append(Line2D([], [], color="k", ls="--", lw=0.9, alpha=0.6, label="BeamLoRA operation"))
    legend_below(fig, handles, ncol=len(handles))
    verdict = wrap(dyn["separation"]["verdict"], 95 if spectral else 60)
    fig.suptitle(f"How the ranks are used over training\n{verdict}")
    return save_figure(fig, path)


@themed
def plot_stability(dyn: dict[str, Any], path: str | os.PathLike) -> Path:
    """Per consecutive pair of snapshots: median Spearman rho of the slot order (per-rank view, with its IQR)
    and the share of modules whose k95 stayed put (spectral view), each with its stable-from step."""
    pairs = dyn["stability"]
    spectral = [p for p in dyn.get("spectral_stability", []) if p["modules"]]
    fig, ax = figure(figsize=(6.8, 4.6))
    if not pairs:
        ax.text(0.5, 0.5, "one snapshot: no rank order to compare", ha="center", va="center", transform=ax.transAxes)
    else:
        x = np.asarray(dyn["x"][1:], dtype=np.float64)  # each pair plotted at its later snapshot
        median = np.array([p["median"] for p in pairs], dtype=np.float64)
        ax.fill_between(x, [p["q25"] for p in pairs], [p["q75"] for p in pairs], color="C2", alpha=0.2, lw=0,
                        label="IQR over modules")
        ax.plot(x, median, "-o", color="C2", markersize=4, label="per-rank: median Spearman of slot order vs previous")
        if len(spectral) == len(pairs):
            ax.plot(x, [p["steady_share"] for p in spectral], "-s", color="C4", markersize=4,
                    label="spectral: share of modules whose k95 stayed put")
        ax.axhline(dyn["threshold"], color="grey", ls=":", lw=1.2, label=f"threshold {dyn['threshold']:g}")
        unit = dyn["x_label"].split(" ")[0]
        if dyn["stable_from_index"] is not None:
            at = dyn["x"][dyn["stable_from_index"]]
            ax.axvline(at, color="C2", lw=1.2, ls="--", label=f"slot order stable from {unit} {at:g}")
        if spectral and dyn.get("spectral_stable_from_index") is not None:
            at = dyn["x"][dyn["spectral_stable_from_index"]]
            ax.axvline(at, color="C4", lw=1.2, ls="-.", label=f"energy ranks steady from {unit} {at:g}")
        low = np.nanmin([p["q25"] for p in pairs] + [dyn["threshold"]]) if np.isfinite(median).any() else 0
        ax.set_ylim(max(-1.05, low - 0.05), 1.02)
        legend_below(fig, ncol=2)
    ax.set_xlabel(f"{dyn['x_label']} (later snapshot of each pair)")
    ax.set_ylabel("agreement with the previous snapshot")
    verdict = (f"slot order stable from {dyn['stable_from']}" if dyn["stable_from_index"] is not None
               else "slot order never stable")
    if spectral:
        verdict += (f"; energy ranks steady from {dyn['spectral_stable_from']}"
                    if dyn.get("spectral_stable_from_index") is not None else "; energy ranks never steady")
    ax.set_title(f"Do the ranks settle? ({verdict})")
    return save_figure(fig, path)


def plot_dynamics(document: dict[str, Any], out_dir: str | os.PathLike, module: str | None = None,
                  dyn: dict[str, Any] | None = None) -> list[Path]:
    """rank_heatmap.png (the given module, else the most unequal one at the end), spread_over_time.png,
    and stability.png when there are at least two snapshots."""
    out_dir = Path(out_dir)
    dyn = dyn if dyn is not None else dynamics(document, include_trajectories=False)
    paths = []
    module = module or largest_final_spread(document)
    if module is not None:
        paths.append(plot_rank_heatmap(document, module, out_dir / "rank_heatmap.png"))
    paths.append(plot_spread_over_time(dyn, out_dir / "spread_over_time.png", document.get("events")))
    if dyn["stability"]:
        paths.append(plot_stability(dyn, out_dir / "stability.png"))
    return paths


__all__ = ["plot_rank_heatmap", "plot_spread_over_time", "plot_stability", "plot_dynamics"]
