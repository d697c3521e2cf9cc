"""Numbers as words: the one formatter of numbers and bands in every sentence rankscope prints."""

from __future__ import annotations

import math


def fmt(x: float | None, digits: int = 3) -> str:
    """A number with fixed decimals, or n/a for None, NaN and Inf."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"



def band_text(band: dict[str, float], digits: int = 3) -> str:
    return f"median {fmt(band['median'], digits)} (IQR {fmt(band['q25'], digits)}–{fmt(band['q75'], digits)})"
