"""What beamlora writes, and what becomes of a write that fails.

- A write that fails (a full disk, a file size limit, a read-only folder: an ``OSError``, or the
  ``SafetensorError``, tokenizers' error or torch's ``RuntimeError`` that wrap one) is one
  :class:`WriteError` naming the path the user knows (never a temporary name).
- Files and folders come out with the permissions ``open()`` and ``mkdir()`` give under the umask,
  also those that libraries create private (safetensors writes 0600, ``mkdtemp`` makes 0700).
- The temporary names beamlora writes into a run folder are recognised (:func:`own_temporary`), so a
  killed writer's leftovers can be removed by the next writer that holds the run folder's lock.

Only the standard library: imported before torch is.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from pathlib import Path
from typing import Iterator

from beamlora.errors import BeamLoraError

# tempfile's random part: 8 characters of [a-z0-9_]. The names rankscope.io.atomic gives a file or a folder
# while it is written (``.NAME.xxxxxxxx.tmp``) or while an old one is taken away (``.NAME.xxxxxxxx.old``).
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.[a-z0-9_]{8}\.(?:tmp|old)$")
# A replacing run's work folder beside the run folder: ``.NAME.new-PID-xxxxxxxx`` (older: ``.NAME.new-xxxxxxxx``).
_WORK = re.compile(r"^\.(?P<target>.+)\.new-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}$")
# What beamlora train writes into a run folder, by name.
_RUN_NAMES = re.compile(r"^(?:step-\d+|final|checkpoints|config\.json|metrics\.jsonl|events\.jsonl|rank_trace\.jsonl"
                        r"|generations\.jsonl|\.rankscope-manifest\.json)$")


class WriteError(BeamLoraError, OSError):
    """A file or folder could not be written (disk full, ...): names the path and the reason.

    Both a BeamLoraError (the CLIs print it as one ``Error:`` line) and an ``OSError`` (what a caller of the
    Python API catches for a full disk), with the ``errno`` of the failure where one is known.
    """

    def __init__(self, path: str | os.PathLike, reason: str, code: int | None = None):
        self.message = f"cannot write {path}: {reason}"
        super().__init__(self.message)
        self.path, self.reason = Path(path), reason
        self.errno, self.strerror, self.filename = code, reason, str(path)

    def __str__(self) -> str:
        return self.message


def umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_open_gives(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes ``open()`` / ``mkdir()`` would under the umask."""
    mask = umask()
    path = Path(path)
    if not path.is_dir() or path.is_symlink():
        os.chmod(path, 0o666 & ~mask)
        return
    os.chmod(path, 0o777 & ~mask)
    for root, dirs, files in os.walk(path):
        for name in dirs:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            if not os.path.islink(os.path.join(root, name)):
                os.chmod(os.path.join(root, name), 0o666 & ~mask)


def failure_reason(error: BaseException, writing: bool = False) -> str | None:
    """Why a write failed, in words, if ``error`` is a failed write; None for any other error.

    An ``OSError`` counts wherever it came from. ``writing``: the error came from code that was only writing
    files, so the errors that wrap one count too: safetensors' and tokenizers' (Rust's ``os error N``) and
    torch's ``RuntimeError`` of a failed ``torch.save`` (which names no errno).
    """
    if isinstance(error, WriteError):
        return error.reason
    if isinstance(error, OSError):
        return error.strerror or str(error) or type(error).__name__
    if not writing or isinstance(error, BeamLoraError) or not isinstance(error, Exception):
        return None
    text = str(error)
    code = re.search(r"os error (\d+)", text)  # Rust's std::io::Error (safetensors, tokenizers)
    if code:
        return os.strerror(int(code.group(1)))
    if isinstance(error, RuntimeError) and re.search(
            r"PytorchStreamWriter|inline_container|file write failed|write\(\): fd", text):
        return f"the write failed ({text.splitlines()[0][:120]}): is the disk full?"
    if type(error).__name__ == "SafetensorError":
        return text.splitlines()[0][:200] if text else "the write failed"
    return None


def user_path(path: str | os.PathLike) -> Path:
    """``path`` as the user knows it: each temporary name in it (``.final.xxxxxxxx.tmp``, a replacing run's
    ``.run.new-PID-xxxxxxxx``) read as the name it becomes."""
    parts = []
    for part in Path(path).parts:
        match = _TEMPORARY.match(part) or _WORK.match(part)
        parts.append(match.group("target") if match else part)
    return Path(*parts) if parts else Path(path)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Turn a failed write inside the block into one :class:`WriteError` naming ``path`` (or the file the
    ``OSError`` names, as the user knows it)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as e:
        reason = failure_reason(e, writing=True)
        if reason is None:
            raise
        named = getattr(e, "filename", None) if isinstance(e, OSError) else None
        code = e.errno if isinstance(e, OSError) else _errno_in(e)
        raise WriteError(user_path(named if isinstance(named, (str, os.PathLike)) else path), reason, code) from None


def _errno_in(error: BaseException) -> int | None:
    found = re.search(r"os error (\d+)", str(error))
    return int(found.group(1)) if found else None


def own_temporary(name: str) -> bool:
    """A temporary file or folder that ``beamlora train`` makes inside a run folder while writing one of its own
    files (``.step-000100.xxxxxxxx.tmp``, ``.config.json.xxxxxxxx.tmp``, ...); other tools' are not."""
    match = _TEMPORARY.match(name)
    return bool(match) and bool(_RUN_NAMES.match(match.group("target")))


def run_file(name: str) -> bool:
    """A name ``beamlora train`` writes into a run folder (``config.json``, ``step-000100``, ``final``, ...)."""
    return bool(_RUN_NAMES.match(name)) or own_temporary(name)


def work_folder_of(name: str, run_name: str) -> int | None:
    """For ``.RUN.new-PID-xxxxxxxx`` (a replacing run's work folder beside ``RUN``): its writer's pid, 0 for a
    name without one (beamlora before it recorded it); None for any other name."""
    match = _WORK.match(name)
    if not match or match.group("target") != run_name:
        return None
    return int(match.group("pid")) if match.group("pid") else 0


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists (a zombie or another user's process counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError as e:
        return e.errno != errno.ESRCH
    return True
