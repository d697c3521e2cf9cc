"""A killed `beamlora train` resumes to the same bits; SIGTERM checkpoints and says so in one line;
--overwrite never deletes what it did not write and replaces a run only once the new one has finished."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.cli import REPO

from beamlora.errors import BeamLoraError
from beamlora.runfolder import RunFolder
from beamlora.train import TrainConfig, train
from rankscope.constants import MANIFEST_FILE

STEPS = 24


def options(tiny_model, small_data, method: str) -> list[str]:
    return ["--model", tiny_model, "--data", small_data, "--method", method, "--rank", "4", "--alpha", "8",
            "--steps", STEPS, "--batch-size", "8", "--held-out", "40", "--max-length", "16", "--lr", "1e-2",
            "--delta-t", "4", "--snapshot-every", "4", "--trace-every", "4", "--eval-every", "12", "--no-progress"]


def start(args: list) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "beamlora.cli", "train", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=600)
    return process.returncode, out, err


def wait_for_checkpoint(run_dir: Path, process: subprocess.Popen, after: int = 0) -> bool:
    """True once a complete checkpoint beyond step ``after`` exists (False if the run ended first)."""
    while process.poll() is None:
        steps = [int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*/complete.json")]
        if any(s > after for s in steps):
            return True
        time.sleep(0.05)
    return False


def same_run(a: Path, b: Path, extra_records: int = 0) -> None:
    """Bit-identical adapters, and the same metrics, events and rank trace."""
    assert (a / "final" / "adapter_model.safetensors").read_bytes() == (b / "final" / "adapter_model.safetensors").read_bytes()
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    assert (a / "events.jsonl").is_file() == (b / "events.jsonl").is_file()
    if (a / "events.jsonl").is_file():
        assert (a / "events.jsonl").read_text() == (b / "events.jsonl").read_text()
    from rankscope.io.trace import iter_records  # the reader drops what a killed run recorded after its checkpoint

    ra, rb = (list(iter_records(path / "rank_trace.jsonl", [])) for path in (a, b))
    assert [r["step"] for r in ra] == list(range(4, STEPS + 1, 4))
    # An interrupted run also records the step it stopped at (a true point of the same trajectory).
    extra = [r["step"] for r in rb if r["step"] not in range(4, STEPS + 1, 4)]
    assert len(extra) <= extra_records
    assert [r["modules"] for r in ra] == [r["modules"] for r in rb if r["step"] not in extra]
    for path in (a, b):
        assert not (path / "checkpoints").exists() and not [p for p in path.iterdir() if p.name.startswith(".") and p.name != MANIFEST_FILE]


RUN_SECONDS: dict[str, float] = {}  # how long each reference run took here (both ran at once)


@pytest.fixture(scope="module")
def references(tiny_model, small_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reference")
    began = time.monotonic()
    runs = {method: start([*options(tiny_model, small_data, method), "--out", root / method])
            for method in ("lora", "beamlora")}
    for method, process in runs.items():
        code, _, err = finish(process)
        assert code == 0, err
        RUN_SECONDS[method] = time.monotonic() - began
    return {method: root / method for method in runs}


@pytest.mark.parametrize("method", ["lora", "beamlora"])
def test_sigkill_at_random_moments_then_resume_gives_the_same_bits(references, tiny_model, small_data, tmp_path, method):
    rng = random.Random(method)
    run_dir = tmp_path / "run"
    args = [*options(tiny_model, small_data, method), "--out", run_dir]
    # One kill at a random moment of the start (perhaps before any file), then kills after random checkpoints.
    process = start(args)
    # Within the first 60% of an uninterrupted run's time (at most 3 s), so the kill lands before the run ends.
    time.sleep(rng.uniform(0.0, min(3.0, 0.6 * RUN_SECONDS[method])))
    process.kill()
    process.wait()
    resumed_from, last = [], 0
    for attempt in range(6):
        process = start([*args, "--resume"])
        if attempt < 2 and wait_for_checkpoint(run_dir, process, after=last):
            time.sleep(rng.uniform(0.0, 0.5))
            process.kill()
            if process.wait() == 0:  # it finished before the kill landed (a busy machine): a resumed run all the same
                code, _, err = finish(process)
                resumed_from += [line for line in err.splitlines() if "continuing from step" in line]
                break
            done = [int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("checkpoint-*/complete.json")]
            last = max(done, default=last)
            continue
        code, _, err = finish(process)
        assert code == 0, err
        resumed_from += [line for line in err.splitlines() if "continuing from step" in line]
        break
    assert resumed_from, "the last attempt should have continued from a checkpoint"
    same_run(references[method], run_dir)


def test_sigterm_checkpoints_and_ends_in_one_line(references, tiny_model, small_data, tmp_path):
    run_dir = tmp_path / "run"
    args = [*options(tiny_model, small_data, "beamlora"), "--out", run_dir]
    process = start(args)
    assert wait_for_checkpoint(run_dir, process)
    process.send_signal(signal.SIGTERM)
    code, out, err = finish(process)
    errors = [line for line in err.splitlines() if line.startswith("Error")]
    assert code == 128 + signal.SIGTERM and len(errors) == 1 and "Traceback" not in err, err
    assert "interrupted by SIGTERM at step" in errors[0] and "--resume" in errors[0]
    assert list((run_dir / "checkpoints").glob("checkpoint-*/complete.json"))
    code, _, err = finish(start([*args, "--resume"]))
    assert code == 0, err
    same_run(references["beamlora"], run_dir, extra_records=1)


def config(tiny_model, small_data, out: Path, **changes) -> TrainConfig:
    base = dict(model=str(tiny_model), data=str(small_data), method="lora", rank=4, alpha=8, steps=6, batch_size=8,
                held_out=40, max_length=16, eval_every=None, snapshot_every=3, trace_every=None, lr=1e-2, out=str(out))
    return TrainConfig(**{**base, **changes})


def tree(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_overwrite_refuses_other_folders_and_keeps_the_old_run_until_the_new_one_finishes(tiny_model, small_data,
                                                                                           tmp_path):
    quiet = dict(progress=False, log=lambda line: None)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "thesis.tex").write_text("years of work")
    with pytest.raises(BeamLoraError, match="holds no beamlora run"):
        train(config(tiny_model, small_data, theirs), overwrite=True, **quiet)
    assert tree(theirs) == {"thesis.tex": b"years of work"}

    run_dir = tmp_path / "run"
    train(config(tiny_model, small_data, run_dir), **quiet)
    before = tree(run_dir)
    with pytest.raises(BeamLoraError, match="already exists"):
        train(config(tiny_model, small_data, run_dir), **quiet)
    with pytest.raises(BeamLoraError, match="diverged"):  # a failed rerun
        train(config(tiny_model, small_data, run_dir, lr=1e6), overwrite=True, **quiet)
    assert tree(run_dir) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run", "theirs"]
    with pytest.raises(BeamLoraError, match="already finished"):
        train(config(tiny_model, small_data, run_dir), resume=True, **quiet)
    broken = tmp_path / "broken"  # a run that stopped half-way: resumable, with its own options only
    with pytest.raises(BeamLoraError, match="diverged"):
        train(config(tiny_model, small_data, broken, lr=1e6), **quiet)
    with pytest.raises(BeamLoraError, match="started with lr=1000000.0, this command gives lr=0.01"):
        train(config(tiny_model, small_data, broken), resume=True, **quiet)
    shutil.rmtree(broken)

    train(config(tiny_model, small_data, run_dir, seed=1), overwrite=True, **quiet)
    assert json.loads((run_dir / "config.json").read_text())["seed"] == 1 and tree(run_dir) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "theirs"]  # no leftovers beside it


def test_one_writer_per_run_folder(tiny_model, small_data, tmp_path):
    holder = RunFolder.open(tmp_path / "run")
    try:
        with pytest.raises(BeamLoraError, match="another beamlora train is writing"):
            train(config(tiny_model, small_data, tmp_path / "run"), progress=False, log=lambda line: None)
    finally:
        holder.close()
