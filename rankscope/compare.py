"""Compatibility: ``rankscope.compare`` as documented before; the code lives in rankscope.maths.compare, rankscope.views.text and rankscope.views.compare_plot."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.maths.compare", "rankscope.views.text", "rankscope.views.compare_plot")
