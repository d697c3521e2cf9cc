"""Does BeamLoRA help? LoRA, BeamLoRA and the paper's Table 3 ablations over several seeds, paired by seed.

Each (task, method, seed) trains in its own subprocess (``beamlora.train.train`` with a
``TrainConfig``), so a crash or a kill loses only that run. Its result (final held-out metrics,
wall time, and the rank measures of the final adapter in both views: per-rank effective rank / r
and top-10% share; spectral energy rank at 95% / r, stable rank / r and spectral effective rank / r,
medians over modules) is cached as JSON under the cache folder; a rerun skips every run whose
cached config matches, so an interrupted benchmark resumes where it stopped.

Tasks:
- classification: the default task (MiniLM, Rotten Tomatoes, r=16, batch 16, AdamW 5e-4, the
  demo's settings) for one epoch: 11,752 training examples / 16 = 735 steps. Δt puts five
  operations before end_step = ⌊⅔ · steps⌋; nine snapshots, as in the demo; held-out metrics
  at half time and at the end. Methods: lora, beamlora, no-expansion, random, fixed-p.
- sft: instruction tuning (`beamlora train --task sft`: SmolLM2 on the generated arithmetic set),
  LoRA and BeamLoRA; skipped with a message where TrainConfig has no ``task`` field yet.

The report (printed, and report.md / report.json in the cache folder): mean ± sd per method, the
paired difference to LoRA per seed with its 95% t-interval, and the rank measures.

    .venv/bin/python benchmarks/bench_fidelity.py                  # the full benchmark (hours on a CPU)
    .venv/bin/python benchmarks/bench_fidelity.py --quick          # a tiny smoke run of the whole pipeline
    options: --tasks classification,sft --methods lora,beamlora,... --seeds 0,1,2 --steps N
             --threads 1 (torch threads per run) --jobs 1 (runs in parallel) --cache DIR
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CACHE = REPO / "benchmarks" / ".cache" / "fidelity"
SCHEMA = "bench-fidelity/run-v1"

# method name → TrainConfig fields
METHODS: dict[str, dict[str, str]] = {
    "lora": {"method": "lora"},
    "beamlora": {"method": "beamlora"},
    "no-expansion": {"method": "beamlora", "ablation": "no-expansion"},
    "random": {"method": "beamlora", "ablation": "random"},
    "fixed-p": {"method": "beamlora", "ablation": "fixed-p"},
}
RANK_MEASURES = ("effective_rank_ratio", "top10_share", "energy95_ratio", "stable_rank_ratio",
                 "spectral_effective_rank_ratio")
BASELINES = ("lora", "beamlora")  # paired differences: every method to LoRA, the ablations also to BeamLoRA
BASELINE_NAMES = {"lora": "LoRA", "beamlora": "BeamLoRA"}
LOWER_IS_BETTER = ("loss", "perplexity", "train_loss")
OPERATIONS = 5  # "chosen so that about five operations happen" (the paper)
DEMO_SNAPSHOTS = 9  # the demo: 360 steps, a snapshot every 40


@dataclass(frozen=True)
class Task:
    """One benchmark task: TrainConfig fields, its default methods, and the metric the verdict uses."""

    name: str
    fields: dict[str, Any]
    methods: tuple[str, ...]
    primary: tuple[str, ...]  # the first of these present in the run's metrics
    steps: int | None  # None: whatever TrainConfig gives for these fields
    quick: dict[str, Any] = field(default_factory=dict)
    requires: str | None = None  # a TrainConfig field without which the task cannot run
    evals: int = 2  # held-out evaluations during the run (the last at the end): sft's generation is slow


EPOCH_STEPS = math.ceil((12752 - 1000) / 16)  # Rotten Tomatoes less the 1,000 held out, batch 16: 735
TASKS = {
    "classification": Task("classification", {}, tuple(METHODS), ("accuracy",), EPOCH_STEPS,
                           quick={"steps": 12, "batch_size": 8, "held_out": 64, "max_length": 32}),
    "sft": Task("sft", {"task": "sft", "model": "smollm2", "data": "arithmetic"}, ("lora", "beamlora"),
                ("exact_match", "loss"), None, quick={"steps": 6, "batch_size": 4, "held_out": 16},
                requires="task", evals=1),
}


# ----------------------------------------------------------------------------- planning


def schedule(steps: int, evals: int = 2) -> dict[str, int]:
    """Δt = ⌈end_step / 6⌉: five operations strictly before end_step (fewer in a very short run), by the
    trainer's own rules; the demo's nine snapshots; ``evals`` held-out evaluations evenly spaced, the last
    at the end (two: at half time and at the end)."""
    from rankscope.maths.schedule import MIN_DELTA_T, default_end_step

    delta_t = max(MIN_DELTA_T, math.ceil(default_end_step(steps) / (OPERATIONS + 1)))
    return {"delta_t": delta_t, "snapshot_every": max(1, round(steps / DEMO_SNAPSHOTS)),
            "eval_every": max(1, math.ceil(steps / evals))}


@dataclass
class Run:
    task: str
    method: str
    seed: int
    config: dict[str, Any]  # TrainConfig fields, out included
    cache: Path

    @property
    def key(self) -> str:
        return f"{self.task}/{self.method}/seed {self.seed}"

    @property
    def result_path(self) -> Path:
        return self.cache / "results" / f"{self.task}__{self.method}__seed{self.seed}.json"

    @property
    def log_path(self) -> Path:
        return self.cache / "logs" / f"{self.task}__{self.method}__seed{self.seed}.log"


def task_available(task: Task) -> str | None:
    """None if the task can run in this checkout, else why not."""
    from beamlora.train import TrainConfig

    if task.requires and task.requires not in {f.name for f in dataclasses.fields(TrainConfig)}:
        return (f"skipping task {task.name}: beamlora.train.TrainConfig has no `{task.requires}` field yet "
                "(instruction tuning, `beamlora train --task sft`, is not in this checkout)")
    return None


def plan(tasks: list[str], methods: list[str] | None, seeds: list[int], steps: int | None, quick: bool,
         cache: Path) -> tuple[list[Run], list[str]]:
    """Every (task, method, seed) to have, with its full TrainConfig; and the messages for skipped tasks."""
    from beamlora.train import TrainConfig

    runs, skipped = [], []
    for name in tasks:
        task = TASKS[name]
        why = task_available(task)
        if why:
            skipped.append(why)
            continue
        fields = {**task.fields, **(task.quick if quick else {})}
        n_steps = steps or fields.get("steps") or task.steps or TrainConfig(**fields).steps
        fields.update(steps=n_steps, **schedule(n_steps, task.evals))
        for method in methods or task.methods:
            for seed in seeds:
                out = cache / "runs" / name / method / f"seed-{seed}"
                config = TrainConfig(**fields, **METHODS[method], seed=seed, out=str(out))  # validated now
                runs.append(Run(name, method, seed, dataclasses.asdict(config), cache))
    return runs, skipped


def cached_result(run: Run) -> dict[str, Any] | None:
    """The cached result of this run if it finished with exactly this config, else None."""
    try:
        result = json.loads(run.result_path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(result, dict) and result.get("schema") == SCHEMA and same_config(result.get("config"), run.config)
    return result if ok else None


def same_config(cached: Any, current: dict[str, Any]) -> bool:
    """Equal configs, where a field the cached run did not know yet counts as equal when it has its default
    (a TrainConfig field added later, at its default, does not change what that run trained)."""
    from beamlora.train import TrainConfig

    if not isinstance(cached, dict) or set(cached) - set(current):
        return False
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    return all(cached[k] == v if k in cached else v == defaults.get(k, object()) for k, v in current.items())


# ----------------------------------------------------------------------------- one run (in its own process)


def rank_measures(adapter: Path) -> dict[str, Any]:
    """Medians over modules of the final adapter's per-rank and spectral measures (rankscope.analyze)."""
    import numpy as np

    from rankscope.maths.analysis import analyze
    from rankscope.maths.dynamics import usable

    modules = [m for m in analyze(adapter, progress=False)["snapshots"][-1]["modules"] if usable(m)]

    def median(values: list[float | None]) -> float | None:
        values = [v for v in values if v is not None and math.isfinite(v)]
        return float(np.median(values)) if values else None

    ratio = lambda m, key: m[key] / m["rank"] if m.get(key) is not None else None  # noqa: E731
    return {
        "modules": len(modules),
        "effective_rank_ratio": median([ratio(m, "effective_rank") for m in modules]),
        "top10_share": median([m["top10_share"] for m in modules]),
        "energy95_ratio": median([m["energy_rank"]["0.95"] / m["rank"] if m.get("energy_rank") else None
                                  for m in modules]),
        "stable_rank_ratio": median([ratio(m, "stable_rank") for m in modules]),
        "spectral_effective_rank_ratio": median([ratio(m, "spectral_effective_rank") for m in modules]),
    }


