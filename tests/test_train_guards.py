"""`beamlora train` refuses bad numbers up front, warns about settings that do nothing, stops a diverging
run naming the step, and runs the ablations through Trainer (a tiny BERT from a config, a small CSV)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_WIDTH as WIDTH

from beamlora import cli
from beamlora.errors import BeamLoraError
from beamlora.train import TrainConfig, train


def quick(tiny_model, small_data, tmp_path, **overrides) -> TrainConfig:
    base = dict(model=str(tiny_model), data=str(small_data), rank=4, alpha=8, steps=12, batch_size=8, held_out=40,
                max_length=16, eval_every=None, snapshot_every=4, delta_t=4, lr=1e-2, out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **overrides})


def run_cli(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        cli.main(["train", *map(str, args)])
    out, err = capsys.readouterr()
    return exited.value.code, out, err


# ---------------------------------------------------------------- bad numbers, up front


@pytest.mark.parametrize("option,value,expected", [
    ("--seed", -1, "seed=-1, expected an integer in 0 … 4294967295"),
    ("--seed", 2**40, "seed=1099511627776, expected an integer in 0 … 4294967295"),
    ("--alpha", "nan", "alpha=nan, expected a positive, finite number"),
    ("--alpha", "inf", "alpha=inf, expected a positive, finite number"),
    ("--lr", "inf", "lr=inf, expected a positive, finite number"),
    ("--lr", "nan", "lr=nan"),
    ("--p-init", "nan", "p_init=nan, expected a number in (0, 1]"),
])
def test_bad_numbers_are_one_error_line_before_anything_is_written(capsys, tmp_path, option, value, expected):
    code, out, err = run_cli(capsys, option, value, "--out", tmp_path / "run", "--no-progress")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1
    assert lines[0].startswith("Error: ") and expected in lines[0]
    assert not (tmp_path / "run").exists()  # no config.json left behind to block the corrected run


def test_seed_at_the_top_of_the_range_is_accepted():
    assert TrainConfig(seed=2**32 - 1).seed == 2**32 - 1
    with pytest.raises(BeamLoraError, match="seed"):
        TrainConfig(seed=2**32)


# ---------------------------------------------------------------- warnings


def test_steps_below_delta_t_and_rank_above_width_warn_once_each(tiny_model, small_data, tmp_path):
    lines: list[str] = []
    result = train(quick(tiny_model, small_data, tmp_path, steps=3, delta_t=5, rank=WIDTH + 8, snapshot_every=None),
                   progress=False, log=lines.append)
    warnings = [line for line in lines if line.startswith("Warning:")]
    assert len(warnings) == 2, lines
    assert "--steps 3 is below --delta-t 5: no BeamLoRA operation runs" in warnings[0]
    # query, key, value (32 → 32) and attention.output.dense (32 → 32) in 2 layers: 8 layers narrower than r = 40.
    assert f"r={WIDTH + 8} exceeds the width of 8 target layer(s)" in warnings[1]
    assert f"min(in, out) = {WIDTH}" in warnings[1]
    assert result.events == 0


def test_a_run_that_fits_operations_and_width_does_not_warn(tiny_model, small_data, tmp_path):
    lines: list[str] = []
    train(quick(tiny_model, small_data, tmp_path, steps=12, delta_t=4), progress=False, log=lines.append)
    assert not [line for line in lines if line.startswith("Warning:")]


# ---------------------------------------------------------------- divergence


def test_a_diverging_run_stops_naming_the_step_and_keeps_its_snapshots(capsys, tiny_model, small_data, tmp_path):
    from safetensors.torch import load_file

    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "--model", tiny_model, "--data", small_data, "--lr", "1e12", "--steps", 30,
                             "--batch-size", 8, "--held-out", 40, "--rank", 4, "--delta-t", 4, "--snapshot-every", 1,
                             "--eval-every", 0, "--out", run, "--no-progress")
    assert code == 2 and out == ""
    line, = err.strip().splitlines()
    assert line.startswith("Error: the training loss is nan at step ") and "diverged" in line
    step = int(line.split("at step ")[1].split(":")[0])
    assert 2 <= step < 30
    # Every snapshot before that step is kept (snapshot every step), with finite weights: the check runs
    # before the optimizer step, so the NaN never reaches the weights.
    assert sorted(p.name for p in run.glob("step-*")) == [f"step-{i:06d}" for i in range(1, step)]
    for tensor in load_file(run / f"step-{step - 1:06d}" / "adapter_model.safetensors").values():
        assert torch.isfinite(tensor).all()
    assert f"step-{step - 1:06d} are kept" in line
    assert not (run / "final").exists() and not (run / "metrics.jsonl").exists()

    def strict(text: str):
        return json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))

    strict((run / "config.json").read_text())
    if step > 4:  # an operation ran at step 4
        for record in map(strict, (run / "events.jsonl").read_text().splitlines()):
            assert all(math.isfinite(v) for v in record["importance"])


def test_a_non_finite_held_out_metric_stops_the_run_before_it_is_written(capsys, tiny_model, small_data, tmp_path):
    code, out, err = run_cli(capsys, "--model", tiny_model, "--data", small_data, "--lr", "1e12", "--steps", 30,
                             "--batch-size", 8, "--held-out", 40, "--rank", 4, "--delta-t", 4, "--eval-every", 1, "--out",
                             tmp_path / "run", "--no-progress")
    line, = err.strip().splitlines()
    assert code == 2 and line.startswith("Error: held-out loss is nan at step 1: the run diverged")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_metrics_with_nan_are_refused(tmp_path):
    from beamlora.guards import NonFiniteError, check_metrics

    check_metrics({"step": 3, "accuracy": 0.5, "loss": 0.7}, 3, tmp_path)
    with pytest.raises(NonFiniteError, match=r"held-out loss is nan at step 3"):
        check_metrics({"step": 3, "accuracy": 0.5, "loss": float("nan")}, 3, tmp_path)


# ---------------------------------------------------------------- ablations through Trainer


def test_no_expansion_through_trainer_records_the_mode_and_keeps_dead_ranks_zero(tiny_model, small_data, tmp_path):
    from safetensors.torch import load_file

    result = train(quick(tiny_model, small_data, tmp_path, ablation="no-expansion", p_init=0.6, steps=16),
                   progress=False, log=lambda line: None)
    run = result.run_dir
    assert json.loads((run / "config.json").read_text())["ablation"] == "no-expansion"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events and {e["ablation"] for e in events} == {"no-expansion"}
    assert all(e["sources"] == [] for e in events)
    assert sorted({e["step"] for e in events}) == [4, 8]  # end_step ⌊⅔ · 16⌋ = 10
    dead: dict[str, set[int]] = {}
    for e in events:
        dead.setdefault(e["module"], set()).update(e["pruned"])
    assert sum(map(len, dead.values())) > 0
    weights = load_file(run / "final" / "adapter_model.safetensors")
    for module, slots in dead.items():
        key = module.removeprefix("base_model.model.")
        A = next(v for k, v in weights.items() if key in k and "lora_A" in k)
        B = next(v for k, v in weights.items() if key in k and "lora_B" in k)
        idx = sorted(slots)
        assert not A[idx].any() and not B[:, idx].any()  # 8 steps after the last operation: still exactly zero
