"""The ``rankscope`` command: a thin layer over the Python API.

Every command prints a short summary for people and can write JSON for machines. Bad input
ends in one line ``Error: ...`` on stderr and exit status 2, never a traceback. Heavy imports
(matplotlib, torch, transformers) happen inside the commands that need them.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Iterator

import click

from rankscope.adapters.resize import check_rule, evaluate_resize
from rankscope.adapters.resize import resize as resize_adapter
from rankscope.errors import RankscopeError
from rankscope.io.atomic import check_file_target, check_out, write_to_path
from rankscope.io.documents import to_json
from rankscope.io.hub import resolve_local
from rankscope.io.loading import resolve_adapter
from rankscope.maths.analysis import MAX_TRACE_RECORDS, analyze_or_read
from rankscope.maths.analysis import analyze as analyze_path
from rankscope.maths.compare import compare as compare_runs
from rankscope.maths.compare import load_run_for_compare
from rankscope.maths.dynamics import dynamics
from rankscope.maths.recommend import recommend as recommend_run
from rankscope.maths.suggest import check_energy
from rankscope.maths.suggest import suggest as suggest_ranks
from rankscope.progress import progress_bar
from rankscope.tasks import models
from rankscope.tasks.data import open_data_file
from rankscope.tasks.evaluate import build_evaluation
from rankscope.tasks.placement import resolve_placement
from rankscope.tasks.runconfig import read_run_config
from rankscope.views.outputs import recommendation_lines, temporal_view, write_analysis, write_compare, write_sweep
from rankscope.views.text import compare_lines, suggest_lines, summary_lines

FORMAT_CHOICES = ["peft", "kohya", "diffusers-legacy", "diffusers-peft", "mlx", "torchtune", "gguf",
                  "peft-loha", "peft-lokr", "lycoris"]  # the last three: rankscope.io.structured


def _out(line: str) -> None:
    """One line of what the command was asked for, on stdout (flushed, so an error there is seen now)."""
    click.echo(line)
    sys.stdout.flush()


@contextlib.contextmanager
def _stdout_for_results_only() -> Iterator[None]:
    """While a command runs, file descriptor 1 goes to stderr, so that what a C library writes there (LAPACK's
    messages) never mixes with the output; ``sys.stdout``, which click writes to, stays the real stdout."""
    try:
        sys.stdout.flush()
        real = os.dup(1)
    except (OSError, AttributeError, ValueError):  # stdout closed: emit_json says so when it is needed
        yield
        return
    saved = sys.stdout
    os.dup2(2, 1)
    sys.stdout = open(real, "w", encoding=saved.encoding or "utf-8", errors="replace", closefd=False)
    try:
        yield
    finally:
        try:
            sys.stdout.flush()
        except OSError:
            pass
        sys.stdout = saved
        os.dup2(real, 1)
        os.close(real)


_STDOUT_NAMES = ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1")  # file descriptor 1 goes to stderr while we work


def _is_stdout(target: str) -> bool:
    """Whether ``target`` names stdout (``/dev/stdout`` and the like, or the very file stdout goes to)."""
    if os.path.normpath(target) in _STDOUT_NAMES:
        return True
    try:
        return os.path.samestat(os.stat(target), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):
        return False


def emit_json(text: str, target: str, human_lines: list[str]) -> None:
    """JSON to stdout with '-' (the human summary then goes to stderr), or to FILE as
    :func:`rankscope.io.atomic.write_to_path` writes it (a device or FIFO written through, a symlink followed)."""
    if target == "-" or _is_stdout(target):  # --json /dev/stdout: JSON alone on stdout, as with -
        if sys.stdout is None or sys.stdout.closed:
            raise RankscopeError("--json -: stdout is closed, so the JSON cannot be written: expected an open "
                                 "stdout, or --json FILE")
        for line in human_lines:
            click.echo(line, err=True)
        try:
            _out(text)
        except OSError as e:
            raise RankscopeError(f"--json -: stdout cannot be written ({e.strerror or e}), so the JSON was lost: "
                                 "expected an open stdout, or --json FILE") from None
    else:
        write_to_path(target, (text + "\n").encode("utf-8"))
        for line in human_lines:
            _out(line)
        _out(f"  json           {target}")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rankscope")
def cli() -> None:
    """See how unequal the ranks of a LoRA adapter are, and what to do about it.

    Reads PEFT adapters (and HF Trainer checkpoint-N series), kohya, diffusers, mlx-lm and
    torchtune files, and BeamLoRA runs; a PATH may also be a Hugging Face repo id
    (owner/name[@rev][/subfolder], only the adapter's files are fetched). Start with:
    rankscope analyze PATH --out report/
    """

def _echo(lines: list[str]) -> None:
    for line in lines:
        _out(line)


def _finish(lines: list[str], json_text: str | None, json_target: str | None) -> None:
    if json_target:
        emit_json(json_text, json_target, lines)
    else:
        _echo(lines)


def _check_out(out_dir: Path | None, json_target: str | None = None) -> None:
    """Refuse an unusable --out or --json FILE before any work is done (--out is checked again when written)."""
    if json_target not in (None, "-"):
        check_file_target(json_target)
    if out_dir is not None:
        check_out(out_dir, "report", replace=True)


def _check_model(spec: str | None) -> None:
    """--validate's base model, before any work: the packaged ones, a folder with config.json, or a hub id."""
    if spec is None:
        raise RankscopeError("--validate needs a base model: pass --model minilm|smollm2|FOLDER (the adapter's folder "
                             "has no beamlora run config.json naming one)")
    if str(spec).strip().lower() not in (models.MINILM, models.SMOLLM2) and not (
            (Path(spec).expanduser() / "config.json").is_file() or models.is_hub_id(spec)):
        raise RankscopeError(f"--model {spec}: not {models.MINILM!r}, {models.SMOLLM2!r}, a folder with config.json or "
                             "a Hugging Face hub id (owner/name)")


def _hub_paths(*names: str, tolerant: bool = False):
    """Add ``--revision`` and resolve the named path arguments first: a Hugging Face repo id (``owner/name[@rev]
    [/sub/folder]``) becomes its folder in the Hub cache, with only the adapter's own files fetched; a local path stays
    as it is. ``tolerant``: of several paths (a survey), one that fails is left for the command to report as its row."""
    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, revision: str | None = None, **kwargs):
            typed = click.get_current_context().meta.setdefault(_TYPED, {})
            for name in names:
                value = kwargs.get(name)
                values = value if isinstance(value, tuple) else () if value is None else (value,)
                found = tuple(_resolved(v, revision, tolerant and len(values) > 1) for v in values)
                typed.update({str(after): str(before) for before, after in zip(values, found) if after != before})
                kwargs[name] = found if isinstance(value, tuple) else found[0] if found else None
            return command(*args, **kwargs)

        return click.option("--revision", metavar="REV",
                            help="For a Hugging Face repo id (owner/name): the branch, tag or commit to read "
                                 "(default: main; owner/name@REV says the same).")(wrapper)
    return decorate


