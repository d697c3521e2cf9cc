"""Run by test_beamlora_trainer: BeamLoRA under DDP with 2 CPU processes on gloo.

Each process sees different data; afterwards every process writes its adapter, scores and
events to OUT/rank{r}.pt so the test can check that all processes made the same decisions.
"""

import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank: int, world: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from peft import LoraConfig, get_peft_model
    from torch.nn.parallel import DistributedDataParallel
    from transformers import BertConfig, BertForSequenceClassification

    import beamlora

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = get_peft_model(BertForSequenceClassification(config), LoraConfig(r=8, target_modules=["query", "value"]))
    controller = beamlora.attach(model, beamlora.BeamLoraConfig(delta_t=6, total_steps=30, p_init=0.85))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=2e-2)
    g = torch.Generator().manual_seed(100 + rank)  # different data on every process
    for _ in range(30):
        ids = torch.randint(0, 64, (8, 10), generator=g)
        labels = (ids[:, 0] % 2).long()
        ddp(input_ids=ids, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    state = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    torch.save({"params": state, "events": controller.events}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    out, port = sys.argv[1], sys.argv[2]
    mp.spawn(worker, args=(2, out, port), nprocs=2, join=True)
