"""Compatibility: ``rankscope.monitor`` as documented before; the code lives in rankscope.telemetry.monitor and rankscope.telemetry.callback."""

from rankscope.compat import forward

__getattr__, __dir__ = forward(__name__, "rankscope.telemetry.monitor", "rankscope.telemetry.callback")