def run_one(spec: dict[str, Any]) -> None:
    """Train, analyse the final adapter, write the result JSON (atomically, strict)."""
    import torch

    from beamlora.train import TrainConfig, train
    from rankscope.io.atomic import write_text
    from rankscope.io.documents import to_json

    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation notices, as the CLI does
    torch.set_num_threads(spec["threads"])
    config = TrainConfig(**spec["config"])
    run_dir = Path(config.out)
    if run_dir.exists():  # left by a killed attempt: the harness made this folder, under its cache
        shutil.rmtree(run_dir)
    started = time.perf_counter()
    result = train(config, progress=False, log=lambda line: print(line, file=sys.stderr, flush=True))
    train_s = time.perf_counter() - started
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = {k: v for k, v in records[-1].items() if k != "step" and isinstance(v, (int, float))}
    started = time.perf_counter()
    ranks = rank_measures(run_dir / "final")
    document = {"schema": SCHEMA, "config": spec["config"], "metrics": final, "step": records[-1]["step"],
                "train_s": train_s, "analysis_s": time.perf_counter() - started, "threads": spec["threads"],
                "events": result.events, "rank": ranks, "majority_rate": result.majority_rate,
                "versions": json.loads((run_dir / "config.json").read_text()).get("versions"),
                "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_text(Path(spec["result"]), to_json(document, indent=2) + "\n")


# ----------------------------------------------------------------------------- running many


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m{rest % 60:02d}s" if h else f"{rest // 60}m{rest % 60:02d}s"


def launch(run: Run, threads: int) -> tuple[int, float]:
    """Run one (task, method, seed) in a fresh Python process; its output goes to the run's log."""
    spec = {"config": run.config, "result": str(run.result_path), "threads": threads}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1"}
    run.log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run.log_path, "w") as log:
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO))
    return done.returncode, time.perf_counter() - started


