"""BeamLoRA and the rank monitor under FSDP2 (sharded LoRA parameters) and DDP, 2 gloo processes on the CPU.

One worker run (tests/helpers/fsdp_worker.py, shared by every test here) trains the same tiny LoRA BERT
with the same global batches three ways: one process, DDP and FSDP2 (lora_A split along its rank axis,
r = 5 as 3 + 2 slots, so a pruned slot and its source often live on different processes), for five variants
covering the global and per-module cut, every optimizer_state mode and the ablations. Dropout is off, so
all three must give the same adapters, events.jsonl and rank_trace.jsonl (1e-4 relative).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
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
    tensors, expected = adapter(ours), adapter(single)
    assert sorted(tensors) == sorted(expected)
    for key in expected:
        assert close(tensors[key], expected[key]), key
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
