"""rankscope: how unequal are the ranks of a LoRA adapter?

``rankscope.load(path)`` reads any LoRA checkpoint (PEFT, HF Trainer runs, kohya, diffusers,
mlx-lm, torchtune, BeamLoRA snapshots); ``rankscope.analyze(path)`` returns the per-rank
importances and their spread. Heavy parts (plots, sweeps on a model) load only when used.
"""

from .analysis import analyze
from .errors import RankscopeError
from .formats import LoraModule
from .loading import Checkpoint, Series, SnapshotRef, discover, load

__version__ = "0.1.0"


def __getattr__(name: str):
    # Sweeps need torch: import it only when asked for (the module is rankscope.sweeps).
    if name == "sweep":
        from .sweeps import sweep

        return sweep
    raise AttributeError(f"module 'rankscope' has no attribute {name!r}")


__all__ = ["analyze", "load", "discover", "Checkpoint", "Series", "SnapshotRef", "LoraModule", "RankscopeError", "sweep"]
