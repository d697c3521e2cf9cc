"""Compatibility: ``rankscope.dynamics_plot`` as documented before; the code lives in rankscope.views.dynamics_plot."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.views.dynamics_plot")
