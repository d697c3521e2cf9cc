"""Importance maths on plain arrays: per-rank norms, update spectra and how unequal they are.

Rank i of a LoRA module contributes the rank-one update ``scale · c_i · b_i a_iᵀ``; its
Frobenius norm is ``|scale · c_i| · ‖b_i‖₂ · ‖a_i‖₂`` exactly, so no d×k matrix is ever built.
Everything is computed in float64 whatever the stored dtype.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

DECILE_LEVELS = np.linspace(0.0, 1.0, 11)


def _as_f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def rank_importance(A: np.ndarray, B: np.ndarray, scale: float = 1.0, coefficients: np.ndarray | None = None) -> np.ndarray:
    """``‖scale · c_i · b_i a_iᵀ‖_F`` for each rank i; A is (r, in), B is (out, r), c is (r,) or None."""
    A64, B64 = _as_f64(A), _as_f64(B)
    a_norms = np.sqrt(np.einsum("ij,ij->i", A64, A64))
    b_norms = np.sqrt(np.einsum("ij,ij->j", B64, B64))
    importance = abs(float(scale)) * a_norms * b_norms
    if coefficients is not None:
        importance = importance * np.abs(_as_f64(coefficients).reshape(-1))
    return importance


# Above this condition number of the r×r Gram matrix (cond(B)² or cond(A)²), its factor loses
# more than ~1e-9 of relative accuracy on the smallest singular values: use Householder QR.
_GRAM_MAX_CONDITION = 1e7


def _r_factor(X: np.ndarray) -> np.ndarray:
    """An r×r ``R`` with ``RᵀR = XᵀX`` for a tall (n, r) float64 ``X``: then ``X = Q R``, Q orthonormal.

    The Gram matrix ``XᵀX`` is one BLAS-3 product (an order of magnitude faster than Householder
    QR of an 11008×64 matrix); ``R = diag(√λ) Vᵀ`` from its eigendecomposition. It squares the
    condition number, so an ill-conditioned or rank-deficient X goes through ``np.linalg.qr``.
    """
    if X.shape[0] < X.shape[1]:
        return np.linalg.qr(X, mode="r")
    gram = X.T @ X
    eigenvalues, vectors = np.linalg.eigh(gram)
    top = eigenvalues[-1]
    if not top > 0:
        return np.zeros((X.shape[1], X.shape[1]))
    if not eigenvalues[0] * _GRAM_MAX_CONDITION > top:  # also catches NaN
        return np.linalg.qr(X, mode="r")
    return np.sqrt(eigenvalues)[:, None] * vectors.T


def update_spectrum(A: np.ndarray, B: np.ndarray, scale: float = 1.0, coefficients: np.ndarray | None = None) -> np.ndarray:
    """The r singular values of ``scale · B diag(c) A``, largest first, padded with zeros.

    From ``B = Q_B R_B`` and ``Aᵀ = Q_A R_A`` (Q's with orthonormal columns, R's r×r):
    ``B A = Q_B (R_B R_Aᵀ) Q_Aᵀ``, so the singular values are those of the small ``R_B R_Aᵀ``.
    The R's come from the float64 Gram matrices ``BᵀB`` and ``AAᵀ`` (see :func:`_r_factor`).
    """
    A64, B64 = _as_f64(A), _as_f64(B)
    r = A64.shape[0]
    r_b = _r_factor(B64)
    r_a = _r_factor(A64.T)
    if coefficients is not None:
        r_b = r_b * _as_f64(coefficients).reshape(1, -1)
    core = float(scale) * (r_b @ r_a.T)
    values = np.linalg.svd(core, compute_uv=False)
    return np.pad(np.abs(values), (0, r - values.size))


def deciles(importance: np.ndarray) -> np.ndarray:
    """The 0, 10, ..., 100% quantiles of the importances divided by the largest (all zeros if it is 0)."""
    importance = _as_f64(importance)
    top = importance.max()
    if not top > 0:
        return np.zeros(DECILE_LEVELS.size)
    return np.quantile(importance / top, DECILE_LEVELS)


def top_share(importance: np.ndarray, fraction: float = 0.1) -> float:
    """Share of the total held by the top ``ceil(fraction · r)`` ranks (uniform gives ceil(fraction·r)/r)."""
    importance = _as_f64(importance)
    total = importance.sum()
    if not total > 0:
        return float("nan")
    k = max(1, math.ceil(fraction * importance.size - 1e-9))
    return float(np.sort(importance)[::-1][:k].sum() / total)


def effective_rank(importance: np.ndarray) -> float:
    """``exp(entropy)`` of the importances normalised to sum 1: r when all ranks are equal, 1 when one holds all."""
    importance = _as_f64(importance)
    total = importance.sum()
    if not total > 0:
        return float("nan")
    p = importance[importance > 0] / total
    return float(math.exp(-(p * np.log(p)).sum()))


def gini(importance: np.ndarray) -> float:
    """Gini coefficient of the importances: 0 when all equal, (r−1)/r when one rank holds all."""
    x = np.sort(_as_f64(importance))
    n, total = x.size, x.sum()
    if not total > 0:
        return float("nan")
    ranks = np.arange(1, n + 1)
    return float((2 * (ranks * x).sum()) / (n * total) - (n + 1) / n)


def band(values: Iterable[float | None]) -> dict[str, float]:
    """Median, quartiles, IQR, min, max and count of the finite values (NaN fields when there are none)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size == 0:
        nan = float("nan")
        return {"median": nan, "q25": nan, "q75": nan, "iqr": nan, "min": nan, "max": nan, "n": 0}
    q25, median, q75 = np.quantile(x, [0.25, 0.5, 0.75])
    return {"median": float(median), "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25),
            "min": float(x.min()), "max": float(x.max()), "n": int(x.size)}


def decile_band(rows: np.ndarray) -> dict[str, list[float]]:
    """Median and inter-quartile band, decile by decile, over modules (rows of 11 deciles)."""
    rows = _as_f64(rows).reshape(-1, DECILE_LEVELS.size)
    if rows.shape[0] == 0:
        empty = [float("nan")] * DECILE_LEVELS.size
        return {"median": empty, "q25": empty, "q75": empty}
    q25, median, q75 = np.quantile(rows, [0.25, 0.5, 0.75], axis=0)
    return {"median": median.tolist(), "q25": q25.tolist(), "q75": q75.tolist()}
