"""#20: the options of ``beamlora train`` for real runs (--config, --precision, --grad-accum, --lr-scheduler,
--epochs, --targets all-linear, --device, --dry-run), the recipes, and their bad input.

Numbers are checked against independent computations written out here (steps from epochs, the schedule's
operation steps and p, the cosine-with-warm-up learning rate); gradient accumulation against the same global
batch in one step, on a real tiny BERT without dropout.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
from conftest import save_tiny_bert
from helpers.cli import REPO, run_beamlora
from helpers.lora import bert_lora
from helpers.trainer import TokenData
from safetensors.torch import load_file

import beamlora
from beamlora import cli as beamlora_cli
from beamlora.config import BeamLoraConfig, TrainConfig
from beamlora.configfile import read_config_file
from beamlora.errors import BeamLoraError
from beamlora.resolve import Prepared, training_arguments
from beamlora.train import train

RECIPES = REPO / "recipes"
QUIET = dict(progress=False, log=lambda line: None)


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A 2-layer BERT of width 32 WITHOUT dropout (so split batches give the same maths), MiniLM's tokenizer."""
    return save_tiny_bert(tmp_path_factory.mktemp("bert-no-dropout"), dropout=False)


@pytest.fixture(scope="module")
def reviews(tmp_path_factory):
    """60 labelled snippets of different lengths (so micro-batches pad differently from whole batches)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("reviews") / "reviews.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(60):
            good = i % 2 == 0
            word = rng.choice(["great", "superb"] if good else ["awful", "dull"])
            writer.writerow([f"the film was {word} " + "so " * rng.randint(0, 6), "pos" if good else "neg"])
    return path


def dry_plan(capsys, *args) -> dict:
    """``beamlora train ARGS --dry-run --json -``, in this process, as the CLI runs it; the plan it prints."""
    beamlora_cli.main(["train", *map(str, args), "--dry-run", "--json", "-"])
    out, _ = capsys.readouterr()
    return json.loads(out)


def expected_operations(delta_t: int, end_step: int, steps: int, p_init: float) -> list[tuple[int, float]]:
    """The schedule written out: multiples of Δt strictly before end_step with Δt steps left; p on the cosine."""
    ops, t = [], delta_t
    while t <= steps:
        if t < end_step and t + delta_t <= steps:
            ops.append((t, p_init + 0.5 * (1 - p_init) * (1 - math.cos(math.pi * t / end_step))))
        t += delta_t
    return ops


# ----------------------------------------------------------------------------- --config


def test_config_file_json_and_yaml_read_the_same_and_the_command_line_wins(capsys, tmp_path, bert_folder, reviews):
    options = {"model": str(bert_folder), "data": str(reviews), "held_out": 10, "rank": 4, "alpha": 8,
               "batch_size": 8, "epochs": 2, "delta_t": 2, "lr": 3e-4, "lr_scheduler": "cosine", "warmup_ratio": 0.1,
               "targets": "query,value", "precision": "bf16", "grad_accum": 2}
    (tmp_path / "run.json").write_text(json.dumps(options))
    # YAML as people write it: lr as 3e-4 (a string to YAML 1.1), option spellings with dashes, a list of targets
    (tmp_path / "run.yaml").write_text("\n".join(
        [f"{k.replace('_', '-')}: {v}" for k, v in options.items() if k not in ("targets", "lr")]
        + ["lr: 3e-4", "targets: [query, value]", "# a comment"]))
    from_json, from_yaml = (read_config_file(tmp_path / name) for name in ("run.json", "run.yaml"))
    assert from_json == from_yaml == {**options, "targets": ["query", "value"]}

    plan = dry_plan(capsys, "--config", tmp_path / "run.yaml")
    assert {k: plan["config"][k] for k in options} == {**options, "targets": ["query", "value"]}
    assert plan["config"]["steps"] == math.ceil(50 / 8) * 2  # 60 examples, 10 held out

    # flags on the command line win over the file; --steps replaces the file's epochs, --warmup-steps its ratio
    plan = dry_plan(capsys, "--config", tmp_path / "run.json", "--rank", "2", "--precision", "fp32", "--steps", "9",
                    "--warmup-steps", "3", "--grad-accum", "1", "--targets", "key")
    config = plan["config"]
    assert (config["rank"], config["precision"], config["steps"], config["epochs"], config["grad_accum"]) == \
           (2, "fp32", 9, None, 1)
    assert (config["warmup_steps"], config["warmup_ratio"], plan["optimizer"]["warmup_steps"]) == (3, None, 3)
    assert plan["lora"]["module_count"] == 2 and all(m.endswith(".key") for m in plan["lora"]["modules"])
    assert (config["alpha"], config["lr"], config["lr_scheduler"]) == (8, 3e-4, "cosine")  # the file's, untouched


def test_a_run_config_json_reads_back_as_a_config_file(tmp_path):
    record = {**TrainConfig(epochs=3).__dict__, "steps": 120, "versions": {"torch": "2"}, "train_examples": 40}
    (tmp_path / "config.json").write_text(json.dumps(record))
    again = read_config_file(tmp_path / "config.json")
    assert again["steps"] == 120 and "epochs" not in again and "versions" not in again
    assert TrainConfig(**again).steps == 120  # the resolved steps rerun


# ----------------------------------------------------------------------------- --dry-run


def test_dry_run_plan_matches_an_independent_computation(capsys, tmp_path, bert_folder, reviews):
    from transformers import AutoConfig, BertForSequenceClassification

    out = tmp_path / "never-written"
    plan = dry_plan(capsys, "--model", bert_folder, "--data", reviews, "--held-out", 10, "--batch-size", 8,
                    "--grad-accum", 2, "--epochs", 2.5, "--delta-t", 2, "--p-init", 0.9, "--targets", "all-linear",
                    "--lr-scheduler", "cosine", "--warmup-ratio", 0.1, "--rank", 4, "--out", out)
    assert not out.exists()
    per_epoch = math.ceil((60 - 10) / 8)
    steps = math.ceil(per_epoch * 2.5)
    assert (plan["data"]["train_examples"], plan["steps_per_epoch"], plan["steps"]) == (50, per_epoch, steps)
    assert plan["batch"] == {"global": 8, "grad_accum": 2, "processes": 1, "micro_batch": 4}
    assert plan["optimizer"]["warmup_steps"] == math.ceil(0.1 * steps)
    end = 2 * steps // 3
    got = [(op["step"], op["p"]) for op in plan["beamlora"]["operations"]]
    want = expected_operations(2, end, steps, 0.9)
    assert [s for s, _ in got] == [s for s, _ in want] and plan["beamlora"]["end_step"] == end
    assert all(op["history_step"] == op["step"] - 1 for op in plan["beamlora"]["operations"])
    assert [p for _, p in got] == pytest.approx([p for _, p in want], rel=1e-12)
    # all-linear: every Linear of the model but the classification head (PEFT's rule), counted the slow way
    model = BertForSequenceClassification(AutoConfig.from_pretrained(bert_folder, num_labels=2))
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier"]
    assert sorted(m.removeprefix("base_model.model.") for m in plan["lora"]["modules"]) == sorted(linear)
    assert plan["lora"]["module_count"] == len(linear) == 13
    lora_params = sum(4 * (m.in_features + m.out_features) for n, m in model.named_modules() if n in linear)
    head = sum(p.numel() for p in model.classifier.parameters())
    assert plan["lora"]["trainable_parameters"] == lora_params + head + 4 * len(linear)  # + one score per rank


def test_dry_run_text_plan(capsys, tmp_path, bert_folder, reviews):
    beamlora_cli.main(["train", "--model", str(bert_folder), "--data", str(reviews), "--held-out", "10",
                       "--batch-size", "8", "--steps", "12", "--delta-t", "4", "--dry-run", "--out", str(tmp_path / "run")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("dry run: beamlora classification")
    assert any(line.split() == ["step", "4", "p", f"{expected_operations(4, 8, 12, 0.95)[0][1]:.4f}"] for line in lines)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- the recipes


@pytest.mark.parametrize("recipe", ["llama2-7b-metamathqa", "mistral-7b-metamathqa"])
def test_paper_recipes_resolve_with_a_packaged_model(capsys, tmp_path, recipe):
    # The real weights and MetaMathQA are not here: SmolLM2 (a Llama: the same seven projections) stands in, a
    # small JSONL for the data, and --steps for the 37,032 steps 3 epochs of the 395K set give at batch 32.
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?\n", "response": f"#### {i + 1}"}) + "\n"
                            for i in range(140)))
    plan = dry_plan(capsys, "--config", RECIPES / f"{recipe}.yaml", "--model", "smollm2", "--data", data,
                    "--steps", 37032)
    config = plan["config"]
    assert (config["rank"], config["alpha"], config["batch_size"], config["lr_scheduler"]) == (64, 128.0, 32, "cosine")
    assert (config["precision"], config["weights_dtype"], config["delta_t"], config["p_init"]) == ("bf16", "bf16", 3000,
                                                                                                   0.95)
    assert config["temperature"] == (0.03 if recipe.startswith("mistral") else 0.05)
    assert config["lr"] == (3e-4 if recipe.startswith("llama") else 5e-5)
    leaves = {m.rsplit(".", 1)[-1] for m in plan["lora"]["modules"]}
    assert leaves == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert plan["lora"]["module_count"] == 7 * plan["model"]["layers"]
    assert plan["beamlora"]["end_step"] == 24688
    assert [op["step"] for op in plan["beamlora"]["operations"]] == [s for s, _ in expected_operations(
        3000, 24688, 37032, 0.95)] == list(range(3000, 24001, 3000))
    assert plan["optimizer"]["warmup_steps"] == math.ceil(0.03 * 37032)
    # 3 epochs of the full 395,000 examples (100 held out) at global batch 32, as the recipe's comment says
    assert math.ceil(394_900 / 32) * 3 == 37_023


def test_cpu_default_recipe_is_the_embedded_default(capsys):
    # the embedded default, but for two spellings of the same thing (device cpu where auto finds no GPU, 0 warm-up)
    assert TrainConfig(**read_config_file(RECIPES / "cpu-default.yaml")) == dataclasses.replace(
        TrainConfig(), device="cpu", warmup_steps=0)
    plan = dry_plan(capsys, "--config", RECIPES / "cpu-default.yaml", "--model", "minilm")
    assert plan["steps"] == 300 and [op["step"] for op in plan["beamlora"]["operations"]] == [50, 100, 150]
    assert plan["lora"]["module_count"] == 24 and plan["device"] == "cpu"


# ----------------------------------------------------------------------------- bad input


def _one_error(done) -> str:
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (done.returncode, done.stderr)
    return lines[0]


@pytest.mark.parametrize("case", ["unknown-key", "wrong-type", "grad-accum-0", "epochs-below-delta-t",
                                  "cuda-without-cuda", "fp16-on-cpu", "steps-and-epochs", "batch-not-divisible"])
def test_bad_input_is_one_error_line_before_the_model_loads(tmp_path, bert_folder, reviews, case):
    assert not torch.cuda.is_available(), "this test expects a machine without CUDA"
    out = tmp_path / "run"
    base = ["train", "--model", bert_folder, "--data", reviews, "--held-out", 10, "--out", out, "--no-progress"]
    cases = {
        "unknown-key": ({"rank": 4, "learning_rate": 1e-3}, [], "unknown key 'learning_rate'"),
        "wrong-type": ({"rank": "four"}, [], "key 'rank' is \"four\" (str), expected an integer or null"),
        "grad-accum-0": (None, ["--grad-accum", 0], "grad_accum=0, expected a positive integer"),
        "epochs-below-delta-t": (None, ["--epochs", 1, "--batch-size", 8, "--delta-t", 10],
                                 "epochs=1.0 gives 7 optimizer steps"),
        "cuda-without-cuda": (None, ["--device", "cuda"], "--device cuda but torch finds no CUDA device"),
        "fp16-on-cpu": (None, ["--precision", "fp16"], "--precision fp16 on the CPU"),
        "steps-and-epochs": ({"steps": 10, "epochs": 2}, [], "expected one of the two"),
        "batch-not-divisible": (None, ["--batch-size", 6, "--grad-accum", 4], "batch_size=6 with grad_accum=4"),
    }
    file_options, flags, expected = cases[case]
    if file_options is not None:
        (tmp_path / "bad.yaml").write_text(json.dumps(file_options))  # JSON is YAML too
        flags = ["--config", tmp_path / "bad.yaml", *flags]
    line = _one_error(run_beamlora(*base, *flags))
    assert expected in line, line
    if case in ("unknown-key", "wrong-type"):
        assert str(tmp_path / "bad.yaml") in line
    assert not out.exists()


def test_bf16_refused_on_a_gpu_without_it(capsys, tmp_path, monkeypatch, bert_folder, reviews):
    # No such GPU here: torch's own answers about the device are what the check reads, so they are set to a
    # pre-Ampere card's (the one stand-in in this file; nothing else about torch is replaced).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100")
    with pytest.raises(SystemExit) as exited:
        beamlora_cli.main(["train", "--model", str(bert_folder), "--data", str(reviews), "--held-out", "10",
                           "--precision", "bf16", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert exited.value.code == 2 and err.startswith("Error: --precision bf16 but the GPU (Tesla V100)"), err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- training


def _short(bert_folder, reviews, out: Path, **changes) -> TrainConfig:
    base = dict(model=str(bert_folder), data=str(reviews), method="beamlora", rank=4, alpha=8, steps=4, batch_size=8,
                lr=1e-2, delta_t=2, end_step=4, p_init=0.8, held_out=10, max_length=16, eval_every=None,
                snapshot_every=None, trace_every=None, checkpoint_every=0, out=str(out))
    return TrainConfig(**{**base, **changes})


def test_grad_accum_2_with_checkpointing_equals_the_same_global_batch_in_one_step(tmp_path, bert_folder, reviews):
    # Without dropout, 2 micro-batches of 4 accumulated are the maths of one batch of 8, and recomputing the
    # activations (gradient checkpointing) changes no number: the same adapter, the same BeamLoRA operations (at
    # optimizer step 2, not micro-batch 2).
    finals, events = {}, {}
    for accumulation in (1, 2):
        run = train(_short(bert_folder, reviews, tmp_path / f"ga{accumulation}", grad_accum=accumulation,
                           gradient_checkpointing=accumulation == 2, snapshot_every=2, trace_every=2), **QUIET)
        finals[accumulation] = load_file(run.run_dir / "final" / "adapter_model.safetensors")
        events[accumulation] = [json.loads(line) for line in (run.run_dir / "events.jsonl").read_text().splitlines()]
    assert finals[1].keys() == finals[2].keys()
    for key in finals[1]:
        torch.testing.assert_close(finals[2][key], finals[1][key], rtol=1e-4, atol=1e-6)
    assert {e["step"] for e in events[2]} == {2} and sum(len(e["pruned"]) for e in events[2]) > 0
    assert [(e["module"], e["pruned"], e["sources"]) for e in events[2]] == \
           [(e["module"], e["pruned"], e["sources"]) for e in events[1]]
    for a, b in zip(events[2], events[1]):  # the scores' gradients accumulate over micro-batches like any other's
        assert a["importance"] == pytest.approx(b["importance"], rel=1e-4)
    # the training loss in metrics.jsonl is per optimizer step (its micro-batches' shares added), not per micro-batch
    losses = [json.loads((tmp_path / f"ga{a}" / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
              for a in (1, 2)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    # snapshots and the rank trace count optimizer steps too
    for accumulation in (1, 2):
        run_dir = tmp_path / f"ga{accumulation}"
        assert sorted(p.name for p in run_dir.glob("step-*")) == ["step-000002", "step-000004"]
        trace = [json.loads(line)["step"] for line in (run_dir / "rank_trace.jsonl").read_text().splitlines()]
        assert trace[-2:] == [2, 4] and set(trace) <= {0, 2, 4}
    config = json.loads((tmp_path / "ga2" / "config.json").read_text())
    assert (config["grad_accum"], config["batch_size"], config["steps"]) == (2, 8, 4)


def test_bf16_autocast_on_cpu_keeps_the_parameters_dtype(tmp_path, bert_folder, reviews):
    # The controller's operations under CPU bf16 autocast: a plain loop on a PEFT model, then a whole run.
    model = bert_lora().train()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=2, total_steps=4, end_step=4, p_init=0.8))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    data = TokenData(n=32)
    for step in range(4):
        batch = {"input_ids": data.ids[step * 8:(step + 1) * 8], "labels": data.labels[step * 8:(step + 1) * 8]}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.step(optimizer)
    assert any(e["pruned"] for e in controller.events)  # an operation did run
    assert {name: p.dtype for name, p in model.named_parameters()} == dtypes
    for layer in controller.layers:
        for param in (layer.A, layer.B, layer.score):
            assert param.dtype == torch.float32
            assert all(optimizer.state[param][k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq"))

    run = train(_short(bert_folder, reviews, tmp_path / "bf16", precision="bf16", weights_dtype="bf16"), **QUIET)
    final = load_file(run.run_dir / "final" / "adapter_model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in final.values())
    events = [json.loads(line) for line in (run.run_dir / "events.jsonl").read_text().splitlines()]
    assert {e["step"] for e in events} == {2}
    assert json.loads((run.run_dir / "config.json").read_text())["precision"] == "bf16"


def test_cosine_schedule_with_warmup_gives_the_formula_s_learning_rates(tmp_path):
    from transformers import Trainer

    config = TrainConfig(method="lora", steps=12, batch_size=8, lr=1e-2, lr_scheduler="cosine", warmup_ratio=0.2)
    prepared = Prepared(config, None, "cpu", 1, 8, 96, 12)
    checkpointed = Prepared(dataclasses.replace(config, gradient_checkpointing=True), None, "cpu", 1, 8, 96, 12)
    assert training_arguments(checkpointed, tmp_path / "t", 0, progress=False).gradient_checkpointing is True
    args = training_arguments(prepared, tmp_path / "trainer", 0, progress=False)
    assert args.gradient_checkpointing is False
    args.logging_steps = 1
    trainer = Trainer(model=bert_lora().train(), args=args, train_dataset=TokenData())
    trainer.train()
    logged = {entry["step"]: entry["learning_rate"] for entry in trainer.state.log_history if "learning_rate" in entry}
    warmup = math.ceil(0.2 * 12)

    def formula(t: int) -> float:  # the LR of the optimizer step that follows t steps: linear warm-up, then cosine
        if t < warmup:
            return 1e-2 * t / warmup
        return 1e-2 * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (12 - warmup)))

    # Trainer logs at step t the learning rate that step t used, the one that followed t - 1 steps
    assert sorted(logged) == list(range(1, 13))
    assert [logged[t] for t in range(1, 13)] == pytest.approx([formula(t - 1) for t in range(1, 13)], rel=1e-9,
                                                              abs=1e-15)
    assert logged[1] == 0.0 and logged[warmup + 1] == 1e-2  # warm-up from 0, then the peak, then down


def test_train_config_refuses_bad_values_by_name():
    for changes, words in ((dict(grad_accum=0), "grad_accum=0"), (dict(precision="fp8"), "precision='fp8'"),
                           (dict(lr_scheduler="step"), "lr_scheduler='step'"), (dict(device="tpu"), "device='tpu'"),
                           (dict(warmup_steps=2, warmup_ratio=0.1), "at most one"),
                           (dict(targets=["all-linear", "q_proj"]), "stands alone"), (dict(epochs=0), "epochs=0")):
        with pytest.raises(BeamLoraError, match=words.replace("(", r"\(")):
            TrainConfig(**changes)
