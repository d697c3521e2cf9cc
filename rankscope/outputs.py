"""Compatibility: ``rankscope.outputs`` as documented before; the code lives in rankscope.views.outputs."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.views.outputs")
