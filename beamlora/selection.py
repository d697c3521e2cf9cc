"""Which ranks an operation prunes and which ranks feed them: pure functions on importance arrays.

Importances here are the per-module softmax probabilities ``softmax(s / T)`` (each module sums
to 1), i.e. ``w / r``. Ties are broken by slot index, so every process of a distributed run, given
the same scores, makes the same choice.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def top_p(step: int, p_init: float, end_step: int) -> float:
    """Dynamic threshold ``p(t) = p_init + ½ (1 − p_init)(1 − cos(π t / T_end))``; 1 from T_end on."""
    if step >= end_step:
        return 1.0
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


def plan_operation(importances: Sequence[np.ndarray], p: float, scope: str,
                   max_fraction: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per module, (pruned slots, their sources) for one operation at threshold ``p``."""
    masks = global_cut(importances, p) if scope == "global" else module_cut(importances, p)
    return [pair_sources(x, cap_pruned(x, m, max_fraction)) for x, m in zip(importances, masks)]
