"""BeamLoRA hyperparameters (p_init, Δt) read off a LoRA run's analysis document.

The rules, both derived from the run's own data (numpy only):

p_init. BeamLoRA prunes, at each operation, the ranks beyond the point where the cumulative
importance (sorted, all modules concatenated, normalised to 1) first reaches p; the crossing rank
is pruned too. Its importance is w = r·softmax(s/T), which sums to r in every module, so here each
module's per-rank norms are first scaled to mean 1 (else the modules with the largest updates
would decide alone). For each p in the grid (0.90 … 0.99) we count what that cut prunes on the
last snapshot. The paper's operating point (p_init 0.95 on importances that start equal) prunes
about 5% of the ranks, a few per module, at the first operation. Rule: **p_init is the smallest p
in the grid whose cut prunes at most ``target_share`` (5%) of all ranks, not counting the one
crossing rank that is always pruned** (smallest, because more operated ranks is the point of the
method, within the budget). Nearly flat importances prune (1 − p)·N ranks (+1), so they give
p_init ≈ 1 − target_share; the more unequal the importances, the more small ranks share the last
(1 − p) of the mass, so the same p prunes more ranks and p_init comes out higher.

Δt. Operations run until end_step = ⌊⅔ · total_steps⌋ (the official schedule, and the trainer's
own rule: ``beamlora.sched.default_end_step``), strictly before it (p reaches 1 there); Δt =
end_step / 6 gives five operations, but the first operation (at step Δt) should not come before the
rank ordering has stabilised (``dynamics.stable_from``), so Δt = max(end_step / 6, stable step),
and never below the trainer's smallest Δt (2).
total_steps defaults to 3 × the run's last step. Assumption when total_steps differs from the
observed run: the observed run is a shortened copy of the long one with the same schedule shape,
so its ordering stabilises at the same *fraction* of training; stable_from is scaled by
total_steps / last step (``scale_stabilisation=False`` keeps it in absolute steps instead, for a
pilot that is literally the head of the long run).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import numpy as np

from rankscope.constants import RECOMMEND_SCHEMA
from rankscope.errors import RankscopeError
from rankscope.maths import schedule as sched  # numpy only: the same cut and schedule the trainer runs
from rankscope.maths.dynamics import STABLE_THRESHOLD, dynamics, usable
from rankscope.maths.importance import band

P_GRID = tuple(round(0.90 + 0.01 * i, 2) for i in range(10))
TARGET_SHARE = 0.05  # share of all ranks the paper's p_init 0.95 operates on when importances are equal
OPERATIONS = 5  # "chosen so that about five operations happen"
DEFAULT_TOTAL_FACTOR = 3


def last_importances(document: dict[str, Any]) -> tuple[int | None, list[tuple[str, np.ndarray]]]:
    """The last snapshot with usable modules: its step and each module's importances (float64)."""
    for snapshot in reversed(document.get("snapshots", [])):
        modules = [(m["name"], np.asarray(m["importance"], dtype=np.float64))
                   for m in snapshot.get("modules", []) if usable(m)]
        if modules:
            return snapshot.get("step"), modules
    return None, []


def global_cut(importances: list[np.ndarray], p: float) -> np.ndarray:
    """Ranks pruned per module by BeamLoRA's global top-p cut (each module scaled to mean 1 first)."""
    masks = sched.global_cut([x / x.mean() for x in importances], p)
    return np.array([int(m.sum()) for m in masks])


def candidates(importances: list[np.ndarray], grid: tuple[float, ...] = P_GRID) -> list[dict[str, Any]]:
    """For each p: ranks pruned in all, per module (median, max), and as a share of all ranks."""
    ranks = np.array([x.size for x in importances])
    total = int(ranks.sum())
    out = []
    for p in grid:
        counts = global_cut(importances, p)
        out.append({
            "p": p,
            "pruned_total": int(counts.sum()),
            "pruned_share": float(counts.sum() / total),
            "pruned_median": float(np.median(counts)),
            "pruned_max": int(counts.max()),
            "pruned_median_share_of_r": float(np.median(counts / ranks)),
            "modules_operated": int((counts > 0).sum()),
            "over_half_r": int((counts > ranks / 2).sum()),
            "flat_would_prune": total - math.ceil(p * total - 1e-9) + 1,
        })
    return out


def choose_p_init(table: list[dict[str, Any]], total_ranks: int, target: float) -> tuple[dict[str, Any], bool]:
    """Smallest p whose cut prunes ≤ target of all ranks beyond the crossing one; (row, within target)."""
    for row in table:
        if row["pruned_total"] - 1 <= target * total_ranks:
            return row, True
    return table[-1], False


# The steps BeamLoRA operates at (multiples of Δt before end_step, with Δt steps still to go): the trainer's rule.
operation_steps = sched.operation_steps


def _observed_last_step(steps: list[int | None]) -> int | None:
    known = [s for s in steps if s is not None]
    return max(known) if known else None


