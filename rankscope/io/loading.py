"""``rankscope.load``: from a path (file, adapter folder or run folder) to checkpoints.

A run folder (HF Trainer ``checkpoint-N/`` folders, our ``step-000100/`` snapshots, mlx-lm's
``0000100_adapters.safetensors`` files) becomes a :class:`Series` whose snapshots are read one
at a time, so memory does not grow with the number of snapshots.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rankscope.constants import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHT_NAMES,
    EVENTS_FILE,
    NOT_ADAPTER_FILES,
    SCORES_FILE,
    TRAINER_STATE,
)
from rankscope.errors import RankscopeError
from rankscope.io.formats import LoraModule, per_rank_vector
from rankscope.io.gguf import GGUF_SUFFIX, GgufFile, is_gguf
from rankscope.io.gguf_lora import parse_gguf_checkpoint
from rankscope.io.hub import resolve_local
from rankscope.io.structured import parse_any
from rankscope.io.tensors import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, SafetensorsFile, open_tensor_file
from rankscope.io.trace import find_trace, is_trace_file
from rankscope.io.validate import (
    ADAPTER_CONFIG_WHAT,
    TRAINER_STATE_WHAT,
    check_event,
    check_trainer_state,
    open_regular,
    parse_json,
)
from rankscope.io.validate import read_json as _read_json

_WEIGHT_NAMES = ADAPTER_WEIGHT_NAMES
_NOT_ADAPTERS = NOT_ADAPTER_FILES
_STEP_PATTERNS = (
    re.compile(r"^checkpoint-(\d+)$"),
    re.compile(r"^(?:global_)?step[-_]?(\d+)$"),
    re.compile(r"^(\d+)_adapters\.(?:safetensors|npz)$"),
    re.compile(r"^.+?[-_](\d+)\.(?:safetensors|bin|pt)$"),  # kohya's per-epoch files: name-000004
)


def step_from_name(name: str) -> int | None:
    for pattern in _STEP_PATTERNS:
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    return None


def _hidden(path: Path) -> bool:
    """Dot-names are temporaries (``.step-000100.x1y2.tmp`` left by a crash) or not ours: never read."""
    return path.name.startswith(".")


def _is_weight_file(path: Path) -> bool:
    return (path.is_file() and path.name not in _NOT_ADAPTERS and not _hidden(path)
            and (path.suffix in (SAFETENSORS_SUFFIX, GGUF_SUFFIX) or path.suffix in PICKLE_SUFFIXES))


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be opened (missing, a symlink loop or a dangling link, no permission), or None."""
    try:
        os.stat(path)
        return None
    except FileNotFoundError:
        if os.path.islink(path):
            return f"{path} is a symbolic link to {os.readlink(path)}, which does not exist"
        return f"{path} does not exist"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"{path} is a symbolic link loop (it leads back to itself)"
        return f"{path} could not be read ({e.strerror or e})"


def _entries(folder: Path) -> list[Path]:
    """The visible entries of ``folder``, sorted; an unlistable folder is one error line."""
    try:
        return sorted(p for p in folder.iterdir() if not _hidden(p))
    except OSError as e:
        raise RankscopeError(f"{folder} could not be listed ({e.strerror or e})") from None


def find_weight_file(folder: Path) -> Path | None:
    """The adapter weights in ``folder``: a known name, else its only tensor file."""
    for name in _WEIGHT_NAMES:
        candidate = folder / name
        if candidate.is_file():
            return candidate
        if os.path.lexists(candidate):  # the name is there but is no file: say why rather than look past it
            problem = _unreadable(candidate) or f"{candidate} is not a file"
            raise RankscopeError(f"{problem}: expected the adapter's weights")
    candidates = [p for p in _entries(folder) if _is_weight_file(p)]
    return candidates[0] if len(candidates) == 1 else None


def _read_object(path: Path, what: str) -> dict:
    value = _read_json(path, what)
    if not isinstance(value, dict):
        raise RankscopeError(f"{path} holds a JSON {type(value).__name__}, expected an object ({what})")
    return value


@dataclass
class Checkpoint:
    """The LoRA modules of one checkpoint."""

    path: Path
    format: str
    step: int | None
    modules: list[LoraModule]
    skipped: list[str] = field(default_factory=list)  # tensors that are not LoRA parts
    notes: list[str] = field(default_factory=list)
    config: dict | None = None

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self) -> Iterator[LoraModule]:
        return iter(self.modules)

    def __getitem__(self, name: str) -> LoraModule:
        for module in self.modules:
            if module.name == name:
                return module
        raise KeyError(name)

    def __repr__(self) -> str:
        ranks = sorted({m.rank for m in self.modules})
        return (f"Checkpoint({str(self.path)!r}, format={self.format!r}, step={self.step}, "
                f"modules={len(self.modules)}, ranks={ranks}, skipped={len(self.skipped)})")


@dataclass
class SnapshotRef:
    """Where one checkpoint lies, read only when :meth:`load` is called."""

    weights: Path
    step: int | None
    format: str | None = None  # forced format, or None to detect

    def load(self) -> Checkpoint:
        return load_checkpoint(self.weights, self.step, self.format)


