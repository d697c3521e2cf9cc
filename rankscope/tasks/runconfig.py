"""A training run's settings: the tasks, their defaults, and the one validated reader of a run's ``config.json``."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from rankscope.constants import RUN_CONFIG
from rankscope.errors import RankscopeError
from rankscope.io.validate import RUN_CONFIG_WHAT, check_run_config, json_int, open_regular

TASKS = ("classification", "sft")


# What a field left at None means, per task. Classification: MiniLM on Rotten Tomatoes. sft: SmolLM2 on
# the generated arithmetic problems, sized for a CPU (see README: time per step, exact match before/after).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"model": "minilm", "data": "rotten-tomatoes", "rank": 16, "alpha": 32.0, "steps": 300,
                       "batch_size": 16, "lr": 5e-4, "delta_t": 50, "held_out": 1000, "max_length": 64},
    "sft": {"model": "smollm2", "data": "arithmetic", "rank": 8, "alpha": 16.0, "steps": 150,
            "batch_size": 4, "lr": 1e-3, "delta_t": 20, "held_out": 100, "max_length": 128},
}


MAX_DEPTH = 32  # a run's config.json nests 3 deep; deeper is not one, whatever the stack depth of the reader


def _nesting(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest (strings skipped), found without recursion."""
    depth = deepest = 0
    for bracket in re.sub(r'[^\[\]{}]', "", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)):
        depth = depth + 1 if bracket in "[{" else depth - 1
        deepest = max(deepest, depth)
    return deepest


def _read(path: Path, strict: bool) -> Any:
    """The parsed ``config.json``, or None where it is not JSON (with ``strict``: one RankscopeError naming it)."""
    if not strict and not path.is_file():
        return None  # a folder, a FIFO (never opened: it would block), a dangling link: not a run's
    with open_regular(path, RUN_CONFIG_WHAT) as f:
        try:
            raw = f.read()
        except OSError as e:
            raise RankscopeError(f"{path} could not be read ({e.strerror or e}): expected {RUN_CONFIG_WHAT}") from None
    try:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RankscopeError(f"{path} is not UTF-8 text (byte {e.start}): expected {RUN_CONFIG_WHAT}") from None
        # Checked before parsing: how deep the parser gets before RecursionError depends on the caller's stack,
        # so the same file would be a run's config for one command and not for another.
        if _nesting(text) > MAX_DEPTH:
            raise RankscopeError(f"{path} nests JSON more than {MAX_DEPTH} levels deep: expected {RUN_CONFIG_WHAT}")
        try:
            # NaN is read, and refused by check_run_config naming the field; an integer beyond float range is inf
            return json.loads(text, parse_int=json_int)
        except (ValueError, RecursionError) as e:
            raise RankscopeError(f"{path} is not valid JSON ({e}): expected {RUN_CONFIG_WHAT}") from None
    except RankscopeError:
        if strict:
            raise
        return None


def read_run_config(run_dir: str | os.PathLike, strict: bool = False) -> dict[str, Any] | None:
    """The ``config.json`` a ``beamlora train`` run wrote, or None for folders made by other tools.

    Checked field by field (a wrong type is one ``Error:`` naming the field); a field an older run left out
    takes its task's default from :data:`TASK_DEFAULTS`, the defaults training itself uses. A ``config.json``
    that is not a regular file or not JSON (not UTF-8, nested too deep, ...) is another tool's (None), or with
    ``strict`` one RankscopeError naming it (``beamlora train --resume`` / ``--overwrite``); one that cannot be
    read (permission denied) is an error either way.
    """
    path = Path(run_dir) / RUN_CONFIG
    if not os.path.lexists(path):
        return None
    data = _read(path, strict)
    if not (isinstance(data, dict) and "method" in data and "held_out" in data):
        return None
    config = check_run_config(data, path)
    defaults = TASK_DEFAULTS.get(config.get("task", "classification"), TASK_DEFAULTS["classification"])
    return {**defaults, **{key: value for key, value in config.items() if value is not None}}
