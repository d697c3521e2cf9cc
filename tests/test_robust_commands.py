"""Every input gets an answer (#22): numbers that overflow, options checked before any work, stdout kept clean,
long traces read in bounded memory. Each test builds its repro in tmp_path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import REPO, run_cli
from safetensors.numpy import load_file, save_file

import rankscope
from rankscope.io.trace import module_text, record_text
from rankscope.maths.analysis import MAX_TRACE_RECORDS, even_subsample
from rankscope.tasks.evaluate import load_error


def peft(folder: Path, A: np.ndarray, B: np.ndarray, alpha: float = 8) -> Path:
    folder.mkdir(parents=True)
    save_file({"base_model.model.m.q.lora_A.weight": A, "base_model.model.m.q.lora_B.weight": B},
              folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": A.shape[0], "lora_alpha": alpha}))
    return folder


def small_adapter(folder: Path, seed: int, alpha: float = 8) -> Path:
    rng = np.random.default_rng(seed)
    return peft(folder, rng.normal(size=(4, 8)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32), alpha)


def one_error(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and lines and lines[-1].startswith("Error: "), done.stderr
    return lines[-1]


def test_an_update_that_overflows_is_named_as_such_and_never_resized(tmp_path):
    rng = np.random.default_rng(0)
    huge = peft(tmp_path / "huge", rng.normal(size=(4, 8)) * 1e200, rng.normal(size=(6, 4)) * 1e200)
    loud = peft(tmp_path / "alpha", rng.normal(size=(4, 8)).astype(np.float32),
                rng.normal(size=(6, 4)).astype(np.float32), alpha=1e308)
    for folder in (huge, loud):
        summary = rankscope.analyze(folder)["snapshots"][0]["summary"]
        assert "overflows float64" in summary["errors"][0] and "NaN" not in summary["errors"][0]
        assert "overflows float64" in summary["verdict"]["sentence"]
        line = one_error(run_cli("resize", folder, "--out", tmp_path / f"out-{folder.name}", "--rank", "1"))
        assert "overflows float64" in line and not (tmp_path / f"out-{folder.name}").exists()


def test_a_zero_scale_is_not_called_an_untrained_adapter(tmp_path):
    folder = small_adapter(tmp_path / "a", seed=1, alpha=0)
    sentence = rankscope.analyze(folder)["snapshots"][0]["summary"]["verdict"]["sentence"]
    assert "the scale is 0" in sentence and "B = 0" not in sentence


def test_every_module_non_finite_says_the_training_diverged_in_one_line(tmp_path):
    modules = {f"base_model.model.layers.{i}.q_proj.lora_{part}.weight": np.full(shape, np.nan, np.float16)
               for i in range(8) for part, shape in (("A", (4, 8)), ("B", (6, 4)))}
    (tmp_path / "a").mkdir()
    save_file(modules, tmp_path / "a" / "adapter_model.safetensors")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    done = run_cli("analyze", tmp_path / "a")
    assert done.returncode == 0, done.stderr
    assert "every module holds NaN or Inf: the training diverged; nothing to analyse" in done.stdout
    assert "8 of 8 modules could not be analysed" in done.stdout
    assert done.stdout.count("  problem  ") == 5  # the first five named; the JSON keeps every module's error


def test_resize_refuses_to_write_inf_into_a_float16_adapter(tmp_path):
    folder = peft(tmp_path / "a", np.full((4, 8), 60000, np.float16), np.full((6, 4), 60000, np.float16), alpha=4)
    line = one_error(run_cli("resize", folder, "--out", tmp_path / "small", "--rank", "1"))
    assert "beyond the largest F16 number" in line and "--dtype fp32" in line and not (tmp_path / "small").exists()
    done = run_cli("resize", folder, "--out", tmp_path / "small", "--rank", "1", "--dtype", "fp32")
    assert done.returncode == 0, done.stderr
    tensors = load_file(tmp_path / "small" / "adapter_model.safetensors")
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in tensors.values())
    # the float64 reference: B·A of the input is 4·60000² everywhere; rank 1 keeps it exactly
    product = tensors["base_model.model.m.q.lora_B.weight"].astype(np.float64) @ \
        tensors["base_model.model.m.q.lora_A.weight"].astype(np.float64)
    np.testing.assert_allclose(product, np.full((6, 8), 4 * 60000.0 ** 2), rtol=1e-6)


@pytest.mark.parametrize("extra, expected", [
    (["--json", "FOLDER"], "is a folder"),
    (["--validate"], "--validate needs a base model"),
    (["--validate", "--model", "/nonexistent/model"], "--model /nonexistent/model: not 'minilm'"),
])
def test_a_failing_resize_writes_nothing(tmp_path, extra, expected):
    folder = small_adapter(tmp_path / "a", seed=2)
    (tmp_path / "FOLDER").mkdir()
    extra = [str(tmp_path / "FOLDER") if x == "FOLDER" else x for x in extra]
    assert expected in one_error(run_cli("resize", folder, "--out", tmp_path / "small", "--rank", "2", *extra))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FOLDER", "a"] and not any((tmp_path / "FOLDER").iterdir())


def test_stdout_carries_only_the_json_whatever_a_c_library_prints(tmp_path):
    """LAPACK prints ``** On entry to DLASCL ...`` to file descriptor 1 from C: it must not land in the JSON."""
    folder = small_adapter(tmp_path / "a", seed=3)
    code = ("import ctypes, sys\n"
            "import rankscope.cli as cli\n"
            "analyze = cli.analyze_path\n"
            "def noisy(*args, **kwargs):\n"
            "    libc = ctypes.CDLL(None)\n"
            "    libc.printf(b'** On entry to DLASCL parameter number 4 had an illegal value\\n'); libc.fflush(None)\n"
            "    return analyze(*args, **kwargs)\n"
            "cli.analyze_path = noisy\n"
            "cli.main(['analyze', sys.argv[1], '--json', '-'])\n")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["schema"] == "rankscope/analysis-v1"
    assert "DLASCL" in done.stderr  # not lost: on stderr


def test_recommend_plans_a_huge_run_in_exact_integers(real_fixtures):
    done = run_cli("recommend", real_fixtures / "peft-roberta-series", "--total-steps", str(10 ** 18), "--json", "-")
    assert done.returncode == 0, done.stderr
    rec = json.loads(done.stdout)
    assert rec["total_steps"] == 10 ** 18 and rec["end_step"] == 2 * 10 ** 18 // 3
    # Δt from the stable step scaled to the long run, rounded up exactly (no float on the way)
    stable, last = rec["stable_from"], rec["importance_step"]  # the series' stable step and last snapshot
    expected = max(-(-rec["end_step"] // 6), -(-stable * 10 ** 18 // last)) if stable else -(-rec["end_step"] // 6)
    assert rec["delta_t"] == min(expected, rec["end_step"])


def _trace(folder: Path, records: int) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(4)
    with open(folder / "rank_trace.jsonl", "w") as f:
        for step in range(1, records + 1):
            modules = [module_text({"name": f"base_model.model.layers.{m}.q_proj", "rank": 4, "scale": 2.0,
                                    "shape": [6, 8], "layer_type": "linear", "dtype": "F32"},
                                   {"importance": np.abs(rng.normal(size=4)) + 0.1,
                                    "spectrum": np.sort(np.abs(rng.normal(size=4)))[::-1]}) for m in range(2)]
            f.write(record_text(step, modules, time=1.0) + "\n")
    return folder


def test_a_long_trace_is_read_as_an_even_subsample_unless_every_record_is_asked_for(tmp_path):
    assert even_subsample(10, 4) == [0, 3, 6, 9] and even_subsample(3, 4) == [0, 1, 2]
    records = MAX_TRACE_RECORDS + 200
    folder = _trace(tmp_path / "run", records)
    document = rankscope.analyze(folder)
    steps = [s["step"] for s in document["snapshots"]]
    assert len(steps) == MAX_TRACE_RECORDS and steps[0] == 1 and steps[-1] == records
    assert steps == [1 + i for i in even_subsample(records, MAX_TRACE_RECORDS)]
    assert any("an even subsample" in note and "--all-records" in note for note in document["snapshots"][-1]["notes"])
    assert len(rankscope.analyze(folder, all_records=True)["snapshots"]) == records


def test_a_state_dict_mismatch_is_told_by_its_first_size_mismatch_not_cut_at_the_colon():
    error = RuntimeError("Error(s) in loading state_dict for PeftModelForSequenceClassification:\n\tsize mismatch for "
                         "base_model.model.classifier.modules_to_save.default.weight: copying a param with shape "
                         "torch.Size([2, 384]) from checkpoint, the shape in current model is torch.Size([3, 384]).\n"
                         "\tsize mismatch for base_model.model.classifier.modules_to_save.default.bias: copying a param "
                         "with shape torch.Size([2]) from checkpoint, the shape in current model is torch.Size([3]).")
    line = load_error(error)
    assert line.startswith("size mismatch for base_model.model.classifier.modules_to_save.default.weight")
    assert "torch.Size([3, 384])" in line and "(and 1 more)" in line and "\n" not in line
    assert load_error(ValueError("plain message\nsecond line")) == "plain message"



def test_progress_in_a_log_is_a_line_every_tenth_after_the_first_seconds():
    from rankscope.progress import LOG_AFTER_SECONDS, LOG_EVERY_SECONDS, LogProgress

    now = [0.0]
    lines: list[str] = []
    log = LogProgress(100, "sweeping", "point", write=lines.append, clock=lambda: now[0])
    for _ in range(100):
        now[0] += LOG_AFTER_SECONDS / 40  # quiet for the first 40 steps, then a line at each tenth
        log.update(1)
    assert lines == [f"sweeping: {p}% ({p}/100 point)" for p in range(40, 101, 10)]
    lines.clear()
    slow = LogProgress(1000, "training", "step", write=lines.append, clock=lambda: now[0])
    now[0] += LOG_AFTER_SECONDS + LOG_EVERY_SECONDS  # one slow step: a line although no tenth was reached
    slow.update(1)
    assert lines == ["training: 0% (1/1000 step)"]


def test_beamlora_train_writes_no_bar_into_a_log(tiny_model, small_data, tmp_path):
    args = ["--model", tiny_model, "--data", small_data, "--method", "beamlora", "--rank", "4", "--alpha", "8",
            "--steps", "8", "--batch-size", "8", "--held-out", "40", "--max-length", "16", "--delta-t", "4",
            "--snapshot-every", "0", "--trace-every", "0", "--eval-every", "8", "--out", tmp_path / "run"]
    done = subprocess.run([sys.executable, "-m", "beamlora.cli", "train", *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "it/s" not in done.stderr and "s/it" not in done.stderr  # stderr is a pipe here


def test_a_write_that_fails_names_the_users_folder_and_leaves_nothing(tmp_path):
    """A real failed write (a file-size limit, as a full disk would fail it): one Error naming --out, no temporary."""
    folder = small_adapter(tmp_path / "a", seed=5)
    code = ("import resource, signal, sys\n"
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # the plots and the report do not fit\n"
            "from rankscope.cli import main\n"
            "main(['analyze', sys.argv[1], '--out', sys.argv[2]])\n")
    done = subprocess.run([sys.executable, "-c", code, str(folder), str(tmp_path / "report")], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    line = one_error(done)
    assert f"--out {tmp_path / 'report'}: cannot be written (File too large)" in line and ".tmp" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
