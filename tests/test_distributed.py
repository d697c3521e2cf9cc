"""BeamLoRA and the rank monitor under FSDP2 (sharded LoRA parameters) and DDP, 2 gloo processes on the CPU.

Through the API: one worker run (tests/helpers/fsdp_worker.py, shared by every test here) trains the same tiny LoRA BERT
with the same global batches three ways: one process, DDP and FSDP2 (lora_A split along its rank axis,
r = 5 as 3 + 2 slots, so a pruned slot and its source often live on different processes), for five variants
covering the global and per-module cut, every optimizer_state mode and the ablations. Dropout is off, so
all three must give the same adapters, events.jsonl and rank_trace.jsonl (1e-4 relative).

Through the command: ``torchrun --nproc-per-node 2 -m beamlora train --fsdp``, killed with SIGKILL after its
first checkpoint and continued with ``--resume``, against one process with the same global batch, on a tiny
dropout-free BERT. (Each torchrun launch costs ~20 s of imports here, so the command runs twice, not more.)
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import save_tiny_bert
from helpers.trainer import free_port

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("global-history", "module-reset", "official", "no-expansion", "random")
RTOL = 1e-4
TEMPERATURE = 0.05  # BeamLoraConfig's default, as the worker uses


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    worker = REPO / "tests" / "helpers" / "fsdp_worker.py"
    result = subprocess.run([sys.executable, str(worker), str(out), free_port()], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def adapter(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "final" / "adapter_model.safetensors"))


def assert_same_adapter(ours: Path, single: Path) -> None:
    """The final adapters hold the same tensors, each within RTOL."""
    tensors, expected = adapter(ours), adapter(single)
    assert sorted(tensors) == sorted(expected)
    for key in expected:
        assert close(tensors[key], expected[key]), key


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def close(a, b) -> bool:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return a.shape == b.shape and bool(np.all(np.abs(a - b) <= RTOL * np.maximum(np.abs(b).max(initial=0), 1e-30)))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["fsdp", "ddp"])
def test_same_adapter_events_and_trace_as_one_process(runs, mode, variant):
    ours, single = runs / mode / variant, runs / "single" / variant
    events, reference = lines(ours / "events.jsonl"), lines(single / "events.jsonl")
    assert sum(len(e["pruned"]) for e in reference) > 0  # the operations did something
    assert [(e["step"], e["module"], e["pruned"], e["sources"]) for e in events] == \
        [(e["step"], e["module"], e["pruned"], e["sources"]) for e in reference]
    for e, r in zip(events, reference):
        assert e["p"] == r["p"] and close(e["importance"], r["importance"])
    assert_same_adapter(ours, single)
    trace, expected_trace = lines(ours / "rank_trace.jsonl"), lines(single / "rank_trace.jsonl")
    assert [r["step"] for r in trace] == [r["step"] for r in expected_trace] == list(range(2, 17, 2))
    for record, ref in zip(trace, expected_trace):
        assert record.get("beamlora") == ref.get("beamlora")
        for m, n in zip(record["modules"], ref["modules"]):
            assert m["name"] == n["name"] and m["shape"] == n["shape"]
            for key in ("importance", "spectrum"):
                assert close(m[key], n[key]), (record["step"], m["name"], key)
            # Raw scores sit near 0; what they mean is w = r·softmax(s/T): a change of 1e-4·T in s moves w by 1e-4.
            assert np.allclose(m["scores"], n["scores"], rtol=0, atol=RTOL * TEMPERATURE), (record["step"], m["name"])


def test_fsdp_shards_the_rank_axis_and_operations_cross_processes(runs):
    """r = 5 over 2 processes: slots 0-2 on rank 0, 3-4 on rank 1; some operation copied across that line."""
    pairs = [(d, s) for e in lines(runs / "fsdp" / "global-history" / "events.jsonl")
             for d, s in zip(e["pruned"], e["sources"])]
    assert any((d < 3) != (s < 3) for d, s in pairs)


def test_no_expansion_slots_stay_zero_under_fsdp(runs):
    events = lines(runs / "fsdp" / "no-expansion" / "events.jsonl")
    tensors = adapter(runs / "fsdp" / "no-expansion")
    dead = {}
    for e in events:
        dead.setdefault(e["module"], set()).update(e["pruned"])
    assert dead
    for module, slots in dead.items():
        A = tensors[f"{module}.lora_A.weight"]
        B = tensors[f"{module}.lora_B.weight"]
        assert not A[sorted(slots)].any() and not B[:, sorted(slots)].any()


def test_whole_controller_state_under_fsdp_equals_one_process(runs):
    ours = json.loads((runs / "fsdp" / "global-history" / "state.json").read_text())
    single = json.loads((runs / "single" / "global-history" / "state.json").read_text())
    assert ours["step"] == single["step"] == 16 and sorted(ours["scores"]) == sorted(single["scores"])
    for name, values in single["scores"].items():
        assert len(ours["scores"][name]) == 5
        assert np.allclose(ours["scores"][name], values, rtol=0, atol=RTOL * TEMPERATURE)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fsdp_equals_ddp_with_the_same_processes(runs, variant):
    fsdp, ddp = runs / "fsdp" / variant, runs / "ddp" / variant
    assert [(e["pruned"], e["sources"]) for e in lines(fsdp / "events.jsonl")] == \
        [(e["pruned"], e["sources"]) for e in lines(ddp / "events.jsonl")]
    tensors, expected = adapter(fsdp), adapter(ddp)
    for key in expected:
        assert close(tensors[key], expected[key]), key


# ----------------------------------------------------------------------------- the command under torchrun

CLI_OPTIONS = ["--rank", "5", "--alpha", "10", "--steps", "24", "--batch-size", "8", "--held-out", "40", "--max-length",
               "16", "--lr", "5e-3", "--delta-t", "4", "--snapshot-every", "4", "--trace-every", "2", "--eval-every",
               "12", "--no-progress"]


def command(model: Path, data: Path, out: Path, processes: int, *extra: str) -> list[str]:
    launch = ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)] if processes > 1 else []
    return [sys.executable, *launch, "-m", "beamlora", "train", "--model", str(model), "--data", str(data),
            *CLI_OPTIONS, "--out", str(out), *extra]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL torchrun and every worker it started (they run in sessions of their own)."""
    import psutil

    parent = psutil.Process(process.pid)
    for proc in [*parent.children(recursive=True), parent]:
        proc.kill()
    process.wait()


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli")
    model, data = save_tiny_bert(root / "tiny-bert", dropout=False), root / "reviews.csv"
    rng = random.Random(0)
    with open(data, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(200):
            good = i % 2 == 0
            word = rng.choice(["great", "wonderful", "superb"] if good else ["awful", "dull", "terrible"])
            writer.writerow([f"the film was {word} {i}", "pos" if good else "neg"])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = {name: root / name for name in ("single", "fsdp")}
    result = subprocess.run(command(model, data, runs["single"], 1), capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # FSDP2: killed once its first checkpoint is complete, then resumed.
    fsdp = command(model, data, runs["fsdp"], 2, "--fsdp")
    process = subprocess.Popen(fsdp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while process.poll() is None and not list(runs["fsdp"].glob("checkpoints/checkpoint-*/complete.json")):
        time.sleep(0.01)
    assert process.poll() is None, "the run ended before it could be killed"
    kill_tree(process)
    assert not (runs["fsdp"] / "final").exists()
    result = subprocess.run([*fsdp, "--resume"], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs["stdout"] = result.stdout
    return runs


def test_torchrun_fsdp_killed_and_resumed_gives_the_one_process_run(cli_runs):
    """(DDP against one process and against FSDP2, every operation mode: the API tests above.)"""
    ours, single = cli_runs["fsdp"], cli_runs["single"]
    events, reference = lines(ours / "events.jsonl"), lines(single / "events.jsonl")
    assert {e["step"] for e in reference} == {4, 8, 12} and sum(len(e["pruned"]) for e in reference) > 0  # end step 16
    assert [(e["step"], e["pruned"], e["sources"]) for e in events] == [(e["step"], e["pruned"], e["sources"])
                                                                        for e in reference]
    for e, r in zip(events, reference):
        assert close(e["importance"], r["importance"])
    assert_same_adapter(ours, single)
    trace, expected_trace = lines(ours / "rank_trace.jsonl"), lines(single / "rank_trace.jsonl")
    assert [r["step"] for r in trace] == [r["step"] for r in expected_trace] == list(range(2, 25, 2))
    for record, ref in zip(trace, expected_trace):
        for m, n in zip(record["modules"], ref["modules"]):
            assert close(m["importance"], n["importance"]) and close(m["spectrum"], n["spectrum"])
    assert sorted(p.name for p in ours.iterdir()) == sorted(p.name for p in single.iterdir())  # one run folder


def test_resumed_fsdp_run_reports_once_and_leaves_no_checkpoint(cli_runs):
    assert not (cli_runs["fsdp"] / "checkpoints").exists()
    assert cli_runs["stdout"].count("run folder") == 1  # rank 0 alone reports


def test_fsdp_without_a_distributed_launch_is_one_error_line(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("WORLD_SIZE", "RANK")}
    result = subprocess.run([sys.executable, "-m", "beamlora", "train", "--fsdp", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env={**env, "PYTHONPATH": str(REPO)}, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("Error: --fsdp without a distributed launch") and result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_global_batch_the_processes_do_not_divide_is_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "WORLD_SIZE": "2", "RANK": "0"}  # as torchrun sets them
    result = subprocess.run([sys.executable, "-m", "beamlora", "train", "--batch-size", "5", "--out", str(tmp_path / "run")],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and result.stdout == "" and result.stderr.count("\n") == 1
    assert result.stderr.startswith("Error: --batch-size 5 over 2 processes: expected a multiple of 2")
    assert not (tmp_path / "run").exists()


def test_row_helpers_act_on_plain_tensors_as_plain_indexing():
    """One process, DDP: the same calls, no collective (no process group exists here)."""
    import torch

    from rankscope.tasks import sharded

    A = torch.arange(20.0).reshape(5, 4)
    rows = sharded.gather_rows([(A, [3, 0, 3]), (A[:, 0], [4])])
    assert rows[0].tolist() == [A[3].tolist(), A[0].tolist(), A[3].tolist()] and rows[1].tolist() == [16.0]
    assert [t.tolist() for t in sharded.full_tensors([A[:, 1]])] == [[1.0, 5.0, 9.0, 13.0, 17.0]]
    B = A.clone()
    sharded.set_rows(B, np.array([1, 4]), torch.ones(2, 4))
    sharded.set_rows(B, [0], 0.0)
    expected = A.numpy().copy()
    expected[[1, 4]] = 1
    expected[0] = 0
    assert np.array_equal(B.numpy(), expected) and sharded.local_range(A) == (0, 5) and not sharded.is_sharded(A)
