"""Nothing a user owns is ever replaced (#22): --json targets, --out and --overwrite folders, races at the swap.

The contract (docs/cli.md#outputs): ``--json PATH`` writes through to a device, a FIFO or stdout, follows a
symlink to its target (replacing the target atomically when it is a regular file), and otherwise creates or
atomically replaces a regular file; ``--out`` and ``--overwrite`` replace only a folder this project wrote
(its manifest lists its files, and nothing was added since), checked again at the final swap.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from helpers.adapters import write_peft
from helpers.cli import REPO, run_cli

from beamlora.errors import BeamLoraError
from beamlora.runfolder import RunFolder
from rankscope.constants import MANIFEST_FILE
from rankscope.errors import RankscopeError
from rankscope.io.atomic import atomic_dir, foreign_files, output_folder


def adapter(folder: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    modules = {f"model.layers.{i}.q_proj": (rng.normal(size=(4, 10)).astype(np.float32),
                                            rng.normal(size=(6, 4)).astype(np.float32)) for i in range(2)}
    return write_peft(folder, modules, r=4, alpha=8)


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry below ``folder`` with its bytes (None for folders), links not followed."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            found[os.path.relpath(os.path.join(root, name), folder) + "/"] = None
        for name in files:
            path = os.path.join(root, name)
            found[os.path.relpath(path, folder)] = Path(path).read_bytes()
    return found


def one_error(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    return lines[0]


# ----------------------------------------------------------------------------- --json PATH


@pytest.mark.skipif(os.geteuid() != 0, reason="making a character device (os.mknod) needs root")
def test_json_to_a_device_writes_through_and_leaves_the_device(tmp_path):
    null = tmp_path / "null"
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # the same device as /dev/null
    done = run_cli("analyze", adapter(tmp_path / "a"), "--json", null)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISCHR(os.stat(null).st_mode) and os.stat(null).st_rdev == os.makedev(1, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "null"]


def test_json_to_a_fifo_writes_through_as_tee_does(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    received = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    done = run_cli("analyze", adapter(tmp_path / "a"), "--json", fifo)
    reader.join(timeout=60)
    assert done.returncode == 0, done.stderr
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)  # still a FIFO, not a regular file put in its place
    assert json.loads(received[0])["schema"] == "rankscope/analysis-v1"


def test_json_to_a_symlink_replaces_its_target_and_keeps_the_link(tmp_path):
    target = tmp_path / "results" / "analysis.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    dangling = tmp_path / "new.json"
    dangling.symlink_to(tmp_path / "results" / "created.json")
    for path in (link, dangling):
        done = run_cli("analyze", adapter(tmp_path / "a"), "--json", path)
        assert done.returncode == 0, done.stderr
        assert path.is_symlink()
    assert json.loads(target.read_text())["schema"] == "rankscope/analysis-v1"
    assert json.loads((tmp_path / "results" / "created.json").read_text())["schema"] == "rankscope/analysis-v1"


def test_json_to_a_folder_is_one_error_naming_it(tmp_path):
    folder = tmp_path / "somewhere"
    folder.mkdir()
    line = one_error(run_cli("analyze", adapter(tmp_path / "a"), "--json", folder))
    assert str(folder) in line and ".tmp" not in line and "is a folder" in line
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("close", ["before the start (sh: >&-)", "after the start"])
def test_json_to_a_closed_stdout_fails(tmp_path, close):
    path = str(adapter(tmp_path / "a"))
    if close.startswith("before"):
        command = ["sh", "-c", 'exec "$@" >&-', "sh", sys.executable, "-m", "rankscope.cli", "analyze", path, "--json", "-"]
    else:
        command = [sys.executable, "-c", "import os, sys; os.close(1); sys.argv = ['rankscope', 'analyze', sys.argv[1], "
                   "'--json', '-']; from rankscope.cli import main; main()", path]
    done = subprocess.run(command, capture_output=False, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith("Error: --json -: stdout"), done.stderr


# ----------------------------------------------------------------------------- resize --out --overwrite


def _adapter_with_a_project_around(folder: Path) -> None:
    adapter(folder)
    (folder / "train.py").write_text("print('my training script')")
    (folder / "data").mkdir()
    (folder / "data" / "important.csv").write_text("a,b\n1,2\n")


def _thesis(folder: Path) -> None:
    (folder / "thesis").mkdir(parents=True)
    (folder / "notes.md").write_text("notes")
    (folder / "thesis" / "chapter1.tex").write_text("\\chapter{One}")
    np.save(folder / "embeddings.npy", np.ones(3))
    from safetensors.numpy import save_file

    save_file({"embedding": np.ones((2, 2), np.float32)}, folder / "embeddings.safetensors")


def _project(folder: Path) -> None:
    (folder / "src").mkdir(parents=True)
    (folder / "README.md").write_text("# my project")
    (folder / "src" / "main.py").write_text("")
    adapter(folder / "adapter")


@pytest.mark.parametrize("make", [_adapter_with_a_project_around, _thesis, _project])
def test_resize_overwrite_never_replaces_a_folder_it_did_not_write(tmp_path, make):
    target = tmp_path / "target"
    make(target)
    before = tree(target)
    line = one_error(run_cli("resize", adapter(tmp_path / "in"), "--out", target, "--energy", "0.9", "--overwrite"))
    assert "rankscope did not write" in line and "nothing was touched" in line
    assert tree(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["in", "target"]


def test_resize_overwrite_replaces_its_own_output_only_while_nothing_was_added(tmp_path):
    source, out = adapter(tmp_path / "in"), tmp_path / "out"
    assert run_cli("resize", source, "--out", out, "--rank", "2").returncode == 0
    listed = json.loads((out / MANIFEST_FILE).read_text())
    assert listed["kind"] == "adapter" and sorted(listed["files"]) == sorted(p.name for p in out.iterdir()
                                                                              if p.name != MANIFEST_FILE)
    line = one_error(run_cli("resize", source, "--out", out, "--rank", "3"))
    assert "already exists" in line and "--overwrite" in line
    assert run_cli("resize", source, "--out", out, "--rank", "3", "--overwrite").returncode == 0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 3
    (out / "my_results.txt").write_text("mine")
    one_error(run_cli("resize", source, "--out", out, "--rank", "1", "--overwrite"))
    assert (out / "my_results.txt").read_text() == "mine" and json.loads((out / "adapter_config.json").read_text())["r"] == 3


# ----------------------------------------------------------------------------- the swap checks again


def test_a_file_that_appears_during_the_work_is_never_deleted(tmp_path):
    out = tmp_path / "report"
    with output_folder(out) as tmp:
        (tmp / "report.html").write_text("first")
    with pytest.raises(RankscopeError) as e:
        with output_folder(out) as tmp:  # checked: ours, may be replaced
            (tmp / "report.html").write_text("second")
            (out / "my_results.txt").write_text("written by the user meanwhile")
    message = str(e.value)
    assert "my_results.txt appeared" in message and "nothing there was replaced" in message
    assert (out / "my_results.txt").read_text() == "written by the user meanwhile"
    assert (out / "report.html").read_text() == "first"
    kept = Path(message.rsplit(" is in ", 1)[1])
    assert kept.parent == tmp_path and (kept / "report.html").read_text() == "second"


def test_two_writers_into_one_new_folder_never_replace_each_other(tmp_path):
    out = tmp_path / "small"
    with pytest.raises(RankscopeError) as e:
        with atomic_dir(out, "adapter", replace=False) as second:  # both found ``out`` missing when they started
            with atomic_dir(out, "adapter", replace=False) as first:
                (first / "adapter_model.safetensors").write_text("first")
            (second / "adapter_model.safetensors").write_text("second")
    assert "another process wrote" in str(e.value)
    assert (out / "adapter_model.safetensors").read_text() == "first"
    kept = Path(str(e.value).rsplit(" is in ", 1)[1])
    assert (kept / "adapter_model.safetensors").read_text() == "second"


# ----------------------------------------------------------------------------- beamlora train --overwrite


def test_train_overwrite_refuses_a_folder_that_only_looks_like_a_run(tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"method": "mine", "held_out": 1}))
    (folder / "thesis.tex").write_text("years of work")
    before = tree(folder)
    with pytest.raises(BeamLoraError, match="holds no beamlora run"):
        RunFolder.open(folder, overwrite=True)
    assert tree(folder) == before


def test_a_report_written_into_a_run_folder_keeps_the_run_replaceable(tmp_path):
    """``make demo`` writes report/, sweep/ and resized-95/ into each run folder: those are this project's too."""
    run = tmp_path / "run"
    with atomic_dir(run, "run") as tmp:
        (tmp / "config.json").write_text("{}")
    with output_folder(run / "report") as tmp:
        (tmp / "report.html").write_text("report")
    assert foreign_files(run, "run") == []
    (run / "report" / "notes.md").write_text("mine")  # something of the user's inside it: the report is theirs now
    assert "report/notes.md" in foreign_files(run, "run")


def test_json_to_dev_stdout_is_json_alone_on_stdout(real_fixtures):
    done = run_cli("analyze", real_fixtures / "peft-gpt2-conv1d", "--json", "/dev/stdout")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["format"] == "peft" and "verdict" in done.stderr  # the summary went to stderr

