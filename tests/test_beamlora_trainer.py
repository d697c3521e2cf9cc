"""BeamLoRA inside transformers.Trainer (accumulation, checkpoints, resume) and under DDP."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from helpers.lora import bert_lora
from helpers.trainer import TokenData, free_port
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

import beamlora
from beamlora import BeamLoraCallback, BeamLoraConfig, SnapshotCallback


def trainer_for(model, out: Path, callbacks, max_steps: int, accumulation: int = 1, save_steps: int | None = None):
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, gradient_accumulation_steps=accumulation,
        learning_rate=2e-2, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, seed=3, data_seed=3,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, logging_steps=1000,
        report_to=[], disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, save_only_model=False)
    return Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=callbacks)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    model = bert_lora().train()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=4, total_steps=12, end_step=12, p_init=0.9,
                                                       output_dir=tmp_path / "run", snapshot_every=6))
    trainer_for(model, tmp_path / "trainer", [BeamLoraCallback(controller)], max_steps=12, accumulation=3).train()
    assert controller.step_count == 12  # 36 micro-batches, 12 optimizer steps
    assert sorted({e["step"] for e in controller.events}) == [4, 8]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["events.jsonl", "step-000006", "step-000012"]


def test_resumed_run_ends_with_the_same_adapter(tmp_path):
    config = dict(delta_t=4, total_steps=16, p_init=0.85)

    def run(resume: str | None):
        model = bert_lora().train()
        controller = beamlora.attach(model, BeamLoraConfig(**config))
        counter = StepCounter()
        trainer_for(model, tmp_path / "trainer", [BeamLoraCallback(controller), counter], max_steps=16,
                    save_steps=6).train(resume_from_checkpoint=resume)
        target = tmp_path / ("resumed" if resume else "straight")
        controller.export(target)
        return controller, load_file(target / "adapter_model.safetensors"), counter.steps

    straight, weights, steps = run(None)
    assert steps == 16 and (tmp_path / "trainer" / "checkpoint-6" / "beamlora_state.pt").is_file()
    assert {e["step"] for e in straight.events} == {4, 8}  # the resume point (6) sits between operations
    resumed, resumed_weights, steps = run(str(tmp_path / "trainer" / "checkpoint-6"))
    assert steps == 10  # it really resumed: only the last 10 optimizer steps ran
    assert resumed.events == straight.events
    assert weights.keys() == resumed_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], resumed_weights[key]), key


class StepCounter(TrainerCallback):
    def __init__(self):
        self.steps = 0

    def on_step_end(self, *args, **kwargs):
        self.steps += 1


def test_snapshot_callback_writes_plain_lora_snapshots_rankscope_reads(tmp_path):
    import rankscope

    model = bert_lora().train()
    trainer_for(model, tmp_path / "trainer", [SnapshotCallback(every=5, output_dir=tmp_path / "run")], max_steps=10).train()
    series = rankscope.load(tmp_path / "run")
    assert series.layout == "beamlora-run" and series.steps == [5, 10]
    final = series[-1]
    for name, p in model.named_parameters():
        if "lora_A" in name:
            module = name.split(".lora_A")[0]
            assert torch.equal(torch.tensor(final[module].A), p.detach())


def test_ddp_processes_make_identical_decisions(tmp_path):
    worker = Path(__file__).parent / "helpers" / "ddp_worker.py"
    done = subprocess.run([sys.executable, str(worker), str(tmp_path), free_port()], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0["events"] == rank1["events"]
    assert sum(len(e["pruned"]) for e in rank0["events"]) > 0  # operations really happened
    assert {e["step"] for e in rank0["events"]} == {6, 12, 18}
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
