"""What ``--out DIR`` holds for each command: JSON, plots and ``report.html``, the folder written as a whole.

The commands in ``cli.py`` only parse options and print; these functions decide the files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from rankscope.errors import RankscopeError
from rankscope.io.atomic import output_folder, write_text
from rankscope.io.documents import to_json
from rankscope.maths.dynamics import dynamics
from rankscope.maths.recommend import recommend
from rankscope.views.compare_plot import plot_compare
from rankscope.views.dynamics_plot import plot_dynamics
from rankscope.views.html import TWO_VIEWS, Section, Table, write_report
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
    summary = document["snapshots"][-1]["summary"]
    sections = [Section("Summary", summary_lines(document), list(plots), [TWO_VIEWS],
                        lead=summary["verdict"]["sentence"][:1].upper() + summary["verdict"]["sentence"][1:] + ".",
                        tables=[key_figures(summary), module_table(document["snapshots"][-1])], collapse=True)]
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


def key_figures(summary: dict[str, Any]) -> Table:
    """Both views' medians over modules, with their quartiles."""
    def row(view: str, what: str, band: dict[str, float] | None, scale: float = 1.0) -> list[Any]:
        band = band or {}
        return [view, what, *(None if band.get(q) is None else band[q] * scale for q in ("median", "q25", "q75"))]

    undefined = summary.get("per_rank_undefined", 0)
    rows = [] if undefined == summary["modules"] else [
        row("per-rank", "top-10% share (uniform " + f"{summary['top10_share_uniform']:.3f})", summary["top10_share"]),
        row("per-rank", "effective rank / r", summary["effective_rank_ratio"]),
        row("per-rank", "gini", summary["gini"])]
    if undefined:  # LoHa / LoKr: no B·A slots, so no slot norms
        rows.append(["per-rank", f"undefined for the {undefined} LoHa / LoKr module(s): no B·A slots", None, None, None])
    if summary.get("spectral_modules"):
        rows += [row("spectral", "k95 (directions holding 95% of ΔW's energy)", summary["energy_ranks"]["0.95"]),
                 row("spectral", "k95 / r", summary["energy_rank_ratio"]),
                 row("spectral", "stable rank / r", summary["stable_rank_ratio"]),
                 row("spectral", "spectral effective rank / r", summary["spectral_effective_rank_ratio"])]
    return Table(["view", "measure", "median", "q25", "q75"], rows,
                 caption=f"Key figures: medians over {summary['modules']} modules, both views")


def module_table(snapshot: dict[str, Any]) -> Table:
    """One row per module: its layer, kind and rank, then both views' measures (click a header to sort)."""
    rows = []
    layers = [str(m.get("layer") or "") for m in snapshot["modules"]]
    prefix = os.path.commonprefix(layers) if len(set(layers)) > 1 else ""
    prefix = prefix[:prefix.rfind(".") + 1]  # whole name parts only
    natural = lambda text: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]  # noqa: E731
    ordered = sorted(zip(snapshot["modules"], layers), key=lambda pair: (natural(pair[1]), str(pair[0].get("kind"))))
    for m, layer in ordered:
        k = m.get("energy_rank") or {}
        r = m.get("rank")
        short = layer[len(prefix):]
        rows.append([int(short) if short.isdigit() else short, m.get("kind"), r, k.get("0.9"), k.get("0.95"), k.get("0.99"),
                     m.get("stable_rank"), m.get("spectral_effective_rank"),
                     None if m.get("effective_rank") is None or not r else m["effective_rank"],
                     m.get("top10_share"), m.get("error")])
    headers = ["layer", "kind", "r", "k90", "k95", "k99", "stable rank", "spectral eff. rank", "per-rank eff. rank",
               "top-10% share", "problem"]
    if not any(row[-1] for row in rows):
        headers, rows = headers[:-1], [row[:-1] for row in rows]
    where = f"; layer after {prefix}…" if prefix else ""
    return Table(headers, rows, caption=f"Every module (click a header to sort{where})")


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
        runs = Table(["run", "modules", "per-rank eff. rank / r", "top-10% share", "k95 / r", "stable rank / r",
                      "spectral eff. rank / r"],
                     [[run["label"], run["modules"], *(run.get(key, {}).get("median") for key in (
                         "effective_rank_ratio", "top10_share", "energy_rank_ratio", "stable_rank_ratio",
                         "spectral_effective_rank_ratio"))] for run in result["runs"]],
                     caption="Medians over each run's modules")
        report = write_report(tmp / "report.html", f"rankscope compare: {labels}",
                              [Section("Comparison", lines, plots, [TWO_VIEWS], lead=result["verdict"]["sentence"],
                                       tables=[runs], collapse=True)])
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
        points = Table(["order", "fraction pruned", "seed", result.metric, "parameters kept", "energy kept"],
                       [[p.order, p.fraction, p.seed, p.value, p.params_kept, p.energy] for p in result.points],
                       caption="Every point of the sweep (click a header to sort)", digits=4)
        lines = [f"  note           {note}" for note in result.notes]
        write_report(tmp / "report.html", f"rankscope sweep: {title or result.adapter}",
                     [Section("Sweep", lines, [tmp / name for name in names[2:]], lead=result.summary_line(),
                              tables=[points], collapse=True)])
        names.append("report.html")
    return [out_dir / name for name in names]