@dataclass
class Series:
    """Snapshots of one training run, ordered by step, read one at a time."""

    path: Path
    layout: str  # "hf-trainer", "beamlora-run", "mlx-series", "snapshots" or "trace" (a trace alone)
    snapshots: list[SnapshotRef]
    final: SnapshotRef | None = None
    events_path: Path | None = None
    trace: Path | None = None  # rank_trace.jsonl: the dense time axis for analysis (snapshots stay for sweeps)
    notes: list[str] = field(default_factory=list)  # what reading the run's own files forgave (a torn events line)

    def __len__(self) -> int:
        return len(self.snapshots)

    def __iter__(self) -> Iterator[Checkpoint]:
        for ref in self.snapshots:
            yield ref.load()

    def __getitem__(self, index: int) -> Checkpoint:
        return self.snapshots[index].load()

    @property
    def steps(self) -> list[int | None]:
        return [ref.step for ref in self.snapshots]

    def at_step(self, step: int) -> Checkpoint:
        for ref in self.snapshots:
            if ref.step == step:
                return ref.load()
        raise RankscopeError(f"{self.path} has no snapshot at step {step}: it has steps {self.steps}")

    def events(self, notes: list[str] | None = None) -> list[dict]:
        """BeamLoRA operations from ``events.jsonl``, if the run wrote any.

        As the rank trace's reader does, a last line cut short mid-write (no final newline, not JSON) is
        skipped with a note, appended to ``notes`` and to :attr:`notes`; any other bad line is an error.
        """
        if self.events_path is None:
            return []
        with open_regular(self.events_path, "BeamLoRA events, one JSON object per line") as f:
            try:
                data = f.read()
            except OSError as e:
                raise RankscopeError(f"{self.events_path} could not be read ({e.strerror or e})") from None
        lines = data.splitlines()
        torn = len(lines) if lines and not data.endswith((b"\n", b"\r")) else None
        events = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            source = f"{self.events_path} line {number}"
            try:
                value = parse_json(line, source, "one JSON event object per line")
            except RankscopeError:
                if number != torn:
                    raise
                note = (f"{self.events_path}: line {number}, the last, is not a complete event (cut short when the run "
                        "was killed mid-write?): ignored, the other events are used")
                if note not in self.notes:
                    self.notes.append(note)
                if notes is not None:
                    notes.append(note)
                continue
            events.append(check_event(value, source))
        return events

    def __repr__(self) -> str:
        return f"Series({str(self.path)!r}, layout={self.layout!r}, steps={self.steps})"


def load_checkpoint(weights: Path, step: int | None = None, format: str | None = None) -> Checkpoint:
    """Read one weights file, with the ``adapter_config.json`` and BeamLoRA scores beside it."""
    weights = Path(weights)
    if is_gguf(weights):
        return _load_gguf(weights, step, format)
    config_path = weights.parent / ADAPTER_CONFIG
    config = _read_object(config_path, ADAPTER_CONFIG_WHAT) if os.path.lexists(config_path) else None
    tensors = open_tensor_file(weights)
    parsed = parse_any(tensors, config, format, config_path=str(config_path))  # LoRA formats, LoHa / LoKr
    notes = list(parsed.notes)
    scores_path = weights.parent / SCORES_FILE
    if os.path.lexists(scores_path):
        scores = SafetensorsFile(scores_path)
        by_name = {m.name: m for m in parsed.modules}
        for name in scores:
            if name in by_name:
                module = by_name[name]
                module.scores = per_rank_vector(scores, name, module.rank, name, "the BeamLoRA scores")
        notes.append("BeamLoRA snapshot: w = r·softmax(s/T) is already folded into A; raw scores s are attached")
    if step is None and os.path.lexists(weights.parent / TRAINER_STATE):
        step = _trainer_step(weights.parent)
    return Checkpoint(weights, parsed.format, step, parsed.modules, parsed.skipped, notes, config)


def _load_gguf(weights: Path, step: int | None, format: str | None) -> Checkpoint:
    """A llama.cpp GGUF LoRA adapter: everything it needs is inside the file (no adapter_config.json is read)."""
    parsed = parse_gguf_checkpoint(GgufFile(weights), format)
    return Checkpoint(weights, parsed.format, step, parsed.modules, parsed.skipped, parsed.notes, None)


def _trainer_step(folder: Path) -> int | None:
    """``global_step`` from the folder's trainer_state.json (None when it gives none)."""
    path = folder / TRAINER_STATE
    return check_trainer_state(_read_object(path, TRAINER_STATE_WHAT), path).get("global_step")


def _snapshot_in_folder(folder: Path, format: str | None) -> SnapshotRef | None:
    weights = find_weight_file(folder)
    if weights is None:
        return None
    step = _trainer_step(folder) if os.path.lexists(folder / TRAINER_STATE) else None
    if step is None:
        step = step_from_name(folder.name)
    return SnapshotRef(weights, step, format)


