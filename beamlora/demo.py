"""``make demo``: LoRA and BeamLoRA side by side on the embedded default, then rankscope on both.

Same model (MiniLM), data (Rotten Tomatoes), seed, split, steps and snapshots for both runs; only
the method differs. Ends with both held-out accuracies and where the reports and plots are.

    python -m beamlora.demo [--out demo_runs] [--steps 240]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from rankscope.errors import RankscopeError

from .errors import BeamLoraError
from .train import TrainConfig

# The setting of the method notes' small-scale measurement: 360 steps of batch 16, Δt 60.
DEMO = TrainConfig(steps=360, eval_every=180, snapshot_every=40, delta_t=60, held_out=1000)
SWEEP_FRACTIONS = (0.0, 0.25, 0.5, 0.75)
SWEEP_EXAMPLES = 300


def demo_config(method: str, steps: int, held_out: int, out: Path) -> TrainConfig:
    """DEMO, with snapshots and Δt scaled to ``steps`` so a shorter demo keeps the same shape."""
    scaled = lambda every: max(2, round(every * steps / DEMO.steps))  # noqa: E731
    return dataclasses.replace(DEMO, method=method, steps=steps, held_out=held_out, out=str(out / method),
                               eval_every=scaled(DEMO.eval_every), snapshot_every=scaled(DEMO.snapshot_every),
                               trace_every=scaled(DEMO.trace_every),
                               delta_t=scaled(DEMO.delta_t))


def run(out: Path, steps: int = DEMO.steps, held_out: int = DEMO.held_out) -> int:
    from rankscope.analysis import analyze
    from rankscope.compare import compare, compare_lines
    from rankscope.outputs import temporal_view, write_analysis, write_compare

    from .train import train

    results = {}
    started = time.perf_counter()
    for method in ("lora", "beamlora"):
        print(f"== training {method} ({steps} steps) ==", file=sys.stderr)
        results[method] = train(demo_config(method, steps, held_out, out), overwrite=True)

    documents, sweeps = {}, {}
    for method, result in results.items():
        document = analyze(result.run_dir, progress=False)
        dyn, rec, _ = temporal_view(document)
        write_analysis(document, result.run_dir / "report", dyn, rec)
        documents[method] = document
        print(f"== sweeping {method}: least / most important ranks pruned ==", file=sys.stderr)
        sweeps[method] = sweep_run(result.run_dir)
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
    print(f"comparison  {out / 'compare' / 'report.html'}")
    print(f"took {time.perf_counter() - started:.0f} s")
    return 0


def sweep_run(run_dir: Path) -> dict:
    """A light prune-by-importance sweep of the final adapter on held-out examples (rankscope sweep)."""
    from rankscope.sweeps import resolve_adapter, sweep
    from rankscope.sweep_task import build_task

    from .train import read_run_config

    checkpoint = resolve_adapter(run_dir)
    task = build_task(checkpoint, None, None, "accuracy", SWEEP_EXAMPLES, read_run_config(run_dir))
    result = sweep(task.model, checkpoint, task.evaluate, fractions=SWEEP_FRACTIONS, orders=("least", "most"),
                   spectral=False, metric="accuracy")
    result.save(run_dir / "sweep", title=f"{run_dir.name}: {task.description}")
    print(f"  {run_dir.name}: {result.summary_line()}", file=sys.stderr)
    return result.to_dict()


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
