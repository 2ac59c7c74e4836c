"""Kernels on blocks of top-k lists laid out rank-major: ``x[j, i]`` is rank ``j`` of row ``i``.

Every reduction over the k ranks is then k - 1 element-wise operations on contiguous rows of
length n (numpy reduces a short inner axis one row at a time, 10-30x slower). Sums reproduce
the order of numpy's pairwise summation of a contiguous row (:func:`rank_sum`), so the values
are bit-identical to ``x.T.sum(axis=1)``.
"""

from __future__ import annotations

import numpy as np

#: numpy's pairwise-summation block (``PW_BLOCKSIZE``) and unroll factor.
_PW_BLOCK = 128
_PW_UNROLL = 8


def rank_major(x: np.ndarray, idx: np.ndarray, k: int, fill: float) -> np.ndarray:
    """Return rows ``idx`` of a row-major ``(rows, kx)`` array as a contiguous ``(k, len(idx))``
    array, padded with ``fill`` below ``kx`` ranks. Contiguous ascending ``idx`` is sliced."""
    n = idx.size
    if n and int(idx[-1]) - int(idx[0]) == n - 1 and (n < 2 or bool((np.diff(idx) == 1).all())):
        rows = x[int(idx[0]) : int(idx[0]) + n]
    else:
        rows = x[idx]
    out = np.empty((k, n), dtype=x.dtype)
    kx = min(x.shape[1], k)
    out[:kx] = rows[:, :kx].T
    if kx < k:
        out[kx:] = fill
    return out


def rank_sum(x: np.ndarray) -> np.ndarray:
    """Sum a ``(k, n)`` float array over its k ranks in numpy's pairwise order for a contiguous
    row of length k (the result equals ``np.sum(x.T, axis=1)`` bit for bit)."""
    k = x.shape[0]
    if k < _PW_UNROLL:
        res = np.zeros(x.shape[1], dtype=x.dtype)
        for j in range(k):
            res += x[j]
        return res
    if k <= _PW_BLOCK:
        r = x[:_PW_UNROLL].copy()
        i = _PW_UNROLL
        while i < k - k % _PW_UNROLL:
            r += x[i : i + _PW_UNROLL]
            i += _PW_UNROLL
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for j in range(i, k):
            res += x[j]
        return res
    half = k // 2
    half -= half % _PW_UNROLL
    return rank_sum(x[:half]) + rank_sum(x[half:])


def first_match(ids: np.ndarray, tok: np.ndarray) -> np.ndarray:
    """Return, per column of a ``(k, n)`` id block, the first rank ``j`` with ``ids[j] == tok``
    (-1 when none)."""
    pos = np.full(tok.size, -1, dtype=np.int64)
    hit = np.empty(tok.size, dtype=bool)
    for j in range(ids.shape[0] - 1, -1, -1):  # last write wins: the first matching rank
        np.equal(ids[j], tok, out=hit)
        np.copyto(pos, j, where=hit)
    return pos


def at_rank(x: np.ndarray, pos: np.ndarray, fill: float) -> np.ndarray:
    """Return ``x[pos[i], i]`` per column, ``fill`` where ``pos`` is -1."""
    out = np.full(pos.size, fill, dtype=np.float64)
    for j in range(x.shape[0]):
        np.copyto(out, x[j], where=pos == j)
    return out


def logit_of(ids: np.ndarray, logits: np.ndarray, tok: np.ndarray, chosen: np.ndarray, chosen_logit: np.ndarray,
             chosen_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (logit, rank) of ``tok`` per column from the top-k, else from chosen_*; NaN / -1 if unknown."""
    rank = first_match(ids, tok.astype(ids.dtype, copy=False) if ids.dtype.kind == tok.dtype.kind else tok)
    found = rank >= 0
    logit = at_rank(logits, rank, np.nan)
    fb = ~found & (tok == chosen)
    return np.where(fb, chosen_logit, logit), np.where(fb, chosen_rank, rank)


def match(a_ids: np.ndarray, b_ids: np.ndarray, b_logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each rank of A, B's logit of the same id (its first occurrence in B's list): k
    comparisons of A's whole block with one rank of B, instead of a (k, k, n) match cube.

    Returns:
        ``(b_on_a, has)``, both ``(k, n)``: B's logit (NaN when absent) and whether A's id
        (not padding) occurs in B's top-k.
    """
    b_on_a = np.full(a_ids.shape, np.nan)
    has = np.zeros(a_ids.shape, dtype=bool)
    hit = np.empty(a_ids.shape, dtype=bool)
    for j in range(b_ids.shape[0] - 1, -1, -1):  # last write wins: the first matching rank of B
        np.equal(a_ids, b_ids[j], out=hit)
        np.copyto(b_on_a, b_logits[j], where=hit)
        has |= hit
    has &= a_ids >= 0
    return np.where(has, b_on_a, np.nan), has


def logsumexp_ranks(x: np.ndarray) -> np.ndarray:
    """log Σ exp over the ranks of a ``(k, n)`` float64 block, ignoring NaN (all-NaN: -inf)."""
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        m = np.fmax.reduce(x, axis=0) if x.shape[0] else np.full(x.shape[1], np.nan)
        mm = np.where(np.isfinite(m), m, 0.0)
        e = np.exp(x - mm)
        e[np.isnan(e)] = 0.0
        return np.log(rank_sum(e)) + mm


def softmax_kld(a_log: np.ndarray, b_on_a: np.ndarray, has: np.ndarray, lse_a: np.ndarray, lse_b: np.ndarray,
                a_top: np.ndarray, lb_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """KL(A‖B) over the shared top-k ids plus one pooled "rest" bucket, and Δp of A's top token.

    Probabilities are ``exp(logit - lse)``. Entries equal on both sides (same logit, same lse)
    reuse A's exp and log instead of recomputing them.

    Returns:
        ``(kld, dp)`` per column.
    """
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        p_c = np.zeros(a_log.shape)
        np.exp(a_log - lse_a, out=p_c, where=has)
        same = has & (b_on_a == a_log) & (lse_b == lse_a)
        q_c = np.where(same, p_c, 0.0)
        np.exp(b_on_a - lse_b, out=q_c, where=has & ~same)
        pos = (p_c > 0) & has
        lp = np.zeros(a_log.shape)
        np.log(p_c, out=lp, where=pos)
        lq = np.where(same, lp, 0.0)
        np.log(q_c, out=lq, where=pos & ~same)
        terms = np.where(pos, p_c * (lp - lq), 0.0)
        pr = np.clip(1.0 - rank_sum(p_c), 0.0, 1.0)
        qr = np.clip(1.0 - rank_sum(q_c), 0.0, 1.0)
        rest = np.where(pr > 0, pr * (np.log(pr) - np.log(np.where(qr > 0, qr, 1e-300))), 0.0)
        kld = np.maximum(rank_sum(terms) + rest, 0.0)
        dp = np.exp(lb_a - lse_b) - np.exp(a_top - lse_a)
    return kld, dp
