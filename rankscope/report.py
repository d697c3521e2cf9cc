"""Words for people: the terminal summary of an analysis, and JSON for machines."""

from __future__ import annotations

import json
import math
import os
from typing import Any


SWEEP_SCHEMA = "rankscope/sweep-v1"  # here, not in sweeps.py, so readers of sweeps need no torch


def read_json(path: str | os.PathLike, what: str) -> Any:
    """Parse a JSON file, or raise one RankscopeError line saying what it was expected to be."""
    from .errors import RankscopeError

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise RankscopeError(f"{path} could not be read as {what} ({e})") from None


def clean_for_json(value: Any) -> Any:
    """NaN and Inf become null, so the output is strict JSON any reader accepts."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: clean_for_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean_for_json(v) for v in value]
    return value


def to_json(document: dict[str, Any], indent: int | None = None) -> str:
    return json.dumps(clean_for_json(document), indent=indent, allow_nan=False)


def _fmt(x: float | None, digits: int = 3) -> str:
    """A number with fixed decimals, or n/a for None, NaN and Inf."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _band_text(band: dict[str, float], digits: int = 3) -> str:
    return f"median {_fmt(band['median'], digits)} (IQR {_fmt(band['q25'], digits)}–{_fmt(band['q75'], digits)})"


def describe_spread(summary: dict[str, Any]) -> str:
    """One honest sentence on how unequal the ranks are."""
    share, uniform = summary["top10_share"]["median"], summary["top10_share_uniform"]
    ratio = summary["effective_rank_ratio"]["median"]
    if share is None or not math.isfinite(share):
        return "no module has a non-zero update yet (B = 0 at initialisation?): nothing to rank"
    excess = share / uniform if uniform else float("nan")
    if ratio > 0.97 and excess < 1.3:
        verdict = "nearly even: the ranks have barely separated (typical early in training or after a short run)"
    elif ratio > 0.85:
        verdict = "mildly unequal: a few ranks carry more of each update"
    else:
        verdict = "strongly unequal: a minority of ranks carries most of each update"
    return verdict


def summary_lines(document: dict[str, Any]) -> list[str]:
    """The terminal summary of an analysis document: the last snapshot, plus the series' span."""
    snapshots = document["snapshots"]
    last = snapshots[-1]
    s = last["summary"]
    where = f"{document['path']} ({document['format']}"
    if document.get("layout") not in (None, "single"):
        steps = [x["step"] for x in snapshots]
        where += f", {document['layout']}, {len(snapshots)} snapshots, steps {steps[0]}–{steps[-1]}; showing the last"
    where += ")"
    ranks = ", ".join(map(str, s["ranks"]))
    scales = ", ".join(f"{x:g}" for x in s["scales"])
    lines = [
        f"rankscope: {where}",
        f"  modules        {s['modules']}   ranks {ranks}   scale {scales}   ({s['total_ranks']} ranks in all"
        + (f"; {last['skipped']} non-LoRA tensors skipped)" if last["skipped"] else ")"),
        f"  top-10% share  {_band_text(s['top10_share'])}   uniform would be {_fmt(s['top10_share_uniform'])}",
        f"  eff. rank / r  {_band_text(s['effective_rank_ratio'])}   (entropy-based; 1 = all ranks equal)",
        f"  gini           {_band_text(s['gini'])}",
        "  deciles        " + " ".join(_fmt(x, 2) for x in s["deciles"]["median"])
        + "   (median over modules, 0%..100%, / module's largest)",
        f"  verdict        {describe_spread(s)}",
    ]
    good = [m for m in last["modules"] if m.get("importance") is not None]
    if len(good) > 1:
        most = max(good, key=lambda m: m["top10_share"])
        least = min(good, key=lambda m: m["top10_share"])
        lines.append(f"  most unequal   {most['name']} (top-10% share {_fmt(most['top10_share'])})")
        lines.append(f"  most even      {least['name']} (top-10% share {_fmt(least['top10_share'])})")
    if len(snapshots) > 1:
        first = snapshots[0]["summary"]
        lines.append(
            f"  over training  top-10% share {_fmt(first['top10_share']['median'])} at step {snapshots[0]['step']}"
            f" -> {_fmt(s['top10_share']['median'])} at step {last['step']}"
        )
    for error in s["errors"]:
        lines.append(f"  problem        {error}")
    for note in last.get("notes", []):
        lines.append(f"  note           {note}")
    return lines
