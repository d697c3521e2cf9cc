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

import functools
import threading
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


# Pair products built at a time, per factor: at most 2 MB, in a scratch buffer kept by each thread. Fresh
# arrays of this size are newly mapped memory on every module, and their page faults cost more than the
# products (a fresh 1.2 MB pair matrix made the Gram matrix 2.5× slower on the 2-core VM).
_BLOCK_VALUES = 262144
_scratch = threading.local()


def _scratch_buffers(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Two (rows, cols) float64 work arrays, reused by this thread from call to call."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.size < 2 * rows * cols:
        buffer = _scratch.buffer = np.empty(2 * rows * cols)
    return buffer[: rows * cols].reshape(rows, cols), buffer[rows * cols: 2 * rows * cols].reshape(rows, cols)


@functools.lru_cache(maxsize=64)
def _pair_index(r: int) -> np.ndarray:
    """The (r, r) map from (i, k) to the index of the unordered pair {i, k} in :func:`_pair_products`' rows."""
    rows, cols = np.triu_indices(r)
    index = np.empty((r, r), dtype=np.intp)
    index[rows, cols] = index[cols, rows] = np.arange(rows.size)
    index.flags.writeable = False  # cached: every module of an adapter has the same r
    return index


def _pair_products(Xt: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out[(i,k), o] = X[o,i]·X[o,k]`` for the pairs ``i ≤ k`` in row order, from ``Xt = Xᵀ`` (r, n)."""
    row = 0
    for i in range(Xt.shape[0]):
        np.multiply(Xt[i:], Xt[i], out=out[row: row + Xt.shape[0] - i])
        row += Xt.shape[0] - i
    return out


def _face_split_gram(Xt: np.ndarray, Yt: np.ndarray) -> np.ndarray:
    """``Fᵀ F`` of the face-splitting product ``F[o, (i,j)] = X[o,i]·Y[o,j]``, from ``Xt = Xᵀ`` (r1, n) and
    ``Yt = Yᵀ`` (r2, n); F is never formed. ``(FᵀF)[(i,j), (k,l)] = Σ_o X[o,i]X[o,k] · Y[o,j]Y[o,l]`` depends on
    (i, k) and (j, l) only as unordered pairs: one product of the pair matrices (r1(r1+1)/2 × r2(r2+1)/2), about
    a third of the products of ``FᵀF`` itself at r = 8 (36² against 64² a row), then spread out."""
    r1, r2, n = Xt.shape[0], Yt.shape[0], Xt.shape[1]
    p1, p2 = r1 * (r1 + 1) // 2, r2 * (r2 + 1) // 2
    step = min(n, max(64, _BLOCK_VALUES // max(p1, p2)))
    x_pairs, y_pairs = _scratch_buffers(max(p1, p2), step)
    pairs = np.zeros((p1, p2))
    for start in range(0, n, step):
        width = min(step, n - start)
        x = _pair_products(Xt[:, start:start + width], x_pairs[:p1, :width])
        y = _pair_products(Yt[:, start:start + width], y_pairs[:p2, :width])
        pairs += x @ y.T
    xi, yi = _pair_index(r1), _pair_index(r2)
    return pairs[xi[:, None, :, None], yi[None, :, None, :]].reshape(r1 * r2, r1 * r2)


def _face_split_times(Xt: np.ndarray, Yt: np.ndarray, W: np.ndarray) -> np.ndarray:
    """``F W`` (n, k) for the face-splitting product F of :func:`_face_split_gram` and W (r1·r2, k), F never formed:
    ``(F W)[o, c] = Σ_i X[o,i] · (Y W_i)[o, c]`` with ``W_i[j, c] = W[(i,j), c]``, by blocks of rows."""
    r1, r2, k, n = Xt.shape[0], Yt.shape[0], W.shape[1], Xt.shape[1]
    W_j = W.reshape(r1, r2, k).transpose(1, 0, 2).reshape(r2, r1 * k)
    out = np.empty((n, k))
    step = min(n, max(64, _BLOCK_VALUES // max(1, r1 * k)))
    scratch = _scratch_buffers(step, r1 * k)[0]
    for start in range(0, n, step):
        width = min(step, n - start)
        inner = np.matmul(Yt[:, start:start + width].T, W_j, out=scratch[:width]).reshape(width, r1, k)  # Y W_i, all i
        out[start:start + width] = np.matmul(Xt[:, start:start + width].T[:, None, :], inner)[:, 0]
    return out


def _cholesky(gram: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(L, L⁻¹) with ``L Lᵀ = gram`` (so ``F L⁻ᵀ`` is orthonormal), or None where the Gram matrix is too
    ill-conditioned to trust (condition number above :data:`rankscope.maths.importance.GRAM_MAX_CONDITION`, as
    :func:`rankscope.maths.importance._r_factor` decides)."""
    try:
        lower = np.linalg.cholesky(gram)
        inverse = np.linalg.inv(lower)
    except np.linalg.LinAlgError:  # not positive definite (to working precision)
        return None
    # cond(gram) = ‖gram‖ ‖L⁻¹‖² ≤ trace(gram) · ‖L⁻¹‖_F²: under the limit, the condition is proven without the
    # eigenvalues; above it (the bound can overstate by up to r⁴), they decide
    if not np.trace(gram) * np.einsum("ij,ij->", inverse, inverse) < imp.GRAM_MAX_CONDITION:
        eigenvalues = np.linalg.eigvalsh(gram)
        if not (eigenvalues[0] * imp.GRAM_MAX_CONDITION > eigenvalues[-1] > 0):
            return None
    return lower, inverse


def _loha_core(parts: dict[str, np.ndarray]) -> tuple | None:
    """(sides, core) of a LoHa module through the Cholesky factors of the Gram matrices of its face-splitting
    factors P and Q (``PᵀP = L_P L_Pᵀ``): ``ΔW = P Qᵀ = (P L_P⁻ᵀ) (L_Pᵀ L_Q) (Q L_Q⁻ᵀ)ᵀ``, the outer two
    orthonormal; each side is (Xᵀ, Yᵀ, L⁻¹). None where a Gram matrix is ill-conditioned (or r1·r2 > n)."""
    # (r, n) rows, contiguous: the pair products read them r times (a strided view made the Gram 15% slower)
    B1t, B2t = np.ascontiguousarray(_f64(parts["B1"]).T), np.ascontiguousarray(_f64(parts["B2"]).T)
    A1, A2 = np.ascontiguousarray(_f64(parts["A1"])), np.ascontiguousarray(_f64(parts["A2"]))
    r2 = B1t.shape[0] * B2t.shape[0]
    if r2 > min(B1t.shape[1], A1.shape[1]):
        return None
    p = _cholesky(_face_split_gram(B1t, B2t))
    q = None if p is None else _cholesky(_face_split_gram(A1, A2))
    if q is None:
        return None
    return ((B1t, B2t, p[1]), (A1, A2, q[1])), p[0].T @ q[0]


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
        found = _loha_core(parts)
        if found is not None:
            return np.abs(float(scale)) * np.linalg.svd(found[1], compute_uv=False)[: _loha_bound(parts)]
        A, B = face_split_factors(parts["B1"], parts["A1"], parts["B2"], parts["A2"])  # ill-conditioned: QR
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

    LoHa: the SVD of the r1·r2 core of :func:`_loha_core`, only the k kept columns of P and Q built (where a Gram
    matrix is ill-conditioned, :func:`rankscope.maths.importance.truncated_factors` of P and Q formed). LoKr: the k largest
    products ``σ_i σ_j`` with ``B'`` columns ``√(σ_i σ_j) kron(u_i, u_j)`` and ``A'`` rows ``√(σ_i σ_j) kron(v_i, v_j)``.
    """
    if method == "loha":
        bound = _loha_bound(parts)
        found = _loha_core(parts)
        if found is not None:
            ((B1t, B2t, inv_p), (A1, A2, inv_q)), core = found
            u, sigma, vt = np.linalg.svd(core)
            k = max(0, min(keep(sigma[:bound]) if callable(keep) else keep, bound))
            root = np.sqrt(sigma[:k])
            # only the k kept columns of P L_P⁻ᵀ U √σ and Q L_Q⁻ᵀ V √σ
            B_new = _face_split_times(B1t, B2t, inv_p.T @ (u[:, :k] * root))
            A_new = _face_split_times(A1, A2, inv_q.T @ (vt[:k].T * root)).T
            return A_new, B_new, sigma[:bound]
        A, B = face_split_factors(parts["B1"], parts["A1"], parts["B2"], parts["A2"])  # ill-conditioned: QR
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

