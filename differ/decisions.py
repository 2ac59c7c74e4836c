"""Decision comparison: one trace's decisions as dense numpy columns, and the vectorised
comparison of aligned decision rows (tokens, ranks, gaps, near ties, logit drift, top-k KLD,
watched tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracefmt import TraceReader

from .columns import codes, combined, dense_lists, numpy_col
from .policy import Policy

#: Rows compared per block (bounds the k x k top-k match matrices).
BLOCK = 1 << 16
KEY_COLUMNS = ("frame", "chunk", "position", "emission")


@dataclass
class Side:
    """One trace's decision rows as numpy columns (row order: sample, step, head).

    Attributes hold one entry per row; ``ids``/``logits`` are ``(rows, kmax)`` padded with -1
    and NaN; ``watched`` maps a watched token id to ``(logit, rank, valid)`` arrays.
    """

    sample: np.ndarray
    step: np.ndarray
    head: np.ndarray
    chosen: np.ndarray
    argmax: np.ndarray
    forced: np.ndarray
    margin: np.ndarray
    lse: np.ndarray  # NaN where null
    ids: np.ndarray
    logits: np.ndarray
    k: np.ndarray
    chosen_logit: np.ndarray  # NaN where unknown
    chosen_rank: np.ndarray  # -1 where unknown
    keys: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    watched: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    piece: pa.Array | None = None

    @property
    def rows(self) -> int:
        """Number of decision rows."""
        return int(self.sample.size)


def load_side(reader: TraceReader, samples: list[str], heads: list[str], watched_ids: list[int],
              keep: list[str] | None = None) -> Side:
    """Read a trace's decisions into a :class:`Side`.

    Args:
        reader: the trace.
        samples: sorted universe of sample ids (codes index into it).
        heads: sorted universe of heads to keep (other heads are dropped).
        watched_ids: watched token ids to extract.
        keep: only these samples (None: all).
    """
    t = reader.decisions(sample=keep) if keep is not None else reader.decisions()
    head_codes = codes(t["head"], heads)
    if (head_codes < 0).any():
        t = t.filter(pa.array(head_codes >= 0))
        head_codes = head_codes[head_codes >= 0]
    ids, k = dense_lists(t["topk_ids"], np.int64, -1)
    logits, _ = dense_lists(t["topk_logits"], np.float64, np.nan)
    lse, _ = numpy_col(t["logsumexp"], np.float64, np.nan)
    cl, cl_valid = numpy_col(t["chosen_logit"], np.float64, np.nan)
    cr, cr_valid = numpy_col(t["chosen_rank"], np.int64, -1)
    side = Side(
        sample=codes(t["sample"], samples),
        step=numpy_col(t["step"], np.int64, 0)[0],
        head=head_codes,
        chosen=numpy_col(t["chosen"], np.int64, -1)[0],
        argmax=numpy_col(t["argmax"], np.int64, -1)[0],
        forced=numpy_col(t["forced"], bool, False)[0],
        margin=numpy_col(t["margin"], np.float64, np.nan)[0],
        lse=lse,
        ids=ids,
        logits=logits,
        k=k,
        chosen_logit=np.where(cl_valid, cl, np.nan),
        chosen_rank=np.where(cr_valid, cr, -1),
        piece=combined(t["piece"]),
    )
    for name in KEY_COLUMNS:
        side.keys[name] = numpy_col(t[name], np.int64, 0)
    if watched_ids and t.num_rows:
        w = combined(t["watched"])
        flat = pc.list_flatten(w)
        parents = pc.list_parent_indices(w).to_numpy()
        wid = flat.field("id").to_numpy(zero_copy_only=False)
        wl = flat.field("logit").fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        wr = flat.field("rank").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        for tok in watched_ids:
            m = wid == tok
            logit = np.full(t.num_rows, np.nan)
            rank = np.full(t.num_rows, -1, dtype=np.int64)
            valid = np.zeros(t.num_rows, dtype=bool)
            logit[parents[m]] = wl[m]
            rank[parents[m]] = wr[m]
            valid[parents[m]] = True
            side.watched[tok] = (logit, rank, valid)
    return side


def _take(x: np.ndarray, idx: np.ndarray, fill: float | int) -> np.ndarray:
    """``x[idx]`` with ``fill`` where ``idx`` is -1 (works for 1-d and 2-d ``x``)."""
    if x.shape[0] == 0:
        shape = (idx.size,) + x.shape[1:]
        return np.full(shape, fill, dtype=x.dtype if np.can_cast(type(fill), x.dtype) else np.float64)
    out = x[np.maximum(idx, 0)]  # fancy indexing copies
    out[idx < 0] = fill
    return out


def _logit_of(ids: np.ndarray, logits: np.ndarray, tok: np.ndarray, chosen: np.ndarray,
              chosen_logit: np.ndarray, chosen_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (logit, rank) of ``tok`` per row from the top-k, else from chosen_*; NaN / -1 if unknown."""
    hit = ids == tok[:, None]
    found = hit.any(axis=1)
    pos = hit.argmax(axis=1)
    rows = np.arange(tok.size)
    logit = np.where(found, logits[rows, pos], np.nan)
    rank = np.where(found, pos, -1)
    fb = ~found & (tok == chosen)
    logit = np.where(fb, chosen_logit, logit)
    rank = np.where(fb, chosen_rank, rank)
    return logit, rank


