"""``make demo``: LoRA and BeamLoRA side by side on the embedded default, then rankscope on both.

Same model (MiniLM), data (Rotten Tomatoes), seed, split, steps and snapshots for both runs; only
the method differs. Each run is analysed in both views (per-rank and spectral), swept (least / most
important slots pruned, and the compression view), and resized to 95% of each module's energy with
the accuracy checked before and after. Ends with both held-out accuracies, the resized sizes and
accuracies, and where the reports and plots are.

The two runs are independent until the comparison, so each runs in its own process (``--jobs 2``,
the default), with half the machine's cores: on a small CPU, two one-thread runs side by side finish
sooner than the same runs one after the other with two threads each (small matrices do not keep two
threads busy). Their log lines are relayed, prefixed with the method; each run's results come back as
one JSON line on the worker's stdout. ``--jobs 1`` runs them one after the other in this process.

    python -m beamlora.demo [--out demo_runs] [--steps 360] [--jobs 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from beamlora.errors import BeamLoraError
from beamlora.train import TrainConfig
from rankscope.adapters.resize import evaluate_resize, resize
from rankscope.errors import RankscopeError
from rankscope.io.documents import load_document
from rankscope.io.loading import resolve_adapter
from rankscope.maths.analysis import analyze
from rankscope.maths.compare import compare
from rankscope.tasks.evaluate import build_evaluation
from rankscope.tasks.runconfig import read_run_config
from rankscope.views.outputs import temporal_view, write_analysis, write_compare, write_sweep
from rankscope.views.text import compare_lines

# The setting of the method notes' small-scale measurement: 360 steps of batch 16, Δt 60. One held-out
# evaluation, at the end (the sweep and the resize check evaluate the final adapter again).
DEMO = TrainConfig(steps=360, eval_every=360, snapshot_every=40, delta_t=60, held_out=1000)
METHODS = {"lora": "LoRA", "beamlora": "BeamLoRA"}
SWEEP_FRACTIONS = (0.0, 0.25, 0.5, 0.75)
SWEEP_ENERGIES = (0.8, 0.95)  # the compression view: each module keeps this share of its energy
SWEEP_EXAMPLES = 300
RESULT_PREFIX = "demo-result "  # the worker's one stdout line: this, then its results as JSON


def demo_config(method: str, steps: int, held_out: int, out: Path) -> TrainConfig:
    """DEMO, with snapshots and Δt scaled to ``steps`` so a shorter demo keeps the same shape."""
    scaled = lambda every: max(2, round(every * steps / DEMO.steps))  # noqa: E731
    return dataclasses.replace(DEMO, method=method, steps=steps, held_out=held_out, out=str(out / method),
                               eval_every=scaled(DEMO.eval_every), snapshot_every=scaled(DEMO.snapshot_every),
                               trace_every=scaled(DEMO.trace_every),
                               delta_t=scaled(DEMO.delta_t))


def run_method(method: str, out: Path, steps: int, held_out: int) -> dict[str, Any]:
    """One run, start to end: train, analyse (report), sweep and resize; what the summary needs, as JSON values."""
    # imported on use: torch, peft and transformers load only when training starts
    from beamlora.train import train

    print(f"== training {method} ({steps} steps) ==", file=sys.stderr)
    result = train(demo_config(method, steps, held_out, out), overwrite=True)
    document = analyze(result.run_dir, progress=False)
    dyn, rec, _ = temporal_view(document)
    write_analysis(document, result.run_dir / "report", dyn, rec)
    print(f"== sweeping {method}: least / most important ranks pruned, and the compression view ==", file=sys.stderr)
    sweep = sweep_run(result.run_dir)
    print(f"== resizing {method} to 95% of each module's energy, checked on the held-out split ==", file=sys.stderr)
    resized = resize_run(result.run_dir)
    return {"run_dir": str(result.run_dir), "accuracy": result.accuracy, "majority_rate": result.majority_rate,
            "sweep": sweep, "resized": {**resized.to_dict(), "validation": resized.validation, "out": str(resized.out)}}


def _threads_per_run(jobs: int) -> int:
    return max(1, (os.cpu_count() or 1) // jobs)


def _worker(method: str, out: Path, steps: int, held_out: int, jobs: int) -> subprocess.Popen:
    threads = str(_threads_per_run(jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "beamlora.demo", "--worker", method, "--out", str(out), "--steps", str(steps),
               "--held-out", str(held_out)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _relay(stream: Any, label: str) -> None:
    for line in stream:
        if line.strip():
            print(f"[{label}] {line.rstrip()}", file=sys.stderr, flush=True)


def run_parallel(out: Path, steps: int, held_out: int, jobs: int = 2) -> dict[str, dict[str, Any]]:
    """Both runs in their own processes; a failure in one stops the other and is raised as one error."""
    workers = {method: _worker(method, out, steps, held_out, jobs) for method in METHODS}
    stdout: dict[str, list[str]] = {method: [] for method in METHODS}
    readers = [threading.Thread(target=_relay, args=(w.stderr, m), daemon=True) for m, w in workers.items()]
    readers += [threading.Thread(target=lambda w=w, m=m: stdout[m].extend(w.stdout), daemon=True)
                for m, w in workers.items()]
    for reader in readers:
        reader.start()
    try:
        while any(w.poll() is None for w in workers.values()):
            if any(w.poll() not in (None, 0) for w in workers.values()):
                break  # the other run is stopped below: one failure ends the demo
            time.sleep(0.5)
    finally:
        for worker in workers.values():
            if worker.poll() is None:
                worker.terminate()
                worker.wait()
        for reader in readers:
            reader.join(timeout=5)
    results = {}
    for method, worker in workers.items():
        lines = [line for line in stdout[method] if line.startswith(RESULT_PREFIX)]
        if worker.returncode != 0 or not lines:
            raise BeamLoraError(f"the {method} run stopped (exit status {worker.returncode}); its log lines, "
                                f"prefixed [{method}], say why")
        results[method] = json.loads(lines[-1][len(RESULT_PREFIX):])
    return results


def run(out: Path, steps: int = DEMO.steps, held_out: int = DEMO.held_out, jobs: int = 2) -> int:
    started = time.perf_counter()
    if os.path.lexists(out) and not out.is_dir():  # before two processes each say so
        raise BeamLoraError(f"--out {out} is not a folder: expected a folder for the two runs (created if missing)")
    if jobs > 1:
        results = run_parallel(out, steps, held_out, jobs)
    else:
        results = {method: run_method(method, out, steps, held_out) for method in METHODS}

    documents = [load_document(Path(r["run_dir"]) / "report" / "analysis.json") for r in results.values()]
    comparison = compare(documents, list(METHODS.values()), [r["sweep"] for r in results.values()])
    lines = compare_lines(comparison)
    write_compare(comparison, out / "compare", lines)

    print()
    for line in lines:
        print(line)
    print()
    for method, r in results.items():
        print(f"{METHODS[method]:9} held-out accuracy {r['accuracy']:.4f}   (majority class {r['majority_rate']:.4f}; "
              f"report {Path(r['run_dir']) / 'report' / 'report.html'})")
    print()
    for method, r in results.items():
        d, v = r["resized"], r["resized"]["validation"]
        print(f"{METHODS[method]:9} resized to 95% energy: ranks {d['ranks_before']['median']:g} -> median "
              f"{d['ranks_after']['median']:g} (range {d['ranks_after']['min']:g}–{d['ranks_after']['max']:g}), "
              f"LoRA parameters {d['params_after'] / d['params_before']:.0%} kept, file {d['bytes_before'] / 2**20:.2f} -> "
              f"{d['bytes_after'] / 2**20:.2f} MiB, accuracy {v['before']:.4f} -> {v['after']:.4f} ({d['out']})")
    print(f"comparison  {out / 'compare' / 'report.html'}")
    print(f"took {time.perf_counter() - started:.0f} s")
    return 0


def sweep_run(run_dir: Path) -> dict:
    """A light prune-by-importance sweep of the final adapter on held-out examples (rankscope sweep)."""
    # imported on use: torch, peft and transformers load only when training starts
    from rankscope.adapters.sweep import resolve_adapter, sweep

    checkpoint = resolve_adapter(run_dir)
    task = build_evaluation(checkpoint, None, None, "accuracy", SWEEP_EXAMPLES, read_run_config(run_dir))
    result = sweep(task.model, checkpoint, task.evaluate, fractions=SWEEP_FRACTIONS, orders=("least", "most"),
                   spectral=False, metric="accuracy", energies=SWEEP_ENERGIES)
    write_sweep(result, run_dir / "sweep", title=f"{run_dir.name}: {task.description}")
    print(f"  {run_dir.name}: {result.summary_line()}", file=sys.stderr)
    return result.to_dict()


def resize_run(run_dir: Path):
    """``rankscope resize RUN --energy 0.95 --validate``: the final adapter, smaller, and both on the held-out split."""

    result = resize(run_dir, run_dir / "resized-95", energy=0.95, overwrite=True)
    result.validation = evaluate_resize(resolve_adapter(run_dir), result.out, run_config=read_run_config(run_dir))
    for line in result.summary_lines():
        print(f"  {line}", file=sys.stderr)
    return result


def main(argv: list[str] | None = None) -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, not the user's business
    parser = argparse.ArgumentParser(description="LoRA vs BeamLoRA on MiniLM / Rotten Tomatoes, then rankscope.")
    parser.add_argument("--out", type=Path, default=Path("demo_runs"))
    parser.add_argument("--steps", type=int, default=DEMO.steps)
    parser.add_argument("--held-out", type=int, default=DEMO.held_out)
    parser.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                        help="2: the two runs side by side in their own processes, each with half the cores "
                             "(default); 1: one after the other in this process")
    parser.add_argument("--worker", choices=tuple(METHODS), help=argparse.SUPPRESS)  # one run, for --jobs 2
    args = parser.parse_args(argv)
    try:
        if args.worker:
            result = run_method(args.worker, args.out, args.steps, args.held_out)
            print(RESULT_PREFIX + json.dumps(result), flush=True)
            sys.exit(0)
        sys.exit(run(args.out, args.steps, args.held_out, args.jobs))
    except (BeamLoraError, RankscopeError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
