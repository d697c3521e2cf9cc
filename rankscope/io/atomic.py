"""Writing what users asked for, atomically, and never over what they own.

A reader (or a crash) never sees a half-written file or folder. A folder is replaced only when this
project wrote it (its manifest says so, and nothing was added since); a path given for a file is written
through when it is a device or a FIFO and followed when it is a symlink. The contract: docs/cli.md#outputs.

Files and folders come out with the permissions ``open()`` and ``mkdir()`` would give them under the
process's umask (the temporary files they are built in start private, 0600 / 0700).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from rankscope.constants import MANIFEST_FILE
from rankscope.errors import RankscopeError


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


# ----------------------------------------------------------------------------- folders: replace only our own

# A folder rankscope or beamlora wrote holds this manifest: what kind of output it is and the files written.
# Only such a folder (of the same kind, with nothing added since) is ever replaced; see docs/cli.md#outputs.
KINDS = ("report", "adapter", "run")
_LEGACY_REPORT_NAMES = {"report.html", "analysis.json", "compare.json", "recommend.json", "sweep.json", "sweep.csv"}


def _files(folder: Path) -> list[str]:
    """Every file and folder below ``folder``, as relative POSIX paths (folders end in '/'), links not followed."""
    found = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        found += [(rel / d).as_posix() + "/" for d in dirs] + [(rel / f).as_posix() for f in files]
    return sorted(found)


def write_manifest(folder: str | os.PathLike, kind: str) -> None:
    """Record that ``folder`` (complete now) was written by this project, as output of ``kind``."""
    folder = Path(folder)
    listed = [name for name in _files(folder) if name != MANIFEST_FILE]
    write_json(folder / MANIFEST_FILE, {"written_by": "rankscope", "kind": kind, "files": listed}, indent=1)


def _manifest(folder: Path) -> dict[str, Any] | None:
    """``folder``'s manifest when it is a valid one this project wrote (never reading a FIFO or a link)."""
    try:
        if not stat.S_ISREG(os.lstat(folder / MANIFEST_FILE).st_mode):
            return None
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError, RecursionError):
        return None
    ok = (isinstance(manifest, dict) and manifest.get("written_by") == "rankscope" and manifest.get("kind") in KINDS
          and isinstance(manifest.get("files"), list))
    return manifest if ok else None


def foreign_files(folder: str | os.PathLike, kind: str) -> list[str]:
    """What in ``folder`` this project did not write as output of ``kind`` (empty: the folder may be replaced).

    A folder without a valid manifest is foreign as a whole, except an empty one, and a report folder of
    rankscope < 0.2 (its own file names and plots only). A sub-folder this project wrote later (a report or a
    resized adapter inside a run folder: its own manifest, nothing added since) counts as this project's.
    """
    folder = Path(folder)
    present = [name for name in _files(folder) if name != MANIFEST_FILE]
    manifest = _manifest(folder)
    if manifest is not None and manifest["kind"] == kind:
        listed = set(manifest["files"])
        foreign = [name for name in present if name not in listed]
    elif kind == "report" and not os.path.lexists(folder / MANIFEST_FILE):
        foreign = [name for name in present if "/" in name or not (name in _LEGACY_REPORT_NAMES or name.endswith(".png"))]
    else:
        foreign = present
    ours = [name for name in foreign if name.endswith("/") and (sub := _manifest(folder / name)) is not None
            and not foreign_files(folder / name, sub["kind"])]
    return [name for name in foreign if not any(name.startswith(sub) for sub in ours)]


def _listed(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")


def check_out(path: str | os.PathLike, kind: str, replace: bool, option: str = "--out") -> Path:
    """Before any work: ``path`` must be missing, an empty folder, or (``replace``) a folder this project wrote
    as output of ``kind``, with nothing added since. Returns the folder the output will take (a symlink's
    target: the link itself stays)."""
    given = Path(path)
    path = Path(os.path.realpath(given))
    if os.path.lexists(path) and not path.is_dir():
        raise RankscopeError(f"{option} {given} is a file: expected a folder for the outputs")
    if not path.is_dir() or not any(path.iterdir()):
        _check_writable(path.parent, given, option)
        return path
    foreign = foreign_files(path, kind)
    if not replace:
        why = (f"it holds files rankscope did not write ({_listed(foreign)}), which are never replaced" if foreign else
               f"pass --overwrite to replace this {kind} folder, which rankscope wrote")
        raise RankscopeError(f"{option} {given} already exists and is not empty: expected a new or empty folder ({why})")
    if foreign:
        raise RankscopeError(f"{option} {given} holds files rankscope did not write ({_listed(foreign)}), so it does not "
                             f"hold one {kind} rankscope wrote: expected a new or empty folder, or a {kind} folder "
                             "rankscope wrote (replaced as a whole); nothing was touched")
    return path


def _check_writable(folder: Path, given: Path, option: str) -> None:
    """Make and remove a folder in ``folder`` (or the nearest one that exists): a path that cannot be written is
    found before the work, not after it."""
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".rankscope-probe-", dir=folder))
    except OSError as e:
        raise RankscopeError(f"{option} {given} cannot be written ({e.strerror or e} in {folder}): expected a "
                             "writable place") from None


