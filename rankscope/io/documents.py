"""rankscope's JSON documents: strict JSON out, and reading documents and sweep results back in."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from rankscope.constants import ANALYSIS_SCHEMA, SWEEP_SCHEMA
from rankscope.errors import RankscopeError
from rankscope.io.validate import check_analysis, check_sweep, read_json


def clean_for_json(value: Any) -> Any:
    """NaN and Inf become null, so the output is strict JSON any reader accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean_for_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_for_json(v) for v in value]
    return value


def to_json(document: dict[str, Any], indent: int | None = None) -> str:
    return json.dumps(clean_for_json(document), indent=indent, allow_nan=False)


def load_document(path: str | os.PathLike) -> dict[str, Any]:
    """Read an analysis document written by ``rankscope analyze --json``."""
    document = read_json(path, "an analysis JSON")
    if not isinstance(document, dict) or document.get("schema") != ANALYSIS_SCHEMA:
        raise RankscopeError(f"{path} is not a rankscope analysis: expected \"schema\": \"{ANALYSIS_SCHEMA}\"")
    return check_analysis(document, path)


def find_sweep(path: str | os.PathLike) -> Path | None:
    """``sweep.json`` in the run's folder (the file's folder for a file), or in its ``sweep/`` subfolder."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    for candidate in (folder / "sweep.json", folder / "sweep" / "sweep.json"):
        if candidate.is_file():
            return candidate
    return None


def read_sweep(path: str | os.PathLike) -> dict[str, Any]:
    return check_sweep(check_sweep_schema(read_json(path, "a sweep JSON"), str(path)), path)


def check_sweep_schema(sweep: dict[str, Any], label: str) -> dict[str, Any]:
    if not isinstance(sweep, dict) or sweep.get("schema", SWEEP_SCHEMA) != SWEEP_SCHEMA or "points" not in sweep:
        raise RankscopeError(f"the sweep given for run {label!r} is not a rankscope sweep: "
                             f"expected \"schema\": \"{SWEEP_SCHEMA}\" with \"points\"")
    return sweep
