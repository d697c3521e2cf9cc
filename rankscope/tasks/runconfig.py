"""A training run's settings: the tasks, their defaults, and the one validated reader of a run's ``config.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from rankscope.constants import RUN_CONFIG
from rankscope.io.validate import check_run_config

TASKS = ("classification", "sft")


# What a field left at None means, per task. Classification: MiniLM on Rotten Tomatoes. sft: SmolLM2 on
# the generated arithmetic problems, sized for a CPU (see README: time per step, exact match before/after).
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    "classification": {"model": "minilm", "data": "rotten-tomatoes", "rank": 16, "alpha": 32.0, "steps": 300,
                       "batch_size": 16, "lr": 5e-4, "delta_t": 50, "held_out": 1000, "max_length": 64},
    "sft": {"model": "smollm2", "data": "arithmetic", "rank": 8, "alpha": 16.0, "steps": 150,
            "batch_size": 4, "lr": 1e-3, "delta_t": 20, "held_out": 100, "max_length": 128},
}


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The ``config.json`` a ``beamlora train`` run wrote, or None for folders made by other tools.

    Checked field by field (a wrong type is one ``Error:`` naming the field); a field an older run left out
    takes its task's default from :data:`TASK_DEFAULTS`, the defaults training itself uses.
    """
    path = Path(run_dir) / RUN_CONFIG
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, RecursionError):
        return None
    if not (isinstance(data, dict) and "method" in data and "held_out" in data):
        return None
    config = check_run_config(data, path)
    defaults = TASK_DEFAULTS.get(config.get("task", "classification"), TASK_DEFAULTS["classification"])
    return {**defaults, **{key: value for key, value in config.items() if value is not None}}
