"""#22, training and its data: every bad input is one ``Error:`` line, nothing hangs, no half-made folders.

A FIFO given as data, a data line with a 5000-digit or 100,000-deep label, a run folder whose config.json
nests 100,000 deep, a full disk (a real EFBIG from a small RLIMIT_FSIZE in a forked child), the modes of what
training writes under the umask, and the leftovers of killed writers.
"""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from beamlora import cli as beamlora_cli
from beamlora.errors import BeamLoraError
from beamlora.runfolder import COMPLETE, RunFolder
from beamlora.train import TrainConfig, train
from rankscope import cli as rankscope_cli
from rankscope.constants import MANIFEST_FILE
from rankscope.errors import RankscopeError
from rankscope.tasks.data import load_data
from rankscope.tasks.runconfig import read_run_config

QUIET = dict(progress=False, log=lambda line: None)


def options(tiny_model, small_data, out, *more) -> list[str]:
    return ["--model", tiny_model, "--data", small_data, "--method", "beamlora", "--rank", "4", "--alpha", "8",
            "--steps", "6", "--batch-size", "8", "--held-out", "40", "--max-length", "16", "--snapshot-every", "3",
            "--delta-t", "3", "--eval-every", "0", "--trace-every", "0", "--lr", "1e-2", "--out", out, "--no-progress",
            *more]


def config(tiny_model, small_data, out, **changes) -> TrainConfig:
    base = dict(model=str(tiny_model), data=str(small_data), method="beamlora", rank=4, alpha=8, steps=6, batch_size=8,
                held_out=40, max_length=16, snapshot_every=3, delta_t=3, eval_every=None, trace_every=None, lr=1e-2,
                out=str(out))
    return TrainConfig(**{**base, **changes})


def one_error(code, out, err) -> str:
    """The one ``Error:`` line a command ended with (exit status 2, nothing else on stderr, no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (code, err)
    return lines[0]


def run(capsys, main, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(map(str, args)))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


@pytest.fixture(autouse=True)
def no_hang():
    """A command that blocks (on a FIFO, say) fails the test after 60 s instead of hanging the suite."""
    def hung(signum, frame):
        raise TimeoutError("the command hung")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def tree(path: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def finished_run(tiny_model, small_data, tmp_path_factory) -> Path:
    """A finished tiny BeamLoRA run (for sweep and resize); read only."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(config(tiny_model, small_data, out), **QUIET)
    return out


# ----------------------------------------------------------------------------- 1. a FIFO as data


@pytest.mark.parametrize("task,name", [("classification", "x.csv"), ("classification", "x.jsonl"), ("sft", "x.jsonl")])
def test_a_fifo_as_training_data_is_refused_unopened_before_anything(capsys, tmp_path, task, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    out = tmp_path / "runs" / "run"
    # No such model: the data is checked first, so the error is about the FIFO and no model is looked for.
    code, stdout, err = run(capsys, beamlora_cli.main, "train", "--task", task, "--model", tmp_path / "no-model",
                            "--data", fifo, "--out", out, "--no-progress")
    line = one_error(code, stdout, err)
    assert f"{fifo}: cannot read the file: it is a FIFO (reading it would block), not a regular file" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no run folder, no lock, no parent made


@pytest.mark.parametrize("command", ["sweep", "sweep-loss", "sweep-exact-match", "resize"])
@pytest.mark.parametrize("name", ["x.csv", "x.jsonl", "x.txt"])
def test_a_fifo_as_sweep_or_resize_data_is_refused_unopened(capsys, tmp_path, finished_run, command, name):
    fifo = tmp_path / name
    os.mkfifo(fifo)
    if command == "resize":
        args = ["resize", finished_run, "--rank", "2", "--out", tmp_path / "small", "--validate", "--data", fifo]
    else:
        args = ["sweep", finished_run, "--data", fifo, "--out", tmp_path / "sweep", "--fractions", "0"]
        args += {"sweep-loss": ["--metric", "loss"], "sweep-exact-match": ["--metric", "exact_match"]}.get(command, [])
    code, out, err = run(capsys, rankscope_cli.main, *args)
    line = one_error(code, out, err)
    if name == "x.txt" and command == "sweep":
        assert "accuracy needs labelled data" in line  # refused by its name, before it is opened
    else:
        assert f"{fifo}: cannot read the file: it is a FIFO" in line
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "small").exists()  # nothing written


