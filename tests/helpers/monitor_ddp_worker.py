"""Run by test_monitor: a 2-process gloo DDP Trainer run with RankMonitorCallback.

Each process trains the same tiny LoRA BERT on its own shard of the data; afterwards it writes
OUT/rank{r}.json with how many records it computed, so the test can check that only rank 0 did.
The workers are forked after the imports, so torch and transformers load once.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from transformers import Trainer, TrainingArguments  # noqa: E402

from helpers.lora import bert_lora  # noqa: E402
from helpers.trainer import TokenData  # noqa: E402
from rankscope.telemetry.callback import RankMonitorCallback  # noqa: E402


def worker(rank: int, world: int, out: str, port: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    model = bert_lora().train()
    args = TrainingArguments(output_dir=os.path.join(out, "trainer"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=2e-2, report_to=[], disable_tqdm=True, use_cpu=True, ddp_backend="gloo",
                             save_strategy="no", logging_steps=1000, dataloader_num_workers=0, seed=3)
    callback = RankMonitorCallback(every=2, output_dir=os.path.join(out, "run"))
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=[callback])
    trainer.train()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"distributed": dist.is_initialized() and dist.get_world_size(), "records": callback.monitor.records,
                   "world_zero": trainer.state.is_world_process_zero}, f)


if __name__ == "__main__":
    out, port = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    mp.start_processes(worker, args=(2, out, port), nprocs=2, join=True, start_method="fork")
