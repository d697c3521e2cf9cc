""""The ranks are not moving": RankMonitorCallback warns once when a dynamic-rank schedule never runs.

Real tiny AdaLoRA PEFT models and BeamLoRA models trained with the real Trainer: without
``update_and_allocate`` (or without BeamLoRA's callback) exactly one warning naming the cause and
``rank/allocation_stale`` = 1 in the logs; with it, none.
"""

from __future__ import annotations

from pathlib import Path

from helpers.lora import bert_lora, tiny_bert
from helpers.trainer import TokenData
from peft import AdaLoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback, TrainingArguments

import beamlora
from beamlora import BeamLoraCallback, BeamLoraConfig
from rankscope.telemetry.allocation import STALE_SCALAR, adalora_due_step
from rankscope.telemetry.callback import RankMonitorCallback

STEPS = 6
TINIT, DELTA_T = 2, 2  # AdaLoRA's first mask at step 4; the check runs at step 5


def train(model, out: Path, callbacks) -> Trainer:
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=8, learning_rate=2e-2, warmup_steps=0,
        weight_decay=0.0, seed=3, data_seed=3, save_strategy="no", logging_steps=1, report_to=[], disable_tqdm=True,
        use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=TokenData(n=48), callbacks=callbacks)
    trainer.train()
    return trainer


def adalora_model():
    config = AdaLoraConfig(init_r=4, target_r=2, tinit=TINIT, tfinal=1, deltaT=DELTA_T, total_step=STEPS,
                           target_modules=["query", "value"], lora_alpha=8)
    return get_peft_model(tiny_bert(), config)


class UpdateAndAllocate(TrainerCallback):
    """What PEFT's docs ask for: update_and_allocate after each optimizer step, while the gradients are there."""

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        model.base_model.update_and_allocate(state.global_step)


def run(tmp_path: Path, model, extra: list) -> tuple[list[str], list[dict]]:
    lines: list[str] = []
    monitor = RankMonitorCallback(every=100, output_dir=tmp_path / "trace", log=lines.append)
    trainer = train(model, tmp_path / "trainer", extra + [monitor])
    warnings = [line for line in lines if "ranks are not moving" in line]
    stale = [entry for entry in trainer.state.log_history if STALE_SCALAR in entry]
    return warnings, stale


def test_adalora_due_step_follows_peft_schedule():
    # The first multiple of deltaT after tinit, or the forced final mask at total_step - tfinal if earlier.
    assert adalora_due_step(2, 2, 6, 1) == 4
    assert adalora_due_step(200, 10, 1000, 100) == 210
    assert adalora_due_step(5, 100, 60, 10) == 50
    assert adalora_due_step(0, 3, None, 0) == 3


def test_adalora_without_update_and_allocate_warns_once_with_the_scalar(tmp_path):
    warnings, stale = run(tmp_path, adalora_model(), [])
    assert len(warnings) == 1, warnings
    assert "update_and_allocate was never called" in warnings[0] and "by step 4 (tinit 2 + deltaT 2)" in warnings[0]
    assert len(stale) == 1 and stale[0][STALE_SCALAR] == 1.0 and stale[0]["step"] == 5


def test_adalora_with_update_and_allocate_does_not_warn(tmp_path):
    model = adalora_model()
    warnings, stale = run(tmp_path, model, [UpdateAndAllocate()])
    assert model.peft_config["default"].rank_pattern  # the schedule really ran: PEFT masked
    assert warnings == [] and stale == []


def test_beamlora_without_its_callback_warns_once_and_with_it_does_not(tmp_path):
    config = dict(delta_t=2, total_steps=STEPS, p_init=0.9)
    model = bert_lora().train()
    beamlora.attach(model, BeamLoraConfig(**config))
    warnings, stale = run(tmp_path / "detached", model, [])
    assert len(warnings) == 1 and "no BeamLoRA operation by step 2 (Δt 2" in warnings[0]
    assert "BeamLoRA callback attached" in warnings[0]
    assert len(stale) == 1 and stale[0]["step"] == 3

    model = bert_lora().train()
    controller = beamlora.attach(model, BeamLoraConfig(**config))
    warnings, stale = run(tmp_path / "attached", model, [BeamLoraCallback(controller)])
    assert controller.events and warnings == [] and stale == []


def test_plain_lora_is_not_watched(tmp_path):
    warnings, stale = run(tmp_path, bert_lora().train(), [])
    assert warnings == [] and stale == []
