"""Compatibility: ``rankscope.recommend`` as documented before; the code lives in rankscope.maths.recommend."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.maths.recommend")
