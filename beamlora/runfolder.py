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

One process at a time per run folder: a lock beside it (``.NAME.lock``) turns a second writer away. Holding
it, a writer knows that the temporary files and folders of earlier writers of this run folder are a killed
writer's, and removes them. A failed write (a full disk) leaves no half-made run: see :meth:`RunFolder.abandon`.
"""

from __future__ import annotations

import contextlib
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
from beamlora.files import (
    WriteError,
    alive,
    as_open_gives,
    failure_reason,
    own_temporary,
    run_file,
    user_path,
    work_folder_of,
    writing,
)
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


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def prune_checkpoints(run_dir: Path, keep: Path | None = None) -> None:
    """Remove every checkpoint but ``keep`` (default: the newest complete one), and partial ones."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return
    complete = complete_checkpoints(run_dir)
    keep = keep or (complete[-1] if complete else None)
    for path in folder.iterdir():
        if path != keep:
            _remove(path)


@dataclass
class RunFolder:
    """Where a run is written (``work``) and where it ends up (``path``)."""

    path: Path
    work: Path
    resume_from: Path | None = None  # the checkpoint a resumed run continues from
    replacing: bool = False
    fresh: bool = False  # a new run: ``path`` was missing or empty (but for a killed writer's leftovers)
    config: dict[str, Any] | None = None  # the existing run's config.json, read once when opened
    notes: list[str] = field(default_factory=list)
    _lock: Any = field(default=None, repr=False)
    _created: list[Path] = field(default_factory=list, repr=False)  # folders the run makes, deepest first
    _failed: bool = field(default=False, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike, overwrite: bool = False, resume: bool = False) -> "RunFolder":
        """Check what ``path`` holds against the request and take the lock; nothing is written yet but the lock.

        Holding the lock, it first removes what killed writers of this run folder left: a replacing run's work
        folder beside it (``.NAME.new-PID-…``, unless process PID still runs) and the temporary files and
        folders of beamlora's own writes inside it (``.step-000100.….tmp``, ...). Other tools' are left alone.
        """
        path = Path(path)
        if overwrite and resume:
            raise BeamLoraError("--overwrite and --resume together: expected one (resume continues a killed run, "
                                "overwrite replaces a finished one)")
        if path.exists() and not path.is_dir():
            raise BeamLoraError(f"{path} is a file: expected a run folder")
        created = [p for p in (path, *path.parents) if not os.path.lexists(p)]
        lock = _take_lock(path)
        folder = cls(path, path, _lock=lock, _created=created)
        try:
            folder._remove_leftovers()
            occupied = path.is_dir() and any(path.iterdir())
            folder.fresh = not occupied
            if resume:
                folder._open_resume(occupied)
            elif occupied:
                folder._open_occupied(overwrite)
            return folder
        except BaseException:
            folder._failed = True
            folder.close()
            raise

    def _remove_leftovers(self) -> None:
        """Killed writers' work of this run folder; only we write it now (we hold the lock)."""
        for entry in self.path.parent.iterdir():
            pid = work_folder_of(entry.name, self.path.name)
            if pid is None:
                continue
            if pid != os.getpid() and alive(pid):
                self.notes.append(f"note: {entry} belongs to process {pid}, which still runs: left alone")
                continue
            _remove(entry)
        if self.path.is_dir():
            for entry in self.path.iterdir():
                if own_temporary(entry.name):
                    _remove(entry)

    def _open_occupied(self, overwrite: bool) -> None:
        path = self.path
        if not overwrite:
            existing = _run_config(path)
            hint = " (or --resume to continue it)" if existing and not (path / "final").is_dir() else ""
            raise BeamLoraError(f"{path} already exists and is not empty: expected a new run folder, or "
                                f"--overwrite to replace a beamlora run{hint}")
        try:
            existing = read_run_config(path, strict=True)
        except RankscopeError as e:
            raise BeamLoraError(f"--overwrite: {e}; so {path} holds no beamlora run to replace: nothing was "
                                "touched") from None
        # The manifest is checked before it is read: a FIFO in its place would block the reader.
        if existing is None or not (path / MANIFEST_FILE).is_file():
            raise BeamLoraError(f"{path} holds no beamlora run that finished there (no config.json and "
                                f"{MANIFEST_FILE} written by beamlora train): --overwrite only replaces a "
                                "finished beamlora run folder, and never deletes anything else; choose "
                                "another --out" + (" (or --resume to continue it)" if existing else ""))
        foreign = foreign_files(path, "run")
        if foreign:
            raise BeamLoraError(f"{path} holds files beamlora did not write ({', '.join(foreign[:4])}"
                                f"{', ...' if len(foreign) > 4 else ''}): --overwrite only replaces a run "
                                "folder with nothing added since; nothing was touched")
        self.config = existing
        try:  # the pid in its name tells the next writer whether it still runs
            self.work = Path(tempfile.mkdtemp(prefix=f".{path.name}.new-{os.getpid()}-", dir=path.parent))
            as_open_gives(self.work)  # mkdtemp makes it 0700: the run folder it becomes gets mkdir's mode
        except OSError as e:
            raise WriteError(path.parent, failure_reason(e) or str(e)) from None
        self.replacing = True

    def _open_resume(self, occupied: bool) -> None:
        try:
            existing = read_run_config(self.path, strict=True)
        except RankscopeError as e:
            raise BeamLoraError(f"--resume: {e}: expected the run folder of a killed beamlora train") from None
        if existing is None:
            if occupied and any(not p.name.startswith(".") for p in self.path.iterdir()):
                raise BeamLoraError(f"--resume: {self.path} holds no beamlora run (no config.json): expected the "
                                    "run folder of a killed beamlora train")
            self.notes.append(f"--resume: {self.path} holds no run yet: starting it")
            return
        self.config = existing
        if (self.path / "final").is_dir() and not complete_checkpoints(self.path):
            raise BeamLoraError(f"--resume: the run in {self.path} has already finished (final/ is written): "
                                "nothing to resume")
        complete = complete_checkpoints(self.path)
        prune_checkpoints(self.path)  # partial checkpoints of the kill go
        if complete:
            # A run stopped after it wrote final/ (its manifest could not be written): the resumed run writes it anew.
            _remove(self.path / "final")
            self.resume_from = complete[-1]
            self.notes.append(f"--resume: continuing from step {checkpoint_step(self.resume_from)} "
                              f"({self.resume_from})")
        else:
            self.notes.append(f"--resume: {self.path} has no complete checkpoint yet: starting from step 0")

    def check_same_run(self, record: dict[str, Any], fields: list[str]) -> None:
        """On resume: the options must be those the killed run was started with (its config.json as read
        when the folder was opened)."""
        existing = self.config
        if existing is None:
            return
        for name in fields:
            if name in existing and existing[name] != record.get(name):
                raise BeamLoraError(f"--resume: the run in {self.path} was started with {name}={existing[name]!r}, "
                                    f"this command gives {name}={record.get(name)!r}: resume with the same options")

    def finish(self) -> None:
        """The run has finished: drop its checkpoints, record its files (the manifest that lets a later
        --overwrite replace it) and, when replacing, swap it in for the old run, checked again at the swap.

        The checkpoints are set aside (beside the run, named as a work folder) until the manifest is written, so
        a manifest that cannot be written (a full disk) leaves the run resumable from its last checkpoint."""
        checkpoints, parked = self.work / CHECKPOINTS, None
        if checkpoints.is_dir():
            try:
                parked = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.new-{os.getpid()}-", dir=self.path.parent))
                os.rename(checkpoints, parked / CHECKPOINTS)
            except OSError:  # no room for a folder, another file system: drop them now, as before
                if parked is not None:
                    shutil.rmtree(parked, ignore_errors=True)
                parked = None
                shutil.rmtree(checkpoints, ignore_errors=True)
        try:
            with writing(self.path / MANIFEST_FILE):
                write_manifest(self.work, "run")
        except BaseException:
            if parked is not None:
                with contextlib.suppress(OSError):  # if they cannot go back, the next writer's clean-up takes them
                    os.rename(parked / CHECKPOINTS, checkpoints)
                    os.rmdir(parked)
            raise
        if parked is not None:
            shutil.rmtree(parked, ignore_errors=True)
        if self.replacing:
            swap_in(self.work, self.path, "run", replace=True)
            self.work = self.path

    def abandon(self, write_failed: bool = False) -> str | None:
        """The run failed. A replacing run's work goes (the old run stays); a new or resumed run stays for
        --resume, except after a failed write (``write_failed``: a full disk): then a new run without a
        complete checkpoint leaves nothing, and a partial checkpoint goes. Returns what became of the run,
        in words, for the error line."""
        self._failed = True
        if self.replacing:
            shutil.rmtree(self.work, ignore_errors=True)
            return f"the run in {self.path} is as it was"
        if not write_failed:
            return None
        complete = complete_checkpoints(self.work)
        prune_checkpoints(self.work)  # a checkpoint the failure cut short
        if complete:
            return (f"the run keeps its checkpoint at step {checkpoint_step(complete[-1])}: continue it with the "
                    "same command and --resume once there is room")
        if self.fresh:
            for entry in self.work.iterdir() if self.work.is_dir() else ():
                if run_file(entry.name):
                    _remove(entry)
            return f"nothing of the run was kept in {self.path}"
        return "continue it with the same command and --resume once there is room"

    def close(self) -> None:
        """Release the lock; after a failure, the folders the run made go where they are empty."""
        _release_lock(self._lock)
        self._lock = None
        if self._failed:
            for folder in self._created:  # deepest first; rmdir leaves a folder that holds anything
                try:
                    os.rmdir(folder)
                except FileNotFoundError:
                    continue  # the run folder itself, never made
                except OSError:
                    break


