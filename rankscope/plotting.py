"""Compatibility: ``rankscope.plotting`` as documented before; the code lives in rankscope.views.plots."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.views.plots")
