"""BeamLoraCallback, unchanged, inside TRL's SFTTrainer: the three lines the README shows, on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("trl", reason="trl is a dev dependency (pip install -e '.[dev]'); this test is about TRL")


def test_beamlora_callback_in_trl_sft_trainer(tmp_path):
    from datasets import Dataset
    from helpers.tiny_causal import tiny_model, tiny_tokenizer
    from peft import LoraConfig, PeftModel
    from trl import SFTConfig, SFTTrainer

    import beamlora
    import rankscope

    tokenizer = tiny_tokenizer()
    rows = [{"prompt": f"Question {i}: what is the answer?\nAnswer:", "completion": " #### 42"} for i in range(32)]
    args = SFTConfig(output_dir=str(tmp_path / "trl"), max_steps=12, per_device_train_batch_size=8, learning_rate=3e-2,
                     lr_scheduler_type="constant", bf16=False, use_cpu=True, report_to=[], logging_steps=1,
                     save_strategy="no", disable_tqdm=True, max_length=64, seed=0)
    trainer = SFTTrainer(model=tiny_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer,
                         peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    # The three lines a TRL user adds (after building the trainer, before train()):
    controller = beamlora.attach(trainer.model, beamlora.BeamLoraConfig(delta_t=3, total_steps=args.max_steps,
                                                                        snapshot_every=6, output_dir=tmp_path / "run"))
    trainer.add_callback(beamlora.BeamLoraCallback(controller))
    scores = [s.detach().clone() for s in trainer.model.beam_scores]
    trainer.train()

    assert controller.step_count == trainer.state.global_step == 12
    # TRL built the optimizer after attach, so it trains the scores too.
    assert all(not torch.equal(a, b) for a, b in zip(scores, trainer.model.beam_scores))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert {e["step"] for e in events} == {3, 6} and len(events) == 2 * 4  # end_step 8: two operations, 4 modules
    assert sum(len(e["pruned"]) for e in events) > 0
    document = rankscope.analyze(tmp_path / "run")
    assert [s["step"] for s in document["snapshots"]] == [6, 12]

    controller.export(tmp_path / "final")  # a plain PEFT adapter: it loads with PEFT alone and gives the same outputs
    reloaded = PeftModel.from_pretrained(tiny_model(tokenizer), tmp_path / "final").eval()
    trainer.model.eval()
    ids = torch.tensor([tokenizer("Question 3: what is the answer?\nAnswer:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trainer.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
