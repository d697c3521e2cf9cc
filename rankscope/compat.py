"""The documented module paths from before the code was arranged in rooms (``rankscope.monitor``, ...).

Each such module is a thin forwarder: a name is looked up, on first use, in the modules where the
code lives now (see docs/python-api.md for the current paths).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def forward(module: str, *targets: str) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``module`` that find each public name in ``targets``, in order."""

    def __getattr__(name: str) -> Any:
        if not name.startswith("_"):
            for target in targets:
                found = importlib.import_module(target)
                if hasattr(found, name):
                    return getattr(found, name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        names = set()
        for target in targets:
            names.update(n for n in dir(importlib.import_module(target)) if not n.startswith("_"))
        return sorted(names)

    return __getattr__, __dir__
