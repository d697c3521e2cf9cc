"""Does BeamLoRA run on a CUDA GPU as on the CPU, and what does it cost there? (issue 20, GPU readiness)

Two parts, one run, under 5 minutes on one GPU:

1. **Same result.** A tiny BERT (hidden 32, 2 layers, dropout off) with LoRA r=8 on query/value and
   seeded non-zero B, ``beamlora.attach`` with Δt 2 over 8 steps (p_init 0.9: operations at steps 2 and 4),
   AdamW lr 2e-2 on the same 8 batches, built from the same seed once on the CPU and once on the GPU
   (TF32 off, float32). Checked: the operations (the same slots pruned and expanded, in ``events``), every
   trainable tensor after the last step (LoRA A, B and the scores), and one monitor record
   (``rankscope.telemetry.monitor.measure``: per-rank importances and spectra) agree within a relative
   difference of 1e-4 (max |gpu − cpu| over max |cpu| per tensor). Float32 kernels differ in summation
   order between devices; after eight Adam steps the differences are ~1e-6, so 1e-4 leaves room and
   still catches a wrong slot, a lost moment or a dtype slip (each an O(1) difference).
   Then ``rankscope sweep``'s evaluation on the GPU in bf16 (MiniLM with a LoRA adapter, loss on 256
   rotten-tomatoes examples) against fp32 on the CPU: within 5e-2 relative, and restored bit for bit.
2. **Cost.** SmolLM2-135M-Instruct (the packaged weights, ``rankscope.tasks.models.load_causal_lm``),
   LoRA r=16 on q/k/v/o of all 30 layers, bf16 autocast with float32 weights, batch 16 × 1024 random
   tokens (causal-LM loss), AdamW lr 1e-4. Two models from the same weights and seed: plain LoRA and
   LoRA + ``beamlora.attach`` (Δt 10 over 40 steps). After warm-up their steps alternate on the same
   batches (as ``bench_beamlora.py`` does), each timed with ``torch.cuda.synchronize()`` around it.
   Printed: BeamLoRA step / LoRA step on ordinary steps (goal ≤ 1.05), and one operation's extra time
   in ordinary steps (goal ≤ 2).

Without CUDA it says so and exits 0; ``--cpu-smoke`` first runs both parts on the CPU with tiny sizes
(the CPU against itself, a tiny Llama instead of SmolLM2), so the script is known to run at all.

    .venv/bin/python benchmarks/gpu_check.py                 # on a CUDA machine
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke     # anywhere: a few seconds
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

TOLERANCE = 1e-4  # relative: max |gpu - cpu| / max |cpu| per tensor


# ----------------------------------------------------------------------------- part 1: the same result


def tiny_bert_lora(seed: int = 0):
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(BertForSequenceClassification(config), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                                              target_modules=["query", "value"]))
    gen = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B ≠ 0: every rank matters from the first step
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return model


def tiny_run(device: str, steps: int = 8, delta_t: int = 2) -> tuple[dict, list, list]:
    """(trainable tensors on the CPU, events, monitor modules) after ``steps`` BeamLoRA steps on ``device``."""
    import beamlora
    from beamlora import BeamLoraConfig
    from rankscope.telemetry.monitor import measure

    model = tiny_bert_lora().to(device).train()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=delta_t, total_steps=steps, end_step=steps, p_init=0.9))
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 64, (8, 10), generator=gen)
        labels = (ids[:, 0] < 32).long()
        model(input_ids=ids.to(device), labels=labels.to(device)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)  # where BeamLoraCallback runs it: after the optimizer step
    state = {n: p.detach().float().cpu() for n, p in model.named_parameters() if p.requires_grad}
    modules, _ = measure(model)
    return state, controller.events, modules


def relative(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    scale = float(a.abs().max()) if a.numel() else 0.0
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max()) if a.numel() else 0.0


def same_result(device: str) -> bool:
    """Part 1: BeamLoRA steps and one monitor record on ``device`` against the CPU."""
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 as on the CPU, not TF32
        torch.backends.cudnn.allow_tf32 = False
    start = time.perf_counter()
    cpu_state, cpu_events, cpu_modules = tiny_run("cpu")
    dev_state, dev_events, dev_modules = tiny_run(device)
    ok = True
    ops = sorted({e["step"] for e in cpu_events})
    slots = lambda events: [(e["step"], e.get("module"), e["pruned"], e["sources"]) for e in events]  # noqa: E731
    same_events = slots(cpu_events) == slots(dev_events)
    ok &= same_events and bool(ops)
    print(f"part 1: tiny BERT, LoRA r=8 on query/value, BeamLoRA Δt 2 over 8 steps, {device} against the CPU "
          f"(float32, TF32 off); tolerance {TOLERANCE:g} relative")
    print(f"  operations at steps {ops}: {len(cpu_events)} events on the CPU, {len(dev_events)} on {device}: "
          f"{'the same slots' if same_events else 'DIFFERENT slots'}")
    worst_param = max(relative(cpu_state[n], dev_state[n]) for n in cpu_state)
    ok &= cpu_state.keys() == dev_state.keys() and worst_param <= TOLERANCE
    print(f"  trainable tensors (A, B, scores: {len(cpu_state)}): max relative difference {worst_param:.2e}")
    worst_monitor = 0.0
    for c, d in zip(cpu_modules, dev_modules):
        for field in ("importance", "spectrum", "scores"):
            x, y = getattr(c, field), getattr(d, field)
            if x is not None or y is not None:
                worst_monitor = max(worst_monitor, relative(x, y) if x is not None and y is not None else float("inf"))
    ok &= len(cpu_modules) == len(dev_modules) and worst_monitor <= TOLERANCE
    print(f"  monitor record ({len(cpu_modules)} modules: importances, spectra, scores): max relative difference "
          f"{worst_monitor:.2e}")
    print(f"  {'PASS' if ok else 'FAIL'} ({time.perf_counter() - start:.1f} s)")
    return ok


def sweep_in_bf16(device: str, examples: int) -> bool:
    """Part 1b: ``rankscope.sweep`` with the base model in bf16 on ``device`` against fp32 on the CPU."""
    import tempfile

    from peft import LoraConfig, get_peft_model

    import rankscope
    from rankscope.tasks.models import load_classifier

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        base, _ = load_classifier("minilm", 2)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                init_lora_weights=False))
        model.save_pretrained(tmp)
        options = dict(data="rotten-tomatoes", metric="loss", examples=examples, fractions=(0.0, 0.5, 1.0),
                       orders=("least",), spectral=False, energies=(), progress=False)
        cpu = rankscope.sweep("minilm", tmp, device="cpu", precision="fp32", **options)
        dev = rankscope.sweep("minilm", tmp, device=device, precision="bf16", **options)
    worst = max(abs(dev.value("least", f) - cpu.value("least", f)) / abs(cpu.value("least", f)) for f in (0.0, 0.5, 1.0))
    restored = dev.restored_value == dev.baseline and cpu.restored_value == cpu.baseline
    ok = restored and worst <= 0.05
    print(f"part 1b: rankscope.sweep of a MiniLM LoRA adapter (r=4, loss on {examples} rotten-tomatoes examples), "
          f"bf16 on {device} against fp32 on the CPU; tolerance 5e-2 relative (bf16 rounds the base weights)")
    print(f"  loss at 0, 50%, 100% pruned: max relative difference {worst:.2e}; the metric after restoring equals the "
          f"baseline bit for bit: {restored}")
    print(f"  {'PASS' if ok else 'FAIL'} ({time.perf_counter() - start:.1f} s)")
    return ok


# ----------------------------------------------------------------------------- part 2: the cost


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config)


def base_model(name: str):
    if name == "tiny":
        return tiny_llama()
    from rankscope.tasks.models import load_causal_lm

    model, _ = load_causal_lm(name, tokenizer=False, dtype=torch.float32)
    return model


def lora_copy(name: str, rank: int, device: str):
    from peft import LoraConfig, get_peft_model

    from rankscope.tasks.models import default_targets

    base = base_model(name)
    torch.manual_seed(1)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=default_targets(base),
                        init_lora_weights=False)  # random non-zero B: the ranks differ from step 1
    return get_peft_model(base, config).to(device).train()


def cost(device: str, name: str, rank: int, batch: int, length: int, steps: int, delta_t: int, warmup: int) -> None:
    """Part 2: an ordinary BeamLoRA step and one operation against a LoRA step, interleaved on the same batches."""
    import beamlora
    from beamlora import BeamLoraConfig

    start = time.perf_counter()
    lora, beam = lora_copy(name, rank, device), lora_copy(name, rank, device)
    controller = beamlora.attach(beam, BeamLoraConfig(delta_t=delta_t, total_steps=steps))
    opt_lora = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    opt_beam = torch.optim.AdamW([p for p in beam.parameters() if p.requires_grad], lr=1e-4)
    vocab = lora.config.vocab_size
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(0, vocab, (batch, length), generator=gen) for _ in range(steps)]
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def train_step(model, optimizer, ids) -> float:
        sync()
        begin = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return time.perf_counter() - begin

    rows = []
    for t in range(1, steps + 1):
        ids = batches[t - 1].to(device)
        kind = "operation" if controller.operation_due(t) else "history" if controller.history_due(t) else "ordinary"
        if t % 2:  # who goes first alternates
            a = train_step(lora, opt_lora, ids)
        b = train_step(beam, opt_beam, ids)
        sync()
        begin = time.perf_counter()
        controller.step(opt_beam)
        sync()
        c = time.perf_counter() - begin
        if not t % 2:
            a = train_step(lora, opt_lora, ids)
        if t > warmup:
            rows.append({"lora": a, "beam": b + c, "ctrl": c, "kind": kind})
    ordinary = [r for r in rows if r["kind"] == "ordinary"]
    ops = [r for r in rows if r["kind"] == "operation"]
    med = statistics.median
    lora_ord, beam_ord = med(r["lora"] for r in ordinary), med(r["beam"] for r in ordinary)
    paired = med(r["beam"] / r["lora"] for r in ordinary)
    ctrl_ord = med(r["ctrl"] for r in ordinary)
    op_extra = med(r["ctrl"] for r in ops) - ctrl_ord if ops else float("nan")
    what = "tiny Llama (CPU smoke sizes)" if name == "tiny" else "SmolLM2-135M-Instruct"
    print(f"part 2: {what}, LoRA r={rank} on q/k/v/o, {'bf16 autocast, ' if device == 'cuda' else ''}batch {batch} × "
          f"{length} tokens, {steps} steps per model ({warmup} untimed), interleaved; BeamLoRA Δt {delta_t}, "
          f"operations at {controller.operation_steps()}; on {device}"
          + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print(f"  {'median ordinary step, LoRA (ms)':<56} {lora_ord * 1e3:>10.2f}")
    print(f"  {'median ordinary step, BeamLoRA incl. controller.step (ms)':<56} {beam_ord * 1e3:>10.2f}")
    print(f"  {'ratio of medians BeamLoRA / LoRA':<56} {beam_ord / lora_ord:>10.4f}  goal ≤ 1.05")
    print(f"  {'median of paired ratios (same batch, adjacent in time)':<56} {paired:>10.4f}  goal ≤ 1.05")
    print(f"  {'controller.step on an ordinary step (ms)':<56} {ctrl_ord * 1e3:>10.3f}")
    print(f"  {'one operation: extra time in ordinary BeamLoRA steps':<56} {op_extra / beam_ord:>10.3f}  goal ≤ 2")
    if device == "cuda":
        print(f"  {'peak GPU memory (GiB, both models)':<56} {torch.cuda.max_memory_allocated() / 2**30:>10.2f}")
    print(f"  ({time.perf_counter() - start:.1f} s)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="run both parts on the CPU with tiny sizes first (the CPU against itself, a tiny Llama)")
    parser.add_argument("--model", default="smollm2", help="part 2's base model (default smollm2)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40, help="steps per model in part 2 (= BeamLoRA total_steps)")
    parser.add_argument("--delta-t", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    ok = True
    if args.cpu_smoke:
        torch.set_num_threads(1)
        print("CPU smoke check (tiny sizes; not a measurement):")
        ok &= same_result("cpu")
        ok &= sweep_in_bf16("cpu", examples=8)
        cost("cpu", "tiny", rank=4, batch=2, length=16, steps=8, delta_t=2, warmup=1)
    if not torch.cuda.is_available():
        print("no CUDA device here (torch.cuda.is_available() is False): the GPU check did not run"
              + ("" if args.cpu_smoke else "; --cpu-smoke runs its CPU half as a smoke check"))
        return 0 if ok else 1
    ok &= same_result("cuda")
    ok &= sweep_in_bf16("cuda", examples=256)
    cost("cuda", args.model, args.rank, args.batch, args.length, args.steps, args.delta_t, args.warmup)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
