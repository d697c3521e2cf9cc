"""What does BeamLoRA cost on top of plain PEFT LoRA? (goals: ordinary step ≤ 1.05×, one operation ≤ 2 steps)

A MiniLM-L6 shaped BERT (hidden 384, 6 layers, 12 heads, intermediate 1536, random init), LoRA r=16
on query/key/value/dense, batch 16 × 64 random token ids, AdamW lr 5e-4. Two models built
identically from the same seed: plain PEFT LoRA (A) and the same plus ``beamlora.attach`` (B).
After a few warm-up steps each, their training steps alternate on the same batches (A B, B A,
A B, …), so machine noise hits both alike. Each step times forward + backward + optimizer.step() +
zero_grad(), and for B ``controller.step(optimizer)`` separately.

    .venv/bin/python benchmarks/bench_beamlora.py [--steps 60] [--delta-t 10] [--threads 1]
    .venv/bin/python benchmarks/bench_beamlora.py --distributed   # also 2 gloo processes: DDP and FSDP2

``--distributed`` runs the same comparison three ways on the same global batches: one process, then 2 CPU
processes (gloo, each taking half of every batch) under DDP and under FSDP2 (``beamlora.distributed.shard``:
every BERT layer and the model sharded, lora_A split along its rank axis), and prints per case the
BeamLoRA / LoRA step ratio (rank 0's clock; the collectives keep the processes in step) and the time of one
BeamLoRA operation (controller.step on an operation step, less an ordinary one), with FSDP2's over one
process's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def build(seed: int, rank: int):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                        num_labels=2)  # MiniLM-L6 shape, vocab 30522, dropout 0.1 as in BERT
    base = BertForSequenceClassification(config)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "key", "value", "dense"],
                      init_lora_weights=False)  # random non-zero B: the ranks differ from step 1
    return get_peft_model(base, lora).train()


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def held_bytes(controller) -> dict[str, int]:
    """Tensors and events the controller itself holds (the score moments live in the optimizer)."""
    history = 0
    if controller.history is not None:
        for h in controller.history.values():
            history += tensor_bytes(h.A) + tensor_bytes(h.B) + sum(tensor_bytes(m) for m in h.moments.values())
    scores = sum(tensor_bytes(layer.score) for layer in controller.layers)
    return {"history": history, "scores": scores, "events_json": len(json.dumps(controller.events))}


def rss_mib() -> tuple[float, float]:
    """(peak RSS of the process so far, current RSS) in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    with open("/proc/self/statm") as f:
        current = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return peak, current


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="steps per model, warm-up included (= BeamLoRA total_steps)")
    parser.add_argument("--delta-t", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="first steps of each model left untimed")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import beamlora
    from beamlora import BeamLoraConfig

    lora = build(0, args.rank)
    beam = build(0, args.rank)
    with torch.no_grad():
        assert all(torch.equal(p, q) for p, q in zip(lora.parameters(), beam.parameters()))
    controller = beamlora.attach(beam, BeamLoraConfig(delta_t=args.delta_t, total_steps=args.steps))
    opt_lora = torch.optim.AdamW(lora.parameters(), lr=5e-4)
    opt_beam = torch.optim.AdamW(beam.parameters(), lr=5e-4)
    lora_params = sum(tensor_bytes(p) for n, p in lora.named_parameters() if "lora_" in n)

    g = torch.Generator().manual_seed(1)
    n_batches = args.steps
    batches = [{"input_ids": torch.randint(1000, 30000, (args.batch, args.length), generator=g),
                "labels": torch.randint(0, 2, (args.batch,), generator=g)} for _ in range(n_batches)]

    def train_step(model, optimizer, inputs) -> float:
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    # The first --warmup steps of both models are real training steps (controller.step included,
    # so BeamLoRA's schedule counts them) but untimed; no snapshot or operation falls in them.
    assert not any(controller.history_due(t) or controller.operation_due(t) for t in range(1, args.warmup + 1))
    rows = []  # per timed step t: lora train, beam train, controller.step, kind
    memory = {}
    rss = {}
    mid = args.steps // 3
    for t in range(1, args.steps + 1):
        inputs = batches[t - 1]
        kind = "operation" if controller.operation_due(t) else "history" if controller.history_due(t) else "ordinary"
        if t % 2:  # who goes first alternates, so neither model always follows the other
            a = train_step(lora, opt_lora, inputs)
        b = train_step(beam, opt_beam, inputs)
        start = time.perf_counter()
        events = controller.step(opt_beam)
        c = time.perf_counter() - start
        if not t % 2:
            a = train_step(lora, opt_lora, inputs)
        if t > args.warmup:
            pruned = sum(len(e["pruned"]) for e in events)
            rows.append({"t": t, "lora": a, "beam": b, "ctrl": c, "kind": kind, "pruned": pruned})
        memory[t] = held_bytes(controller)
        if t in (mid, args.steps):
            rss[t] = rss_mib()

    ordinary = [r for r in rows if r["kind"] == "ordinary"]
    med = statistics.median
    lora_ord = med(r["lora"] for r in ordinary)
    beam_ord = med(r["beam"] + r["ctrl"] for r in ordinary)
    paired = med((r["beam"] + r["ctrl"]) / r["lora"] for r in ordinary)
    ctrl_ord = med(r["ctrl"] for r in ordinary)
    ops = [r for r in rows if r["kind"] == "operation"]
    hist = [r for r in rows if r["kind"] == "history"]
    op_cost = med(r["ctrl"] for r in ops) - ctrl_ord if ops else float("nan")
    hist_cost = med(r["ctrl"] for r in hist) - ctrl_ord if hist else float("nan")

    modules = len(controller.layers)
    history_peak = max(m["history"] for m in memory.values())
    peak_to_mid = max(memory[t]["history"] for t in range(1, mid + 1))
    print(f"BERT hidden 384 × 6 layers × 12 heads, intermediate 1536 (random init); LoRA r={args.rank} on "
          f"query/key/value/dense = {modules} modules; batch {args.batch} × {args.length} tokens; AdamW lr 5e-4; "
          f"torch threads {args.threads}; {args.steps} steps per model, the first {args.warmup} untimed, "
          f"interleaved LoRA/BeamLoRA; delta_t {args.delta_t}")
    print(f"BeamLoRA schedule: history at {[r['t'] for r in hist]}, operations at {[r['t'] for r in ops]} "
          f"(pruned+expanded slots per operation: {[r['pruned'] for r in ops]})")
    print()
    print(f"{'quantity':<58} {'value':>12}  goal")
    print(f"{'median ordinary step, LoRA (ms)':<58} {lora_ord * 1e3:>12.1f}")
    print(f"{'median ordinary step, BeamLoRA incl. controller.step (ms)':<58} {beam_ord * 1e3:>12.1f}")
    print(f"{'ratio of medians BeamLoRA / LoRA':<58} {beam_ord / lora_ord:>12.4f}  ≤ 1.05")
    print(f"{'median of paired ratios (same batch, adjacent in time)':<58} {paired:>12.4f}  ≤ 1.05")
    print(f"{'controller.step on an ordinary step (ms)':<58} {ctrl_ord * 1e3:>12.3f}")
    print(f"{'operation: controller.step extra (ms)':<58} {op_cost * 1e3:>12.1f}")
    print(f"{'operation cost in ordinary BeamLoRA steps':<58} {op_cost / beam_ord:>12.4f}  ≤ 2")
    print(f"{'historical snapshot: controller.step extra (ms)':<58} {hist_cost * 1e3:>12.1f}")
    print(f"{'historical snapshot cost in ordinary BeamLoRA steps':<58} {hist_cost / beam_ord:>12.4f}")
    print()
    scores = memory[args.steps]["scores"]
    print(f"{'LoRA parameter bytes (A + B, all modules)':<58} {lora_params:>12,}")
    print(f"{'history when held (A, B, 2 Adam moments each) bytes':<58} {history_peak:>12,}")
    print(f"{'history / LoRA parameter bytes':<58} {history_peak / lora_params:>12.3f}")
    print(f"{'score parameter bytes':<58} {scores:>12,}")
    print(f"{'score bytes incl. their 2 AdamW moments (in the optimizer)':<58} {3 * scores:>12,}")
    print(f"{'(history + scores + score moments) / LoRA parameter bytes':<58} "
          f"{(history_peak + 3 * scores) / lora_params:>12.3f}")
    for t in (mid, args.steps):
        m = memory[t]
        print(f"{f'after step {t}: history / scores / events JSON bytes':<58} "
              f"{m['history']:,} / {m['scores']:,} / {m['events_json']:,}")
    print(f"{f'max history bytes over steps 1..{mid} vs 1..{args.steps}':<58} {peak_to_mid:,} vs {history_peak:,}")
    n_ops_mid = sum(1 for r in ops if r["t"] <= mid)
    if n_ops_mid and len(ops) > n_ops_mid:
        per_op = (memory[args.steps]["events_json"] - memory[mid]["events_json"]) / (len(ops) - n_ops_mid)
        print(f"{'events JSON growth per operation (bytes; none between)':<58} {per_op:>12,.0f}")
    (p1, c1), (p2, c2) = rss[mid], rss[args.steps]
    print(f"{f'process RSS peak / current after step {mid} (MiB)':<58} {p1:.1f} / {c1:.1f}")
    print(f"{f'process RSS peak / current after step {args.steps} (MiB)':<58} {p2:.1f} / {c2:.1f}")
    print("(RSS is one process holding both models; the allocator makes its growth noisy, not a per-model figure)")


