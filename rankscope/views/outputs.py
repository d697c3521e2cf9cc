"""What ``--out DIR`` holds for each command: JSON, plots and ``report.html``, the folder written as a whole.

The commands in ``cli.py`` only parse options and print; these functions decide the files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rankscope.errors import RankscopeError
from rankscope.io.atomic import output_folder, write_text
from rankscope.io.documents import to_json
from rankscope.maths.dynamics import dynamics
from rankscope.maths.recommend import recommend
from rankscope.views.compare_plot import plot_compare
from rankscope.views.dynamics_plot import plot_dynamics
from rankscope.views.html import TWO_VIEWS, Section, write_report
from rankscope.views.plots import plot_analysis
from rankscope.views.sweep_plot import plot_compression, plot_sweep
from rankscope.views.text import dynamics_summary_lines, summary_lines


def temporal_view(document: dict[str, Any], total_steps: int | None = None) -> tuple[dict | None, dict | None, list[str]]:
    """Dynamics and a recommendation for a series (None for a single snapshot), with their summary lines."""
    if len(document.get("snapshots", [])) < 2:
        return None, None, []

    dyn = dynamics(document, include_trajectories=False)
    notes = []
    try:
        rec = recommend(document, total_steps=total_steps, dyn=dyn)
    except RankscopeError as e:  # e.g. no step numbers: the dynamics still stand on their own
        rec, notes = None, [f"  recommend      not possible: {e}"]
    return dyn, rec, dynamics_summary_lines(dyn, rec) + notes


def _final(paths: list[Path], tmp: Path, out_dir: Path) -> list[Path]:
    return [out_dir / p.relative_to(tmp) for p in paths]


def write_analysis(document: dict[str, Any], out_dir: str | os.PathLike, dyn: dict | None = None,
                   rec: dict | None = None, module: str | None = None,
                   extra: dict[str, str] | None = None) -> list[Path]:
    """analysis.json, deciles.png, energy.png, heatmap.png, the temporal plots for a series, and report.html,
    plus ``extra`` files (name -> text); the folder is built aside and swapped in whole."""
    out_dir = Path(out_dir)
    with output_folder(out_dir) as tmp:
        return _final(_analysis_files(document, tmp, dyn, rec, module, extra or {}), tmp, out_dir)


def _analysis_files(document: dict[str, Any], out_dir: Path, dyn: dict | None, rec: dict | None,
                    module: str | None, extra: dict[str, str]) -> list[Path]:

    written = []
    for name, text in extra.items():
        write_text(out_dir / name, text)
        written.append(out_dir / name)
    plots = plot_analysis(document, out_dir)
    sections = [Section("Summary", summary_lines(document), list(plots), [TWO_VIEWS])]
    if dyn is not None:

        temporal = plot_dynamics(document, out_dir, module=module, dyn=dyn)
        plots += temporal
        sections.append(Section("Over training", dynamics_summary_lines(dyn), temporal))
    if rec is not None:
        sections.append(Section("Recommendation for a BeamLoRA run", recommendation_lines(rec)))
    json_path = out_dir / "analysis.json"
    write_text(json_path, to_json(document) + "\n")
    report = write_report(out_dir / "report.html", f"rankscope: {document.get('path')}", sections,
                          subtitle=f"{document.get('format')} · {len(document['snapshots'])} snapshot(s)")
    return written + plots + [json_path, report]


def recommendation_lines(rec: dict[str, Any]) -> list[str]:
    lines = [f"p_init   {rec['p_init']:.2f}",
             f"delta_t  {rec['delta_t']}   (end_step {rec['end_step']} of {rec['total_steps']} steps, "
             f"{rec['operations']} operations)"]
    lines += [f"because  {reason}" for reason in rec["reasons"]]
    lines += [f"warning  {warning}" for warning in rec["warnings"]]
    schedule = rec.get("schedule") or []
    if schedule:
        lines.append("schedule " + ", ".join(f"step {op['step']}: p {op['p']:.3f}" for op in schedule))
    return lines


def write_compare(result: dict[str, Any], out_dir: str | os.PathLike, lines: list[str]) -> list[Path]:
    """compare.json, the overlay plots and report.html; the folder is built aside and swapped in whole."""

    out_dir = Path(out_dir)
    with output_folder(out_dir) as tmp:
        plots = plot_compare(result, tmp)
        json_path = tmp / "compare.json"
        write_text(json_path, to_json(result) + "\n")
        labels = ", ".join(run["label"] for run in result["runs"])
        report = write_report(tmp / "report.html", f"rankscope compare: {labels}",
                              [Section("Comparison", lines, plots, [TWO_VIEWS])])
        return _final(plots + [json_path, report], tmp, out_dir)


def write_sweep(result: Any, out_dir: str | os.PathLike, title: str | None = None) -> list[Path]:
    """Write ``sweep.json``, ``sweep.csv``, ``sweep.png`` (and ``compression.png``) of a
    :class:`rankscope.adapters.sweep.SweepResult` into ``out_dir``, the folder built aside and swapped in
    whole (an earlier rankscope output folder is replaced, anything else refused)."""
    out_dir = Path(out_dir)
    names = ["sweep.json", "sweep.csv", "sweep.png"]
    with output_folder(out_dir) as tmp:
        write_text(tmp / "sweep.json", result.to_json() + "\n")
        write_text(tmp / "sweep.csv", result.to_csv())
        document = result.to_dict()
        plot_sweep(document, tmp / "sweep.png", title=title)
        if any(p.order == "energy" for p in result.points):
            plot_compression(document, tmp / "compression.png", title=title)
            names.append("compression.png")
    return [out_dir / name for name in names]
