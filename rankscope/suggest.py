"""Compatibility: ``rankscope.suggest`` as documented before; the code lives in rankscope.maths.suggest and rankscope.views.text."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.maths.suggest", "rankscope.views.text")
