"""What does a training step of the sft default cost, and what does ``logits_to_keep`` save?

SmolLM2-135M-Instruct with the sft default's LoRA (r=8 on q/k/v/o of all 30 layers), batches of
the default size from the built-in arithmetic set, AdamW. Two collators on the same batches: the
full vocabulary projection at every position (A) and logits from the first response position on
only (B, what ``beamlora train --task sft`` uses). After two warm-up steps each, steps alternate
(A B, B A, ...) so machine noise hits both alike; each step times forward + backward + optimizer
step. Also times one held-out evaluation (loss and generation) on a few problems.

    .venv/bin/python benchmarks/bench_sft.py [--steps 10] [--threads 2] [--eval-examples 16]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per collator")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--eval-examples", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from peft import LoraConfig, get_peft_model

    from beamlora.train import TrainConfig
    from rankscope.tasks import models, sft
    from rankscope.tasks.sft_data import load_sft_data

    config = TrainConfig(task="sft")
    base, tokenizer = models.load_causal_lm(config.model)
    data = load_sft_data(config.data, args.eval_examples, config.seed)
    train_set = sft.encode_all(data.train, tokenizer, config.max_length)
    held_out = sft.encode_all(data.held_out, tokenizer, config.max_length)
    model = get_peft_model(base, LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                            target_modules=models.default_targets(base), task_type="CAUSAL_LM"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    collators = {"full": sft.collator(tokenizer.pad_token_id, False), "keep": sft.collator(tokenizer.pad_token_id, True)}
    bs = config.batch_size

    def step(name: str, i: int) -> float:
        batch = collators[name](train_set.items[i * bs:(i + 1) * bs])
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return time.perf_counter() - start

    model.train()
    for i in range(2):
        step("full", i), step("keep", i)
    times: dict[str, list[float]] = {"full": [], "keep": []}
    ratios = []
    for i in range(2, 2 + args.steps):
        order = ("full", "keep") if i % 2 else ("keep", "full")
        pair = {name: step(name, i) for name in order}  # the same batch for both
        for name, t in pair.items():
            times[name].append(t)
        ratios.append(pair["keep"] / pair["full"])
    tokens = statistics.mean(len(x.input_ids) for x in train_set.items[:bs * (2 + args.steps)])
    print(f"threads {args.threads}, batch {bs} x {tokens:.0f} tokens (mean), load average {os.getloadavg()[0]:.1f}")
    print(f"  step, full logits          median {statistics.median(times['full']):.2f} s")
    print(f"  step, logits_to_keep       median {statistics.median(times['keep']):.2f} s")
    print(f"  ratio keep / full (paired) median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")

    start = time.perf_counter()
    loss = sft.mean_loss(model, tokenizer, held_out, progress=False)
    middle = time.perf_counter()
    rate = sft.exact_match_rate(model, tokenizer, held_out, progress=False)
    end = time.perf_counter()
    print(f"  held-out loss on {len(held_out)} problems   {middle - start:.1f} s (loss {loss:.3f})")
    print(f"  held-out generation on {len(held_out)}      {end - middle:.1f} s (exact match {rate:.3f})")


if __name__ == "__main__":
    main()
