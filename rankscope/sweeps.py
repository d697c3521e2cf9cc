"""Compatibility: ``rankscope.sweeps`` as documented before; the code lives in rankscope.adapters.sweep and rankscope.tasks.layers."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.adapters.sweep", "rankscope.tasks.layers")
