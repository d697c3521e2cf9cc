"""Run by test_distributed: BeamLoRA and the rank monitor on one tiny LoRA BERT, three ways.

``single``: one process, the global batch of 8. ``ddp`` / ``fsdp``: 2 gloo processes, 4 examples each
(the same global batch), under DistributedDataParallel or FSDP2 (``fully_shard`` on every BERT layer and on
the model: lora_A split along its rank axis, 3 + 2 of r = 5 slots). Dropout is off, so the three see the same
maths. For each variant (scope, optimizer_state, ablation) a run folder OUT/MODE/VARIANT gets events.jsonl,
rank_trace.jsonl (a record every 2 steps) and final/ (the exported adapter). Imports happen once, before the
workers fork.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification  # noqa: E402

import beamlora  # noqa: E402
from rankscope.telemetry.monitor import RankMonitor  # noqa: E402

VARIANTS = {
    "global-history": dict(scope="global", optimizer_state="history", ablation="none"),
    "module-reset": dict(scope="module", optimizer_state="reset", ablation="none"),
    "official": dict(scope="global", optimizer_state="official", ablation="none"),
    "no-expansion": dict(scope="global", optimizer_state="history", ablation="no-expansion"),
    "random": dict(scope="module", optimizer_state="history", ablation="random"),
}
STEPS, BATCH = 16, 8


def run(mode: str, variant: str, out: str, rank: int, world: int) -> None:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(BertForSequenceClassification(config),
                           LoraConfig(r=5, lora_alpha=10, target_modules=["query", "value"], init_lora_weights=False))
    folder = os.path.join(out, mode, variant)
    controller = beamlora.attach(model, beamlora.BeamLoraConfig(delta_t=4, total_steps=STEPS, p_init=0.8, seed=7,
                                                                output_dir=folder, **VARIANTS[variant]))
    trained = model
    if mode == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(model)
    elif mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.base_model.model.bert.encoder.layer:
            fully_shard(block)
        fully_shard(model)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=5e-3)
    monitor = RankMonitor(folder)
    g = torch.Generator().manual_seed(100)  # the same global batches everywhere
    share = BATCH // world
    for step in range(1, STEPS + 1):
        ids = torch.randint(0, 64, (BATCH, 10), generator=g)
        labels = (ids[:, 0] % 2).long()
        mine = slice(rank * share, (rank + 1) * share)
        trained(input_ids=ids[mine], labels=labels[mine]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
        if step % 2 == 0:
            monitor.record(model, step)
    controller.export(os.path.join(folder, "final"))
    if variant == "global-history":  # the controller's checkpoint state, whole, as rank 0 saves it
        state = controller.state_dict()
        if rank == 0:
            with open(os.path.join(folder, "state.json"), "w") as f:
                json.dump({"step": state["step"], "scores": {k: v.tolist() for k, v in state["scores"].items()}}, f)


def worker(rank: int, world: int, out: str, port: str, modes: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for mode in modes:
        for variant in VARIANTS:
            run(mode, variant, out, rank, world)
    dist.destroy_process_group()


if __name__ == "__main__":
    out, port = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    for variant in VARIANTS:
        run("single", variant, out, 0, 1)
    mp.start_processes(worker, args=(2, out, port, ["ddp", "fsdp"]), nprocs=2, join=True, start_method="fork")
