"""--out folders are written whole (built aside, swapped in), never mixed, never stale, never over someone's files;
atomically written files and folders get the permissions the umask gives."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers.cli import REPO
from safetensors.numpy import save_file

from rankscope.constants import MANIFEST_FILE
from rankscope.errors import RankscopeError
from rankscope.io.atomic import atomic_dir, write_bytes

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def adapter(folder: Path, seed: int, modules: int = 4) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    tensors = {}
    for i in range(modules):
        tensors[f"base_model.model.layers.{i}.q.lora_A.weight"] = rng.normal(size=(4, 16)).astype(np.float32)
        tensors[f"base_model.model.layers.{i}.q.lora_B.weight"] = rng.normal(size=(16, 4)).astype(np.float32)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4}))
    return folder


def analyze(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "rankscope.cli", "analyze", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def test_two_writers_of_one_out_never_mix(tmp_path):
    first, second = adapter(tmp_path / "first", 0), adapter(tmp_path / "second", 1, modules=6)
    out = tmp_path / "report"
    for _ in range(3):
        runs = [analyze(first, "--out", out), analyze(second, "--out", out)]
        results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
        for code, err in results:  # each either wrote its whole folder, or stepped back with one clear line
            assert code == 0 or (code == 2 and "another process" in err), err
        document = json.loads((out / "analysis.json").read_text())
        title = re.search(r"<title>rankscope: (.*?)</title>", (out / "report.html").read_text()).group(1)
        assert title == document["path"]  # the report and the JSON come from the same writer
        assert len(document["snapshots"][0]["modules"]) == (4 if title.endswith("first") else 6)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.name != MANIFEST_FILE]  # no temporaries left


def test_reused_out_has_no_stale_plots_and_foreign_folders_are_refused(tmp_path, real_fixtures):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "rankscope.cli", "analyze", real_fixtures / "peft-roberta-series",
                           "--out", out], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0 and (out / "rank_heatmap.png").is_file()
    done = subprocess.run([sys.executable, "-m", "rankscope.cli", "analyze", adapter(tmp_path / "a", 2), "--out", out],
                          capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr
    assert not (out / "rank_heatmap.png").exists() and (out / "deciles.png").is_file()

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    for target in (mine, tmp_path / "a", mine / "thesis.tex"):
        done = subprocess.run([sys.executable, "-m", "rankscope.cli", "analyze", tmp_path / "a", "--out", target],
                              capture_output=True, text=True, env=ENV)
        assert done.returncode == 2 and done.stderr.startswith("Error: --out ") and done.stdout == ""
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        write_bytes(tmp_path / "file.json", b"{}")
        with atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("x")
        plain = tmp_path / "plain"
        plain.mkdir()
        (plain / "f").write_text("x")
    finally:
        os.umask(previous)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "file.json") == mode(plain / "f") == 0o666 & ~umask
    assert mode(tmp_path / "folder") == mode(plain) == 0o777 & ~umask


def test_a_failed_write_leaves_the_old_folder(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "report.html").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "report.html").write_text("half")
            raise RuntimeError("crash")
    assert (target / "report.html").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(RankscopeError, match="holds files rankscope did not write"):
        from rankscope.io.atomic import output_folder

        (target / "notes.md").write_text("mine")
        with output_folder(target):
            pass
