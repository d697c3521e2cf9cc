"""`make demo` end to end, shortened (same code path, fewer steps and held-out examples)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers.cli import REPO


def test_demo_runs_both_methods_and_writes_the_reports(tmp_path):
    done = subprocess.run([sys.executable, "-m", "beamlora.demo", "--out", tmp_path, "--steps", "36",
                           "--held-out", "100"], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert any(line.startswith("LoRA ") and "held-out accuracy" in line for line in lines)
    assert any(line.startswith("BeamLoRA ") and "held-out accuracy" in line for line in lines)
    # Both views for both runs, and the resized adapters with their accuracy before and after.
    assert sum(line.strip().startswith("per-rank") for line in lines) == 2
    assert sum(line.strip().startswith("spectral  k95 / r") for line in lines) == 2
    assert sum("resized to 95% energy" in line and "accuracy" in line for line in lines) == 2
    for method in ("lora", "beamlora"):
        assert (tmp_path / method / "report" / "report.html").is_file()
        assert (tmp_path / method / "resized-95" / "adapter_model.safetensors").is_file()
        assert (tmp_path / method / "sweep" / "compression.png").is_file()
        assert json.loads((tmp_path / method / "sweep" / "sweep.json").read_text())["schema"] == "rankscope/sweep-v1"
    assert len(list((tmp_path / "beamlora").glob("step-*"))) == 9  # snapshots every 4 of 36 steps
    compare = json.loads((tmp_path / "compare" / "compare.json").read_text())
    assert [run["label"] for run in compare["runs"]] == ["LoRA", "BeamLoRA"] and compare["sweeps"] is not None


def test_demo_out_that_is_a_file_is_one_error_line_before_any_run(tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    done = subprocess.run([sys.executable, "-m", "beamlora.demo", "--out", taken, "--steps", "4"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines() == [f"Error: --out {taken} is not a folder: expected a folder for the two runs "
                                        "(created if missing)"]
    assert taken.read_text() == "mine"
