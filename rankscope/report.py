"""Compatibility: ``rankscope.report`` as documented before; the code lives in rankscope.views.text, rankscope.maths.verdict and rankscope.io.documents."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.views.text", "rankscope.maths.verdict", "rankscope.io.documents")
