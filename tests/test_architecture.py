"""The house rules that import-linter and ruff do not state: old documented paths, no private names across modules."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from helpers.cli import REPO

# The dotted paths the README and the notebook showed before the code moved into rooms, and where each
# name lives now: the old path must give the very same object.
OLD_PATHS = {
    "rankscope.analysis": {"analyze": "rankscope.maths.analysis"},
    "rankscope.compare": {"compare": "rankscope.maths.compare", "compare_lines": "rankscope.views.text",
                          "plot_compare": "rankscope.views.compare_plot"},
    "rankscope.dynamics": {"dynamics": "rankscope.maths.dynamics", "usable": "rankscope.maths.dynamics",
                           "dynamics_summary_lines": "rankscope.views.text"},
    "rankscope.dynamics_plot": {"plot_dynamics": "rankscope.views.dynamics_plot"},
    "rankscope.monitor": {"RankMonitor": "rankscope.telemetry.monitor", "measure": "rankscope.telemetry.monitor",
                          "TELEMETRY_ATTR": "rankscope.telemetry.monitor",
                          "RankMonitorCallback": "rankscope.telemetry.callback"},
    "rankscope.outputs": {"recommendation_lines": "rankscope.views.outputs", "write_analysis": "rankscope.views.outputs"},
    "rankscope.plotting": {"plot_analysis": "rankscope.views.plots"},
    "rankscope.recommend": {"recommend": "rankscope.maths.recommend"},
    "rankscope.report": {"summary_lines": "rankscope.views.text", "to_json": "rankscope.io.documents"},
    "rankscope.suggest": {"suggest": "rankscope.maths.suggest", "suggest_lines": "rankscope.views.text"},
    "rankscope.sweeps": {"sweep": "rankscope.adapters.sweep", "Masker": "rankscope.adapters.sweep",
                         "ranks_to_drop": "rankscope.adapters.sweep", "lora_layers": "rankscope.tasks.layers"},
    "beamlora.train": {"train": "beamlora.train", "TrainConfig": "beamlora.config"},
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_documented_old_paths_give_the_same_objects(old):
    module = importlib.import_module(old)
    for name, home in OLD_PATHS[old].items():
        assert getattr(module, name) is getattr(importlib.import_module(home), name), f"{old}.{name}"
    with pytest.raises(AttributeError):
        module.no_such_name  # noqa: B018


def test_top_level_api():
    import rankscope

    assert rankscope.analyze is importlib.import_module("rankscope.maths.analysis").analyze
    assert rankscope.sweep is importlib.import_module("rankscope.adapters.sweep").sweep
    assert rankscope.report.to_json is importlib.import_module("rankscope.io.documents").to_json
    import beamlora

    assert beamlora.__version__ == rankscope.__version__  # the version is written once
    assert issubclass(beamlora.BeamLoraError, rankscope.RankscopeError)  # one error hierarchy


def _project_modules() -> dict[str, Path]:
    found = {}
    for package in ("rankscope", "beamlora"):
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def test_no_private_name_is_imported_from_another_module():
    modules = _project_modules()
    offences = []
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                offences += [f"{path.relative_to(REPO)}:{node.lineno} imports {node.module}.{a.name}"
                             for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
    assert not offences, "\n".join(offences)
