"""Deriving a decision row from a full logits vector, exactly as SPEC.md §3.2 defines it.

This numpy version serves the JSONL importer and any writer that holds logits on the host.
Order: larger logit first; equal logits by smaller id; NaN after every number (even -inf).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import TraceUsageError


@dataclass(frozen=True, slots=True)
class Decision:
    """Everything SPEC.md stores about one decision that can be derived from logits."""

    chosen: int
    argmax: int
    topk_ids: np.ndarray  # int32, length k
    topk_logits: np.ndarray  # float32, length k
    margin: float
    logsumexp: float
    chosen_logit: float
    chosen_rank: int
    watched: list[dict]  # [{"id": int, "logit": float, "rank": int}]


def rank_of(x: np.ndarray, nan: np.ndarray, token: int) -> int:
    """Return the 0-based rank of ``token`` in ``x`` under SPEC.md ordering.

    Args:
        x: logits as float64.
        nan: ``np.isnan(x)``.
        token: the id to rank.
    """
    if nan[token]:
        return int(x.size - np.count_nonzero(nan) + np.count_nonzero(nan[:token]))
    v = x[token]
    return int(np.count_nonzero(x > v) + np.count_nonzero(x[:token] == v))


def logsumexp(x: np.ndarray) -> float:
    """Return log(sum(exp(x))) in float64; NaN if any element is NaN."""
    if x.size == 0 or np.isnan(x).any():
        return float("nan")
    m = float(x.max())
    if not np.isfinite(m):
        return m
    return m + float(np.log(np.exp(x - m).sum()))


def decide(
    logits: np.ndarray,
    *,
    k: int = 8,
    chosen: int | None = None,
    watched: Iterable[int] = (),
) -> Decision:
    """Derive a decision from one full logits vector.

    Args:
        logits: 1-d array of logits (any float dtype; NaN and ±Inf allowed).
        k: how many top candidates to keep (at least 2; fewer if the vocabulary is smaller).
        chosen: the token the runtime actually used; defaults to the argmax.
        watched: token ids whose logit and rank to record (e.g. EOS).

    Returns:
        The :class:`Decision`.

    Raises:
        TraceUsageError: logits are not 1-d, hold fewer than 2 entries, k < 2, or an id is
            out of range.
    """
    if np.ndim(logits) != 1:
        raise TraceUsageError(f"logits must be 1-d, got shape {np.shape(logits)}; pass the last position only")
    x = np.asarray(logits)
    v = x.size
    if v < 2:
        raise TraceUsageError(f"logits hold {v} entries; a decision needs at least 2")
    if k < 2:
        raise TraceUsageError(f"k={k}: SPEC.md needs at least the top 2 candidates")
    k = min(k, v)
    watched = [int(t) for t in watched]
    if x.dtype in (np.float32, np.float64):
        am = first_max(x)
        if am is not None:
            return _decide_numbers(x, k, am, chosen, watched)
    x = x.astype(np.float64)
    nan = np.isnan(x)
    key = np.where(nan, -np.inf, x)
    kth = np.partition(key, v - k)[v - k]
    cand = np.flatnonzero(key >= kth)
    order = np.lexsort((cand, nan[cand], -key[cand]))[:k]
    top = cand[order]
    topk_ids = top.astype(np.int32)
    topk_logits = x[top].astype(np.float32)
    argmax = int(top[0])
    if chosen is None:
        chosen = argmax
    for t in (chosen, *watched):
        if not 0 <= int(t) < v:
            raise TraceUsageError(f"token id {t} is outside the logits (vocabulary of {v})")
    return Decision(
        chosen=int(chosen),
        argmax=argmax,
        topk_ids=topk_ids,
        topk_logits=topk_logits,
        margin=float(np.float32(float(topk_logits[0]) - float(topk_logits[1]))),
        logsumexp=logsumexp(x),
        chosen_logit=float(np.float32(x[chosen])),
        chosen_rank=rank_of(x, nan, int(chosen)),
        watched=[
            {"id": int(t), "logit": float(np.float32(x[t])), "rank": rank_of(x, nan, int(t))} for t in watched
        ],
    )


def _decide_numbers(x: np.ndarray, k: int, am: int, chosen: int | None, watched: list[int]) -> Decision:
    """:func:`decide` for float32/float64 logits holding no NaN (the common case), on the array
    as it is: ordering float32 values needs no float64 copy, and ``am`` (the first maximum) is
    the argmax with rank 0. Gives exactly what the general path gives."""
    v = x.size
    kth = np.partition(x, v - k)[v - k]
    cand = np.flatnonzero(x >= kth)
    top = cand[np.argsort(-x[cand], kind="stable")[:k]]  # cand ascends: ties stay by smaller id
    topk_logits = x[top].astype(np.float32)
    if chosen is None:
        chosen = am
    for t in (chosen, *watched):
        if not 0 <= int(t) < v:
            raise TraceUsageError(f"token id {t} is outside the logits (vocabulary of {v})")
    m = float(x[am])
    if math.isfinite(m):
        e = np.subtract(x, m, dtype=np.float64)
        lse = m + float(np.log(np.exp(e, out=e).sum()))
    else:
        lse = m
    chosen = int(chosen)
    return Decision(
        chosen=chosen,
        argmax=am,
        topk_ids=top.astype(np.int32),
        topk_logits=topk_logits,
        margin=float(np.float32(float(topk_logits[0]) - float(topk_logits[1]))),
        logsumexp=lse,
        chosen_logit=float(np.float32(x[chosen])),
        chosen_rank=0 if chosen == am else _rank_number(x, chosen),
        watched=[{"id": t, "logit": float(np.float32(x[t])), "rank": _rank_number(x, t)} for t in watched],
    )


def _rank_number(x: np.ndarray, token: int) -> int:
    """:func:`rank_of` in logits holding no NaN."""
    val = x[token]
    return int(np.count_nonzero(x > val) + np.count_nonzero(x[:token] == val))


def first_max(logits: np.ndarray) -> int | None:
    """Return the argmax of 1-d logits by SPEC.md §3.2's order (the first of equal maxima) when
    that needs no sort: logits of a numeric dtype holding no NaN. None otherwise (use
    :func:`decide`, whose order puts NaN last).

    Args:
        logits: 1-d numpy array.
    """
    x = logits
    if x.ndim != 1 or x.size == 0 or x.dtype.kind not in "fiub":
        return None
    am = int(x.argmax())  # numpy's argmax stops at the first NaN
    return am if x.dtype.kind != "f" or x[am] == x[am] else None


def decide_many(
    logits: np.ndarray,
    *,
    k: int,
    chosen: list[int | None],
    watched: list[int],
) -> list[Decision]:
    """:func:`decide` of every row of a 2-d array, with the same results, in a few numpy calls
    over the whole array (a writer deriving the decisions of many steps at once spends its time
    in numpy, which releases the GIL, instead of in Python, which the model's thread waits for).

    Rows holding NaN, and rows whose k-th largest logit is tied with logits outside the top k,
    are handed to :func:`decide` (their order needs a full sort).

    Args:
        logits: ``(rows, vocabulary)`` array.
        k: top candidates kept (at least 2).
        chosen: per row, the id used (None: the argmax).
        watched: ids watched in every row.

    Returns:
        One :class:`Decision` per row.
    """
    cols, rest = decide_columns(logits, k=k, chosen=chosen, watched=watched)
    out: list[Decision | None] = [None] * len(chosen)
    if cols is not None:
        _decisions_of_columns(cols, watched, out)
    for i, d in rest.items():
        out[i] = d
    return out  # type: ignore[return-value]


class ExactColumns(NamedTuple):
    """:func:`decide` of the rows ``rows`` of a 2-d logits array, column by column (rows whose
    top k are exactly the logits above the k-th: no NaN, no tie at the k-th)."""

    rows: np.ndarray  # int64 (n,): which rows of the logits
    chosen: np.ndarray  # int64 (n,)
    argmax: np.ndarray  # int64 (n,)
    topk_ids: np.ndarray  # int32 (n, k)
    topk_logits: np.ndarray  # float32 (n, k)
    margin: np.ndarray  # float32 (n,)
    logsumexp: np.ndarray  # float64 (n,)
    values: np.ndarray  # float32 (n, 1 + watched): the chosen id's logit, then each watched id's
    ranks: np.ndarray  # int64 (n, 1 + watched): their ranks


def decide_columns(
    logits: np.ndarray, *, k: int, chosen: list[int | None], watched: list[int],
) -> tuple[ExactColumns | None, dict[int, Decision]]:
    """:func:`decide_many` as columns: the rows it can derive in a few numpy calls over the whole
    array as :class:`ExactColumns` (None: none), and the others (NaN, a tie at the k-th, or
    logits of another dtype) decided one by one by :func:`decide`, by row.

    Raises:
        TraceUsageError: a chosen or watched id outside the vocabulary.
    """
    x = np.asarray(logits)
    n, v = x.shape
    for t in [c for c in chosen if c is not None] + list(watched):
        if not 0 <= int(t) < v:
            raise TraceUsageError(f"token id {t} is outside the logits (vocabulary of {v})")
    k = min(k, v)
    cols = None
    done = np.zeros(n, bool)
    if n and x.dtype in (np.float32, np.float64) and k >= 2:
        am = x.argmax(axis=1)
        m = x[np.arange(n), am]
        kth = np.partition(x, v - k, axis=1)[:, v - k]
        above = x >= kth[:, None]
        exact = np.flatnonzero(~np.isnan(m) & (np.count_nonzero(above, axis=1) == k))  # no NaN, no tie at the k-th
        if exact.size:
            cols = _exact_columns(x, exact, above, am, m, k, chosen, watched)
            done[exact] = True
    rest = {i: decide(x[i], k=k, chosen=chosen[i], watched=watched) for i in np.flatnonzero(~done).tolist()}
    return cols, rest


_scratch = threading.local()


def _exact_columns(x: np.ndarray, rows: np.ndarray, above: np.ndarray, am: np.ndarray, m: np.ndarray, k: int,
                   chosen: list[int | None], watched: list[int]) -> ExactColumns:
    """:func:`decide_columns` for ``rows``, whose top k are exactly the logits ``above`` the k-th."""
    n, v = rows.size, x.shape[1]
    xs = x[rows] if rows.size < x.shape[0] else x
    if rows.size < x.shape[0]:
        above, am, m = above[rows], am[rows], m[rows]
    cand = np.nonzero(above)[1].reshape(n, k)  # ids ascending in each row
    vals = np.take_along_axis(xs, cand, 1)
    top = np.take_along_axis(cand, np.argsort(-vals, axis=1, kind="stable"), 1)  # ties stay by smaller id
    topk_logits = np.take_along_axis(xs, top, 1).astype(np.float32)
    own = np.array([a if chosen[r] is None else chosen[r] for r, a in zip(rows.tolist(), am.tolist())], np.int64)
    ids = np.column_stack([own, np.tile(np.asarray(watched, np.int64), (n, 1))]) if watched else own[:, None]
    tv = np.take_along_axis(xs, ids, 1)
    ranks = np.zeros(ids.shape, np.int64)
    col = np.arange(v)
    for j in range(ids.shape[1]):
        need = np.flatnonzero(ids[:, j] != am)  # the argmax (the first maximum) ranks 0
        if need.size:
            t, xn = tv[need, j : j + 1], xs[need]
            ranks[need, j] = (np.count_nonzero(xn > t, axis=1)
                              + np.count_nonzero((xn == t) & (col < ids[need, j : j + 1]), axis=1))
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        finite = np.isfinite(m)
        buf = getattr(_scratch, "e", None)
        if buf is None or buf.size < xs.size:
            buf = _scratch.e = np.empty(max(xs.size, 1 << 16), np.float64)  # fresh memory is slow to touch
        e = buf[: xs.size].reshape(xs.shape)
        np.subtract(xs, np.where(finite, m, 0.0)[:, None], out=e, dtype=np.float64)
        np.exp(e, out=e)
        lse = np.where(finite, m + np.log(e.sum(axis=1)), m)
        margins = (topk_logits[:, 0].astype(np.float64) - topk_logits[:, 1]).astype(np.float32)
    return ExactColumns(rows, own, am, top.astype(np.int32), topk_logits, margins, lse, tv.astype(np.float32), ranks)


def _decisions_of_columns(c: ExactColumns, watched: list[int], out: list) -> None:
    """Fill ``out`` (by row) with the :class:`Decision` of each row of ``c``."""
    # one conversion per column, then a Python step per row: the writer's thread holds the GIL
    # for these loops, which the model's thread waits for
    for j, r, ch, a, mg, ls, rk, tl in zip(range(c.rows.size), c.rows.tolist(), c.chosen.tolist(), c.argmax.tolist(),
                                            c.margin.tolist(), c.logsumexp.tolist(), c.ranks.tolist(), c.values.tolist()):
        out[r] = Decision(
            chosen=ch, argmax=a, topk_ids=c.topk_ids[j], topk_logits=c.topk_logits[j], margin=mg, logsumexp=ls,
            chosen_logit=tl[0], chosen_rank=rk[0],
            watched=[{"id": w, "logit": lg, "rank": r_} for w, lg, r_ in zip(watched, tl[1:], rk[1:])] if watched else [],
        )