_TYPED = "rankscope.typed_paths"  # click context meta: {resolved path: the path or repo id as typed}


def _typed(path: Path) -> Path:
    """``path`` as the user typed it: the repo id for a folder in the Hub cache, else ``path`` itself."""
    return Path(click.get_current_context().meta.get(_TYPED, {}).get(str(path), path))


def _resolved(value: Path, revision: str | None, tolerant: bool) -> Path:
    """``value`` resolved (:func:`resolve_local`); ``tolerant``: one that fails is returned as it is."""
    try:
        return resolve_local(value, revision)
    except RankscopeError:
        if tolerant and revision is None:  # read again by the survey, which makes the error its row
            return value
        raise


def _written(paths: list[Path]) -> list[str]:
    kinds = {".html": "report", ".json": "json", ".csv": "csv"}
    return [f"  {kinds.get(p.suffix, 'plot'):<15}{p}" for p in paths]


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Folder for analysis.json, plots (deciles, heatmap; for a run also rank_heatmap, spread_over_time, "
                   "stability) and report.html.")
@click.option("--json", "json_target", metavar="FILE|-", help="Write the analysis as JSON to FILE, or to stdout with '-'.")
@click.option("--format", "format_", type=click.Choice(FORMAT_CHOICES), help="Force the checkpoint format instead of detecting it.")
@click.option("--spectrum/--no-spectrum", default=True, show_default=True,
              help="Also compute each update's singular values (basis-independent view).")