def choose_delta_t(stable_step: int | None, observed: int | None, total_steps: int, scale: bool) -> dict[str, Any]:
    """Δt = max(end_step / 6, stable step in the long run's units); and how many operations then fit."""
    end_step = sched.default_end_step(total_steps)  # what BeamLoraConfig resolves end_step=None to
    # Exact fractions, not floats: a run of 10**18 steps still gets the exact integer Δt.
    base = Fraction(end_step, OPERATIONS + 1)  # operations run strictly before end_step, where p reaches 1
    stable_long = None
    if stable_step is not None:
        stable_long = Fraction(stable_step * total_steps, observed) if scale and observed else Fraction(stable_step)
    delta_t = min(math.ceil(max(base, stable_long or Fraction(0))), end_step)
    delta_t = max(sched.MIN_DELTA_T, delta_t)  # beamlora train rejects a smaller Δt
    return {"end_step": end_step, "base": float(base), "stable_long": None if stable_long is None else float(stable_long),
            "delta_t": delta_t, "bound_by_stability": stable_long is not None and stable_long > base,
            "operations": len(operation_steps(delta_t, end_step, total_steps))}


def recommend(document: dict[str, Any], total_steps: int | None = None, *, target_share: float = TARGET_SHARE,
              threshold: float = STABLE_THRESHOLD, grid: tuple[float, ...] = P_GRID,
              scale_stabilisation: bool = True, dyn: dict[str, Any] | None = None) -> dict[str, Any]:
    """BeamLoRA's p_init and Δt for a run like this one, with the reasons and warnings (see module doc).

    ``dyn``: the document's :func:`dynamics` when the caller already has it (same threshold).
    """
    dyn = dyn if dyn is not None else dynamics(document, threshold=threshold, include_trajectories=False)
    reasons: list[str] = []
    warnings: list[str] = []
    step, modules = last_importances(document)
    if not modules:
        raise RankscopeError("no module with a non-zero, finite importance: nothing to recommend from")
    importances = [x for _, x in modules]
    n_ranks = int(sum(x.size for x in importances))
    table = candidates(importances, grid)
    row, within = choose_p_init(table, n_ranks, target_share)
    p_init = row["p"]
    reasons.append(
        f"p_init {p_init:.2f}: the smallest p in {grid[0]:.2f}–{grid[-1]:.2f} whose global top-p cut on the "
        f"importances at step {step} prunes at most {target_share:.0%} of the {n_ranks} ranks besides the one "
        f"crossing rank (the paper's operating point: 0.95 on equal importances); it prunes {row['pruned_total']} "
        f"({row['pruned_share']:.1%}), median {row['pruned_median']:g} and at most {row['pruned_max']} per module")
    reasons.append(_flatness_reason(dyn["separation"], table, p_init, n_ranks))
    if not within:
        warnings.append(f"even p = {grid[-1]:.2f} prunes {row['pruned_share']:.1%} of the ranks: importances are very "
                        "unequal, consider a p_init above the grid")
    if row["over_half_r"]:
        warnings.append(f"at p_init {p_init:.2f} {row['over_half_r']} module(s) would lose more than half their ranks "
                        "in one operation: cap K at r/2 per module (as the method notes)")

    steps = dyn["steps"]
    observed = _observed_last_step(steps)
    if total_steps is None:
        if observed is None or observed <= 0:
            raise RankscopeError("the snapshots carry no step numbers: pass total_steps")
        total_steps = DEFAULT_TOTAL_FACTOR * observed
        reasons.append(f"total_steps not given: assumed {DEFAULT_TOTAL_FACTOR} × the run's last step "
                       f"{observed} = {total_steps}")
    stable_step = dyn["stable_from"]
    timing = choose_delta_t(stable_step, observed, total_steps, scale_stabilisation and stable_step is not None)
    reasons += _delta_t_reasons(timing, stable_step, steps[0] if steps else None, observed, total_steps,
                                scale_stabilisation, threshold)
    warnings += _data_warnings(dyn, threshold)
    if timing["stable_long"] is not None and timing["stable_long"] >= timing["end_step"]:
        warnings.append(f"the ordering settles only at step {timing['stable_long']:.0f} of the long run, at or after "
                        f"end_step {timing['end_step']}: no operation fits; train longer or move end_step")
    elif timing["operations"] == 0:
        warnings.append(f"no operation fits in {total_steps} steps: Δt {timing['delta_t']} (at least "
                        f"{sched.MIN_DELTA_T}) leaves no multiple before end_step {timing['end_step']} with Δt "
                        "steps still to go; BeamLoRA would train as plain LoRA, plan a longer run")
    if dyn["stable_from_index"] is not None and stable_step is None:
        warnings.append("the snapshots carry no step numbers: the stabilisation point cannot be placed, so Δt "
                        "comes from end_step / 6 alone")
    schedule = _schedule(importances, p_init, timing["delta_t"], timing["end_step"], int(total_steps))
    return {
        "schema": RECOMMEND_SCHEMA,
        "p_init": p_init,
        "delta_t": timing["delta_t"],
        "end_step": timing["end_step"],
        "total_steps": int(total_steps),
        "operations": timing["operations"],
        "reasons": reasons,
        "warnings": warnings,
        "candidates": table,
        "target_share": target_share,
        "total_ranks": n_ranks,
        "modules": len(modules),
        "importance_step": step,
        "stable_from": stable_step,
        "stable_from_long_run": timing["stable_long"],
        "separation": dyn["separation"],
        "schedule": schedule,
        "pruned_per_module_at_p_init": band(global_cut(importances, p_init).tolist()),
    }