# ----------------------------------------------------------------------------- 2. huge and deep labels

GOOD = {"text": "a fine film", "label": "pos"}
BAD_LINES = {
    "5000 digits": '{"text": "a", "label": 1' + "0" * 5000 + "}",
    "100000 deep": '{"text": "a", "label": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "a list": '{"text": "a", "label": [[["neg"]]]}',
    "900 deep": '{"text": "a", "label": ' + "[" * 900 + "]" * 900 + "}",
}
SFT_BAD_LINES = {
    "5000 digits": '{"prompt": "a", "response": 1' + "0" * 5000 + "}",
    "100000 deep": '{"prompt": "a", "response": ' + "[" * 100_000 + "]" * 100_000 + "}",
    "deep messages": '{"messages": [' + "[" * 900 + "]" * 900 + ', {"role": "assistant", "content": "4"}]}',
}


@pytest.mark.parametrize("bad", BAD_LINES)
@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_label_too_long_or_too_deep_is_one_error_naming_file_and_line(capsys, tmp_path, finished_run, bad, command):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + BAD_LINES[bad] + "\n" + json.dumps({**GOOD, "label": "neg"}) + "\n")
    if command == "train":
        code, out, err = run(capsys, beamlora_cli.main, "train", "--model", tmp_path / "no-model", "--data", data,
                             "--out", tmp_path / "run", "--no-progress")
    else:
        code, out, err = run(capsys, rankscope_cli.main, "sweep", finished_run, "--model", tmp_path / "no-model",
                             "--data", data, "--out", tmp_path / "sweep")
    assert f"{data}: line 2" in one_error(code, out, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl"]


@pytest.mark.parametrize("bad", SFT_BAD_LINES)
def test_an_sft_line_too_long_or_too_deep_is_one_error_naming_file_and_line(capsys, tmp_path, bad):
    data = tmp_path / "chats.jsonl"
    data.write_text(json.dumps({"prompt": "2+2=", "response": "4"}) + "\n" + SFT_BAD_LINES[bad] + "\n")
    code, out, err = run(capsys, beamlora_cli.main, "train", "--task", "sft", "--model", tmp_path / "no-model",
                         "--data", data, "--held-out", "1", "--out", tmp_path / "run", "--no-progress")
    assert f"{data}: line 2" in one_error(code, out, err)


def test_a_csv_label_of_5000_digits_is_a_class_name_like_any_other(tmp_path):
    data = tmp_path / "data.csv"
    huge, large = "1" + "0" * 5000, "9" * 4400  # both beyond int()'s 4300 digits
    labels = [huge, "2", large, "10"] * 3
    data.write_text("text,label\n" + "".join(f"text {i},{label}\n" for i, label in enumerate(labels)))
    assert load_data(data).label_names == ["2", "10", large, huge]  # in numeric order, as smaller integers are


# ----------------------------------------------------------------------------- 3. run folders


def deep_config(levels: int) -> str:
    return '{"method": "lora", "held_out": 40, "rank": ' + "[" * levels + "]" * levels + "}"


@pytest.mark.parametrize("content", ["[" * 100_000 + "]" * 100_000, deep_config(100_000), deep_config(980), "fifo"])
@pytest.mark.parametrize("mode", ["--overwrite", "--resume"])
def test_a_run_config_nested_too_deep_or_a_fifo_is_one_error_and_nothing_is_touched(capsys, tmp_path, tiny_model,
                                                                                    small_data, content, mode):
    out = tmp_path / "run"
    out.mkdir()
    if content == "fifo":
        os.mkfifo(out / "config.json")
    else:
        (out / "config.json").write_text(content)
    (out / MANIFEST_FILE).write_text(json.dumps({"written_by": "rankscope", "kind": "run", "files": ["config.json"]}))
    before = tree(out) if content != "fifo" else None
    code, stdout, err = run(capsys, beamlora_cli.main, "train", *options(tiny_model, small_data, out, mode))
    line = one_error(code, stdout, err)
    assert line.startswith(f"Error: {mode}: {out / 'config.json'}")
    assert ("not a regular file" if content == "fifo" else "nests JSON more than 32 levels deep") in line
    if before is not None:
        assert tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_fifo_manifest_does_not_block_overwrite(capsys, tmp_path, tiny_model, small_data):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"method": "lora", "held_out": 40}))
    os.mkfifo(out / MANIFEST_FILE)
    code, stdout, err = run(capsys, beamlora_cli.main, "train", *options(tiny_model, small_data, out, "--overwrite"))
    assert "holds no beamlora run that finished there" in one_error(code, stdout, err)


