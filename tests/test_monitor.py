"""Rank telemetry while training: RankMonitorCallback / RankMonitor, the trace, and rankscope reading it.

Real Trainer runs on tiny transformers models (BERT, GPT-2 Conv1D), real PEFT adapters saved at the
same steps and analysed by rankscope as the reference, the real TensorBoard writer, and a real
2-process gloo DDP run.
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import REPO, run_cli
from helpers.lora import bert_lora, tiny_bert, tiny_gpt2
from helpers.trainer import TokenData, free_port
from peft import AdaLoraConfig, LoraConfig, get_peft_model
from transformers import Trainer, TrainingArguments

import beamlora
import rankscope
from beamlora import BeamLoraCallback, BeamLoraConfig, SnapshotCallback
from rankscope.constants import TRACE_FILE
from rankscope.errors import RankscopeError
from rankscope.maths.compare import compare
from rankscope.maths.dynamics import dynamics
from rankscope.maths.recommend import recommend
from rankscope.telemetry.callback import RankMonitorCallback
from rankscope.telemetry.monitor import LIVE_SCALE_SOURCE, TELEMETRY_ATTR, RankMonitor, measure

COMPUTED = ("importance", "spectrum", "deciles", "top10_share", "effective_rank", "gini", "energy_rank", "stable_rank",
            "spectral_effective_rank", "scores", "adalora_E")


class LMData(torch.utils.data.Dataset):
    """Token sequences that continue a simple pattern (learnable by a tiny causal LM)."""

    def __init__(self, n: int = 64, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, 60, (n, 1), generator=g)
        self.ids = (start + torch.arange(12)) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(model, out: Path, callbacks, steps: int, data=None, accumulation: int = 1, lr: float = 2e-2, **args):
    options = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
                   gradient_accumulation_steps=accumulation, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0,
                   seed=3, data_seed=3, save_strategy="no", logging_steps=1000, report_to=[], disable_tqdm=True,
                   use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=TrainingArguments(**{**options, **args}), train_dataset=data or TokenData(),
                      callbacks=callbacks)
    trainer.train()
    return trainer


def assert_same_module(traced: dict, saved: dict, rtol: float = 1e-6) -> None:
    """Everything the analysis reports for a module, from the trace and from the saved adapter."""
    # The same scale from two places: the trace reads the live layer's scaling, the file its config.
    assert traced["scale_source"] == LIVE_SCALE_SOURCE and saved["scale_source"] != LIVE_SCALE_SOURCE
    skip = (*COMPUTED, "scale_source")
    assert {k: v for k, v in traced.items() if k not in skip} == {k: v for k, v in saved.items() if k not in skip}
    for key in ("importance", "spectrum", "scores", "adalora_E"):
        if saved.get(key) is None:
            assert traced.get(key) is None, key
            continue
        a, b = np.asarray(traced[key]), np.asarray(saved[key])
        # Relative to each value, and to the largest for singular values near zero (padding, B = 0 columns).
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max(), err_msg=f"{saved['name']} {key}")
    assert traced["energy_rank"] == saved["energy_rank"]


def assert_trace_matches_snapshots(trace_doc: dict, snapshot_doc: dict, rtol: float = 1e-6) -> None:
    assert [s["step"] for s in trace_doc["snapshots"]] == [s["step"] for s in snapshot_doc["snapshots"]]
    for traced, saved in zip(trace_doc["snapshots"], snapshot_doc["snapshots"]):
        by_name = {m["name"]: m for m in saved["modules"]}  # a saved file lists modules alphabetically
        assert sorted(m["name"] for m in traced["modules"]) == sorted(by_name)
        for m in traced["modules"]:
            assert_same_module(m, by_name[m["name"]], rtol)


# ----------------------------------------------------------------------------- equal to analysing saved adapters


def gpt2_rslora_rank_pattern():
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True,
                        rank_pattern={"c_fc": 4}, alpha_pattern={"c_attn": 24}, fan_in_fan_out=True, lora_dropout=0.0)
    return get_peft_model(tiny_gpt2(), config).train()


@pytest.mark.parametrize("case", ["bert-linear-accumulation", "gpt2-conv1d-rslora-rank-pattern"])
def test_trace_equals_the_analysis_of_adapters_saved_at_the_same_steps(tmp_path, case):
    if case.startswith("bert"):
        model, data, accumulation = bert_lora().train(), TokenData(), 2
    else:
        model, data, accumulation = gpt2_rslora_rank_pattern(), LMData(), 1
    train(model, tmp_path / "trainer", [SnapshotCallback(every=3, output_dir=tmp_path / "snapshots"),
                                        RankMonitorCallback(every=3, output_dir=tmp_path / "traced")],
          steps=9, data=data, accumulation=accumulation)
    trace_doc = rankscope.analyze(tmp_path / "traced")
    snapshot_doc = rankscope.analyze(tmp_path / "snapshots")
    assert trace_doc["layout"] == "trace" and snapshot_doc["layout"] == "beamlora-run"
    # Optimizer steps, not micro-batches (18 of them with accumulation 2): the snapshots count the same way.
    assert [s["step"] for s in trace_doc["snapshots"]] == [3, 6, 9]
    assert_trace_matches_snapshots(trace_doc, snapshot_doc)
    if case.startswith("gpt2"):
        modules = trace_doc["snapshots"][-1]["modules"]
        assert {m["rank"] for m in modules} == {8, 4}
        scales = {m["kind"]: m["scale"] for m in modules}
        assert scales["attn.c_attn"] == pytest.approx(24 / math.sqrt(8)) and scales["mlp.c_fc"] == pytest.approx(16 / 2)
        assert scales["attn.c_proj"] == pytest.approx(16 / math.sqrt(8))


def test_conv_embedding_dora_and_adalora_records_equal_the_analysis(tmp_path):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.conv, self.lin = torch.nn.Embedding(20, 12), torch.nn.Conv2d(3, 6, 3), torch.nn.Linear(12, 7)

    torch.manual_seed(0)
    models = {
        "conv-embedding-linear": get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=12, target_modules=["emb", "conv", "lin"])),
        "dora": get_peft_model(tiny_bert(), LoraConfig(r=8, lora_alpha=8, use_dora=True, target_modules=["query", "value"])),
        "adalora": get_peft_model(tiny_bert(), AdaLoraConfig(init_r=6, target_r=4, lora_alpha=8, total_step=10,
                                                             target_modules=["query", "value"])),
    }
    for label, model in models.items():
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:  # B (and E) away from zero, unequal ranks
                    p.copy_(torch.randn_like(p) * torch.linspace(0.2, 1.0, p.shape[-1] if p.dim() > 1 else 1))
        monitor = RankMonitor(tmp_path / label)
        monitor.record(model, 1)
        model.save_pretrained(tmp_path / label / "adapter")
        (tmp_path / label / TRACE_FILE).rename(tmp_path / f"{label}.jsonl")  # alone, so the folder reads as the adapter
        traced = rankscope.analyze(tmp_path / f"{label}.jsonl")
        saved = rankscope.analyze(tmp_path / label / "adapter")
        assert traced["layout"] == "trace"
        by_name = {m["name"]: m for m in saved["snapshots"][0]["modules"]}  # the file's order is alphabetical
        assert sorted(by_name) == sorted(m["name"] for m in traced["snapshots"][0]["modules"])
        for m in traced["snapshots"][0]["modules"]:
            assert_same_module(m, by_name[m["name"]])
        kinds = {m["layer_type"] for m in traced["snapshots"][0]["modules"]}
        if label == "conv-embedding-linear":
            assert kinds == {"conv", "embedding", "linear"}
        if label == "dora":
            assert any("DoRA" in note for note in traced["snapshots"][0]["notes"])
        if label == "adalora":
            assert all(m["adalora_E"] is not None for m in traced["snapshots"][0]["modules"])
        # The accelerator path (float32, Householder QR) on the same weights: float32 accuracy.
        modules, _ = measure(model, dtype=torch.float32)
        for m in modules:
            b = by_name[m.name]
            np.testing.assert_allclose(m.spectrum, b["spectrum"], rtol=1e-4, atol=1e-5 * max(b["spectrum"]))
            np.testing.assert_allclose(m.importance, b["importance"], rtol=1e-5)


def test_beamlora_trace_folds_w_attaches_scores_and_counts_operated_ranks(tmp_path):
    model = bert_lora().train()
    controller = beamlora.attach(model, BeamLoraConfig(delta_t=4, total_steps=12, end_step=12, p_init=0.85,
                                                       output_dir=tmp_path / "run", snapshot_every=2))
    assert callable(getattr(model, TELEMETRY_ATTR))
    trainer = train(model, tmp_path / "trainer", [BeamLoraCallback(controller), RankMonitorCallback(every=2, output_dir=tmp_path / "run")],
                    steps=12, logging_steps=4)
    trace_doc = rankscope.analyze(tmp_path / "run" / TRACE_FILE)
    steps = [s["step"] for s in trace_doc["snapshots"]]
    assert steps == [2, 4, 6, 8, 10, 12]
    snapshot_doc = {"snapshots": [rankscope.analyze(tmp_path / "run" / f"step-{s:06d}")["snapshots"][0] for s in steps]}
    # w folded into A (float32 there, float64 here) and raw scores attached, at operation steps too (4, 8).
    assert_trace_matches_snapshots(trace_doc, snapshot_doc, rtol=1e-6)
    assert trace_doc["events"] and any("BeamLoRA" in n for n in trace_doc["snapshots"][-1]["notes"])
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    records = [json.loads(line) for line in (tmp_path / "run" / TRACE_FILE).read_text().splitlines()]
    for record in records:
        done = [e for e in events if e["step"] <= record["step"]]
        if not done:
            assert "beamlora" not in record
            continue
        last = max(e["step"] for e in done)
        operated = sum(len(e["pruned"]) for e in done if e["step"] == last)
        assert record["beamlora"] == {"ranks_operated": operated, "operation_step": last}
    assert sum(len(e["pruned"]) for e in events) > 0
    logged = [entry for entry in trainer.state.log_history if "rank/ranks_operated" in entry]
    assert [entry["step"] for entry in logged] == [4, 8, 12]


# ----------------------------------------------------------------------------- the live scalars


def slow_scalars(record: dict) -> dict[str, float]:
    """The medians the callback logs, from a trace record, the obvious way."""
    shares, k95, stable = [], [], []
    for m in record["modules"]:
        x, s, r = np.array(m["importance"]), np.array(m["spectrum"]), m["rank"]
        top = max(1, math.ceil(0.1 * r))
        shares.append(sum(sorted(x, reverse=True)[:top]) / x.sum())
        energy = np.cumsum(s ** 2) / (s ** 2).sum()
        k95.append((int(np.argmax(energy >= 0.95 - 1e-12)) + 1) / r)
        stable.append((s ** 2).sum() / s.max() ** 2 / r)
    return {"rank/top10_share": float(np.median(shares)), "rank/k95_over_r": float(np.median(k95)),
            "rank/stable_rank_over_r": float(np.median(stable))}


def test_scalars_reach_tensorboard_log_history_and_the_console_and_stabilisation_is_announced(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines: list[str] = []
    callback = RankMonitorCallback(every=2, log=lines.append)
    trainer = train(bert_lora().train(), tmp_path / "out", [callback], steps=16, lr=5e-3, logging_steps=4,
                    report_to=["tensorboard"])
    records = {r["step"]: r for r in map(json.loads, (tmp_path / "out" / TRACE_FILE).read_text().splitlines())}
    assert sorted(records) == list(range(2, 17, 2))  # output_dir=None: the Trainer's own output_dir
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in logged] == [4, 8, 12, 16]
    events = EventAccumulator(glob.glob(str(tmp_path / "out" / "runs" / "*"))[0])
    events.Reload()
    console = capsys.readouterr().out
    for entry in logged:
        expected = slow_scalars(records[entry["step"]])
        for key, value in expected.items():
            assert entry[key] == pytest.approx(value, rel=1e-6), key  # state.log_history
            (point,) = [e for e in events.Scalars(f"train/{key}") if e.step == entry["step"]]  # the TensorBoard file
            assert point.value == pytest.approx(value, rel=1e-6)
            assert f"'{key}'" in console  # PrinterCallback prints the same logs dict
    # One line names the step from which both views are stable; the trace read so far says the same step.
    assert len(lines) == 1 and f"stable from step {callback.monitor.stable_step}" in lines[0]
    document = rankscope.analyze(tmp_path / "out")
    document["snapshots"] = [s for s in document["snapshots"] if s["step"] <= callback.monitor.stable_announced_at]
    dyn = dynamics(document)
    assert callback.monitor.stable_step == max(dyn["stable_from"], dyn["spectral_stable_from"])
    assert len(document["snapshots"]) - 1 - dyn["steps"].index(callback.monitor.stable_step) >= 3


def test_callback_rejects_a_bad_interval():
    with pytest.raises(RankscopeError, match="every=0"):
        RankMonitorCallback(every=0)


# ----------------------------------------------------------------------------- distributed


def test_two_process_ddp_run_writes_one_trace_from_rank_zero_only(tmp_path):
    worker = Path(__file__).parent / "helpers" / "monitor_ddp_worker.py"
    done = subprocess.run([sys.executable, str(worker), str(tmp_path), free_port()], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0["distributed"] == rank1["distributed"] == 2
    assert rank0 == {"distributed": 2, "records": 3, "world_zero": True}
    assert rank1["records"] == 0 and not rank1["world_zero"]  # computed nothing at all
    lines = (tmp_path / "run" / TRACE_FILE).read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6]


# ----------------------------------------------------------------------------- the trace file


def traced_run(folder: Path, steps=(2, 4, 6)) -> Path:
    model = bert_lora()
    monitor = RankMonitor(folder, log=lambda line: None)
    for step in steps:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.mul_(1.1)
        monitor.record(model, step)
    return folder / TRACE_FILE


def test_a_torn_last_record_reads_back_cleanly_with_a_note(tmp_path):
    path = traced_run(tmp_path / "run")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 300])  # killed in the middle of writing step 6
    document = rankscope.analyze(path)
    assert [s["step"] for s in document["snapshots"]] == [2, 4]
    assert any("line 3" in n and "not a complete trace record" in n for n in document["snapshots"][-1]["notes"])
    done = run_cli("analyze", tmp_path / "run", "--json", "-")
    assert done.returncode == 0 and "Traceback" not in done.stderr
    assert "not a complete trace record" in done.stderr  # the summary (on stderr with --json -) shows the note
    assert [s["step"] for s in json.loads(done.stdout)["snapshots"]] == [2, 4]
    # The run resumes from step 4 and records 6 and 8: the torn part stays on its own line and is skipped.
    RankMonitor(tmp_path / "run").record(bert_lora(), 6)
    RankMonitor(tmp_path / "run").record(bert_lora(), 8)
    assert [s["step"] for s in rankscope.analyze(path)["snapshots"]] == [2, 4, 6, 8]
    assert [s["step"] for s in rankscope.analyze(path, last_only=True)["snapshots"]] == [8]


def test_a_resumed_run_replaces_the_records_it_repeats(tmp_path):
    path = traced_run(tmp_path / "run", steps=(2, 4, 6, 8))
    model = bert_lora(seed=5)
    RankMonitor(tmp_path / "run").record(model, 4)  # resumed from a checkpoint at step 3
    document = rankscope.analyze(path)
    assert [s["step"] for s in document["snapshots"]] == [2, 4]
    assert any("replace 3 earlier" in n for n in document["snapshots"][-1]["notes"])
    assert document["snapshots"][-1]["modules"][0]["importance"] == pytest.approx(
        [float(f"{v:.8g}") for v in measure(model)[0][0].importance])


def test_a_file_without_any_complete_record_is_an_error_line(tmp_path):
    path = tmp_path / "run" / TRACE_FILE
    path.parent.mkdir()
    path.write_text('{"schema": "rankscope/trace-v1", "step": 10, "time": 1.0, "modules": [{"na')
    done = run_cli("analyze", path)
    assert done.returncode == 2 and done.stderr.startswith("Error: ") and "no complete rank trace record" in done.stderr
    assert "Traceback" not in done.stderr


def test_record_size_of_a_llama2_7b_shaped_r64_adapter_is_under_one_percent_of_its_snapshot():
    from rankscope.io.trace import record_text
    from rankscope.telemetry.monitor import ModuleMeasure

    shapes = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
              "gate_proj": (11008, 4096), "up_proj": (11008, 4096), "down_proj": (4096, 11008)}
    rng = np.random.default_rng(0)
    texts, snapshot_bytes = [], 0
    for layer in range(32):
        for proj, (out, inp) in shapes.items():
            where = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            values = np.exp(rng.normal(size=(2, 64))) * 10.0 ** rng.integers(-4, 1)  # full-length numbers
            texts.append(ModuleMeasure(f"base_model.model.model.layers.{layer}.{where}.{proj}", 64, 2.0, out, inp,
                                       "linear", "BF16", False, values[0], np.sort(values[1])[::-1]).text())
            snapshot_bytes += 2 * 64 * (out + inp)  # bf16 A and B
    record = record_text(1000, texts, time=1.7e9).encode()
    json.loads(record)  # strict JSON
    assert snapshot_bytes > 319e6 and len(record) <= 0.01 * snapshot_bytes


# ----------------------------------------------------------------------------- reading: analyze, recommend, compare


@pytest.fixture(scope="module")
def twin_runs(tmp_path_factory):
    """One LoRA run recorded twice: a trace every 2 steps and snapshot folders every 2 steps."""
    base = tmp_path_factory.mktemp("twins")
    train(bert_lora().train(), base / "trainer", [SnapshotCallback(every=2, output_dir=base / "snapshots"),
                                                  RankMonitorCallback(every=2, output_dir=base / "traced")],
          steps=16, lr=5e-3)
    return base / "traced", base / "snapshots"


def test_dynamics_and_recommendation_from_the_trace_equal_those_from_the_snapshots(twin_runs):
    traced, snapshots = twin_runs
    a, b = rankscope.analyze(traced), rankscope.analyze(snapshots)
    assert_trace_matches_snapshots(a, b)
    da, db = dynamics(a), dynamics(b)
    assert da["steps"] == db["steps"] == list(range(2, 17, 2))
    for key in ("stable_from", "spectral_stable_from", "stable_from_index"):
        assert da[key] == db[key], key
    for pa, pb in zip(da["stability"], db["stability"]):
        assert pa["median"] == pytest.approx(pb["median"], abs=1e-9)
    for sa, sb in zip(da["spread"], db["spread"]):
        for key in ("top10_share", "energy_rank_ratio", "stable_rank_ratio"):
            assert sa[key]["median"] == pytest.approx(sb[key]["median"], rel=1e-6)
    ra, rb = recommend(a, total_steps=100), recommend(b, total_steps=100)
    assert (ra["p_init"], ra["delta_t"]) == (rb["p_init"], rb["delta_t"])


def test_cli_analyze_recommend_and_compare_read_a_trace(twin_runs, tmp_path):
    traced, snapshots = twin_runs
    done = run_cli("analyze", traced / TRACE_FILE, "--out", tmp_path / "report", "--json", "-")
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert document["layout"] == "trace" and document["dynamics"]["steps"] == list(range(2, 17, 2))
    assert (tmp_path / "report" / "rank_heatmap.png").is_file() and (tmp_path / "report" / "report.html").is_file()
    done = run_cli("recommend", traced, "--total-steps", 100, "--json", "-")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["delta_t"] == recommend(rankscope.analyze(snapshots), total_steps=100)["delta_t"]
    done = run_cli("compare", traced, snapshots, "--labels", "trace,snapshots", "--json", "-")
    assert done.returncode == 0, done.stderr
    runs = json.loads(done.stdout)["runs"]
    expected = compare([rankscope.analyze(snapshots, last_only=True)] * 2, ["a", "b"])["runs"][0]
    for run in runs:
        for key in ("effective_rank_ratio", "top10_share", "energy_rank_ratio"):
            assert run[key]["median"] == pytest.approx(expected[key]["median"], rel=1e-6)


def test_a_run_folder_with_both_uses_the_trace_and_keeps_snapshots_for_sweeps(tmp_path):
    from rankscope.adapters.sweep import resolve_adapter

    model = bert_lora().train()
    train(model, tmp_path / "trainer", [SnapshotCallback(every=4, output_dir=tmp_path / "run"),
                                        RankMonitorCallback(every=2, output_dir=tmp_path / "run")], steps=8)
    model.save_pretrained(tmp_path / "run" / "final")
    document = rankscope.analyze(tmp_path / "run")
    assert document["layout"] == "trace" and [s["step"] for s in document["snapshots"]] == [2, 4, 6, 8]
    series = rankscope.load(tmp_path / "run")
    assert series.steps == [4, 8] and series.trace == tmp_path / "run" / TRACE_FILE
    assert resolve_adapter(tmp_path / "run").path == tmp_path / "run" / "final" / "adapter_model.safetensors"
    assert resolve_adapter(tmp_path / "run", step=4).step == 4


def test_importing_the_monitor_and_analysing_a_trace_load_nothing_heavy(twin_runs, analyze_in_a_fresh_process):
    traced, _ = twin_runs
    heavy, document = analyze_in_a_fresh_process(traced, preload=("rankscope.telemetry.monitor", "rankscope.io.trace"))
    assert heavy == []
    assert document["layout"] == "trace"