def case(mode: str, args: argparse.Namespace, rank: int = 0, world: int = 1) -> dict[str, float]:
    """One comparison (``mode``: single, ddp or fsdp) in this process; every process of a group calls it."""
    import beamlora
    from beamlora import BeamLoraConfig
    from beamlora.distributed import shard

    lora, beam = build(0, args.rank), build(0, args.rank)
    controller = beamlora.attach(beam, BeamLoraConfig(delta_t=args.delta_t, total_steps=args.steps))
    run_lora, run_beam = lora, beam
    if mode == "ddp":
        run_lora, run_beam = (torch.nn.parallel.DistributedDataParallel(m) for m in (lora, beam))
    elif mode == "fsdp":
        shard(lora)
        shard(beam)
    opt_lora = torch.optim.AdamW(run_lora.parameters(), lr=5e-4)
    opt_beam = torch.optim.AdamW(run_beam.parameters(), lr=5e-4)
    g = torch.Generator().manual_seed(1)
    share = args.batch // world
    mine = slice(rank * share, (rank + 1) * share)
    batches = [{"input_ids": torch.randint(1000, 30000, (args.batch, args.length), generator=g)[mine],
                "labels": torch.randint(0, 2, (args.batch,), generator=g)[mine]} for _ in range(args.steps)]

    def train_step(model, optimizer, inputs) -> float:
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    rows = []
    for t in range(1, args.steps + 1):
        kind = "operation" if controller.operation_due(t) else "history" if controller.history_due(t) else "ordinary"
        if t % 2:
            a = train_step(run_lora, opt_lora, batches[t - 1])
        b = train_step(run_beam, opt_beam, batches[t - 1])
        start = time.perf_counter()
        controller.step(opt_beam)
        c = time.perf_counter() - start
        if not t % 2:
            a = train_step(run_lora, opt_lora, batches[t - 1])
        if t > args.warmup:
            rows.append({"lora": a, "beam": b, "ctrl": c, "kind": kind})
    med = statistics.median
    ordinary = [r for r in rows if r["kind"] == "ordinary"]
    ctrl = med(r["ctrl"] for r in ordinary)
    ops = [r["ctrl"] - ctrl for r in rows if r["kind"] == "operation"]
    return {"lora": med(r["lora"] for r in ordinary), "beam": med(r["beam"] + r["ctrl"] for r in ordinary),
            "paired": med((r["beam"] + r["ctrl"]) / r["lora"] for r in ordinary), "operation": med(ops)}