@click.option("--module", metavar="NAME", help="For a run: the module whose ranks are drawn over time (default: the most unequal).")
@click.option("--all-records", is_flag=True,
              help=f"A rank trace longer than {MAX_TRACE_RECORDS} records: analyse every record, not an even subsample.")
@click.option("--table", "table_target", metavar="FILE|-",
              help="Survey several adapters (PATH ...): one row each (format, modules, ranks, medians of both views, "
                   "verdict, or the error that stopped it) to FILE.csv, FILE.parquet (with pyarrow), or - (CSV on stdout).")
@click.option("--progress/--no-progress", default=None, help="Progress bar over snapshots (default: when stderr is a terminal).")
@_hub_paths("paths", tolerant=True)
def analyze(paths: tuple[Path, ...], out_dir: Path | None, json_target: str | None, format_: str | None,
            spectrum: bool, module: str | None, all_records: bool, table_target: str | None,
            progress: bool | None) -> None:
    """Per-rank importance of every LoRA module in PATH.

    PATH is a checkpoint file, an adapter folder, or a run folder of snapshots
    (checkpoint-N/, step-N/, mlx-lm NNNNNNN_adapters.safetensors). Importance of rank i is
    ‖scale·b_i a_iᵀ‖_F = scale·‖b_i‖·‖a_i‖, in float64, in the checkpoint's rank order.
    For a run it adds the view over training: spread per step, rank-order stability, the step
    from which the order is stable, BeamLoRA operations, and a p_init / Δt recommendation.
    """
    if table_target is not None:
        if out_dir is not None or json_target is not None:
            raise RankscopeError("--table with --out or --json: expected one of them (--table surveys many adapters, "
                                 "--out and --json write one adapter's analysis)")
        _survey(paths, table_target, format_, spectrum, all_records, progress)
        return
    if len(paths) > 1:
        raise RankscopeError(f"{len(paths)} paths given: expected one PATH, or --table FILE for one row per adapter")
    path = paths[0]
    _check_out(out_dir, json_target)
    document = analyze_path(path, format=format_, spectrum=spectrum, progress=progress, all_records=all_records)
    dyn, rec, temporal_lines = temporal_view(document)
    if dyn is not None:
        document["dynamics"] = dyn
    lines = summary_lines(document) + temporal_lines
    if out_dir is not None:

        lines += _written(write_analysis(document, out_dir, dyn, rec, module))
    _finish(lines, to_json(document) if json_target else None, json_target)


def _survey(paths: tuple[Path, ...], target: str, format_: str | None, spectrum: bool, all_records: bool,
            progress: bool | None) -> None:
    """``analyze A B C --table FILE``: one row per adapter; an input that fails is a row with its error."""
    if target != "-":
        check_file_target(target, "--table")
    # imported on use: pandas loads only when a table is asked for
    from rankscope.views.frames import survey_row, write_table

    rows = []
    with progress_bar(len(paths), progress, "analysing adapters", "adapter") as bar:
        for path in paths:
            try:
                rows.append(survey_row(str(path), analyze_path(path, format=format_, spectrum=spectrum,
                                                               progress=False, all_records=all_records)))
            except RankscopeError as e:
                rows.append(survey_row(str(path), None, str(e)))
            bar.update(1)
    write_table(rows, target)
    failed = sum(row["modules"] is None for row in rows)
    line = (f"survey: {len(rows)} adapters, {len(rows) - failed} analysed, {failed} with an error"
            + ("" if target == "-" else f"\n  table          {target}"))
    click.echo(line, err=target == "-")