def _logsumexp_rows(x: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        m = np.nanmax(np.where(np.isnan(x), -np.inf, x), axis=1)
        mm = np.where(np.isfinite(m), m, 0.0)
        s = np.nansum(np.exp(x - mm[:, None]), axis=1)
        return np.log(s) + mm


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
    epsilon: np.ndarray
    near_tie: np.ndarray
    logit_diff: np.ndarray  # max |delta| over shared top-k ids (and logsumexp)
    logit_tol: np.ndarray
    bitexact: np.ndarray
    drift: np.ndarray
    kld: np.ndarray
    dp: np.ndarray
    watched: dict[int, dict[str, np.ndarray]]


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
    a_tok, b_tok = _take(A.argmax, ia, -1), _take(B.argmax, ib, -1)
    out = DecisionDiff(
        a_tok=a_tok, b_tok=b_tok,
        a_chosen=_take(A.chosen, ia, -1), b_chosen=_take(B.chosen, ib, -1),
        a_forced=_take(A.forced, ia, False), b_forced=_take(B.forced, ib, False),
        a_margin=_take(A.margin, ia, np.nan), b_margin=_take(B.margin, ib, np.nan),
        a_rank_of_b=np.full(n, -1, np.int64), b_rank_of_a=np.full(n, -1, np.int64),
        a_gap=np.full(n, np.nan), b_gap=np.full(n, np.nan), epsilon=np.full(n, np.nan),
        near_tie=np.zeros(n, bool), logit_diff=np.full(n, np.nan), logit_tol=np.full(n, np.nan),
        bitexact=np.zeros(n, bool), drift=np.zeros(n, bool), kld=np.full(n, np.nan), dp=np.full(n, np.nan),
        watched={},
    )
    rows_both = np.flatnonzero(both)
    for lo in range(0, rows_both.size, BLOCK):
        r = rows_both[lo : lo + BLOCK]
        _block(out, A, B, ia[r], ib[r], head[r], r, heads, policy, grid)
    for tok in set(A.watched) & set(B.watched):
        al, ar, av = (_take(x, ia, f) for x, f in zip(A.watched[tok], (np.nan, -1, False)))
        bl, br, bv = (_take(x, ib, f) for x, f in zip(B.watched[tok], (np.nan, -1, False)))
        a_top = _take(A.logits[:, 0] if A.rows else np.zeros(0), ia, np.nan)
        b_top = _take(B.logits[:, 0] if B.rows else np.zeros(0), ib, np.nan)
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
    """Compare one block of rows present on both sides; write results at positions ``r``."""
    a_ids, a_log = A.ids[ia], A.logits[ia]
    b_ids, b_log = B.ids[ib], B.logits[ib]
    kk = max(a_ids.shape[1], b_ids.shape[1])
    if a_ids.shape[1] < kk:
        a_ids = np.pad(a_ids, ((0, 0), (0, kk - a_ids.shape[1])), constant_values=-1)
        a_log = np.pad(a_log, ((0, 0), (0, kk - a_log.shape[1])), constant_values=np.nan)
    if b_ids.shape[1] < kk:
        b_ids = np.pad(b_ids, ((0, 0), (0, kk - b_ids.shape[1])), constant_values=-1)
        b_log = np.pad(b_log, ((0, 0), (0, kk - b_log.shape[1])), constant_values=np.nan)
    at, bt = A.argmax[ia], B.argmax[ib]
    la_b, ra_b = _logit_of(a_ids, a_log, bt, A.chosen[ia], A.chosen_logit[ia], A.chosen_rank[ia])
    lb_a, rb_a = _logit_of(b_ids, b_log, at, B.chosen[ib], B.chosen_logit[ib], B.chosen_rank[ib])
    a_top, b_top = a_log[:, 0], b_log[:, 0]
    a_gap, b_gap = a_top - la_b, b_top - lb_a
    # epsilon and logit tolerance per head
    mag = np.fmax(np.abs(a_top), np.abs(b_top))
    eps = np.empty(r.size)
    ltol = np.empty(r.size)
    for h in np.unique(head):
        m = head == h
        dt = policy.for_head(heads[h])
        e = dt.epsilons(grid, mag[m])
        eps[m] = e
        ltol[m] = dt.logit_tolerance(grid, mag[m])
    same = at == bt
    with np.errstate(invalid="ignore"):
        near = (~same) & (ra_b >= 0) & (rb_a >= 0) & (a_gap <= eps) & (b_gap <= eps)
    # logits of ids present in both top-k lists
    match = (a_ids[:, :, None] == b_ids[:, None, :]) & (a_ids[:, :, None] >= 0)
    has = match.any(axis=2)
    bpos = match.argmax(axis=2)
    rows = np.arange(r.size)[:, None]
    b_on_a = np.where(has, b_log[rows, bpos], np.nan)
    with np.errstate(invalid="ignore"):
        delta = np.abs(a_log - b_on_a)
        both_nan = np.isnan(a_log) & np.isnan(b_on_a) & has
        delta = np.where(both_nan, 0.0, np.where(has & np.isnan(delta), np.inf, delta))
        ldiff = np.fmax.reduce(np.where(has, delta, np.nan), axis=1) if kk else np.zeros(r.size)
    la, lb = A.lse[ia], B.lse[ib]
    lse_d = np.where(np.isnan(la) | np.isnan(lb), 0.0, np.abs(la - lb))
    ldiff = np.fmax(np.nan_to_num(ldiff, nan=0.0), lse_d)
    bitexact = (
        same
        & (A.k[ia] == B.k[ib])
        & (a_ids == b_ids).all(axis=1)
        & ((a_log.astype(np.float32).view(np.uint32) == b_log.astype(np.float32).view(np.uint32)) | np.isnan(a_log) & np.isnan(b_log)).all(axis=1)
        & ((la.astype(np.float32).view(np.uint32) == lb.astype(np.float32).view(np.uint32)) | (np.isnan(la) & np.isnan(lb)))
    )
    # probabilities: full softmax when logsumexp is known on both sides, else over the top-k
    lse_a = np.where(np.isnan(la) | np.isnan(lb), _logsumexp_rows(a_log), la)
    lse_b = np.where(np.isnan(la) | np.isnan(lb), _logsumexp_rows(b_log), lb)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        p = np.exp(a_log - lse_a[:, None])
        q = np.exp(b_on_a - lse_b[:, None])
        p_c = np.where(has, p, 0.0)
        q_c = np.where(has, q, 0.0)
        terms = np.where((p_c > 0) & has, p_c * (np.log(p_c) - np.log(q_c)), 0.0)
        pr = np.clip(1.0 - p_c.sum(axis=1), 0.0, 1.0)
        qr = np.clip(1.0 - q_c.sum(axis=1), 0.0, 1.0)
        rest = np.where(pr > 0, pr * (np.log(pr) - np.log(np.where(qr > 0, qr, 1e-300))), 0.0)
        kld = np.maximum(terms.sum(axis=1) + rest, 0.0)
        p_at = np.exp(a_top - lse_a)
        q_at = np.exp(lb_a - lse_b)
        dp = q_at - p_at
    out.a_rank_of_b[r] = ra_b
    out.b_rank_of_a[r] = rb_a
    out.a_gap[r] = np.where(same, 0.0, a_gap)
    out.b_gap[r] = np.where(same, 0.0, b_gap)
    out.epsilon[r] = eps
    out.near_tie[r] = near
    out.logit_diff[r] = ldiff
    out.logit_tol[r] = ltol
    out.bitexact[r] = bitexact
    with np.errstate(invalid="ignore"):
        out.drift[r] = same & ~bitexact & (ldiff > ltol)
    out.kld[r] = kld
    out.dp[r] = dp
