"""Progress of long work: a bar on a terminal."""

from __future__ import annotations

import sys


def progress_bar(total: int, enabled: bool | None, description: str, unit: str):
    """A tqdm bar on stderr; by default only when there is more than one item and stderr is a terminal."""
    from tqdm import tqdm

    if enabled is None:
        enabled = total > 1 and sys.stderr.isatty()
    return tqdm(total=total, desc=description, unit=unit, disable=not enabled, file=sys.stderr, leave=False)