@cli.command()
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--total-steps", type=click.IntRange(min=3), help="Steps of the long run to plan (default: 3 × this run's last step).")
@click.option("--json", "json_target", metavar="FILE|-", help="Write the recommendation as JSON to FILE, or to stdout with '-'.")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Folder for recommend.json, plots and report.html.")
@click.option("--all-records", is_flag=True,
              help=f"A rank trace longer than {MAX_TRACE_RECORDS} records: analyse every record, not an even subsample.")
@click.option("--progress/--no-progress", default=None, help="Progress bar over snapshots (default: when stderr is a terminal).")
@_hub_paths("run_dir")
def recommend(run_dir: Path, total_steps: int | None, json_target: str | None, out_dir: Path | None,
              all_records: bool, progress: bool | None) -> None:
    """p_init and Δt for a longer BeamLoRA run, from a short run's snapshots.

    RUN_DIR is a run folder (or an analysis.json written by `rankscope analyze`). p_init is
    the smallest p whose top-p cut operates on few ranks of the observed importances; Δt puts
    five operations before end_step (⅔ of the run) but not before the rank order stabilises.
    Every number comes with its reason, and warnings say when the run cannot tell.
    """
    _check_out(out_dir, json_target)
    document = analyze_or_read(run_dir, progress=progress, all_records=all_records)
    dyn = dynamics(document, include_trajectories=False)
    rec = recommend_run(document, total_steps=total_steps, dyn=dyn)
    lines = [f"recommendation for a BeamLoRA run like {document.get('path')}"] + ["  " + x for x in recommendation_lines(rec)]
    if out_dir is not None:

        series = dyn if len(document["snapshots"]) > 1 else None
        lines += _written(write_analysis(document, out_dir, series, rec, extra={"recommend.json": to_json(rec) + "\n"}))
    _finish(lines, to_json(rec) if json_target else None, json_target)


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--labels", help="Comma-separated names for the runs, in order (default: folder names).")
@click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Folder for compare.json, overlaid plots and report.html.")
@click.option("--json", "json_target", metavar="FILE|-", help="Write the comparison as JSON to FILE, or to stdout with '-'.")
@click.option("--progress/--no-progress", default=None, help="Progress bar over snapshots (default: when stderr is a terminal).")
@_hub_paths("paths")
def compare(paths: tuple[Path, ...], labels: str | None, out_dir: Path | None, json_target: str | None,
            progress: bool | None) -> None:
    """Compare how evenly two or more runs spread importance over their ranks.

    Each PATH is an adapter, a run folder (its last snapshot is compared) or an analysis.json.
    Reports decile curves, effective rank / r and top-10% share per run, a Mann-Whitney test
    across modules for each pair, and overlays sweep curves where a sweep.json sits beside a run
    (the paper's Figure 4: with more ranks mattering, accuracy falls faster under pruning).
    """
    if len(paths) < 2:
        raise RankscopeError(f"{len(paths)} path given: expected at least two runs to compare")
    _check_out(out_dir, json_target)
    names = [x.strip() for x in labels.split(",")] if labels else None
    if names is not None and len(names) != len(paths):
        raise RankscopeError(f"--labels has {len(names)} names for {len(paths)} paths: expected one name per path")
    loaded = [load_run_for_compare(p) for p in paths]
    for (document, _), path in zip(loaded, paths):  # a repo id is named as typed, not by its commit's cache folder
        document["path"] = str(_typed(path)) if _typed(path) != path else document.get("path")
    result = compare_runs([doc for doc, _ in loaded], names, [sweep for _, sweep in loaded])
    lines = compare_lines(result)
    if out_dir is not None:

        lines += _written(write_compare(result, out_dir, lines))
    _finish(lines, to_json(result) if json_target else None, json_target)


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--energy", type=float, default=0.95, show_default=True,
              help="Share of ΔW's energy (Σσ²) each module must keep, in (0, 1].")
