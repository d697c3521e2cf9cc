"""``rankscope.load``: from a path (file, adapter folder or run folder) to checkpoints.

A run folder (HF Trainer ``checkpoint-N/`` folders, our ``step-000100/`` snapshots, mlx-lm's
``0000100_adapters.safetensors`` files) becomes a :class:`Series` whose snapshots are read one
at a time, so memory does not grow with the number of snapshots.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import RankscopeError
from .formats import LoraModule, parse_checkpoint
from .trace import find_trace, is_trace_file
from .tensors import PICKLE_SUFFIXES, SAFETENSORS_SUFFIX, SafetensorsFile, open_tensor_file

# Weight files by the name each tool gives them, most specific first.
_WEIGHT_NAMES = (
    "adapter_model.safetensors", "adapters.safetensors", "pytorch_lora_weights.safetensors",
    "adapter_model.bin", "adapter_model.pt", "pytorch_lora_weights.bin",
)
# Files in training folders that are tensors but never adapters.
_NOT_ADAPTERS = {
    "beamlora_scores.safetensors", "optimizer.pt", "scheduler.pt", "training_args.bin", "rng_state.pth",
    "scaler.pt", "beamlora_state.pt",
}
_STEP_PATTERNS = (
    re.compile(r"^checkpoint-(\d+)$"),
    re.compile(r"^(?:global_)?step[-_]?(\d+)$"),
    re.compile(r"^(\d+)_adapters\.(?:safetensors|npz)$"),
    re.compile(r"^.+?[-_](\d+)\.(?:safetensors|bin|pt)$"),  # kohya's per-epoch files: name-000004
)
SCORES_FILE = "beamlora_scores.safetensors"


def step_from_name(name: str) -> int | None:
    for pattern in _STEP_PATTERNS:
        m = pattern.match(name)
        if m:
            return int(m.group(1))
    return None


def _is_weight_file(path: Path) -> bool:
    return (path.is_file() and path.name not in _NOT_ADAPTERS and not path.name.startswith(".")
            and (path.suffix == SAFETENSORS_SUFFIX or path.suffix in PICKLE_SUFFIXES))


def find_weight_file(folder: Path) -> Path | None:
    """The adapter weights in ``folder``: a known name, else its only tensor file."""
    for name in _WEIGHT_NAMES:
        if (folder / name).is_file():
            return folder / name
    candidates = [p for p in sorted(folder.iterdir()) if _is_weight_file(p)]
    return candidates[0] if len(candidates) == 1 else None


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RankscopeError(f"{path} is not valid JSON ({e}): expected the adapter's configuration") from None
    if not isinstance(value, dict):
        raise RankscopeError(f"{path} holds a JSON {type(value).__name__}, expected an object")
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

    def events(self) -> list[dict]:
        """BeamLoRA operations from ``events.jsonl``, if the run wrote any."""
        if self.events_path is None:
            return []
        events = []
        with open(self.events_path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        events.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise RankscopeError(f"{self.events_path} line {number} is not JSON: expected one event per line") from None
        return events

    def __repr__(self) -> str:
        return f"Series({str(self.path)!r}, layout={self.layout!r}, steps={self.steps})"


def load_checkpoint(weights: Path, step: int | None = None, format: str | None = None) -> Checkpoint:
    """Read one weights file, with the ``adapter_config.json`` and BeamLoRA scores beside it."""
    weights = Path(weights)
    config_path = weights.parent / "adapter_config.json"
    config = _read_json(config_path) if config_path.is_file() else None
    tensors = open_tensor_file(weights)
    parsed = parse_checkpoint(tensors, config, format)
    notes = list(parsed.notes)
    scores_path = weights.parent / SCORES_FILE
    if scores_path.is_file():
        scores = SafetensorsFile(scores_path)
        by_name = {m.name: m for m in parsed.modules}
        for name in scores:
            if name in by_name:
                by_name[name].scores = scores[name].astype("float64").reshape(-1)
        notes.append("BeamLoRA snapshot: w = r·softmax(s/T) is already folded into A; raw scores s are attached")
    if step is None and weights.parent.joinpath("trainer_state.json").is_file():
        step = _trainer_step(weights.parent)
    return Checkpoint(weights, parsed.format, step, parsed.modules, parsed.skipped, notes, config)


def _trainer_step(folder: Path) -> int | None:
    state = _read_json(folder / "trainer_state.json")
    step = state.get("global_step")
    return int(step) if isinstance(step, (int, float)) else None


def _snapshot_in_folder(folder: Path, format: str | None) -> SnapshotRef | None:
    weights = find_weight_file(folder)
    if weights is None:
        return None
    step = _trainer_step(folder) if (folder / "trainer_state.json").is_file() else None
    if step is None:
        step = step_from_name(folder.name)
    return SnapshotRef(weights, step, format)


def discover(path: str | os.PathLike, format: str | None = None) -> SnapshotRef | Series:
    """Say what ``path`` holds without reading any tensor: one checkpoint or a series of them."""
    path = Path(path)
    if not path.exists():
        raise RankscopeError(f"{path} does not exist: expected a LoRA checkpoint file, an adapter folder or a run folder")
    if path.is_file():
        if is_trace_file(path):
            events = path.parent / "events.jsonl"
            return Series(path.parent, "trace", [], None, events if events.is_file() else None, trace=path)
        return SnapshotRef(path, step_from_name(path.name), format)
    entries = sorted(path.iterdir())
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
        events = path / "events.jsonl"
        return Series(path, layout, snapshots, final, events if events.is_file() else None, trace)
    if trace is not None:
        events = path / "events.jsonl"
        return Series(path, "trace", [], final, events if events.is_file() else None, trace)
    if final is not None:
        return final
    inner = [p for p in entries if p.is_dir() and find_weight_file(p) is not None]
    if len(inner) == 1:
        return _snapshot_in_folder(inner[0], format)
    if not entries:
        raise RankscopeError(f"{path} is an empty folder: expected a LoRA checkpoint (adapter_model.safetensors, ...) or checkpoint-N/ folders")
    listed = ", ".join(p.name + ("/" if p.is_dir() else "") for p in entries[:6]) + (", ..." if len(entries) > 6 else "")
    raise RankscopeError(
        f"{path} holds no LoRA checkpoint ({listed}): expected adapter_model.safetensors / .bin (PEFT), "
        "adapters.safetensors (mlx-lm), pytorch_lora_weights.safetensors (diffusers), one .safetensors file, "
        "or checkpoint-N/ / step-N/ snapshot folders"
    )


def load(path: str | os.PathLike, format: str | None = None) -> Checkpoint | Series:
    """Load a LoRA checkpoint, or describe a run folder as a :class:`Series` of snapshots.

    ``format`` forces one of ``rankscope.formats.FORMATS`` instead of detecting it.
    """
    found = discover(path, format)
    return found.load() if isinstance(found, SnapshotRef) else found
