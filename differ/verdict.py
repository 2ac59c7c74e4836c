"""Verdicts: per aligned row, per sample, and the two-axis first divergence.

Row verdicts, best to worst: ``identical`` (bit-exact decisions and digests), ``equivalent``
(same decision, everything within tolerance), ``drift`` (same decision, something beyond
tolerance), ``flip`` (different token, a near tie), ``divergent`` (different token, not a near
tie, :mod:`steptrace.differ.neartie`), ``missing`` (one side has no such step). Once the tokens fed back
differ (free-running decode), later rows of the sample are marked ``after`` and do not count as
fresh mismatches; rows of open-loop heads (not fed back: CTC frames, VAD chunks) never are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .align import BOTH, Alignment
from .decisions import DecisionDiff
from .neartie import HeadNoise, judge_near_ties, pair_noise
from .policy import Policy

VERDICTS = ("identical", "equivalent", "drift", "flip", "divergent", "missing")
IDENTICAL, EQUIVALENT, DRIFT, FLIP, DIVERGENT, MISSING = range(6)


@dataclass
class StepStatus:
    """Per aligned row: tensor status of its step and the resulting verdict.

    Attributes:
        t_fail: the step has a tensor beyond tolerance.
        t_first: index (into the tensor diff) of the first such tensor in execution order, -1 if none.
        t_exact: every compared tensor of the step is bit-exact (True when it has none).
        t_count: tensors compared at the step.
        verdict: the row verdict code.
        after: the row follows a divergence of the fed-back tokens in its sample.
        drifted: something at the step is beyond tolerance (a tensor, or the decision's logits).
        noise: each head's logit noise on agreeing steps (head code -> :class:`HeadNoise`).
    """

    t_fail: np.ndarray
    t_first: np.ndarray
    t_exact: np.ndarray
    t_count: np.ndarray
    verdict: np.ndarray
    after: np.ndarray
    drifted: np.ndarray
    noise: dict[int, HeadNoise] = field(default_factory=dict)


def tensor_status(al: Alignment, t_sample: np.ndarray, t_step: np.ndarray, t_order: np.ndarray,
                  t_within: np.ndarray, t_exact: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Summarise tensor comparisons per aligned row (through the row's sample and A step).

    Returns:
        ``(fail, first, exact, count)`` arrays, one entry per aligned row.
    """
    n = al.rows
    fail = np.zeros(n, bool)
    first = np.full(n, -1, np.int64)
    exact = np.ones(n, bool)
    count = np.zeros(n, np.int64)
    if t_sample.size == 0:
        return fail, first, exact, count
    key_t = t_sample * (1 << 32) + t_step
    order = np.lexsort((t_order, key_t))
    key_s = key_t[order]
    starts = np.flatnonzero(np.r_[True, key_s[1:] != key_s[:-1]])
    ukeys = key_s[starts]
    ends = np.r_[starts[1:], key_s.size]
    bad = ~t_within[order]
    g_fail = np.logical_or.reduceat(bad, starts)
    g_exact = np.logical_and.reduceat(t_exact[order], starts)
    g_count = ends - starts
    # first failing tensor of each group, in execution order
    badpos = np.where(bad, np.arange(key_s.size), key_s.size)
    g_firstpos = np.minimum.reduceat(badpos, starts)
    g_first = np.where(g_firstpos < key_s.size, order[np.minimum(g_firstpos, key_s.size - 1)], -1)
    key_r = al.sample * (1 << 32) + al.a_step
    pos = np.searchsorted(ukeys, key_r)
    pos_c = np.minimum(pos, ukeys.size - 1)
    hit = (al.a_step >= 0) & (pos < ukeys.size) & (ukeys[pos_c] == key_r)
    fail[hit] = g_fail[pos_c[hit]]
    first[hit] = g_first[pos_c[hit]]
    exact[hit] = g_exact[pos_c[hit]]
    count[hit] = g_count[pos_c[hit]]
    return fail, first, exact, count


def judge_rows(al: Alignment, dd: DecisionDiff, t_fail: np.ndarray, t_first: np.ndarray, t_exact: np.ndarray,
               t_count: np.ndarray, *, heads: list[str], policy: Policy,
               open_loop: np.ndarray | None = None) -> StepStatus:
    """Give every aligned row its verdict and its ``after`` flag.

    Args:
        heads: head names (``al.head`` codes index into it).
        policy: tolerances (the near-tie rule of each head).
        open_loop: per head code, whether the head's decisions are not fed back: its rows never
            make later rows "after" a divergence and are never "after" themselves.
    """
    both = al.gap == BOTH
    same = dd.a_tok == dd.b_tok
    # a divergence of what was fed back (chosen tokens) or a step on one side only
    event = ~both | (dd.a_chosen != dd.b_chosen)
    open_rows = None
    if open_loop is not None and open_loop.any():
        open_rows = open_loop[al.head]
        event &= ~open_rows
    after = _after(al.sample, al.pos, event)
    if open_rows is not None:
        after &= ~open_rows
    noise = pair_noise(dd, both & same & ~after, al.head, heads, policy)
    judge_near_ties(dd, both & ~same, al.head, heads, policy, noise)
    v = np.full(al.rows, EQUIVALENT, np.int8)
    drifted = both & (t_fail | dd.drift)
    v[both & same & dd.bitexact & t_exact] = IDENTICAL
    v[both & same & drifted] = DRIFT
    v[both & ~same & dd.near_tie] = FLIP
    v[both & ~same & ~dd.near_tie] = DIVERGENT
    # same own decision, but different tokens were fed back (forced or sampled differently)
    v[both & same & (dd.a_chosen != dd.b_chosen)] = DIVERGENT
    v[~both] = MISSING
    return StepStatus(t_fail, t_first, t_exact, t_count, v, after, drifted, noise)


def _after(sample: np.ndarray, pos: np.ndarray, event: np.ndarray) -> np.ndarray:
    """True for rows of a (sample, pos) group that follows a group with an event in its sample.

    Rows must be sorted by (sample, pos): a row is after an event when its position is beyond
    the position of its sample's first event row.
    """
    n = sample.size
    if n == 0:
        return np.zeros(0, bool)
    ev = np.flatnonzero(event)
    if not ev.size:
        return np.zeros(n, bool)
    lo = int(sample.min())
    if lo < 0:
        sample = sample - lo
    ev_sample = sample[ev]
    first = np.r_[True, ev_sample[1:] != ev_sample[:-1]]  # each sample's first event row
    first_pos = np.full(int(sample.max()) + 1, np.iinfo(np.int64).max, dtype=np.int64)
    first_pos[ev_sample[first]] = pos[ev[first]]
    return pos > first_pos[sample]