def _flatness_reason(sep: dict[str, Any], table: list[dict[str, Any]], p_init: float, n_ranks: int) -> str:
    row = next(r for r in table if r["p"] == p_init)
    if sep["separated"]:
        return (f"importances have separated ({sep['verdict']}): the low ranks hold little mass, so a cut at p prunes "
                f"more than the {row['flat_would_prune']} ranks equal importances would; p_init rises to keep the "
                "first operation small")
    return (f"slot importances are nearly flat in the per-rank view that BeamLoRA acts on (top-10% share "
            f"{sep['relative_excess']:.0%} above uniform, effective rank {sep['final_effective_rank_ratio']:.3f} of r): a cut at p then prunes about (1 − p)·N ranks plus the "
            f"crossing one, here {row['pruned_total']} measured against {row['flat_would_prune']} for exactly equal "
            f"importances, so p_init comes out near 1 − {TARGET_SHARE:.0%}; the measured counts still decide it, and "
            "the ordering, not the size of the differences, is what BeamLoRA acts on")


def _delta_t_reasons(timing: dict[str, Any], stable_step: int | None, first_step: int | None, observed: int | None,
                     total_steps: int, scale: bool, threshold: float) -> list[str]:
    reasons = [f"end_step {timing['end_step']} = ⌊⅔ · {total_steps}⌋ steps, as the trainer computes it "
               "(operations only in the first two thirds)"]
    reasons.append(f"{OPERATIONS} operations strictly before end_step: end_step / {OPERATIONS + 1} = {timing['base']:.0f} steps")
    if stable_step is None:
        reasons.append(f"no stable ordering observed (median Spearman never stayed ≥ {threshold:g}): Δt is not held "
                       "back by stabilisation")
    else:
        how = (f"scaled by {total_steps}/{observed} (assumes the observed run is a shortened copy of the long one, "
               "stabilising at the same fraction of training)" if scale and observed and observed != total_steps
               else "in absolute steps")
        reasons.append(f"rank order stable from step {stable_step} (median Spearman ≥ {threshold:g} for all later "
                       f"snapshot pairs), {how}: the first operation should come at or after step "
                       f"{timing['stable_long']:.0f}")
        if stable_step == first_step:
            reasons.append("the order was already stable at the first snapshot, so it may have settled earlier: "
                           "earlier snapshots would allow an earlier first operation")
    if timing["bound_by_stability"]:
        reasons.append(f"Δt {timing['delta_t']} set by stabilisation, so {timing['operations']} operation(s) fit "
                       f"before end_step instead of {OPERATIONS}")
    else:
        reasons.append(f"Δt {timing['delta_t']}: first operation at step {timing['delta_t']}, "
                       f"{timing['operations']} operation points up to end_step (p reaches 1 at end_step)")
    if timing["delta_t"] < 200:
        reasons.append("Δt is short in absolute steps: the paper found Δt = 200 too small on 7B runs (too little "
                       "time to adapt between operations); prefer fewer, later operations if in doubt")
    return reasons


def _data_warnings(dyn: dict[str, Any], threshold: float) -> list[str]:
    warnings = []
    if dyn["snapshots"] < 3:
        warnings.append(f"only {dyn['snapshots']} snapshot(s): stability over time cannot be judged well "
                        "(save at least 3 checkpoints)")
    if dyn["snapshots"] >= 2 and dyn["stable_from_index"] is None:
        warnings.append(f"the rank ordering never stabilised (median Spearman < {threshold:g} at the end): "
                        "operations would act on an ordering that still changes")
    if not dyn["separation"]["separated"]:
        warnings.append("slot importances have not separated (nearly flat, per-rank view): the recommendation "
                        "rests on small differences; a longer pilot run gives firmer numbers")
    return warnings


def _schedule(importances: list[np.ndarray], p_init: float, delta_t: int, end_step: int, total_steps: int) -> list[dict[str, Any]]:
    """Planned operations (as the controller runs them) with p(t), and what that cut would prune on the final importances."""
    out = []
    for t in operation_steps(delta_t, end_step, total_steps)[:1000]:
        p = sched.top_p(t, p_init, end_step)
        out.append({"step": t, "p": p, "pruned_estimate": int(global_cut(importances, p).sum())})
    return out


__all__ = ["recommend", "global_cut", "candidates", "choose_p_init", "choose_delta_t", "operation_steps", "P_GRID",
           "TARGET_SHARE"]
