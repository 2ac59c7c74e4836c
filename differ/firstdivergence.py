"""A pair's divergence values built from its aligned rows: the :class:`FirstDivergence` of a
row (tokens, margins, gaps, watched tokens, near-tie evidence), the culprit tensor, looked back
for at earlier steps when the row's own step has none (:class:`Lookback`), and the tensors to
confirm with values.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from steptrace.tracefmt import TraceReader

from .align import A_ONLY, B_ONLY, BOTH, Alignment
from .decisions import DecisionDiff
from .divergence import Culprit, FirstDivergence, NearTieEvidence, WatchedToken
from .metrics import BASIS_STATS
from .neartie import RULES, ulps
from .policy import Policy
from .side import Side
from .tensors import BASES, TensorDiff
from .verdict import VERDICTS, StepStatus


def or_none(x: Any) -> Any:
    """Return a numpy scalar as a Python value, its NaN / -1 sentinel as None."""
    if isinstance(x, (np.floating, float)):
        return None if np.isnan(x) else float(x)
    if isinstance(x, (np.integer, int)):
        return None if x < 0 else int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


def culprit_at(td: TensorDiff | None, idx: int) -> Culprit | None:
    """Return tensor comparison ``idx`` of ``td`` as a :class:`Culprit` (None when ``idx`` is -1)."""
    if td is None or idx < 0:
        return None
    c = td.cols
    return Culprit(td.names[int(c["name"][idx])], int(c["call"][idx]), int(c["a_step"][idx]), int(c["order"][idx]),
                   td.metrics(idx))


class Lookback:
    """Finds, for a step without a tensor beyond tolerance, the tensors that fed it: the latest
    earlier step of the sample with a tensor beyond tolerance, and there the first such tensor in
    execution order (an encoder run once at step 0 whose frames are decided at later steps)."""

    def __init__(self, td: TensorDiff | None) -> None:
        self.idx = np.zeros(0, np.int64)
        self.key = np.zeros(0, np.int64)
        if td is not None and td.rows:
            c = td.cols
            bad = np.flatnonzero(~c["within"])
            # sort by (sample, step, order): the first entry of a (sample, step) is its first in order
            order = np.lexsort((c["order"][bad], c["a_step"][bad], c["sample"][bad]))
            self.idx = bad[order]
            self.key = (c["sample"][self.idx].astype(np.int64) << 32) | c["a_step"][self.idx].astype(np.int64)

    def __call__(self, sample: int, step: int) -> int:
        """Return the tensor comparison index to name for ``(sample, step)``, -1 when none."""
        pos = int(np.searchsorted(self.key, (sample << 32) | step)) - 1  # the last key before the step
        if pos < 0 or int(self.key[pos]) >> 32 != sample:
            return -1
        first = int(np.searchsorted(self.key, self.key[pos]))  # that step's first tensor in order
        return int(self.idx[first])


def first_divergence(i: int, sample: str, al: Alignment, dd: DecisionDiff, st: StepStatus, td: TensorDiff | None,
                     heads: list[str], A: Side, B: Side, ra: TraceReader, rb: TraceReader,
                     id_to_name: dict[int, str], resync: bool, policy: Policy, grid: str,
                     lookback: Lookback) -> FirstDivergence:
    """Return the :class:`FirstDivergence` of aligned row ``i`` of sample ``sample``.

    Args:
        i: the aligned row.
        sample: its sample id.
        al, dd, st, td: the pair's alignment, decision comparison, row verdicts and tensor
            comparison (None when no tensors were compared).
        heads: head names; A, B: both sides' decisions; ra, rb: both traces (for the pieces).
        id_to_name: watched token id -> name.
        resync: the alignment is ``resync`` (a missing step is then a drop or an insertion).
        policy, grid: the tolerances and the logits' grid, for the near-tie evidence.
        lookback: finds the culprit at an earlier step when the row's step has none.
    """
    kind = VERDICTS[int(st.verdict[i])]
    detail = None
    gap = int(al.gap[i])
    if gap == A_ONLY:
        detail = "dropped" if resync else "candidate has no such step (ended early)"
    elif gap == B_ONLY:
        detail = "inserted" if resync else "candidate has extra steps (over-generation)"
    a_step, b_step = or_none(al.a_step[i]), or_none(al.b_step[i])
    step = a_step if a_step is not None else b_step
    a_tok, b_tok = or_none(dd.a_tok[i]), or_none(dd.b_tok[i])
    watched = []
    for tok, w in dd.watched.items():
        if tok in (a_tok, b_tok) or (gap != BOTH and (w["a_rank"][i] >= 0 or w["b_rank"][i] >= 0)):
            watched.append(WatchedToken(id_to_name.get(tok, str(tok)), int(tok), or_none(w["a_rank"][i]),
                                        or_none(w["b_rank"][i]), or_none(w["a_lost_by"][i]),
                                        or_none(w["b_lost_by"][i]), or_none(w["b_bias"][i])))
    evidence = None
    if gap == BOTH and a_tok != b_tok:
        h = int(al.head[i])
        tol = policy.for_head(heads[h] if heads else "")
        hn = st.noise.get(h)
        a_u, b_u = ulps(dd, i, grid)
        evidence = NearTieEvidence(
            rule=RULES[int(dd.rule[i])] or None, shift=or_none(dd.a_gap[i] + dd.b_gap[i]),
            noise=hn.value if hn else None, noise_percentile=tol.noise_percentile, noise_steps=hn.steps if hn else 0,
            noise_cap=tol.noise_cap, grid=grid, grid_epsilon=or_none(dd.epsilon[i]),
            coin_toss=or_none(min(tol.coin_toss * dd.scale[i], tol.noise_cap)), a_gap_ulps=a_u, b_gap_ulps=b_u)
    culprit = culprit_at(td, int(st.t_first[i])) if st.t_fail[i] else None
    if culprit is None and td is not None and a_step is not None:
        culprit = culprit_at(td, lookback(int(al.sample[i]), a_step))
    confirm = confirm_tensors(td, int(al.sample[i]), culprit.step if culprit else a_step,
                              culprit.order if culprit else None)
    return FirstDivergence(
        sample=sample, step=int(step), a_step=a_step, b_step=b_step, head=heads[al.head[i]] if heads else None,
        kind=kind, detail=detail, a_token=a_tok, b_token=b_tok,
        a_piece=ra.piece(a_tok) if a_tok is not None else None, b_piece=rb.piece(b_tok) if b_tok is not None else None,
        a_margin=or_none(dd.a_margin[i]), b_margin=or_none(dd.b_margin[i]),
        a_rank_of_b=or_none(dd.a_rank_of_b[i]) if gap == BOTH and a_tok != b_tok else None,
        b_rank_of_a=or_none(dd.b_rank_of_a[i]) if gap == BOTH and a_tok != b_tok else None,
        a_gap=or_none(dd.a_gap[i]), b_gap=or_none(dd.b_gap[i]), epsilon=or_none(dd.epsilon[i]),
        culprit=culprit, watched=watched, evidence=evidence, confirm_with_values=confirm,
    )


#: At most this many tensors are named for a values re-recording.
CONFIRM_MAX = 8


def confirm_tensors(td: TensorDiff | None, sample: int, step: int | None, order: int | None) -> list[str]:
    """Tensors judged from statistics alone at ``step`` up to the culprit (execution ``order``),
    the nearest ``CONFIRM_MAX`` of them: their metrics are lower bounds, so one of them may be the
    real first culprit. Recording their values settles it."""
    if td is None or step is None or not td.rows:
        return []
    c = td.cols
    m = (c["sample"] == sample) & (c["a_step"] == step) & (c["basis"] == BASES.index(BASIS_STATS))
    if order is not None:
        m &= c["order"] <= order
    idx = np.flatnonzero(m)
    idx = idx[np.argsort(c["order"][idx], kind="stable")]
    return list(dict.fromkeys(td.names[int(c["name"][j])] for j in idx))[-CONFIRM_MAX:]  # nearest the culprit