def check_file_target(path: str | os.PathLike, option: str = "--json") -> None:
    """Before any work: a file target (``--json FILE``) that is a folder, or whose folder cannot be written, is
    refused now; a device, a FIFO or a symlink's target is checked when written (:func:`write_to_path`)."""
    given = Path(path)
    try:
        mode = os.stat(given).st_mode  # follows links: /dev/stderr is a pipe or a terminal, written through
    except OSError:
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise RankscopeError(f"{option} {given} is a folder: expected a file to write (or - for stdout)")
    if mode is None:
        _check_writable(Path(os.path.realpath(given)).parent, given, option)


def _keep_aside(tmp: Path, path: Path) -> Path:
    """Give a finished output that could not take ``path`` a visible name beside it."""
    for n in range(1, 1000):
        kept = path.with_name(f"{path.name}.rankscope-{n}")
        try:
            os.rename(tmp, kept)  # fails if kept is a non-empty folder: try the next name
            return kept
        except OSError:
            continue
    return tmp


def swap_in(tmp: Path, path: Path, kind: str, replace: bool) -> None:
    """Put the finished folder ``tmp`` at ``path``: into a missing or empty place, or over a folder this project
    wrote as ``kind`` output (when ``replace``), checked again once it is renamed away, so that nothing that
    appeared there meanwhile is ever deleted. Otherwise ``tmp`` is kept beside ``path`` and the error says where."""
    reason = f"another process wrote {path} meanwhile (theirs is kept whole)"
    for _ in range(4):
        try:
            os.rename(tmp, path)  # a missing path, or an empty folder, takes it in one rename
            return
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise
        if not (replace and path.is_dir() and not path.is_symlink()):
            break
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        try:
            os.rename(path, old / path.name)  # taken away: nothing can land in it through ``path`` now
        except FileNotFoundError:  # another writer took it first: try again
            os.rmdir(old)
            continue
        foreign = foreign_files(old / path.name, kind)
        if foreign:
            reason = f"{path} changed while this command ran ({_listed(foreign)} appeared)"
            try:
                os.rename(old / path.name, path)  # theirs goes back, untouched
                os.rmdir(old)
            except OSError:
                reason += f"; its content is kept whole in {old / path.name}"
            break
        shutil.rmtree(old, ignore_errors=True)  # our own earlier output: replaced, as asked
    kept = _keep_aside(tmp, path)
    raise RankscopeError(f"{reason}: nothing there was replaced, and this command's finished output is in {kept}")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, kind: str = "adapter", replace: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it takes ``path`` in one rename (:func:`swap_in`).

    The folder gets a manifest (:func:`write_manifest`). On an exception the temporary folder is removed
    and ``path`` is left as it was; a folder at ``path`` that this project did not write is never replaced.
    """
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        write_manifest(tmp, kind)
        os.chmod(tmp, 0o777 & ~_umask())
        swap_in(tmp, path, kind, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def output_folder(path: str | os.PathLike, kind: str = "report", replace: bool = True,
                  option: str = "--out") -> Iterator[Path]:
    """An ``--out`` folder: checked before any work (:func:`check_out`), built aside, swapped in whole. A write
    that fails (a full disk, a permission) is one error naming the user's folder, never the hidden temporary."""
    try:
        with atomic_dir(check_out(path, kind, replace, option), kind, replace) as tmp:
            yield tmp
    except OSError as e:
        raise RankscopeError(f"{option} {path}: cannot be written ({e.strerror or e}); nothing was left "
                             "behind") from None


# ----------------------------------------------------------------------------- a file the user names


def write_to_path(path: str | os.PathLike, data: bytes, option: str = "--json") -> None:
    """Write ``data`` where the user asked, as ``tee`` would: through to a device or a FIFO (``/dev/null``,
    ``/dev/stdout``); to a symlink's target (the link stays); otherwise a regular file, created or replaced
    atomically. An error names the user's path, never a temporary file."""
    given = Path(path)
    try:
        mode = os.stat(given).st_mode  # follows links
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise RankscopeError(f"{option} {given}: cannot be written ({e.strerror or e})") from None
    try:
        if mode is not None and stat.S_ISDIR(mode):
            raise RankscopeError(f"{option} {given} is a folder: expected a file to write (or - for stdout)")
        if mode is not None and not stat.S_ISREG(mode):
            with open(given, "wb") as f:  # a device, a FIFO or a socket: written through, never replaced
                f.write(data)
            return
        write_bytes(os.path.realpath(given), data)
    except OSError as e:
        raise RankscopeError(f"{option} {given}: cannot be written ({e.strerror or e})") from None
