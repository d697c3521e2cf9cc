"""Compatibility: ``rankscope.dynamics`` as documented before; the code lives in rankscope.maths.dynamics and rankscope.views.text."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.maths.dynamics", "rankscope.views.text")
