"""Words for people: the terminal summary of an analysis, and JSON for machines."""

from __future__ import annotations

import json
import math
from typing import Any


SWEEP_SCHEMA = "rankscope/sweep-v1"  # here, not in sweeps.py, so readers of sweeps need no torch


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


# Per-rank view: below both limits the slot norms count as "nearly even" (dynamics.separation agrees).
FLAT_EFFECTIVE_RANK_RATIO = 0.97
FLAT_TOP_EXCESS = 1.3
STRONG_EFFECTIVE_RANK_RATIO = 0.85
# Spectral view: "concentrated" when the median module needs at most half of its rank for 95% of the
# energy; "uses all of its rank" when more than half of the modules need every direction.
CONCENTRATED_ENERGY_RATIO = 0.5
FULL_RANK_SHARE = 0.5


def _per_rank_category(summary: dict[str, Any]) -> str | None:
    share, uniform = summary["top10_share"]["median"], summary["top10_share_uniform"]
    ratio = summary["effective_rank_ratio"]["median"]
    if share is None or not math.isfinite(share) or not uniform:
        return None
    if ratio > FLAT_EFFECTIVE_RANK_RATIO and share / uniform < FLAT_TOP_EXCESS:
        return "even"
    return "mild" if ratio > STRONG_EFFECTIVE_RANK_RATIO else "strong"


def _spectral_category(summary: dict[str, Any]) -> str | None:
    n = summary.get("spectral_modules", 0)
    if not n:
        return None
    if summary["zero_modules"] == n:
        return "zero"
    if summary["full_rank_modules"] > FULL_RANK_SHARE * n:
        return "full"
    ratio = summary["energy_rank_ratio"]["median"]
    return "concentrated" if ratio <= CONCENTRATED_ENERGY_RATIO else "spread"


def directions_text(summary: dict[str, Any]) -> str:
    """``k95 median 5 of 16`` for one rank, ``k95 / r median 0.31`` when ranks differ."""
    k = summary["energy_ranks"]["0.95"]
    if len(summary["ranks"]) == 1:
        return f"a median {_fmt(k['median'], 0) if float(k['median']).is_integer() else _fmt(k['median'], 1)} of {summary['ranks'][0]} directions"
    return f"a median {_fmt(summary['energy_rank_ratio']['median'] * 100, 0)}% of each module's rank"


def utilisation_verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """How the adapter uses its rank, in both views: categories and one honest sentence.

    The per-rank view (slot norms) says whether single A/B slots dominate; the spectral view says
    how many directions ΔW really uses. Equal slot norms with a concentrated spectrum mean the rank is
    under-used, not evenly used, so the sentence never calls such an adapter "barely separated".
    """
    per_rank, spectral = _per_rank_category(summary), _spectral_category(summary)
    n, errors = summary["modules"], len(summary["errors"])
    if per_rank is None and spectral in (None, "zero"):
        if errors and errors == n:
            sentence = "no module could be analysed: every module's A or B holds NaN or Inf"
        elif errors:
            sentence = (f"nothing has been learned yet in the {n - errors} readable modules (every update is exactly "
                        f"zero, as at initialisation); {errors} module(s) hold NaN or Inf")
        else:
            sentence = ("nothing has been learned yet: every update is exactly zero (B = 0, as at initialisation), "
                        "so there are no ranks or directions to compare")
        return {"per_rank": per_rank, "spectral": "zero" if spectral == "zero" else spectral,
                "sentence": sentence}
    slots = {
        "even": "slot norms nearly even (per-rank view: no single A/B slot dominates)",
        "mild": "slot norms mildly unequal (per-rank view: a few slots carry more of each update)",
        "strong": "slot norms strongly unequal (per-rank view: a minority of slots carries most of each update)",
        None: "",
    }[per_rank]
    if spectral is None:
        sentence = {"even": "nearly even: the ranks have barely separated (typical early in training or after a "
                            "short run); the spectral view was not computed",
                    "mild": "mildly unequal: a few ranks carry more of each update (spectral view not computed)",
                    "strong": "strongly unequal: a minority of ranks carries most of each update (spectral view "
                              "not computed)"}[per_rank]
        return {"per_rank": per_rank, "spectral": None, "sentence": sentence}
    full, n_spec = summary["full_rank_modules"], summary["spectral_modules"]
    if spectral == "concentrated":
        joint = "yet" if per_rank == "even" else "and"
        words = (f"{joint} 95% of ΔW's energy lies in {directions_text(summary)} (spectral view): the update needs "
                 "at most half of its rank, and a smaller r would likely do (rankscope suggest)")
        if per_rank == "even":
            words += "; even slot norms do not mean an evenly used rank"
    elif spectral == "full":
        words = (f"and ΔW needs all of its rank for 95% of its energy in {full} of {n_spec} modules (spectral "
                 "view): the adapter uses all of its rank, and a larger r may help")
    else:
        words = f"and 95% of ΔW's energy needs {directions_text(summary)} (spectral view): most of its rank is in use"
    zero = summary["zero_modules"]
    if zero:
        words += f"; {zero} of {n_spec} modules have a zero update (nothing learned there yet)"
    sentence = f"{slots}, {words}" if slots else words.removeprefix("and ").removeprefix("yet ")
    return {"per_rank": per_rank, "spectral": spectral, "sentence": sentence}