def _worker(rank: int, world: int, port: str, args: argparse.Namespace, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = {mode: case(mode, args, rank, world) for mode in ("ddp", "fsdp")}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def distributed(args: argparse.Namespace) -> None:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    import beamlora  # noqa: F401  (imported before the workers fork)

    results = {"single": case("single", args)}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.json")
        mp.start_processes(_worker, args=(2, port, args, out), nprocs=2, join=True, start_method="fork")
        results.update(json.loads(Path(out).read_text()))
    print()
    print(f"distributed: global batch {args.batch} × {args.length}, {args.steps} steps, Δt {args.delta_t}, "
          f"{args.threads} torch thread(s) per process, 2 processes on gloo for ddp / fsdp")
    print(f"{'case':<8} {'LoRA step (ms)':>15} {'BeamLoRA step (ms)':>19} {'ratio':>7} {'paired':>7} "
          f"{'operation (ms)':>15}")
    for mode, r in results.items():
        print(f"{mode:<8} {r['lora'] * 1e3:>15.1f} {r['beam'] * 1e3:>19.1f} {r['beam'] / r['lora']:>7.4f} "
              f"{r['paired']:>7.4f} {r['operation'] * 1e3:>15.2f}")
    print(f"BeamLoRA / LoRA goal ≤ 1.05 under both; one operation under FSDP2 / one process: "
          f"{results['fsdp']['operation'] / results['single']['operation']:.2f}")


if __name__ == "__main__":
    if "--distributed" in sys.argv:
        sys.argv.remove("--distributed")
        parser = argparse.ArgumentParser()
        for name, default in (("--steps", 60), ("--delta-t", 10), ("--warmup", 3), ("--threads", 1), ("--rank", 16),
                              ("--batch", 16), ("--length", 64)):
            parser.add_argument(name, type=int, default=default)
        options = parser.parse_args()
        torch.set_num_threads(options.threads)
        distributed(options)
    else:
        main()
