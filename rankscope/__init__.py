"""rankscope: how are the ranks of a LoRA adapter used?

``rankscope.load(path)`` reads any LoRA checkpoint (PEFT, HF Trainer runs, kohya, diffusers,
mlx-lm, torchtune, BeamLoRA snapshots); ``rankscope.analyze(path)`` returns both views of its ranks
(per-rank slot norms and the spectrum of ΔW). Heavy parts (plots, sweeps on a model) load only when
used. The layout of the code: docs/architecture.md.
"""

import importlib

from rankscope.errors import RankscopeError
from rankscope.io.formats import LoraModule
from rankscope.io.loading import Checkpoint, Series, SnapshotRef, discover, load
from rankscope.maths.analysis import analyze

__version__ = "0.1.0"

# Submodules loaded on first attribute access (``rankscope.report.to_json``), as before the code moved:
# the documented paths of rankscope.compat and the rooms themselves.
_SUBMODULES = {"analysis", "compare", "dynamics", "dynamics_plot", "monitor", "outputs", "plotting", "recommend",
               "report", "suggest", "sweeps", "cli", "io", "maths", "tasks", "adapters", "telemetry", "views"}


def __getattr__(name: str):
    if name == "sweep":  # sweeps need torch: import it only when asked for
        from rankscope.adapters.sweep import sweep

        return sweep
    if name == "to_frame":  # pandas loads only when a DataFrame is asked for
        from rankscope.views.frames import to_frame

        return to_frame
    if name in _SUBMODULES:
        return importlib.import_module(f"rankscope.{name}")
    raise AttributeError(f"module 'rankscope' has no attribute {name!r}")


__all__ = ["analyze", "load", "discover", "Checkpoint", "Series", "SnapshotRef", "LoraModule", "RankscopeError", "sweep",
           "to_frame"]
