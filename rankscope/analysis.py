"""Compatibility: ``rankscope.analysis`` as documented before; the code lives in rankscope.maths.analysis."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.maths.analysis")