def discover(path: str | os.PathLike, format: str | None = None, revision: str | None = None) -> SnapshotRef | Series:
    """Say what ``path`` holds without reading any tensor: one checkpoint or a series of them.

    ``path`` may be a Hugging Face repo id (``owner/name[@rev][/sub/folder]``, ``revision`` where it names none):
    the adapter's own files are fetched into (or found in) the Hub cache. A local path always wins.
    """
    path = resolve_local(path, revision)
    problem = _unreadable(path)
    if problem:
        raise RankscopeError(f"{problem}: expected a LoRA checkpoint file, an adapter folder or a run folder")
    if not path.is_dir():
        if is_trace_file(path):
            events = path.parent / EVENTS_FILE
            return Series(path.parent, "trace", [], None, events if os.path.lexists(events) else None, trace=path)
        return SnapshotRef(path, step_from_name(path.name), format)
    entries = _entries(path)
    trace = find_trace(path)
    stepped_dirs = [(step_from_name(p.name), p) for p in entries if p.is_dir() and step_from_name(p.name) is not None]
    snapshots = [ref for _, p in stepped_dirs if (ref := _snapshot_in_folder(p, format)) is not None]
    final = _snapshot_in_folder(path, format)
    if final is None and (path / "final").is_dir():
        final = _snapshot_in_folder(path / "final", format)
    layout = "snapshots"
    if snapshots:
        names = {p.name.split("-")[0] for _, p in stepped_dirs}
        layout = "hf-trainer" if names == {"checkpoint"} else "beamlora-run" if names == {"step"} else "snapshots"
    else:
        stepped_files = [p for p in entries if _is_weight_file(p) and step_from_name(p.name) is not None]
        if stepped_files and (len(stepped_files) > 1 or final is not None):
            snapshots = [SnapshotRef(p, step_from_name(p.name), format) for p in stepped_files]
            layout = "mlx-series" if all(p.name.endswith("_adapters.safetensors") for p in stepped_files) else "snapshots"
            if final is not None and final.weights in {s.weights for s in snapshots}:
                final = None
    if snapshots:
        snapshots.sort(key=lambda ref: (ref.step is None, ref.step or 0))
        events = path / EVENTS_FILE
        return Series(path, layout, snapshots, final, events if os.path.lexists(events) else None, trace)
    if trace is not None:
        events = path / EVENTS_FILE
        return Series(path, "trace", [], final, events if os.path.lexists(events) else None, trace)
    if final is not None:
        return final
    inner = [p for p in entries if p.is_dir() and find_weight_file(p) is not None]
    if len(inner) == 1:
        return _snapshot_in_folder(inner[0], format)
    if not entries:
        hidden = sum(1 for _ in path.iterdir())
        what = (f"holds nothing but hidden entries ({hidden}; temporaries of an interrupted write?)" if hidden
                else "is an empty folder")
        raise RankscopeError(f"{path} {what}: expected a LoRA checkpoint (adapter_model.safetensors, ...) or checkpoint-N/ folders")
    listed = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:6]) + (", ..." if len(entries) > 6 else "")
    raise RankscopeError(
        f"{path} holds no LoRA checkpoint ({listed}): expected adapter_model.safetensors / .bin (PEFT), "
        "adapters.safetensors (mlx-lm), pytorch_lora_weights.safetensors (diffusers), one .safetensors file, "
        "or checkpoint-N/ / step-N/ snapshot folders"
    )


def load(path: str | os.PathLike, format: str | None = None, revision: str | None = None) -> Checkpoint | Series:
    """Load a LoRA checkpoint, or describe a run folder as a :class:`Series` of snapshots.

    ``format`` forces one of ``rankscope.formats.FORMATS`` instead of detecting it. ``path`` may be a Hugging Face
    repo id (``owner/name[@rev][/sub/folder]``, ``revision`` where it names none): see :func:`discover`.
    """
    found = discover(path, format, revision)
    return found.load() if isinstance(found, SnapshotRef) else found


def resolve_adapter(adapter: str | os.PathLike | Checkpoint | Series, step: int | None = None,
                    format: str | None = None) -> Checkpoint:
    """A checkpoint from a path, a Checkpoint or a run folder (its final adapter, or the snapshot at ``step``)."""
    if isinstance(adapter, Checkpoint):
        if step is not None and adapter.step != step:
            raise RankscopeError(f"{adapter.path} is one checkpoint (step {adapter.step}), not a run folder: "
                                 f"--step {step} needs a run folder with snapshots")
        return adapter
    found = adapter if isinstance(adapter, Series) else discover(adapter, format)
    if isinstance(found, Series):
        if found.final is None and not found.snapshots:
            raise RankscopeError(f"{found.path} holds a rank trace but no adapter: expected an adapter folder, a run's "
                                 "final adapter or a snapshot (a trace has importances and spectra, not weights)")
        if step is not None:
            return found.at_step(step)
        if found.final is None:
            raise RankscopeError(f"{found.path} is a run folder without a final adapter: choose a snapshot with "
                                 f"--step (steps {found.steps})")
        return found.final.load()
    checkpoint = found.load()
    if step is not None and checkpoint.step != step:
        raise RankscopeError(f"{found.weights} is one checkpoint (step {checkpoint.step}), not a run folder: "
                             f"--step {step} needs a run folder with snapshots")
    return checkpoint