@click.option("--format", "format_", type=click.Choice(FORMAT_CHOICES), help="Force the checkpoint format instead of detecting it.")
@click.option("--step", type=int, help="For a run folder: the snapshot at this step instead of the final adapter.")
@click.option("--json", "json_target", metavar="FILE|-", help="Write the suggestion as JSON to FILE, or to stdout with '-'.")
@_hub_paths("path")
def suggest(path: Path, energy: float, format_: str | None, step: int | None, json_target: str | None) -> None:
    """Suggest a rank per module and a global r from the spectrum of each update.

    Each module keeps the smallest k whose top singular directions hold ENERGY of ΔW's energy
    (relative Frobenius error sqrt(1 − ENERGY) at most); the global r is the 90th percentile of
    those k. Prints a ready-to-paste PEFT LoraConfig (r, lora_alpha, rank_pattern, alpha_pattern
    keeping each module's trained scale, rsLoRA included), or the kohya / mlx-lm equivalent. When
    most modules need all of their rank it says so and suggests a larger r instead. PATH is an
    adapter, or a run folder (its final adapter, or --step N).
    """
    check_energy(energy)  # before anything is read
    _check_out(None, json_target)
    result = suggest_ranks(path, energy=energy, format=format_, step=step)
    _finish(suggest_lines(result), to_json(result) if json_target else None, json_target)


def _placement_options(prefix: str = ""):
    """--device, --precision and --batch-size of an evaluation (sweep, resize --validate); checked before any load."""
    def decorate(command):
        for option in reversed((
            click.option("--device", type=click.Choice(["auto", "cpu", "cuda", "mps"], case_sensitive=False),
                         default="auto", show_default=True,
                         help=f"{prefix}where the base model is evaluated (auto: CUDA, then MPS, then the CPU)."),
            click.option("--precision", type=click.Choice(["fp32", "bf16", "fp16"], case_sensitive=False),
                         default="fp32", show_default=True,
                         help=f"{prefix}dtype the base model is loaded in (the adapter stays float32 on a bf16/fp16 "
                              "base); fp16 is refused on the CPU."),
            click.option("--batch-size", type=int, help=f"{prefix}examples per forward pass (default: the metric's own, "
                                                         "8-64)."),
        )):
            command = option(command)
        return command
    return decorate


@cli.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="New folder for the resized adapter (same format and file names as the input).")
@click.option("--energy", type=float, help="Per module: the smallest rank holding this share of ΔW's energy, in (0, 1].")
@click.option("--rank", type=int, help="The same rank K for every module (capped at the module's rank).")
@click.option("--max-error", type=float,
              help="Per module: the smallest rank whose relative Frobenius error ‖ΔW − ΔW_k‖/‖ΔW‖ is at most this, in (0, 1).")
@click.option("--module-min", type=int, default=1, show_default=True, help="No module goes below this rank.")
@click.option("--dtype", type=click.Choice(["keep", "fp32", "bf16", "fp16"]), default="keep", show_default=True,
              help="dtype of the new A and B (keep: the input's).")
@click.option("--step", type=int, help="For a run folder: the snapshot at this step instead of the final adapter.")
@click.option("--format", "format_", type=click.Choice(FORMAT_CHOICES), help="Force the checkpoint format instead of detecting it.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it already holds an adapter (never anything else).")
@click.option("--validate", is_flag=True,
              help="Evaluate the original and the resized adapter on the same examples (PEFT adapters; the task "
                   "options below, or a beamlora train run's own model, data and held-out split).")
@click.option("--model", "model_spec", help="--validate: base model, minilm, smollm2, a local folder or a Hugging Face repo id "
                   "(default: the run's own).")
@click.option("--data", help="--validate: rotten-tomatoes, a .csv/.jsonl with text and label, or a text file for loss.")
@click.option("--metric", type=click.Choice(["accuracy", "exact_match", "loss", "perplexity"]),
              help="--validate: the metric to compare (default: the run's own; accuracy otherwise).")
