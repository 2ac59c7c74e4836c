"""Decision comparison: the vectorised comparison of aligned decision rows (tokens, ranks, gaps,
near ties, logit drift, top-k KLD, watched tokens) of two sides (:class:`~steptrace.differ.side.Side`).

:class:`Side`, :func:`load_side` and :data:`KEY_COLUMNS` are defined in :mod:`steptrace.differ.side`
and importable from here too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .policy import Policy
from .side import KEY_COLUMNS, KeyColumns, Side, load_side
from .topk import logit_of, logsumexp_ranks, match, rank_major, softmax_kld

__all__ = ["BLOCK", "KEY_COLUMNS", "DecisionDiff", "KeyColumns", "Side", "compare_decisions", "load_side"]

#: Rows compared per block: a block's (k, rows) float64 temporaries (1 MB at k = 8) stay in cache.
BLOCK = 1 << 14


class _Taker:
    """``x[idx]`` with a fill value where ``idx`` is -1, for many ``x`` and one ``idx`` (works for
    1-d and 2-d ``x``)."""

    def __init__(self, idx: np.ndarray) -> None:
        self.absent = idx < 0
        self.any_absent = bool(self.absent.any())
        self.safe = np.maximum(idx, 0) if self.any_absent else idx
        self.size = idx.size

    def __call__(self, x: np.ndarray, fill: float) -> np.ndarray:
        if x.shape[0] == 0:
            shape = (self.size,) + x.shape[1:]
            return np.full(shape, fill, dtype=x.dtype if np.can_cast(type(fill), x.dtype) else np.float64)
        out = x[self.safe]  # fancy indexing copies
        if self.any_absent:
            out[self.absent] = fill
        return out


def _filled(n: int, dtype: type, fill: float, written: np.ndarray) -> np.ndarray:
    """An array of ``n`` whose entries outside ``written`` hold ``fill`` (the rest is left for the
    caller to write: fresh memory is touched once, not twice)."""
    out = np.empty(n, dtype=dtype)
    out[~written] = fill
    return out


@dataclass
class DecisionDiff:
    """Per aligned row (both sides present), the comparison of two decisions. Arrays of equal
    length; rows where a side is absent hold fill values (-1, NaN, False)."""

    a_tok: np.ndarray
    b_tok: np.ndarray
    a_chosen: np.ndarray
    b_chosen: np.ndarray
    a_forced: np.ndarray
    b_forced: np.ndarray
    a_margin: np.ndarray
    b_margin: np.ndarray
    a_rank_of_b: np.ndarray  # rank of B's token among A's candidates, -1 if beyond A's top-k
    b_rank_of_a: np.ndarray
    a_gap: np.ndarray  # A's logit(a_tok) - A's logit(b_tok); NaN if unknown
    b_gap: np.ndarray  # B's logit(b_tok) - B's logit(a_tok)
    epsilon: np.ndarray  # the grid's near-tie threshold (or the fixed --epsilon)
    scale: np.ndarray  # the step's logit scale: max |top logit| of both sides, at least 1
    gap_noise: np.ndarray  # same-token rows: max change of a shared id's logit relative to the top's; else NaN
    logit_diff: np.ndarray  # max |delta| over shared top-k ids (and logsumexp)
    logit_tol: np.ndarray
    bitexact: np.ndarray
    drift: np.ndarray
    kld: np.ndarray
    dp: np.ndarray
    watched: dict[int, dict[str, np.ndarray]]
    near_tie: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # set by differ.neartie
    rule: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))  # which near-tie rule held
    noise: np.ndarray = field(default_factory=lambda: np.zeros(0))  # the pair's noise of the row's head


def compare_decisions(A: Side, B: Side, ia: np.ndarray, ib: np.ndarray, head: np.ndarray, heads: list[str],
                      policy: Policy, grid: str) -> DecisionDiff:
    """Compare aligned decision rows, vectorised.

    Args:
        A, B: both sides.
        ia, ib: for each aligned row, its row in A / B (-1 when absent).
        head: head code of each aligned row (index into ``heads``).
        heads: head names.
        policy: tolerances (ε and logit tolerance per head).
        grid: dtype of the logits' grid (coarser side), for the default ε.
    """
    n = ia.size
    both = (ia >= 0) & (ib >= 0)
    take_a, take_b = _Taker(ia), _Taker(ib)
    out = DecisionDiff(
        a_tok=take_a(A.argmax, -1), b_tok=take_b(B.argmax, -1),
        a_chosen=take_a(A.chosen, -1), b_chosen=take_b(B.chosen, -1),
        a_forced=take_a(A.forced, False), b_forced=take_b(B.forced, False),
        a_margin=take_a(A.margin, np.nan), b_margin=take_b(B.margin, np.nan),
        # every row present on both sides is written by _block; the others keep the fill
        a_rank_of_b=_filled(n, np.int64, -1, both), b_rank_of_a=_filled(n, np.int64, -1, both),
        a_gap=_filled(n, np.float64, np.nan, both), b_gap=_filled(n, np.float64, np.nan, both),
        epsilon=_filled(n, np.float64, np.nan, both), scale=_filled(n, np.float64, np.nan, both),
        gap_noise=_filled(n, np.float64, np.nan, both), logit_diff=_filled(n, np.float64, np.nan, both), logit_tol=_filled(n, np.float64, np.nan, both),
        bitexact=np.zeros(n, bool), drift=np.zeros(n, bool), kld=_filled(n, np.float64, np.nan, both),
        dp=_filled(n, np.float64, np.nan, both), watched={},
        near_tie=np.zeros(n, bool), rule=np.zeros(n, np.int8), noise=np.full(n, np.nan),
    )
    rows_both = np.flatnonzero(both)
    for lo in range(0, rows_both.size, BLOCK):
        r = rows_both[lo : lo + BLOCK]
        _block(out, A, B, ia[r], ib[r], head[r], r, heads, policy, grid)
    for tok in set(A.watched) & set(B.watched):
        al, ar, av = (take_a(x, f) for x, f in zip(A.watched[tok], (np.nan, -1, False)))
        bl, br, bv = (take_b(x, f) for x, f in zip(B.watched[tok], (np.nan, -1, False)))
        a_top = take_a(A.logits[:, 0].astype(np.float64) if A.rows else np.zeros(0), np.nan)
        b_top = take_b(B.logits[:, 0].astype(np.float64) if B.rows else np.zeros(0), np.nan)
        out.watched[tok] = {
            "a_logit": al, "a_rank": np.where(av, ar, -1), "b_logit": bl, "b_rank": np.where(bv, br, -1),
            # gap to the top: how much the watched token lost by (0 when it is the argmax)
            "a_lost_by": np.where(av, a_top - al, np.nan), "b_lost_by": np.where(bv, b_top - bl, np.nan),
            # smallest bias on the watched logit that changes the step's decision
            "a_bias": np.where(av, np.where(ar == 0, -out.a_margin, a_top - al), np.nan),
            "b_bias": np.where(bv, np.where(br == 0, -out.b_margin, b_top - bl), np.nan),
        }
    return out


def _block(out: DecisionDiff, A: Side, B: Side, ia: np.ndarray, ib: np.ndarray, head: np.ndarray, r: np.ndarray,
           heads: list[str], policy: Policy, grid: str) -> None:
    """Compare one block of rows present on both sides; write results at positions ``r``.

    The top-k lists are taken rank-major (``(k, rows)``, see :mod:`steptrace.differ.topk`); bit-exactness
    is judged on the float32 values as stored, the arithmetic is float64. Rows that are the same
    decision bit for bit (same argmax at rank 0 of identical lists, equal logsumexp, finite
    logits, no probability above e) get the results the arithmetic would give them: rank 0,
    gaps, logit difference, KLD and Δp 0. Only the other rows go through :func:`_general`.
    """
    kk = max(A.ids.shape[1], B.ids.shape[1])
    a_ids, b_ids = rank_major(A.ids, ia, kk, -1), rank_major(B.ids, ib, kk, -1)
    a_raw, b_raw = rank_major(A.logits, ia, kk, np.nan), rank_major(B.logits, ib, kk, np.nan)
    stored32 = a_raw.dtype == np.float32 and b_raw.dtype == np.float32  # as SPEC.md stores them
    a32, b32 = (a_raw, b_raw) if stored32 else (a_raw.astype(np.float32), b_raw.astype(np.float32))
    at, bt = A.argmax[ia], B.argmax[ib]
    la, lb = A.lse[ia], B.lse[ib]
    a_top, b_top = a_raw[0].astype(np.float64), b_raw[0].astype(np.float64)
    # epsilon and logit tolerance per head
    mag = np.fmax(np.abs(a_top), np.abs(b_top))
    eps = np.empty(r.size)
    ltol = np.empty(r.size)
    lo_h, hi_h = (int(head.min()), int(head.max())) if head.size else (0, 0)
    for h in range(lo_h, hi_h + 1):
        m = slice(None) if lo_h == hi_h else head == h
        dt = policy.for_head(heads[h])
        eps[m] = dt.epsilons(grid, mag[m])
        ltol[m] = dt.logit_tolerance(grid, mag[m])
    same = at == bt
    a_nan = np.isnan(a32)
    lse_nan = np.isnan(la) | np.isnan(lb)
    bitexact = (
        same
        & (A.k[ia] == B.k[ib])
        & (a_ids == b_ids).all(axis=0)
        & ((a32.view(np.uint32) == b32.view(np.uint32)) | a_nan & np.isnan(b32)).all(axis=0)
        & ((la.astype(np.float32).view(np.uint32) == lb.astype(np.float32).view(np.uint32)) | (np.isnan(la) & np.isnan(lb)))
    )
    with np.errstate(invalid="ignore"):
        ident = (stored32 & bitexact & (a_ids[0] == at) & (a_ids[0] >= 0)
                 & (~np.isinf(a32) & (~a_nan | (a_ids < 0))).all(axis=0)  # finite; NaN only as padding
                 & (lse_nan | (np.fmax.reduce(a32, axis=0).astype(np.float64) - la <= 1.0)))
    rest = np.flatnonzero(~ident)
    at_r = slice(int(r[0]), int(r[-1]) + 1) if r[-1] - r[0] == r.size - 1 else r  # usually a range
    out.epsilon[at_r] = eps
    out.scale[at_r] = np.maximum(np.nan_to_num(mag, nan=1.0, posinf=1.0), 1.0)
    out.logit_tol[at_r] = ltol
    out.bitexact[at_r] = bitexact
    res: dict[str, np.ndarray] = {}
    if rest.size:
        sub = slice(None) if rest.size == r.size else rest
        res = _general(A, B, ia[sub], ib[sub], a_ids[:, sub], b_ids[:, sub], a_raw[:, sub], b_raw[:, sub], at[sub],
                       bt[sub], la[sub], lb[sub], ltol[sub], same[sub], bitexact[sub])
    for name, value in _IDENTICAL_ROW.items():
        col = getattr(out, name)
        if rest.size == r.size:
            col[at_r] = res[name]
            continue
        blk = np.full(r.size, value, dtype=col.dtype)
        if rest.size:
            blk[rest] = res[name]
        col[at_r] = blk


#: What the comparison gives a row that is the same decision bit for bit (see :func:`_block`).
_IDENTICAL_ROW = {"a_rank_of_b": 0, "b_rank_of_a": 0, "a_gap": 0.0, "b_gap": 0.0, "gap_noise": 0.0,
                  "logit_diff": 0.0, "drift": False, "kld": 0.0, "dp": 0.0}


def _general(A: Side, B: Side, ia: np.ndarray, ib: np.ndarray, a_ids: np.ndarray, b_ids: np.ndarray,
             a_raw: np.ndarray, b_raw: np.ndarray, at: np.ndarray, bt: np.ndarray, la: np.ndarray, lb: np.ndarray,
             ltol: np.ndarray, same: np.ndarray, bitexact: np.ndarray) -> dict[str, np.ndarray]:
    """Ranks, gaps, gap noise, logit difference, drift, KLD and Δp of rows (rank-major blocks).

    Near ties are judged later (:mod:`steptrace.differ.neartie`), against the noise of the whole pair.
    """
    a_log, b_log = a_raw.astype(np.float64), b_raw.astype(np.float64)
    la_b, ra_b = logit_of(a_ids, a_log, bt, A.chosen[ia], A.chosen_logit[ia], A.chosen_rank[ia])
    lb_a, rb_a = logit_of(b_ids, b_log, at, B.chosen[ib], B.chosen_logit[ib], B.chosen_rank[ib])
    a_top, b_top = a_log[0], b_log[0]
    with np.errstate(invalid="ignore"):  # -inf - -inf (masked logits) is NaN: not a near tie
        a_gap, b_gap = a_top - la_b, b_top - lb_a
    # logits of ids present in both top-k lists
    b_on_a, has = match(a_ids, b_ids, b_log)
    with np.errstate(invalid="ignore"):
        # how far each shared id moved relative to the chosen token: the noise that can swap two
        # tokens (a shift common to every logit changes no decision)
        rel = np.abs((a_log - a_top) - (b_on_a - lb_a))
        gap_noise = np.fmax.reduce(np.where(has & np.isfinite(rel), rel, np.nan), axis=0)
        gap_noise = np.where(same, np.nan_to_num(gap_noise, nan=0.0), np.nan)
        delta = np.abs(a_log - b_on_a)
        both_nan = np.isnan(a_log) & np.isnan(b_on_a) & has
        delta = np.where(both_nan, 0.0, np.where(has & np.isnan(delta), np.inf, delta))
        ldiff = np.fmax.reduce(np.where(has, delta, np.nan), axis=0)
    lse_d = np.where(np.isnan(la) | np.isnan(lb), 0.0, np.abs(la - lb))
    ldiff = np.fmax(np.nan_to_num(ldiff, nan=0.0), lse_d)
    same_rows = ((a_log == b_log) | (np.isnan(a_log) & np.isnan(b_log))).all(axis=0)  # equal values, rank by rank
    kld, dp = _kld(a_ids, a_log, b_log, b_on_a, has, la, lb, a_top, lb_a, same_rows)
    with np.errstate(invalid="ignore"):
        drift = same & ~bitexact & (ldiff > ltol)
    return {"a_rank_of_b": ra_b, "b_rank_of_a": rb_a, "a_gap": np.where(same, 0.0, a_gap),
            "b_gap": np.where(same, 0.0, b_gap), "gap_noise": gap_noise, "logit_diff": ldiff, "drift": drift,
            "kld": kld, "dp": dp}


def _kld(a_ids: np.ndarray, a_log: np.ndarray, b_log: np.ndarray, b_on_a: np.ndarray, has: np.ndarray,
         la: np.ndarray, lb: np.ndarray, a_top: np.ndarray, lb_a: np.ndarray,
         same_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-k KL divergence and Δp of A's top token for a block (rank-major arrays).

    Probabilities come from the full softmax (``logit - logsumexp``) when both sides recorded
    logsumexp, else from the top-k. Rows whose probabilities are provably equal on both sides
    get exactly what the arithmetic gives them, 0 and 0, without computing it: B's logits equal
    A's rank by rank (and on every shared id), logsumexp equal (or computed from equal lists),
    every logit finite (NaN only as padding) and none above logsumexp + 1 (no probability
    overflows; a logsumexp computed from the list is never below its maximum), and B's logit of
    A's token equal to A's top logit.
    """
    need = np.isnan(la) | np.isnan(lb)
    with np.errstate(invalid="ignore"):
        finite = (np.isfinite(a_log) | (np.isnan(a_log) & (a_ids < 0))).all(axis=0)  # NaN only as padding
        top = np.fmax.reduce(a_log, axis=0)
        trivial = (same_rows & finite & ((b_on_a == a_log) | ~has).all(axis=0) & (lb_a == a_top)
                   & (need | ((la == lb) & (top - la <= 1.0))))
    kld, dp = np.zeros(a_top.size), np.zeros(a_top.size)
    rest = np.flatnonzero(~trivial)
    if not rest.size:
        return kld, dp
    if rest.size < a_top.size:
        a_log, b_log, b_on_a, has = a_log[:, rest], b_log[:, rest], b_on_a[:, rest], has[:, rest]
        la, lb, a_top, lb_a, need, same_rows = la[rest], lb[rest], a_top[rest], lb_a[rest], need[rest], same_rows[rest]
    lse_a, lse_b = la.copy(), lb.copy()
    if need.any():
        rows = slice(None) if need.all() else need
        lse_a[rows] = logsumexp_ranks(a_log[:, rows])
        lse_b[rows] = lse_a[rows]  # equal logit lists give equal sums
        own = need & ~same_rows
        if own.any():
            lse_b[own] = logsumexp_ranks(b_log[:, own])
    kld[rest], dp[rest] = softmax_kld(a_log, b_on_a, has, lse_a, lse_b, a_top, lb_a)
    return kld, dp