def headline(result: dict[str, Any], task: Task) -> str:
    metrics = result["metrics"]
    name = next((m for m in task.primary if m in metrics), None)
    return f"{name} {metrics[name]:.4f}" if name else "no metric"


def execute(runs: list[Run], threads: int, jobs: int) -> tuple[dict[str, dict], list[str]]:
    """Run what is not cached yet, ``jobs`` at a time; returns the results by run key and the failures."""
    from tqdm import tqdm

    results, todo = {}, []
    for run in runs:
        cached = cached_result(run)
        if cached is not None:
            results[run.key] = cached
        else:
            todo.append(run)
    print(f"{len(runs)} runs: {len(runs) - len(todo)} cached, {len(todo)} to train "
          f"({jobs} at a time, {threads} torch thread(s) each)", file=sys.stderr)
    failures: list[str] = []
    if not todo:
        return results, failures
    lock, started, state = threading.Lock(), time.perf_counter(), {"begun": 0}

    def one(run: Run) -> tuple[Run, int, float]:
        with lock:
            state["begun"] += 1
            tqdm.write(f"[{hms(time.perf_counter() - started)}] start {run.key} ({state['begun']} of {len(todo)}; "
                       f"log {run.log_path.relative_to(REPO) if run.log_path.is_relative_to(REPO) else run.log_path})",
                       file=sys.stderr)
        code, seconds = launch(run, threads)
        return run, code, seconds

    with tqdm(total=len(todo), desc="fidelity runs", unit="run", file=sys.stderr) as bar, \
            ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in as_completed([pool.submit(one, run) for run in todo]):
            run, code, seconds = future.result()
            result = cached_result(run) if code == 0 else None
            left = bar.total - bar.n - 1
            if result is None:
                tail = run.log_path.read_text(errors="replace").strip().splitlines()[-3:] if run.log_path.exists() else []
                failures.append(f"{run.key}: exit {code}" + (f": {tail[-1]}" if tail else ""))
                tqdm.write(f"[{hms(time.perf_counter() - started)}] FAILED {run.key} (exit {code}, {hms(seconds)}); "
                           f"{left} left; see {run.log_path}" + "".join(f"\n    {line}" for line in tail),
                           file=sys.stderr)
            else:
                results[run.key] = result
                tqdm.write(f"[{hms(time.perf_counter() - started)}] done  {run.key}: "
                           f"{headline(result, TASKS[run.task])} in {hms(seconds)}; {left} left", file=sys.stderr)
            bar.update(1)
    return results, failures


