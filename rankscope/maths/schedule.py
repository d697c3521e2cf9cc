"""Which ranks an operation prunes and which ranks feed them: pure functions on importance arrays.

Importances here are the per-module softmax probabilities ``softmax(s / T)`` (each module sums
to 1), i.e. ``w / r``. Ties are broken by slot index, so every process of a distributed run, given
the same scores, makes the same choice. The schedule (``end_step``, which steps operate, the
smallest Δt) lives here too, so ``rankscope recommend`` plans with exactly the trainer's rules.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

MIN_DELTA_T = 2  # the historical snapshot sits Δt/2 steps before an operation: Δt = 1 leaves no room


def default_end_step(total_steps: int) -> int:
    """T_end when none is given: two thirds of the run, rounded down (the authors prune in 2 of 3 epochs)."""
    return (2 * total_steps) // 3


def is_operation_step(step: int, delta_t: int, end_step: int, total_steps: int) -> bool:
    """An operation runs at multiples of Δt strictly before end_step, with at least Δt steps still to go."""
    return step > 0 and step % delta_t == 0 and step < end_step and step + delta_t <= total_steps


def operation_steps(delta_t: int, end_step: int, total_steps: int) -> list[int]:
    """Every step :func:`is_operation_step` accepts (p_init < 1 assumed: at p = 1 nothing is pruned)."""
    return [t for t in range(delta_t, min(end_step, total_steps + 1), delta_t)
            if is_operation_step(t, delta_t, end_step, total_steps)]


def top_p(step: int, p_init: float, end_step: int, dynamic: bool = True) -> float:
    """Dynamic threshold ``p(t) = p_init + ½ (1 − p_init)(1 − cos(π t / T_end))``; 1 from T_end on.

    ``dynamic=False`` (the "fixed-p" ablation) holds p at p_init until T_end instead.
    """
    if step >= end_step:
        return 1.0
    if not dynamic:
        return p_init
    return p_init + 0.5 * (1.0 - p_init) * (1.0 - math.cos(math.pi * step / end_step))


def cut_beyond_mass(importance: np.ndarray, p: float) -> np.ndarray:
    """Boolean mask of the ranks beyond cumulative mass ``p``, the rank that crosses ``p`` included.

    Sort descending, normalise the cumulative sum to 1, find the first position where it
    reaches ``p``: that rank and every rank after it are pruned (the authors' rule).
    """
    values = np.asarray(importance, dtype=np.float64).reshape(-1)
    pruned = np.zeros(values.size, dtype=bool)
    total = values.sum()
    if values.size == 0 or not total > 0 or p >= 1.0:
        return pruned
    order = np.argsort(-values, kind="stable")
    mass = np.cumsum(values[order]) / total
    crossing = int(np.searchsorted(mass, p, side="left"))
    pruned[order[crossing:]] = True
    return pruned


def global_cut(importances: Sequence[np.ndarray], p: float) -> list[np.ndarray]:
    """One cut over all modules' importances concatenated (the authors' code)."""
    sizes = [len(x) for x in importances]
    mask = cut_beyond_mass(np.concatenate([np.asarray(x, dtype=np.float64) for x in importances]), p)
    return np.split(mask, np.cumsum(sizes)[:-1])


def module_cut(importances: Sequence[np.ndarray], p: float) -> list[np.ndarray]:
    """The same cut inside each module (the paper's text)."""
    return [cut_beyond_mass(x, p) for x in importances]


def cap_pruned(importance: np.ndarray, pruned: np.ndarray, max_fraction: float) -> np.ndarray:
    """Keep at most ``floor(max_fraction · r)`` pruned slots: the least important of those chosen."""
    values = np.asarray(importance, dtype=np.float64)
    limit = int(math.floor(max_fraction * values.size + 1e-9))
    chosen = np.flatnonzero(pruned)
    if chosen.size <= limit:
        return pruned.copy()
    keep_pruned = chosen[np.argsort(values[chosen], kind="stable")[:limit]]
    capped = np.zeros_like(pruned)
    capped[keep_pruned] = True
    return capped


def pair_sources(importance: np.ndarray, pruned: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(slots, sources): each pruned slot and the kept rank it copies.

    Sources are the most important *kept* ranks (never a slot being pruned, unlike the authors'
    top-K over all ranks). The least important pruned slot gets the most important source. If
    fewer ranks are kept than pruned (only possible with max_fraction > 0.5) sources repeat.
    """
    values = np.asarray(importance, dtype=np.float64)
    slots = np.flatnonzero(pruned)
    slots = slots[np.argsort(values[slots], kind="stable")]
    kept = np.flatnonzero(~pruned)
    if slots.size == 0 or kept.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ranked = kept[np.argsort(-values[kept], kind="stable")]
    sources = ranked[np.arange(slots.size) % ranked.size]
    return slots.astype(np.int64), sources.astype(np.int64)


def random_pairs(size: int, count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(slots, sources) drawn at random: ``count`` of ``size`` slots pruned, each fed by a random kept slot.

    Sources are drawn without replacement among the kept slots (cycling, as :func:`pair_sources`
    does, only when fewer are kept than pruned).
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    slots = rng.choice(size, size=count, replace=False).astype(np.int64)
    kept = np.setdiff1d(np.arange(size, dtype=np.int64), slots)
    if kept.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    sources = rng.permutation(kept)[np.arange(count) % kept.size]
    return slots, sources.astype(np.int64)


def plan_operation(importances: Sequence[np.ndarray], p: float, scope: str, max_fraction: float,
                   live: Sequence[np.ndarray] | None = None,
                   rng: np.random.Generator | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per module, (pruned slots, their sources) for one operation at threshold ``p``.

    ``live``: per module, a boolean mask of the slots that take part (None: all). Slots outside it
    (pruned for good by the "no-expansion" ablation) are neither assessed, pruned again nor used as
    sources, and the cap counts live slots only, so at least one slot of every module stays live.
    ``rng``: the "random" ablation: each module prunes as many slots as the cut (and cap) decide,
    but which ones, and which kept slots feed them, is drawn from ``rng`` (modules in order).
    """
    if live is None:
        live = [np.ones(len(x), dtype=bool) for x in importances]
    indices = [np.flatnonzero(mask) for mask in live]
    subsets = [np.asarray(x, dtype=np.float64)[index] for x, index in zip(importances, indices)]
    masks = global_cut(subsets, p) if scope == "global" else module_cut(subsets, p)
    plans = []
    for x, mask, index in zip(subsets, masks, indices):
        capped = cap_pruned(x, mask, max_fraction)
        slots, sources = pair_sources(x, capped) if rng is None else random_pairs(x.size, int(capped.sum()), rng)
        plans.append((index[slots].astype(np.int64), index[sources].astype(np.int64)))
    return plans
