"""The rank trace: per-rank importances and update spectra recorded while training, one line per step.

``rank_trace.jsonl`` in the run folder holds one strict-JSON object per recorded step, appended and
flushed as training goes (written by :mod:`rankscope.monitor`)::

    {"schema": "rankscope/trace-v1", "step": 120, "time": 1764000000.0, "format": "peft", "method": "lora",
     "modules": [{"name": "base_model.model.…query", "rank": 16, "scale": 2.0, "shape": [out, in],
                  "layer_type": "linear", "dtype": "F32", "importance": [16 numbers], "spectrum": [16 numbers]}]}

Per module, ``importance`` is ``scale·|c_i|·‖b_i‖·‖a_i‖`` in the adapter's rank order and ``spectrum``
the singular values of ``scale·B·diag(c)·A``, largest first (c: AdaLoRA's E, BeamLoRA's w), both
with 8 significant digits (float32 precision). Optional fields: ``scores`` (BeamLoRA's raw scores,
whose w is folded into the numbers as in its snapshots), ``E`` (AdaLoRA), ``dora``: true, and
``error`` with a null ``importance`` (NaN or Inf in A or B). A BeamLoRA record also carries
``"beamlora": {"ranks_operated": n, "operation_step": t}``. A module's layer and kind follow from
its name, as for every checkpoint.

Reading is forgiving where a kill could leave a mark: a line that is not a complete record (cut
short mid-write) is skipped with a note, never an error for the rest; a record whose step is not
after the previous one (a resumed or restarted run appending to the same file) replaces every
earlier record from that step on.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from .errors import RankscopeError

TRACE_FILE = "rank_trace.jsonl"
SCHEMA = "rankscope/trace-v1"
DIGITS = 8  # significant digits of every stored number: float32 precision (a 7B r=64 record: 0.1% of a snapshot)
_PREFIX = b'{"schema": "' + SCHEMA.encode() + b'"'
_STEP = re.compile(rb'^\{"schema": "' + re.escape(SCHEMA.encode()) + rb'", "step": (-?\d+)[,}]')
_DORA_NOTE = ("DoRA adapter: its update also rescales each output by a learned magnitude, so ΔW is not B A alone; "
              "rankscope reports the importances of B A")
_BEAMLORA_NOTE = ("BeamLoRA run: w = r·softmax(s/T) is folded into each importance and spectrum (as in its "
                  "snapshots); raw scores s are attached")


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
    return (isinstance(record, dict) and record.get("schema") == SCHEMA and isinstance(record.get("step"), int)
            and isinstance(record.get("modules"), list))


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return record if _valid(record) else None


def _skipped_note(path: Path, numbers_: list[int]) -> str:
    where = f"line {numbers_[0]}" if len(numbers_) == 1 else f"{len(numbers_)} lines (first: line {numbers_[0]})"
    return (f"{path}: {where} not a complete trace record (cut short when the run was killed mid-write?): "
            "ignored, the other records are used")


def _index(path: Path) -> tuple[list[tuple[int, int]], list[int], list[int]]:
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
            step = int(match.group(1))
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
    kept, bad, replaced = index or _index(path)
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
                yield record
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
                    if skipped:
                        notes.append(f"{path}: the last {skipped} line(s) are not complete trace records (cut short "
                                     "when the run was killed mid-write?): ignored, the record before them is used")
                    return record
                skipped += 1
            if start == 0:
                return None
            chunk *= 4


def record_notes(record: dict[str, Any]) -> list[str]:
    notes = []
    if record.get("method") == "beamlora":
        notes.append(_BEAMLORA_NOTE)
    if any(m.get("dora") for m in record["modules"] if isinstance(m, dict)):
        notes.append(_DORA_NOTE)
    return notes


def _array(values: Any, name: str, field: str, rank: int) -> np.ndarray | None:
    if values is None:
        return None
    x = np.asarray([math.nan if v is None else v for v in values], dtype=np.float64)
    if x.shape != (rank,):
        raise RankscopeError(f"trace module {name}: {field} has {x.size} values, expected rank {rank}")
    return x


def record_snapshot(record: dict[str, Any], path: str | os.PathLike, spectrum: bool = True) -> dict[str, Any]:
    """One element of an analysis document's ``snapshots`` from a trace record: the same fields as a checkpoint's."""
    from .analysis import module_entry, nonfinite_error, summarize
    from .formats import LoraModule

    entries = []
    for m in record["modules"]:
        try:
            name, rank, (out_features, in_features) = str(m["name"]), int(m["rank"]), m["shape"]
            module = LoraModule(name=name, rank=rank, scale=float(m["scale"]), in_features=int(in_features),
                                out_features=int(out_features), stored_dtype=str(m.get("dtype", "")),
                                layer_type=str(m.get("layer_type", "linear")), dora=bool(m.get("dora", False)),
                                E=_array(m.get("E"), name, "E", rank), scores=_array(m.get("scores"), name, "scores", rank))
            importance = _array(m.get("importance"), name, "importance", rank)
            spectral = _array(m.get("spectrum"), name, "spectrum", rank) if spectrum else None
        except (KeyError, TypeError, ValueError) as e:
            raise RankscopeError(f"{path}: the record of step {record['step']} has a module entry that is not "
                                 f"rankscope's ({type(e).__name__}: {e}); expected name, rank, scale, shape, "
                                 "importance, spectrum") from None
        if importance is None or not np.isfinite(importance).all():
            entries.append(module_entry(module, None, error=m.get("error") or nonfinite_error(name, [])))
        else:
            entries.append(module_entry(module, importance, spectral))
    return {
        "step": record["step"],
        "path": f"{path}#step={record['step']}",
        "format": record.get("format", "peft"),
        "modules": entries,
        "skipped": 0,
        "skipped_names": [],
        "notes": record_notes(record),
        "summary": summarize(entries),
    }


def trace_snapshots(path: str | os.PathLike, spectrum: bool = True, last_only: bool = False,
                    progress: bool | None = None) -> list[dict[str, Any]]:
    """Every record of a trace as an analysis snapshot (only the newest with ``last_only``).

    Reading notes (incomplete lines, replaced records) go into the last snapshot's ``notes``.
    """
    from .analysis import progress_bar

    path = Path(path)
    notes: list[str] = []
    if last_only:
        record = last_record(path, notes)
        snapshots = [record_snapshot(record, path, spectrum)] if record is not None else []
    else:
        index = _index(path)
        with progress_bar(len(index[0]), progress, "reading the rank trace", "record") as bar:
            snapshots = [record_snapshot(record, path, spectrum)
                         for record in iter_records(path, notes, lambda: bar.update(1), index)]
    if not snapshots:
        raise RankscopeError(f"{path} holds no complete rank trace record: expected lines of "
                             f"{{\"schema\": \"{SCHEMA}\", \"step\": ..., \"modules\": [...]}}")
    snapshots[-1]["notes"] = snapshots[-1]["notes"] + notes
    return snapshots


__all__ = ["TRACE_FILE", "SCHEMA", "append_record", "record_text", "module_text", "numbers", "find_trace",
           "is_trace_file", "iter_records", "last_record", "record_snapshot", "trace_snapshots"]
