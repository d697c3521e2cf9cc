"""The rank trace ``rank_trace.jsonl``: one strict-JSON record per traced step, appended and flushed while training.

Its format (fields, precision, BeamLoRA's extras) is in docs/documents.md (trace-v1) and docs/telemetry.md.
Reading is forgiving where a kill could leave a mark: a line that is not a complete record (cut short
mid-write) is skipped with a note; a record whose step is not after the previous one (a resumed run
appending to the same file) replaces every earlier record from that step on. The records become
analysis snapshots in :mod:`rankscope.maths.analysis`.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from rankscope.constants import TRACE_FILE, TRACE_SCHEMA
from rankscope.io.validate import STEP, TRACE_WHAT, check, check_trace_record, json_int, loads, obj

SCHEMA = TRACE_SCHEMA
DIGITS = 8  # significant digits of every stored number: float32 precision (a 7B r=64 record: 0.1% of a snapshot)
_PREFIX = b'{"schema": "' + SCHEMA.encode() + b'"'
_STEP_SPEC = obj(required={"step": STEP})
_STEP = re.compile(rb'^\{"schema": "' + re.escape(SCHEMA.encode()) + rb'", "step": (-?\d+)[,}]')


# ----------------------------------------------------------------------------- writing


def numbers(values: Iterable[float]) -> str:
    """A JSON array of ``DIGITS`` significant digits; NaN and Inf become null (strict JSON)."""
    return "[" + ",".join(f"{v:.{DIGITS}g}" if math.isfinite(v) else "null" for v in map(float, values)) + "]"


def module_text(meta: dict[str, Any], arrays: dict[str, Any]) -> str:
    """One module's object: ``meta`` through json, each array in ``arrays`` at ``DIGITS`` digits (None: null)."""
    head = json.dumps(meta, ensure_ascii=False, allow_nan=False)[:-1]
    tail = "".join(f', "{key}": ' + ("null" if values is None else numbers(values)) for key, values in arrays.items())
    return head + tail + "}"


def record_text(step: int, modules: list[str], *, time: float, format: str = "peft", method: str = "lora",
                extra: dict[str, Any] | None = None) -> str:
    """One record (a line without its newline) from the modules' texts (:func:`module_text`)."""
    head = json.dumps({"schema": SCHEMA, "step": int(step), "time": round(time, 3), "format": format, "method": method,
                       **(extra or {})}, allow_nan=False)[:-1]
    return head + ', "modules": [' + ", ".join(modules) + "]}"


def append_record(path: str | os.PathLike, text: str) -> None:
    """Append one record and flush it. A previous record cut short (no final newline) stays on its own line."""
    data = text.encode() + b"\n"
    with open(path, "a+b") as f:
        if f.seek(0, os.SEEK_END) > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = b"\n" + data
        f.write(data)  # one write: a kill leaves at most this line incomplete
        f.flush()


# ----------------------------------------------------------------------------- finding


def is_trace_file(path: str | os.PathLike) -> bool:
    """A regular file that starts like a rank trace record (whatever its name); never opens a FIFO or device."""
    if not Path(path).is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(len(_PREFIX)) == _PREFIX
    except OSError:
        return False


def find_trace(folder: str | os.PathLike) -> Path | None:
    """``folder/rank_trace.jsonl`` when it is there and is a trace."""
    path = Path(folder) / TRACE_FILE
    return path if path.is_file() and is_trace_file(path) else None


# ----------------------------------------------------------------------------- reading


def _valid(record: Any) -> bool:
    """A trace record at all (its fields are checked by :func:`_checked`)."""
    return isinstance(record, dict) and record.get("schema") == SCHEMA and "step" in record


def _parse(line: bytes) -> dict[str, Any] | None:
    """A line's record, or None when the line is not one (cut short mid-write, or not strict JSON)."""
    try:
        record = loads(line)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return record if _valid(record) else None


def _checked(record: dict[str, Any], path: Path, where: str) -> dict[str, Any]:
    """A complete record whose fields are wrong (rank 0, a shape of 1e400, a rank of 4.7) is an error, not a skip."""
    return check_trace_record(record, f"{path} {where}")


def _step(text: bytes, path: Path, number: int) -> int:
    """A record's step as the index reads it (through the one JSON number reader), checked like the record's."""
    return check({"step": json_int(text.decode("ascii"))}, _STEP_SPEC, f"{path} line {number}", TRACE_WHAT)["step"]


def _skipped_note(path: Path, numbers_: list[int]) -> str:
    where = f"line {numbers_[0]}" if len(numbers_) == 1 else f"{len(numbers_)} lines (first: line {numbers_[0]})"
    return (f"{path}: {where} not a complete trace record (cut short when the run was killed mid-write?): "
            "ignored, the other records are used")


def index_records(path: Path) -> tuple[list[tuple[int, int]], list[int], list[int]]:
    """(line number, step) of the records that take effect; incomplete lines; steps a resumed run replaced.

    Only each line's step is read here (records start with it), so a long trace costs one parse in all.
    """
    kept: list[tuple[int, int]] = []
    bad: list[int] = []
    replaced: list[int] = []
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            match = _STEP.match(line)
            if match is None:
                bad.append(number)
                continue
            step = _step(match.group(1), path, number)
            while kept and kept[-1][1] >= step:
                replaced.append(kept.pop()[1])
            kept.append((number, step))
    return kept, bad, replaced


def iter_records(path: str | os.PathLike, notes: list[str], on_record: Callable[[], None] | None = None,
                 index: tuple[list[tuple[int, int]], list[int], list[int]] | None = None) -> Iterator[dict[str, Any]]:
    """The trace's records in the order they take effect, one in memory at a time.

    Lines that are not complete records are skipped; a record whose step is not after the previous
    one (a resumed or restarted run) replaces the earlier records from that step on. Notes for the
    reader are appended to ``notes`` once the file has been read to its end.
    """
    path = Path(path)
    kept, bad, replaced = index or index_records(path)
    wanted = iter(kept)
    target = next(wanted, None)
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if target is None:
                break
            if number != target[0]:
                continue
            record = _parse(line)
            if record is None or record["step"] != target[1]:
                bad.append(number)
            else:
                yield _checked(record, path, f"line {number}")
            if on_record is not None:
                on_record()
            target = next(wanted, None)
    if bad:
        notes.append(_skipped_note(path, sorted(bad)))
    if replaced:
        notes.append(f"{path}: a resumed or restarted run recorded steps again from step {min(replaced)}: "
                     f"its records replace {len(replaced)} earlier ones")


def last_record(path: str | os.PathLike, notes: list[str]) -> dict[str, Any] | None:
    """The newest complete record, read from the end of the file (a long trace is not read through)."""
    path = Path(path)
    size = path.stat().st_size
    chunk = 1 << 20
    with open(path, "rb") as f:
        while True:
            start = max(0, size - chunk)
            f.seek(start)
            lines = f.read(size - start).split(b"\n")
            if start > 0:
                lines = lines[1:]  # may begin mid-line
            skipped = 0
            for line in reversed(lines):
                if not line.strip():
                    continue
                record = _parse(line)
                if record is not None:
                    _checked(record, path, "(its last complete record)")
                    if skipped:
                        notes.append(f"{path}: the last {skipped} line(s) are not complete trace records (cut short "
                                     "when the run was killed mid-write?): ignored, the record before them is used")
                    return record
                skipped += 1
            if start == 0:
                return None
            chunk *= 4


__all__ = ["TRACE_FILE", "SCHEMA", "append_record", "record_text", "module_text", "numbers", "find_trace",
           "is_trace_file", "index_records", "iter_records", "last_record"]
