"""Tiny real transformers models with PEFT LoRA, a plain training loop, and the top-p cut written the slow way."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel

R = 8



def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()



def bert_lora(seed: int = 0, r: int = R, targets=("query", "value")) -> PeftModel:
    model = get_peft_model(tiny_bert(seed), LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets)))
    torch.manual_seed(seed + 100)
    for name, p in model.named_parameters():  # B ≠ 0 so every rank matters from the start
        if "lora_B" in name:
            p.data.normal_(0, 0.2)
    return model



def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()



def batch(seed: int, n: int = 8, length: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 64, (n, length), generator=g), "labels": torch.randint(0, 2, (n,), generator=g)}



def train(model, controller, steps: int, lr: float = 1e-2, before_step=None, seed: int = 0,
          optimizer_class=torch.optim.AdamW):
    """A plain loop: forward, backward, AdamW step, controller step. ``before_step(t, opt)`` runs
    after ``optimizer.step()`` and before ``controller.step`` of optimizer step t."""
    optimizer = optimizer_class(model.parameters(), lr=lr)
    for t in range(1, steps + 1):
        loss = model(**batch(seed * 1000 + t)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if before_step:
            before_step(t, optimizer)
        controller.step(optimizer)
    return optimizer



def slow_cut(values: list[float], p: float) -> set[int]:
    """The rule in words: sort descending, walk the cumulative share; from the rank that reaches p on, prune."""
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    total, running, pruned, crossed = sum(values), 0.0, set(), False
    for i in order:
        running += values[i]
        if crossed or running / total >= p:
            pruned.add(i)
            crossed = True
    return pruned
