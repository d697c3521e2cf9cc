"""A run folder's life: a new run, a rerun that replaces an old run only once it has finished, and a
killed run resumed from its last complete checkpoint.

- **New**: ``RUN_DIR`` must be missing or empty.
- **--overwrite**: ``RUN_DIR`` must hold a finished beamlora run with nothing added since (its manifest
  lists every file); anything else is refused, never deleted, and the swap checks again. The new run is written beside it in a hidden folder and swapped in only when it has
  finished; a failed or killed rerun leaves the old run exactly as it was.
- **--resume**: the same options as the killed run (checked against its ``config.json``); training
  continues from the newest complete checkpoint in ``RUN_DIR/checkpoints/`` (Trainer's optimizer,
  scheduler and RNG states, the adapter, the BeamLoRA controller, the held-out metrics so far). A
  checkpoint is complete once ``complete.json`` is in it, written last; partial ones are removed.

One process at a time per run folder: a lock beside it (``.NAME.lock``) turns a second writer away.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from beamlora.errors import BeamLoraError
from rankscope.constants import MANIFEST_FILE
from rankscope.errors import RankscopeError
from rankscope.io.atomic import foreign_files, swap_in, write_manifest
from rankscope.tasks.runconfig import read_run_config

CHECKPOINTS = "checkpoints"
COMPLETE = "complete.json"
HELD_OUT_STATE = "held_out.json"
_CHECKPOINT_PREFIX = "checkpoint-"


class Interrupted(BeamLoraError):
    """SIGINT or SIGTERM stopped the run after writing a checkpoint (exit status 128 + signal)."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def _run_config(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``config.json`` as ``beamlora train`` wrote it, or None (not a run, or unreadable)."""
    try:
        return read_run_config(run_dir)
    except (OSError, RankscopeError):
        return None


def checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith(_CHECKPOINT_PREFIX) or not name[len(_CHECKPOINT_PREFIX):].isdigit():
        return None
    return int(name[len(_CHECKPOINT_PREFIX):])


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint folders whose ``complete.json`` was written, oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if checkpoint_step(p) is not None and (p / COMPLETE).is_file()]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(run_dir: Path, keep: Path | None = None) -> None:
    """Remove every checkpoint but ``keep`` (default: the newest complete one), and partial ones."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return
    complete = complete_checkpoints(run_dir)
    keep = keep or (complete[-1] if complete else None)
    for path in folder.iterdir():
        if path != keep:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


def _hidden_leftovers(run_dir: Path) -> list[Path]:
    """Temporary folders a killed writer left inside the run folder (``.step-000100.x.tmp`` and the like)."""
    return [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old"))] \
        if run_dir.is_dir() else []


@dataclass
class RunFolder:
    """Where a run is written (``work``) and where it ends up (``path``)."""

    path: Path
    work: Path
    resume_from: Path | None = None  # the checkpoint a resumed run continues from
    replacing: bool = False
    notes: list[str] = field(default_factory=list)
    _lock: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> "RunFolder":
        """Check what ``path`` holds against the request and take the lock; nothing is written yet but the lock."""
        path = Path(path)
        if overwrite and resume:
            raise BeamLoraError("--overwrite and --resume together: expected one (resume continues a killed run, "
                                "overwrite replaces a finished one)")
        if path.exists() and not path.is_dir():
            raise BeamLoraError(f"{path} is a file: expected a run folder")
        lock = _take_lock(path)
        try:
            occupied = path.is_dir() and any(p for p in path.iterdir())
            existing = _run_config(path) if occupied else None
            folder = cls(path, path, _lock=lock)
            if resume:
                folder._open_resume(existing, occupied)
            elif occupied:
                if not overwrite:
                    hint = " (or --resume to continue it)" if existing and not (path / "final").is_dir() else ""
                    raise BeamLoraError(f"{path} already exists and is not empty: expected a new run folder, or "
                                        f"--overwrite to replace a beamlora run{hint}")
                foreign = foreign_files(path, "run")
                if existing is None or not (path / MANIFEST_FILE).is_file():
                    raise BeamLoraError(f"{path} holds no beamlora run that finished there (no config.json and "
                                        f"{MANIFEST_FILE} written by beamlora train): --overwrite only replaces a "
                                        "finished beamlora run folder, and never deletes anything else; choose "
                                        "another --out" + (" (or --resume to continue it)" if existing else ""))
                if foreign:
                    raise BeamLoraError(f"{path} holds files beamlora did not write ({', '.join(foreign[:4])}"
                                        f"{', ...' if len(foreign) > 4 else ''}): --overwrite only replaces a run "
                                        "folder with nothing added since; nothing was touched")
                for old in path.parent.glob(f".{path.name}.new-*"):  # a killed rerun's work: we hold the lock
                    shutil.rmtree(old, ignore_errors=True)
                folder.work = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-", dir=path.parent))
                folder.replacing = True
            return folder
        except BaseException:
            _release_lock(lock)
            raise

    def _open_resume(self, existing: dict | None, occupied: bool) -> None:
        if existing is None:
            if occupied and any(not p.name.startswith(".") for p in self.path.iterdir()):
                raise BeamLoraError(f"--resume: {self.path} holds no beamlora run (no config.json): expected the "
                                    "run folder of a killed beamlora train")
            self.notes.append(f"--resume: {self.path} holds no run yet: starting it")
            return
        if (self.path / "final").is_dir() and not complete_checkpoints(self.path):
            raise BeamLoraError(f"--resume: the run in {self.path} has already finished (final/ is written): "
                                "nothing to resume")
        for leftover in _hidden_leftovers(self.path):
            shutil.rmtree(leftover, ignore_errors=True)
        complete = complete_checkpoints(self.path)
        prune_checkpoints(self.path)  # partial checkpoints of the kill go
        if complete:
            self.resume_from = complete[-1]
            self.notes.append(f"--resume: continuing from step {checkpoint_step(self.resume_from)} "
                              f"({self.resume_from})")
        else:
            self.notes.append(f"--resume: {self.path} has no complete checkpoint yet: starting from step 0")

    def check_same_run(self, record: dict[str, Any], fields: list[str]) -> None:
        """On resume: the options must be those the killed run was started with."""
        existing = _run_config(self.path)
        if existing is None:
            return
        for name in fields:
            if name in existing and existing[name] != record.get(name):
                raise BeamLoraError(f"--resume: the run in {self.path} was started with {name}={existing[name]!r}, "
                                    f"this command gives {name}={record.get(name)!r}: resume with the same options")

    def finish(self) -> None:
        """The run has finished: drop its checkpoints, record its files (the manifest that lets a later
        --overwrite replace it) and, when replacing, swap it in for the old run, checked again at the swap."""
        shutil.rmtree(self.work / CHECKPOINTS, ignore_errors=True)
        write_manifest(self.work, "run")
        if self.replacing:
            swap_in(self.work, self.path, "run", replace=True)
            self.work = self.path

    def abandon(self) -> None:
        """The run failed: a replacing run's work goes (the old run stays); a new or resumed run stays for --resume."""
        if self.replacing:
            shutil.rmtree(self.work, ignore_errors=True)

    def close(self) -> None:
        _release_lock(self._lock)
        self._lock = None


def _take_lock(path: Path) -> Any:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path.parent / f".{path.name}.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise BeamLoraError(f"another beamlora train is writing {path} right now: expected one process per run "
                            "folder (wait for it, or choose another --out)") from None
    return handle


def _release_lock(handle: Any) -> None:
    if handle is None:
        return
    try:
        os.unlink(handle.name)
    except OSError:
        pass
    handle.close()


@dataclass
class StopRequest:
    """Set by SIGINT / SIGTERM during training: the run checkpoints at the end of the step and stops."""

    signum: int | None = None


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    """The first SIGINT or SIGTERM asks for a checkpoint and a stop; a second one interrupts at once."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handler(signum: int, frame: Any) -> None:
        if request.signum is not None:
            raise KeyboardInterrupt
        request.signum = signum

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield request
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
