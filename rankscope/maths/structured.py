"""The spectrum and best rank-k factors of LoHa and LoKr updates, through their structure (pure numpy).

Both come as 2-D factors (:mod:`rankscope.io.structured` folds Tucker cores and flattens conv kernels first):

- **LoHa** ``ΔW = s · (B1 A1) ⊙ (B2 A2)``, B (out, r), A (r, in). A Hadamard product of two rank-r matrices is
  the product of their face-splitting (row-wise Kronecker) factors: ``P[o, (i,j)] = B1[o,i]·B2[o,j]`` (out, r1·r2)
  and ``Q[c, (i,j)] = A1[i,c]·A2[j,c]`` (in, r1·r2), ``ΔW = s · P Qᵀ``: a LoRA of rank r1·r2, whose spectrum
  and truncated SVD come from its small core exactly as LoRA's do (:func:`rankscope.maths.importance.update_spectrum`).
- **LoKr** ``ΔW = s · kron(W1, W2)``, each W full or ``B A``. The singular values of a Kronecker product are the
  products ``σ_i(W1)·σ_j(W2)``, its singular vectors ``kron(u_i, u_j)`` and ``kron(v_i, v_j)``: the SVDs of the
  two small factors give everything; ΔW (out × in) is never formed.

``parts`` is a dict of float arrays: LoHa ``{"B1", "A1", "B2", "A2"}``; LoKr ``{"W1"}`` or ``{"B1", "A1"}`` and
``{"W2"}`` or ``{"B2", "A2"}``. Everything is float64. The scale is not in the factors; the spectrum takes it
(as ``update_spectrum`` does) and the truncated factors leave it to the caller (as ``truncated_factors`` does).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from rankscope.maths import importance as imp

METHODS = ("loha", "lokr")


def _f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def face_split_factors(B1: np.ndarray, A1: np.ndarray, B2: np.ndarray, A2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(A, B) with ``B A = (B1 A1) ⊙ (B2 A2)``: B = P (out, r1·r2) and A = Qᵀ (r1·r2, in), face-splitting products."""
    B1, A1, B2, A2 = map(_f64, (B1, A1, B2, A2))
    # Built as (r1·r2, n) rows with the long axis innermost: a broadcast over length-r inner loops is ~30× slower.
    B1t, B2t = np.ascontiguousarray(B1.T), np.ascontiguousarray(B2.T)
    P = (B1t[:, None, :] * B2t[None, :, :]).reshape(-1, B1.shape[0]).T
    Qt = (A1[:, None, :] * A2[None, :, :]).reshape(-1, A1.shape[1])
    return Qt, P


def _thin_svd(parts: dict[str, np.ndarray], which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, σ, Vᵀ) of one LoKr half, W or B A, with only its nonzero-able singular triplets (thin)."""
    if f"W{which}" in parts:
        return np.linalg.svd(_f64(parts[f"W{which}"]), full_matrices=False)
    B, A = _f64(parts[f"B{which}"]), _f64(parts[f"A{which}"])
    q_b, r_b = np.linalg.qr(B)
    q_a, r_a = np.linalg.qr(A.T)
    u, s, vt = np.linalg.svd(r_b @ r_a.T)
    return q_b @ u, s, vt @ q_a.T


def _loha_bound(parts: dict[str, np.ndarray]) -> int:
    B1, A1, B2 = parts["B1"], parts["A1"], parts["B2"]
    return min(B1.shape[1] * B2.shape[1], B1.shape[0], A1.shape[1])


def spectrum(method: str, parts: dict[str, np.ndarray], scale: float = 1.0) -> np.ndarray:
    """The singular values of ``scale · ΔW`` of a LoHa or LoKr module, largest first, as many as its rank bound
    (LoHa ``min(r1·r2, out, in)``, LoKr ``rank(W1)·rank(W2)`` bounds), zeros included."""
    if method == "loha":
        A, B = face_split_factors(parts["B1"], parts["A1"], parts["B2"], parts["A2"])
        return imp.update_spectrum(A, B, scale)[: _loha_bound(parts)]
    if method == "lokr":
        s1, s2 = _thin_svd(parts, "1")[1], _thin_svd(parts, "2")[1]
        return np.sort(np.abs(float(scale)) * np.outer(s1, s2).reshape(-1))[::-1]
    raise ValueError(f"unknown structured method {method!r}: expected one of {METHODS}")


def truncated_factors(method: str, parts: dict[str, np.ndarray],
                      keep: int | Callable[[np.ndarray], int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A', B', σ): the best rank-``keep`` approximation ``B' A'`` of the unscaled ΔW (Eckart–Young), with the
    singular values split evenly between B' (out, k) and A' (k, in); σ holds all of them, largest first. ``keep``
    may be a function of σ (the rule that picks k), so that only the k kept directions are ever built.

    LoHa: :func:`rankscope.maths.importance.truncated_factors` of the face-splitting factors. LoKr: the k largest
    products ``σ_i σ_j`` with ``B'`` columns ``√(σ_i σ_j) kron(u_i, u_j)`` and ``A'`` rows ``√(σ_i σ_j) kron(v_i, v_j)``.
    """
    if method == "loha":
        A, B = face_split_factors(parts["B1"], parts["A1"], parts["B2"], parts["A2"])
        bound = _loha_bound(parts)
        A_new, B_new, sigma = imp.truncated_factors(A, B, keep if not callable(keep) else lambda s: keep(s[:bound]))
        k = min(A_new.shape[0], bound)
        return A_new[:k], B_new[:, :k], sigma[:bound]
    if method == "lokr":
        u1, s1, vt1 = _thin_svd(parts, "1")
        u2, s2, vt2 = _thin_svd(parts, "2")
        products = np.outer(s1, s2).reshape(-1)
        order = np.argsort(-products, kind="stable")
        sigma = products[order]
        k = max(0, min(keep(sigma) if callable(keep) else keep, sigma.size))
        i, j = np.divmod(order[:k], s2.size)
        root = np.sqrt(sigma[:k])
        # kron(u1[:, i], u2[:, j]) for each kept pair, as columns: (a, 1, k) * (1, b, k) -> (a·b, k)
        B_new = (u1[:, None, i] * u2[None, :, j]).reshape(-1, k) * root
        A_new = ((vt1[i, :, None] * vt2[j, None, :]).reshape(k, -1)) * root[:, None]
        return A_new, B_new, sigma
    raise ValueError(f"unknown structured method {method!r}: expected one of {METHODS}")