@click.option("--examples", type=click.IntRange(min=1), help="--validate: only the first N held-out examples.")
@_placement_options("--validate: ")
@click.option("--json", "json_target", metavar="FILE|-", help="Write the per-module table as JSON to FILE, or to stdout with '-'.")
@_hub_paths("path")
def resize(path: Path, out_dir: Path, energy: float | None, rank: int | None, max_error: float | None, module_min: int,
           dtype: str, step: int | None, format_: str | None, overwrite: bool, validate: bool, model_spec: str | None,
           data: str | None, metric: str | None, examples: int | None, device: str, precision: str,
           batch_size: int | None, json_target: str | None) -> None:
    """Write a smaller adapter: each module truncated to its best rank-k update, in the input's own format.

    Exactly one rule picks each module's k: --energy F (the same rule as `rankscope suggest`),
    --rank K, or --max-error E. The new factors come from the truncated SVD of scale·B·A through
    its r×r core (the best rank-k update in Frobenius and spectral norm), the singular values split
    evenly between B and A, and the config reproduces every module's new rank and trained scale
    (PEFT rank_pattern/alpha_pattern, rsLoRA included; kohya alpha; mlx-lm scale). DoRA and AdaLoRA
    are refused. The output folder is written aside and renamed; the input is never touched.
    """
    check_rule(energy, rank, max_error, module_min)  # before anything is read
    _check_out(None, json_target)
    run_config = read_run_config(path) if validate and path.is_dir() else None
    placement = resolve_placement(device, precision, batch_size) if validate else None
    if validate and resolve_adapter(path, step, format_).format == "gguf":
        raise RankscopeError("--validate evaluates adapters on a transformers model; a GGUF adapter runs in llama.cpp: "
                             "resize it without --validate and check it there (llama-perplexity --lora FILE)")
    if validate:
        _check_model(model_spec or (run_config or {}).get("model"))
        if data is not None and Path(data).suffix:  # a data file (not a packaged set): readable, before any work
            open_data_file(Path(data), "the --validate data").close()
    result = resize_adapter(path, out_dir, energy=energy, rank=rank, max_error=max_error, module_min=module_min,
                        dtype=dtype, overwrite=overwrite, step=step, format=format_)
    if validate:
        result.validation = evaluate_resize(resolve_adapter(path, step, format_), out_dir, model_spec, data, metric,
                                         examples, run_config, placement)
    _finish(result.summary_lines(), to_json(result.to_dict()) if json_target else None, json_target)