# ----------------------------------------------------------------------------- statistics (pure)


def mean_sd(values: list[float]) -> dict[str, Any]:
    """Mean and sample standard deviation (n − 1; None below two values)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None}
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else None
    return {"n": n, "mean": mean, "sd": sd}


def paired(differences: list[float], level: float = 0.95) -> dict[str, Any]:
    """Mean of paired differences with its two-sided t-interval (Student t, n − 1 degrees of freedom)."""
    from scipy.stats import t as student_t

    out = mean_sd(differences)
    out["ci"] = None
    if out["n"] > 1:
        half = student_t.ppf(0.5 + level / 2, out["n"] - 1) * out["sd"] / math.sqrt(out["n"])
        out["ci"] = [out["mean"] - half, out["mean"] + half]
    return out


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Per task and method: metrics and rank measures (mean ± sd over seeds); paired differences to LoRA
    (every other method) and to BeamLoRA (the ablations: what switching off one part of it costs)."""
    by_task: dict[str, dict[str, dict[int, dict]]] = {}
    for r in results:
        by_task.setdefault(r["task"], {}).setdefault(r["method"], {})[r["seed"]] = r
    summary: dict[str, Any] = {}
    for task, methods in by_task.items():
        table, diffs = {}, {}
        for method, seeds in methods.items():
            runs = [seeds[s] for s in sorted(seeds)]
            metric_names = sorted(set.intersection(*(set(r["metrics"]) for r in runs)))
            table[method] = {
                "seeds": sorted(seeds),
                "metrics": {m: {**mean_sd([r["metrics"][m] for r in runs]),
                                "values": [r["metrics"][m] for r in runs]} for m in metric_names},
                "rank": {k: mean_sd([r["rank"][k] for r in runs if r["rank"].get(k) is not None])
                         for k in RANK_MEASURES},
                "train_s": mean_sd([r["train_s"] for r in runs]),
            }
            for baseline in BASELINES:
                if method in BASELINES[:BASELINES.index(baseline) + 1] or baseline not in methods:
                    continue
                base = methods[baseline]
                common = sorted(set(seeds) & set(base))
                diff = diffs.setdefault(baseline, {})[method] = {"seeds": common, "metrics": {}}
                for m in metric_names:
                    if all(m in base[s]["metrics"] for s in common):
                        values = [seeds[s]["metrics"][m] - base[s]["metrics"][m] for s in common]
                        diff["metrics"][m] = {**paired(values), "per_seed": values}
        summary[task] = {"methods": table, **{f"paired_to_{b}": diffs.get(b, {}) for b in BASELINES}}
    return summary


def verdict(diff: dict[str, Any], lower_is_better: bool, baseline: str = "LoRA") -> str:
    """Where the 95% interval of the paired difference lies."""
    if diff["ci"] is None:
        return "one seed: no interval"
    lo, hi = diff["ci"]
    if lo <= 0 <= hi:
        return "interval includes 0: no difference shown"
    better = (hi < 0) if lower_is_better else (lo > 0)
    return f"better than {baseline}" if better else f"worse than {baseline}"


