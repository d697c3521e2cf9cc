"""``make demo``: LoRA and BeamLoRA side by side on the embedded default, then rankscope on both.

Same model (MiniLM), data (Rotten Tomatoes), seed, split, steps and snapshots for both runs; only
the method differs. Each run is analysed in both views (per-rank and spectral), swept (least / most
important slots pruned, and the compression view), and resized to 95% of each module's energy with
the accuracy checked before and after. Ends with both held-out accuracies, the resized sizes and
accuracies, and where the reports and plots are.

    python -m beamlora.demo [--out demo_runs] [--steps 240]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from beamlora.errors import BeamLoraError
from beamlora.train import TrainConfig
from rankscope.adapters.resize import evaluate_resize, resize
from rankscope.errors import RankscopeError
from rankscope.io.loading import resolve_adapter
from rankscope.maths.analysis import analyze
from rankscope.maths.compare import compare
from rankscope.tasks.evaluate import build_evaluation
from rankscope.tasks.runconfig import read_run_config
from rankscope.views.outputs import temporal_view, write_analysis, write_compare, write_sweep
from rankscope.views.text import compare_lines

# The setting of the method notes' small-scale measurement: 360 steps of batch 16, Δt 60.
DEMO = TrainConfig(steps=360, eval_every=180, snapshot_every=40, delta_t=60, held_out=1000)
SWEEP_FRACTIONS = (0.0, 0.25, 0.5, 0.75)
SWEEP_ENERGIES = (0.8, 0.95)  # the compression view: each module keeps this share of its energy
SWEEP_EXAMPLES = 300


def demo_config(method: str, steps: int, held_out: int, out: Path) -> TrainConfig:
    """DEMO, with snapshots and Δt scaled to ``steps`` so a shorter demo keeps the same shape."""
    scaled = lambda every: max(2, round(every * steps / DEMO.steps))  # noqa: E731
    return dataclasses.replace(DEMO, method=method, steps=steps, held_out=held_out, out=str(out / method),
                               eval_every=scaled(DEMO.eval_every), snapshot_every=scaled(DEMO.snapshot_every),
                               trace_every=scaled(DEMO.trace_every),
                               delta_t=scaled(DEMO.delta_t))


def run(out: Path, steps: int = DEMO.steps, held_out: int = DEMO.held_out) -> int:
    # imported on use: torch, peft and transformers load only when training starts
    from beamlora.train import train

    results = {}
    started = time.perf_counter()
    for method in ("lora", "beamlora"):
        print(f"== training {method} ({steps} steps) ==", file=sys.stderr)
        results[method] = train(demo_config(method, steps, held_out, out), overwrite=True)

    documents, sweeps, resized = {}, {}, {}
    for method, result in results.items():
        document = analyze(result.run_dir, progress=False)
        dyn, rec, _ = temporal_view(document)
        write_analysis(document, result.run_dir / "report", dyn, rec)
        documents[method] = document
        print(f"== sweeping {method}: least / most important ranks pruned, and the compression view ==", file=sys.stderr)
        sweeps[method] = sweep_run(result.run_dir)
        print(f"== resizing {method} to 95% of each module's energy, checked on the held-out split ==", file=sys.stderr)
        resized[method] = resize_run(result.run_dir)
    comparison = compare([documents["lora"], documents["beamlora"]], ["LoRA", "BeamLoRA"],
                         [sweeps["lora"], sweeps["beamlora"]])
    lines = compare_lines(comparison)
    write_compare(comparison, out / "compare", lines)

    print()
    for line in lines:
        print(line)
    print()
    for method, result in results.items():
        name = "BeamLoRA" if method == "beamlora" else "LoRA"
        print(f"{name:9} held-out accuracy {result.accuracy:.4f}   (majority class {result.majority_rate:.4f}; "
              f"report {result.run_dir / 'report' / 'report.html'})")
    print()
    for method, result in resized.items():
        name = "BeamLoRA" if method == "beamlora" else "LoRA"
        d, v = result.to_dict(), result.validation
        print(f"{name:9} resized to 95% energy: ranks {d['ranks_before']['median']:g} -> median "
              f"{d['ranks_after']['median']:g} (range {d['ranks_after']['min']:g}–{d['ranks_after']['max']:g}), "
              f"LoRA parameters {d['params_after'] / d['params_before']:.0%} kept, file {d['bytes_before'] / 2**20:.2f} -> "
              f"{d['bytes_after'] / 2**20:.2f} MiB, accuracy {v['before']:.4f} -> {v['after']:.4f} ({result.out})")
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
    args = parser.parse_args(argv)
    try:
        sys.exit(run(args.out, args.steps, args.held_out))
    except (BeamLoraError, RankscopeError) as e:
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