def _energies(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = [math.nan]
    if not all(0.0 < v <= 1.0 for v in values):
        raise RankscopeError(f"--energies {text!r}: expected comma-separated shares in (0, 1], e.g. 0.8,0.9,0.95,0.99")
    return values


def _fractions(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or not all(0.0 <= v <= 1.0 for v in values):
        raise RankscopeError(f"--fractions {text!r}: expected comma-separated numbers in [0, 1], e.g. 0,0.1,0.5,1")
    return values


@cli.command()
@click.argument("adapter", type=click.Path(path_type=Path))
@click.option("--model", "model_spec", help="Base model: minilm, smollm2, a local folder or a Hugging Face repo id "
                                            "(owner/name[@rev][/subfolder]) (default: the run's own).")
@click.option("--data", help="rotten-tomatoes, a .csv/.jsonl with text and label, or a .txt/.jsonl text file for loss "
                             "(default: the run's own data and held-out split).")
@click.option("--metric", type=click.Choice(["accuracy", "exact_match", "loss", "perplexity"]),
              help="accuracy on labelled data (default); exact_match of the final answer by greedy generation (default "
                   "for a `beamlora train --task sft` run); loss (cross-entropy, nats per token: a causal LM on a text "
                   "file, or an sft run's response tokens) or perplexity (exp of that loss). Lower is better for the "
                   "last two.")
@click.option("--fractions", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1", show_default=True,
              help="Fractions of each module's ranks to prune.")
@click.option("--order", "orders", default="least,most,random", show_default=True,
              help="Which ranks go first: least, most (by importance), random.")
@click.option("--spectral/--no-spectral", default=True, show_default=True,
              help="Also keep each module's top singular directions of scale·B A (basis-independent curve).")
@click.option("--energies", default="0.8,0.9,0.95,0.99", show_default=True,
              help="Compression view: for each share f, every module keeps the fewest singular directions holding f "
                   "of its energy (what `rankscope resize --energy f` writes); '' to skip.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, show_default=True, help="Seeds for the random order.")
@click.option("--step", type=int, help="For a run folder: sweep the snapshot at this step instead of the final adapter.")
@click.option("--examples", type=click.IntRange(min=1), help="Evaluate on only the first N held-out examples (faster).")
@_placement_options()
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True,
              help="Folder for sweep.json, sweep.csv and sweep.png.")
@click.option("--json", "json_target", metavar="FILE|-", help="Also write the sweep JSON to FILE, or to stdout with '-'.")
@click.option("--progress/--no-progress", default=None, help="Progress bar over points (default: when stderr is a terminal).")
@_hub_paths("adapter")
def sweep(adapter: Path, model_spec: str | None, data: str | None, metric: str | None, fractions: str, orders: str,
          spectral: bool, energies: str, seeds: int, step: int | None, examples: int | None, device: str,
          precision: str, batch_size: int | None, out_dir: Path, json_target: str | None,
          progress: bool | None) -> None:
    """Prune each module's least / most / random important ranks and measure the metric.

    At each fraction f every module loses its round(f·r) ranks (per-module order, as in the
    paper), the model is evaluated, and the weights are restored exactly (no reload). The
    compression view (--energies) keeps in each module the directions holding a share f of its
    energy and plots the metric against the share of parameters kept (compression.png). ADAPTER
    is a PEFT adapter or a run folder (its final adapter, or --step N).
    """
    # imported on use: torch loads only for a sweep
    from rankscope.adapters.sweep import ORDERS, resolve_adapter
    from rankscope.adapters.sweep import sweep as run_sweep

    # Options first: a typo (or an --out that cannot be written) should not cost a model load.
    _check_out(out_dir, json_target)
    fraction_list = _fractions(fractions)
    energy_list = _energies(energies)
    order_list = [o.strip() for o in orders.split(",") if o.strip()]
    unknown = [o for o in order_list if o not in ORDERS]
    if unknown or not order_list:
        raise RankscopeError(f"--order {orders!r}: expected some of least, most, random")
    placement = resolve_placement(device, precision, batch_size)
    checkpoint = resolve_adapter(adapter, step)
    run_config = read_run_config(adapter) if adapter.is_dir() else None
    task = build_evaluation(checkpoint, model_spec, data, metric, examples, run_config, placement)
    result = run_sweep(task.model, checkpoint, task.evaluate, fractions=fraction_list, orders=order_list, seeds=seeds, spectral=spectral,
                       energies=energy_list, progress=progress, metric=task.metric, higher_is_better=task.higher_is_better)
    paths = write_sweep(result, out_dir, title=f"{_typed(adapter).name}: {task.description}")
    lines = [f"sweep: {checkpoint.path.parent} on {task.description} ({placement.describe()})",
             f"  {result.summary_line()}"]
    lines += [f"  note           {note}" for note in result.notes] + _written(paths)
    _finish(lines, result.to_json() if json_target else None, json_target)


def run(group: click.Group, prog_name: str, argv: list[str] | None, errors: tuple[type[Exception], ...],
        results_only: bool = False) -> None:
    """Run a click group; known errors, missing parts and OS errors become one ``Error:`` line, exit 2.
    ``results_only``: stdout carries only what the command writes with :func:`_out`."""
    try:
        with _stdout_for_results_only() if results_only else contextlib.nullcontext():
            group.main(args=argv, prog_name=prog_name, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Error: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except errors as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(getattr(e, "exit_code", 2))  # an interrupted training run: 128 + the signal
    except ImportError as e:  # an optional part (plots, models) is not installed
        click.echo(f"Error: {e}; expected it installed (`make setup` or pip install -e .)", err=True)
        sys.exit(2)
    except OSError as e:  # permission denied, disk full, ...: say what and where
        click.echo(f"Error: {e.strerror or e} ({e.filename or 'no file named'})", err=True)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``rankscope``."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not the user's business
    run(cli, "rankscope", argv, (RankscopeError,), results_only=True)


if __name__ == "__main__":
    main()
