"""The verdict rules: how an adapter uses its rank, in both views, as categories and one sentence."""

from __future__ import annotations

import math
from typing import Any

from rankscope.formatting import fmt

# Per-rank view: below both limits the slot norms count as "nearly even" (dynamics.separation agrees).
FLAT_EFFECTIVE_RANK_RATIO = 0.97



FLAT_TOP_RATIO = 1.3  # top-10% share / its uniform value



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
    if ratio > FLAT_EFFECTIVE_RANK_RATIO and share / uniform < FLAT_TOP_RATIO:
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
        return f"a median {fmt(k['median'], 0) if float(k['median']).is_integer() else fmt(k['median'], 1)} of {summary['ranks'][0]} directions"
    return f"a median {fmt(summary['energy_rank_ratio']['median'] * 100, 0)}% of each module's rank"



def utilisation_verdict(summary: dict[str, Any]) -> dict[str, Any]:
    """How the adapter uses its rank, in both views: categories and one honest sentence.

    The per-rank view (slot norms) says whether single A/B slots dominate; the spectral view says
    how many directions ΔW really uses. Equal slot norms with a concentrated spectrum mean the rank is
    under-used, not evenly used, so the sentence never calls such an adapter "barely separated".
    """
    per_rank, spectral = _per_rank_category(summary), _spectral_category(summary)
    n, errors = summary["modules"], len(summary["errors"])
    if per_rank is None and spectral is None and summary.get("per_rank_undefined"):  # LoHa / LoKr, --no-spectrum
        return {"per_rank": None, "spectral": None,
                "sentence": "the per-rank view is undefined for LoHa / LoKr modules and the spectral view was not "
                            "computed: nothing to say about their rank use (drop --no-spectrum)"}
    if per_rank is None and spectral in (None, "zero"):
        if errors and errors == n:
            diverged = sum("NaN or Inf" in e for e in summary["errors"])
            sentence = ("every module holds NaN or Inf: the training diverged; nothing to analyse" if diverged == n else
                        f"no module could be analysed: {diverged} hold NaN or Inf and {n - diverged} have an update "
                        "that overflows float64 (each is named below)")
        elif errors:
            sentence = (f"nothing has been learned yet in the {n - errors} readable modules (every update is exactly "
                        f"zero, as at initialisation); {errors} module(s) hold NaN or Inf")
        elif summary.get("scales") and all(s == 0 for s in summary["scales"]):
            sentence = ("every update is exactly zero because the scale is 0 (lora_alpha 0): there are no ranks or "
                        "directions to compare")
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