# ----------------------------------------------------------------------------- report


def fmt(stats: dict[str, Any], digits: int = 4) -> str:
    if stats.get("mean") is None:
        return "n/a"
    sd = f" ± {stats['sd']:.{digits}f}" if stats.get("sd") is not None else ""
    return f"{stats['mean']:.{digits}f}{sd}"


def report_lines(summary: dict[str, Any], meta: dict[str, Any]) -> list[str]:
    lines = [f"# BeamLoRA fidelity benchmark{' (quick smoke run: numbers mean nothing)' if meta['quick'] else ''}", ""]
    lines.append(f"Seeds {', '.join(map(str, meta['seeds']))}; {meta['runs']} runs, {meta['trained']} trained now; "
                 f"training time summed over runs {hms(meta['train_s_total'])}; this invocation took "
                 f"{hms(meta['elapsed_s'])} ({meta['jobs']} at a time, {meta['threads']} torch thread(s) each).")
    for note in meta["notes"]:
        lines.append(f"- {note}")
    for task, block in summary.items():
        t = TASKS[task]
        methods = block["methods"]
        metric_names = sorted({m for v in methods.values() for m in v["metrics"]},
                              key=lambda m: (m not in t.primary, t.primary.index(m) if m in t.primary else 0, m))
        lines += ["", f"## {task}", "", f"Config: {meta['configs'].get(task, '')}", ""]
        lines.append("| method | n | " + " | ".join(metric_names) + " | train time (s) |")
        lines.append("| --- | ---: | " + " | ".join("---:" for _ in metric_names) + " | ---: |")
        for method, v in methods.items():
            cells = [fmt(v["metrics"][m]) if m in v["metrics"] else "n/a" for m in metric_names]
            lines.append(f"| {method} | {len(v['seeds'])} | " + " | ".join(cells) + f" | {fmt(v['train_s'], 0)} |")
        lines += ["", "Rank measures of the final adapter (medians over modules; mean ± sd over seeds). Per-rank: "
                  "effective rank / r, top-10% share; spectral: energy rank at 95% / r, stable rank / r, "
                  "spectral effective rank / r.", ""]
        lines.append("| method | eff. rank / r | top-10% share | energy rank 95% / r | stable rank / r | "
                     "spectral eff. rank / r |")
        lines.append("| --- | ---: | ---: | ---: | ---: | ---: |")
        for method, v in methods.items():
            lines.append(f"| {method} | " + " | ".join(fmt(v["rank"][k], 3) for k in RANK_MEASURES) + " |")
        for baseline in BASELINES:
            diffs = block[f"paired_to_{baseline}"]
            if not diffs:
                continue
            name = BASELINE_NAMES[baseline]
            lines += ["", f"Paired difference to {name} (same seed: same split, initialisation and data order), "
                      "mean with its 95% t-interval:", ""]
            lines.append("| method | metric | per seed | mean | 95% interval | reading |")
            lines.append("| --- | --- | --- | ---: | --- | --- |")
            for method, d in diffs.items():
                for m in metric_names:
                    if m not in d["metrics"] or m == "train_loss":
                        continue
                    x = d["metrics"][m]
                    ci = f"[{x['ci'][0]:+.4f}, {x['ci'][1]:+.4f}]" if x["ci"] else "n/a"
                    per_seed = ", ".join(f"{s}: {v:+.4f}" for s, v in zip(d["seeds"], x["per_seed"]))
                    lines.append(f"| {method} | {m} | {per_seed} | {x['mean']:+.4f} | {ci} | "
                                 f"{verdict(x, m in LOWER_IS_BETTER, name)} |")
    if meta["failures"]:
        lines += ["", "## Failed runs (rerun to retry them)", ""] + [f"- {f}" for f in meta["failures"]]
    return lines


