"""Atomic writes: a reader (or a crash) never sees a half-written file or folder.

Files and folders come out with the permissions ``open()`` and ``mkdir()`` would give them under the
process's umask (the temporary files they are built in start private, 0600 / 0700).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from rankscope.errors import RankscopeError

# What rankscope writes into an --out folder: such a folder may be replaced as a whole.
OUTPUT_NAMES = {"report.html", "analysis.json", "compare.json", "recommend.json", "sweep.json", "sweep.csv"}


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename."""
    write_chunks(path, (data,))


def write_chunks(path: str | os.PathLike, chunks: Iterable[bytes]) -> None:
    """Write ``chunks`` one after another to ``path`` (never joined in memory), atomically as ``write_bytes``."""

    def fill(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)

    write_with(path, fill)


def write_with(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path`` (``torch.save``, say), which then replaces ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Strict JSON (NaN or Inf raise ValueError rather than write what other parsers reject)."""
    write_text(path, json.dumps(obj, indent=indent, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    On an exception the temporary folder is removed and ``path`` is left as it was. When another
    process puts its own folder at ``path`` meanwhile, theirs stays whole and this one is dropped
    with an error: a folder is always one writer's complete output.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        try:
            if path.exists():
                # Rename the old folder away first so the new one appears in a single rename.
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.replace(path, old / path.name)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except FileNotFoundError:
            raise RankscopeError(f"{path} was replaced by another process while this one wrote it: nothing of "
                                 "this run was kept; run it again") from None
        except OSError as e:
            if e.errno not in (39, 17):  # ENOTEMPTY, EEXIST: someone else's folder arrived first
                raise
            raise RankscopeError(f"{path} was written by another process at the same moment: theirs is kept "
                                 "whole and this run's output was dropped; run it again") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_folder(path: str | os.PathLike) -> Path:
    """An --out folder rankscope may fill: missing, empty, or holding only what rankscope writes there.

    Such a folder is then replaced as a whole (:func:`output_folder`), so stale plots of an earlier run
    never sit beside new ones, and a folder holding anything else is refused rather than emptied.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise RankscopeError(f"--out {path} is a file: expected a folder for the outputs")
    if path.is_dir():
        foreign = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                         if not (p.is_file() and (p.name in OUTPUT_NAMES or p.suffix == ".png")))
        if foreign:
            listed = ", ".join(foreign[:4]) + (", ..." if len(foreign) > 4 else "")
            raise RankscopeError(f"--out {path} holds files rankscope did not write ({listed}): expected a new or "
                                 "empty folder, or an earlier rankscope output folder (which is replaced as a whole)")
    return path


@contextlib.contextmanager
def output_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Build an --out folder aside and swap it in whole (see :func:`check_output_folder`)."""
    with atomic_dir(check_output_folder(path)) as tmp:
        yield tmp