def describe_spread(summary: dict[str, Any]) -> str:
    """One honest sentence on how the adapter uses its ranks (both views; see :func:`utilisation_verdict`)."""
    verdict = summary.get("verdict") or utilisation_verdict(summary)
    return verdict["sentence"]


PER_RANK_HEADER = ("per-rank view  slot norms scale·‖b_i‖·‖a_i‖: the paper's measure and what BeamLoRA acts on; "
                   "they depend on the A/B basis")
SPECTRAL_HEADER = ("spectral view  singular values of ΔW: basis-independent, how many directions the update "
                   "really uses")


def directions_line(summary: dict[str, Any]) -> str:
    """``k95 median 5 of 16 (IQR 4–6); k90 4, k99 9; stable rank 1.3; spectral eff. rank / r 0.50`` (medians)."""
    k = summary["energy_ranks"]
    if len(summary["ranks"]) == 1:
        kk = lambda b: _fmt(b, 0) if b is not None and math.isfinite(b) and float(b).is_integer() else _fmt(b, 1)  # noqa: E731
        energy = (f"k95 median {kk(k['0.95']['median'])} of {summary['ranks'][0]} "
                  f"(IQR {kk(k['0.95']['q25'])}–{kk(k['0.95']['q75'])}); k90 {kk(k['0.9']['median'])}, "
                  f"k99 {kk(k['0.99']['median'])}")
    else:
        energy = f"k95 / r {_band_text(summary['energy_rank_ratio'], 2)}"
    return (f"{energy}; stable rank {_fmt(summary['stable_rank']['median'], 1)}; spectral eff. rank / r "
            f"{_fmt(summary['spectral_effective_rank_ratio']['median'], 2)}")


def summary_lines(document: dict[str, Any]) -> list[str]:
    """The terminal summary of an analysis document: the last snapshot in both views, plus the series' span."""
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
        "  " + PER_RANK_HEADER,
        f"  top-10% share  {_band_text(s['top10_share'])}   uniform would be {_fmt(s['top10_share_uniform'])}",
        f"  eff. rank / r  {_band_text(s['effective_rank_ratio'])}   (entropy-based; 1 = all slots equal)",
        f"  gini           {_band_text(s['gini'])}",
        "  deciles        " + " ".join(_fmt(x, 2) for x in s["deciles"]["median"])
        + "   (median over modules, 0%..100%, / module's largest)",
    ]
    if s.get("spectral_modules"):
        lines += [
            "  " + SPECTRAL_HEADER,
            f"  directions     {directions_line(s)}",
            f"  full rank      k95 = r in {s['full_rank_modules']} of {s['spectral_modules']} modules"
            + (f"; {s['zero_modules']} with a zero update" if s["zero_modules"] else ""),
        ]
    lines.append(f"  verdict        {describe_spread(s)}")
    good = [m for m in last["modules"] if m.get("importance") is not None and math.isfinite(m.get("top10_share") or math.nan)]
    if len(good) > 1:
        most = max(good, key=lambda m: m["top10_share"])
        least = min(good, key=lambda m: m["top10_share"])
        lines.append(f"  most unequal   {most['name']} (top-10% share {_fmt(most['top10_share'])})")
        lines.append(f"  most even      {least['name']} (top-10% share {_fmt(least['top10_share'])})")
        spectral = [m for m in good if m.get("energy_rank")]
        if spectral:
            fewest = min(spectral, key=lambda m: (m["energy_rank"]["0.95"] / m["rank"], m["name"]))
            widest = max(spectral, key=lambda m: (m["energy_rank"]["0.95"] / m["rank"], m["name"]))
            lines.append(f"  fewest dirs    {fewest['name']} (k95 {fewest['energy_rank']['0.95']} of {fewest['rank']})")
            lines.append(f"  most dirs      {widest['name']} (k95 {widest['energy_rank']['0.95']} of {widest['rank']})")
    if len(snapshots) > 1:
        first = snapshots[0]["summary"]
        line = (f"  over training  top-10% share {_fmt(first['top10_share']['median'])} at step {snapshots[0]['step']}"
                f" -> {_fmt(s['top10_share']['median'])} at step {last['step']}")
        if first.get("spectral_modules") and s.get("spectral_modules"):
            line += (f"; k95 / r {_fmt(first['energy_rank_ratio']['median'], 2)} -> "
                     f"{_fmt(s['energy_rank_ratio']['median'], 2)}")
        lines.append(line)
    for error in s["errors"]:
        lines.append(f"  problem        {error}")
    for note in last.get("notes", []):
        lines.append(f"  note           {note}")
    return lines
