"""benchmarks/bench_fidelity.py: its plan, cache keys and statistics (the runs themselves: `--quick`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys

import pytest
from helpers.cli import REPO


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fidelity", REPO / "benchmarks" / "bench_fidelity.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_fidelity"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_fidelity", None)


def test_paired_interval_matches_a_hand_computation(bench):
    d = [0.012, -0.004, 0.007]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    t_975_2 = 4.302652729911275  # Student t, 2 degrees of freedom, 97.5% quantile (tables)
    out = bench.paired(d)
    assert out["n"] == 3 and out["mean"] == pytest.approx(mean) and out["sd"] == pytest.approx(sd)
    assert out["ci"] == pytest.approx([mean - t_975_2 * sd / math.sqrt(3), mean + t_975_2 * sd / math.sqrt(3)])
    assert bench.paired([0.5])["ci"] is None and bench.mean_sd([0.5])["sd"] is None


def test_summary_pairs_runs_by_seed_and_reads_the_interval(bench):
    def row(method, seed, accuracy, loss):
        return {"task": "classification", "method": method, "seed": seed, "train_s": 10.0 + seed,
                "metrics": {"accuracy": accuracy, "loss": loss},
                "rank": {k: 0.5 + 0.1 * seed for k in bench.RANK_MEASURES}}

    rows = [row("lora", s, a, l) for s, a, l in [(0, 0.80, 0.45), (1, 0.78, 0.47), (2, 0.79, 0.46)]]
    rows += [row("beamlora", s, a, l) for s, a, l in [(0, 0.81, 0.44), (1, 0.80, 0.45)]]  # seed 2 missing
    rows += [row("random", s, a, l) for s, a, l in [(0, 0.70, 0.60), (1, 0.69, 0.61), (2, 0.71, 0.59)]]
    summary = bench.summarise(rows)["classification"]
    lora = summary["methods"]["lora"]
    assert lora["metrics"]["accuracy"]["mean"] == pytest.approx(0.79)
    assert lora["metrics"]["accuracy"]["sd"] == pytest.approx(0.01)
    assert lora["rank"]["top10_share"]["mean"] == pytest.approx(0.6)
    beam = summary["paired_to_lora"]["beamlora"]
    assert beam["seeds"] == [0, 1] and beam["metrics"]["accuracy"]["per_seed"] == pytest.approx([0.01, 0.02])
    assert "lora" not in summary["paired_to_lora"]
    rnd = summary["paired_to_lora"]["random"]["metrics"]
    assert bench.verdict(rnd["accuracy"], lower_is_better=False) == "worse than LoRA"
    assert bench.verdict(rnd["loss"], lower_is_better=True) == "worse than LoRA"
    # The ablations are also paired with BeamLoRA (what switching off one part of it costs), on their common seeds.
    ablation = summary["paired_to_beamlora"]["random"]
    assert ablation["seeds"] == [0, 1] and ablation["metrics"]["accuracy"]["per_seed"] == pytest.approx([-0.11, -0.11])
    assert set(summary["paired_to_beamlora"]) == {"random"}
    flat = bench.paired([0.01, -0.01, 0.005])
    assert bench.verdict(flat, lower_is_better=False) == "interval includes 0: no difference shown"
    lines = bench.report_lines(bench.summarise(rows), {
        "quick": False, "seeds": [0, 1, 2], "runs": 8, "trained": 0, "train_s_total": 88, "elapsed_s": 1,
        "jobs": 1, "threads": 1, "notes": [], "failures": [], "configs": {}})
    json.dumps(bench.summarise(rows), allow_nan=False)
    assert any(line.startswith("| random | accuracy | 0: -0.1000, 1: -0.0900, 2: -0.0800 |") for line in lines)
    assert any(line.startswith("| random | accuracy | 0: -0.1100, 1: -0.1100 |") for line in lines)
    assert "Paired difference to BeamLoRA" in "\n".join(lines)


def test_report_only_trains_nothing_and_names_the_missing_runs(bench, tmp_path, capsys):
    runs, _ = bench.plan(["classification"], ["lora", "beamlora"], [0, 1], None, True, tmp_path)
    done = runs[0]
    done.result_path.parent.mkdir(parents=True)
    done.result_path.write_text(json.dumps({
        "schema": bench.SCHEMA, "config": done.config, "metrics": {"accuracy": 0.75}, "train_s": 3.0,
        "rank": {k: 0.5 for k in bench.RANK_MEASURES}}))
    code = bench.main(["--tasks", "classification", "--methods", "lora,beamlora", "--seeds", "0,1", "--quick",
                       "--cache", str(tmp_path), "--report-only"])
    report = (tmp_path / "report.md").read_text()
    assert code == 0 and "4 runs, 0 trained now" in report
    assert "not run yet (3 of 4): classification/lora/seed 1, classification/beamlora/seed 0, " \
           "classification/beamlora/seed 1" in report
    assert "| lora | 1 | 0.7500 |" in report
    assert not (tmp_path / "runs").exists()  # nothing was trained


def test_schedule_puts_five_operations_before_end_step_for_one_epoch(bench):
    assert bench.EPOCH_STEPS == 735  # ⌈11,752 / 16⌉
    s = bench.schedule(735)
    end = 2 * 735 // 3
    ops = [t for t in range(1, 736) if t % s["delta_t"] == 0 and t < end and t + s["delta_t"] <= 735]
    assert len(ops) == 5 and s["eval_every"] == 368 and 735 // s["snapshot_every"] == 8


def test_plan_and_cache_keys(bench, tmp_path):
    from beamlora.train import TrainConfig

    runs, skipped = bench.plan(["classification", "sft"], ["lora", "random"], [0, 1], None, True, tmp_path)
    classification = [r for r in runs if r.task == "classification"]
    assert [(r.method, r.seed) for r in classification] == [("lora", 0), ("lora", 1), ("random", 0), ("random", 1)]
    assert {r.config["steps"] for r in classification} == {12}
    assert [r.config["ablation"] for r in classification] == ["none", "none", "random", "random"]
    assert len({r.config["out"] for r in runs}) == len(runs)
    if "task" in {f.name for f in dataclasses.fields(TrainConfig)}:
        assert {r.method for r in runs if r.task == "sft"} == {"lora", "random"} and not skipped
    else:  # instruction tuning not in this checkout: the harness says so and runs the rest
        assert len(skipped) == 1 and "skipping task sft" in skipped[0] and "`task` field" in skipped[0]

    run = classification[2]
    assert bench.cached_result(run) is None
    run.result_path.parent.mkdir(parents=True)
    run.result_path.write_text(json.dumps({"schema": bench.SCHEMA, "config": run.config, "metrics": {}}))
    assert bench.cached_result(run)["config"] == run.config
    changed = dataclasses.replace(run, config={**run.config, "steps": 13})
    assert bench.cached_result(changed) is None  # another config: trained again, not read from the cache
    # A result cached before a TrainConfig field existed still counts while that field is at its default.
    older = {k: v for k, v in run.config.items() if k != "eval_every"}
    run.result_path.write_text(json.dumps({"schema": bench.SCHEMA, "config": older, "metrics": {}}))
    default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}["eval_every"]
    assert (bench.cached_result(dataclasses.replace(run, config={**run.config, "eval_every": default})) is not None)
    assert bench.cached_result(dataclasses.replace(run, config={**run.config, "eval_every": default + 1})) is None
    run.result_path.write_text("{\"schema\": ")  # a torn file counts as missing
    assert bench.cached_result(run) is None