def config_line(runs: list[Run], task: str) -> str:
    config = next(r.config for r in runs if r.task == task)
    keys = ("task", "model", "data", "rank", "alpha", "steps", "batch_size", "lr", "p_init", "delta_t",
            "snapshot_every", "held_out", "max_length")
    return ", ".join(f"{k} {config[k]}" for k in keys if k in config)


# ----------------------------------------------------------------------------- main


def parse_list(text: str, kind=str) -> list:
    return [kind(x.strip()) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="classification,sft", help="comma-separated: classification, sft")
    parser.add_argument("--methods", help=f"comma-separated, of {', '.join(METHODS)} (default: each task's own)")
    parser.add_argument("--seeds", help="comma-separated seeds (default 0,1,2; with --quick 0,1)")
    parser.add_argument("--steps", type=int, help="override every task's steps (Δt and snapshots follow)")
    parser.add_argument("--quick", action="store_true", help="tiny smoke config: proves the pipeline, measures nothing")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel")
    parser.add_argument("--cache", type=Path, help=f"cache folder (default {CACHE.relative_to(REPO)}, "
                        "its quick/ subfolder with --quick)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: the report from the cached runs of this grid, naming the missing ones")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        run_one(json.loads(args.worker))
        return 0

    from beamlora.errors import BeamLoraError
    from rankscope.io.atomic import write_text
    from rankscope.io.documents import to_json

    tasks = parse_list(args.tasks)
    methods = parse_list(args.methods) if args.methods else None
    seeds = parse_list(args.seeds, int) if args.seeds else ([0, 1] if args.quick else [0, 1, 2])
    bad = [t for t in tasks if t not in TASKS] + [m for m in methods or [] if m not in METHODS]
    if bad or args.threads < 1 or args.jobs < 1 or (args.steps is not None and args.steps < 2) or not seeds:
        print(f"Error: unknown task/method {', '.join(bad)}; expected tasks of {', '.join(TASKS)}, methods of "
              f"{', '.join(METHODS)}, --threads/--jobs ≥ 1, --steps ≥ 2, at least one seed"
              if bad else "Error: expected --threads/--jobs ≥ 1, --steps ≥ 2 and at least one seed", file=sys.stderr)
        return 2
    cache = args.cache or (CACHE / "quick" if args.quick else CACHE)
    started = time.perf_counter()
    try:
        runs, skipped = plan(tasks, methods, seeds, args.steps, args.quick, cache)
    except BeamLoraError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 2
    for message in skipped:
        print(message, file=sys.stderr)
    n_cached = sum(cached_result(r) is not None for r in runs)
    try:
        if args.report_only:
            results = {r.key: cached for r in runs if (cached := cached_result(r)) is not None}
            missing = [f"{r.task}/{r.method}/seed {r.seed}" for r in runs if r.key not in results]
            failures = []
            if missing:
                skipped = skipped + [f"not run yet ({len(missing)} of {len(runs)}): {', '.join(missing)}"]
        else:
            results, failures = execute(runs, args.threads, args.jobs)
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished runs stay cached in {cache}; run the same command again to resume",
              file=sys.stderr)
        return 130
    rows = [{**results[r.key], "task": r.task, "method": r.method, "seed": r.seed} for r in runs if r.key in results]
    summary = summarise(rows)
    trained = 0 if args.report_only else len(runs) - n_cached - len(failures)
    meta = {"quick": args.quick, "seeds": seeds, "runs": len(runs), "trained": trained,
            "train_s_total": sum(r["train_s"] for r in rows), "elapsed_s": time.perf_counter() - started,
            "jobs": args.jobs, "threads": args.threads, "notes": skipped, "failures": failures,
            "configs": {t: config_line(runs, t) for t in summary}, "cpus": os.cpu_count()}
    lines = report_lines(summary, meta)
    print("\n".join(lines))
    write_text(cache / "report.md", "\n".join(lines) + "\n")
    write_text(cache / "report.json", to_json({"schema": "bench-fidelity/report-v1", "meta": meta, "summary": summary,
                                               "runs": rows}, indent=2) + "\n")
    print(f"\nreport: {cache / 'report.md'} and report.json", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
