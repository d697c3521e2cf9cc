"""A Hugging Face Hub cache folder built by hand, in huggingface_hub's own layout, for offline tests.

``models--owner--name/blobs/<sha256>`` holds each file once; ``snapshots/<commit>/<path>`` links to it (a relative
symbolic link, as huggingface_hub makes them); ``refs/<branch or tag>`` holds the commit hash, without a newline.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_commit(cache: Path, repo_id: str, files: dict[str, bytes | Path], refs: tuple[str, ...] = ("main",),
               commit: str | None = None) -> str:
    """Add one commit of ``repo_id`` holding ``files`` (repo path → content or a file to copy), point ``refs`` at it,
    and return its 40-hex commit hash."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    contents = {path: data.read_bytes() if isinstance(data, Path) else data for path, data in files.items()}
    if commit is None:
        digest = hashlib.sha1(repo_id.encode())
        for path in sorted(contents):
            digest.update(path.encode() + hashlib.sha256(contents[path]).digest())
        commit = digest.hexdigest()
    for path, data in contents.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return commit


def folder_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    """Every file under ``folder`` as {``prefix`` + its relative path: the file}, ready for :func:`add_commit`."""
    return {prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