def test_reading_a_run_config_does_not_depend_on_the_stack_depth(tmp_path):
    (tmp_path / "config.json").write_text(deep_config(980))

    def at_depth(n: int):
        return at_depth(n - 1) if n else read_run_config(tmp_path)

    assert at_depth(0) is None and at_depth(30) is None  # not a run's config, whoever asks
    with pytest.raises(RankscopeError, match="nests JSON more than 32 levels deep"):
        read_run_config(tmp_path, strict=True)
    (tmp_path / "config.json").write_text(json.dumps({"method": "lora", "held_out": 40, "targets": [["q"]]}))
    assert read_run_config(tmp_path, strict=True)["targets"] == [["q"]]


# ----------------------------------------------------------------------------- 4. a full disk


def in_child(argv: list, limit: int | None = None, limit_after: str | None = None) -> tuple[int, str]:
    """``beamlora ARGV`` in a forked child whose files may not grow past ``limit`` bytes (RLIMIT_FSIZE, SIGXFSZ
    ignored: a write past it fails with a real EFBIG, as on a full disk); with ``limit_after``, the limit (0) starts
    once a file whose path ends so has been renamed into place. Returns (exit status, stderr)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        code = 3
        try:
            os.close(read)
            stream = os.fdopen(write, "w", buffering=1)
            os.dup2(write, 1)
            os.dup2(write, 2)
            sys.stdout = sys.stderr = stream
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            signal.alarm(0)
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
            if limit_after is not None:
                def hook(event, args):
                    if event == "os.rename" and str(args[1]).endswith(limit_after):
                        resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # the disk is full from now on

                sys.addaudithook(hook)
            try:
                beamlora_cli.main(list(map(str, argv)))
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            stream.flush()
        except BaseException:  # noqa: BLE001 — anything else: a traceback on stderr, status 3
            import traceback

            traceback.print_exc()
            sys.stderr.flush()
        finally:
            os._exit(code)
    os.close(write)
    try:
        with os.fdopen(read) as f:
            err = f.read()
    except BaseException:  # the test timed out: the child goes too
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*") if p.name != MANIFEST_FILE)


def test_a_full_disk_before_the_first_checkpoint_leaves_nothing(tmp_path, tiny_model, small_data):
    out = tmp_path / "new" / "runs" / "run"
    # 8000 bytes: config.json and events.jsonl fit, the first adapter (≈ 11 KB, safetensors) does not.
    code, err = in_child(["train", *options(tiny_model, small_data, out)], limit=8000)
    line = one_error(code, "", err)
    assert line.startswith(f"Error: cannot write {out}/") and ("step-000003" in line or "checkpoint-3" in line)
    assert "Traceback" not in err and "nothing of the run was kept" in line
    assert list(tmp_path.iterdir()) == []  # no run folder, no parents made for it, no lock, no temporary folder


def test_a_full_disk_after_a_checkpoint_keeps_the_run_resumable(tmp_path, tiny_model, small_data):
    out = tmp_path / "run"
    code, err = in_child(["train", *options(tiny_model, small_data, out)], limit_after=f"checkpoint-3/{COMPLETE}")
    line = one_error(code, "", err)
    assert line.startswith(f"Error: cannot write {out}/") and "File too large" in line
    assert "checkpoint at step 3" in line and "--resume" in line
    assert (out / "checkpoints" / "checkpoint-3" / COMPLETE).is_file()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-3"]  # the cut-short one went
    assert hidden(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    result = train(config(tiny_model, small_data, out), resume=True, **QUIET)  # once there is room again
    assert (result.run_dir / "final" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints").exists() and hidden(out) == []

    before = tree(out)  # a rerun with --overwrite on the full disk: the old run stays as it was
    code, err = in_child(["train", *options(tiny_model, small_data, out, "--overwrite", "--seed", "1")], limit=0)
    line = one_error(code, "", err)
    assert line.startswith(f"Error: cannot write {out}/config.json: File too large")
    assert line.endswith(f"the run in {out} is as it was")
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_run_that_fails_before_writing_anything_leaves_no_folder(capsys, tmp_path, small_data):
    out = tmp_path / "new" / "run"
    code, stdout, err = run(capsys, beamlora_cli.main, "train", "--model", tmp_path / "no-model", "--data", small_data,
                            "--held-out", "40", "--out", out, "--no-progress")
    assert "no-model" in one_error(code, stdout, err)
    assert list(tmp_path.iterdir()) == []  # the folders made for its lock went with it


# ----------------------------------------------------------------------------- 5. permissions


def modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mode & 0o777 for p in [folder, *folder.rglob("*")]}


def test_what_training_writes_gets_the_modes_of_the_umask(tmp_path, tiny_model, small_data):
    out = tmp_path / "run"
    previous = os.umask(0o027)
    try:
        train(config(tiny_model, small_data, out, method="lora"), **QUIET)
        found = modes(out)
        assert found["final/adapter_model.safetensors"] == 0o640  # safetensors alone would write 0600
        assert {m for name, m in found.items() if (out / name).is_dir()} == {0o750}
        assert {m for name, m in found.items() if not (out / name).is_dir()} == {0o640}, found
        os.umask(0o002)
        train(config(tiny_model, small_data, out, method="lora", seed=1), overwrite=True, **QUIET)
        found = modes(out)
        assert found["."] == 0o775  # the replacing run's folder came from mkdtemp (0700)
        assert {m for name, m in found.items() if (out / name).is_dir()} == {0o775}
        assert {m for name, m in found.items() if not (out / name).is_dir()} == {0o664}, found
    finally:
        os.umask(previous)


# ----------------------------------------------------------------------------- 6. leftovers of killed writers


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_the_next_run_removes_dead_writers_leftovers_and_only_theirs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"method": "lora", "held_out": 40}))  # a run killed early
    live = subprocess.Popen(["sleep", "60"])
    try:
        dead = dead_pid()
        leftovers = {f".run.new-{dead}-abcd1234": True, ".run.new-abcd1234": True,  # a killed --overwrite's work
                     f".run.new-{live.pid}-abcd1234": False,  # its process still runs: never removed
                     ".other.new-12-abcd1234": False}  # another run folder's
        inside = {".step-000003.abcd1234.tmp": True, ".final.x_9k2m4p.tmp": True, ".step-000006.qwer1234.old": True,
                  ".report.abcd1234.tmp": False}  # rankscope analyze --out RUN/report may be writing it now
        for name in leftovers:
            (tmp_path / name).mkdir()
            (tmp_path / name / "config.json").write_text("{}")
        for name in inside:
            (out / name).mkdir()
        (out / ".metrics.jsonl.abcd1234.tmp").write_text("{}")  # a temporary file, not a folder
        inside[".metrics.jsonl.abcd1234.tmp"] = True

        folder = RunFolder.open(out, resume=True)
        try:
            assert any(f"process {live.pid}, which still runs" in note for note in folder.notes)
        finally:
            folder.close()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["run", *[name for name, gone in leftovers.items() if not gone]])
        assert sorted(p.name for p in out.iterdir()) == sorted(
            ["config.json", *[name for name, gone in inside.items() if not gone]])

        new = tmp_path / "fresh"  # a new run into a missing folder cleans beside it too
        (tmp_path / f".fresh.new-{dead}-zz112233").mkdir()
        RunFolder.open(new).close()
        assert not (tmp_path / f".fresh.new-{dead}-zz112233").exists() and not new.exists()
    finally:
        live.kill()
        live.wait()


def test_a_second_writer_is_told_the_first_ones_pid(tmp_path):
    holder = RunFolder.open(tmp_path / "run")
    try:
        with pytest.raises(BeamLoraError, match=re.escape(f"is writing {tmp_path / 'run'} right now (process {os.getpid()})")):
            RunFolder.open(tmp_path / "run")
    finally:
        holder.close()
    assert list(tmp_path.iterdir()) == []  # the lock goes with its holder