def _lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


def _take_lock(path: Path) -> Any:
    """Lock ``.NAME.lock`` beside the run folder; it holds the writer's pid."""
    lock = _lock_path(path)
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a+")
        except OSError as e:
            raise WriteError(user_path(e.filename or lock), failure_reason(e) or str(e)) from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                handle.seek(0)
                holder = handle.read(20).strip()
            except OSError:
                holder = ""
            handle.close()
            by = f" (process {holder})" if holder.isdigit() else ""
            raise BeamLoraError(f"another beamlora train is writing {path} right now{by}: expected one process per "
                                "run folder (wait for it, or choose another --out)") from None
        # The holder before us removes the file as it lets go: if it did so after we opened it, we hold the lock
        # of a file no one else will open; take the one at the path now instead.
        try:
            same = os.path.samestat(os.fstat(handle.fileno()), os.stat(lock))
        except OSError:
            same = False
        if same:
            with contextlib.suppress(OSError):
                handle.seek(0)
                handle.truncate()
                handle.write(f"{os.getpid()}\n")
                handle.flush()
            return handle
        handle.close()


def _release_lock(handle: Any) -> None:
    if handle is None:
        return
    try:
        os.unlink(handle.name)
    except OSError:
        pass
    with contextlib.suppress(OSError):  # the pid it could not write (a full disk) is not flushed again
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
