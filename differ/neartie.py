"""Near ties: is a token flip explained by the numeric difference this pair of runs shows?

Two runs choose different tokens ``a`` (reference) and ``b`` (candidate) at a step. The
reference prefers ``a`` by its gap ``g_a = L_ref[a] - L_ref[b]``, the candidate prefers ``b`` by
``g_b = L_cand[b] - L_cand[a]``; to swap the two, the logit difference ``L[a] - L[b]`` had to
move by the **shift** ``g_a + g_b`` between the runs. The flip is a near tie (verdict ``flip``)
when each token is in the other side's recorded top-k and one of these explains it, checked in
this order (docs/differ.md §4 gives the justification):

1. ``grid``: both gaps are within ε, 4 ulps of the coarser side's computation grid at the
   logits' magnitude — rounding alone can swap them;
2. ``coin_toss``: both gaps are within 0.5 % of the step's logit scale (max |top logit| of
   both sides, at least 1) and below the noise cap — a swap of two tokens that close is a coin
   toss whatever the dtype;
3. ``noise``: the shift is within the **pair's noise** — the 90th percentile, over every
   comparable step of the pair where both runs chose the same token (all samples, per head), of
   how far a shared top-k id's logit moved relative to the chosen token's — and within the
   noise cap of 1 logit (no noise explains a swap of a nat or more).

With a fixed ``epsilon`` (``--epsilon``) none of these applies: a flip is a near tie exactly
when both gaps are within it. Anything else is ``divergent``: the evidence does not explain it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .decisions import DecisionDiff
from .policy import MIN_NOISE_STEPS, Policy, ulp

#: Near-tie rules, by code (0: not a near tie).
RULES = ("", "epsilon", "grid", "coin_toss", "noise")
NO_RULE, EPSILON, GRID, COIN_TOSS, NOISE = range(5)


@dataclass(frozen=True)
class HeadNoise:
    """The logit noise one head of a pair shows on the steps where both runs agree.

    Attributes:
        head: the decision head.
        steps: agreeing, comparable steps measured.
        percentile: which percentile ``value`` is.
        value: the noise (logits); None when fewer than ``MIN_NOISE_STEPS`` steps were measured.
        p50, max: the median and the largest per-step noise (None without steps).
    """

    head: str
    steps: int
    percentile: float
    value: float | None
    p50: float | None
    max: float | None

    def to_json(self) -> dict[str, object]:
        """Return the fields as a JSON object."""
        return dict(self.__dict__)


def pair_noise(dd: DecisionDiff, agree: np.ndarray, head: np.ndarray, heads: list[str],
               policy: Policy) -> dict[int, HeadNoise]:
    """Measure each head's noise over the rows of ``agree`` (comparable rows with the same token).

    Args:
        dd: the decision comparison (its ``gap_noise`` column).
        agree: rows to measure.
        head: head code of every aligned row.
        heads: head names.
        policy: the percentile of each head.

    Returns:
        ``{head code: HeadNoise}`` for every head code in ``range(len(heads))``.
    """
    out: dict[int, HeadNoise] = {}
    m = agree & ~np.isnan(dd.gap_noise)
    for h, name in enumerate(heads or [""]):
        x = dd.gap_noise[m & (head == h)] if len(heads) > 1 else dd.gap_noise[m]
        q = policy.for_head(name).noise_percentile
        if x.size:
            value, p50 = np.percentile(x, [q, 50.0])
            out[h] = HeadNoise(name, int(x.size), q, float(value) if x.size >= MIN_NOISE_STEPS else None,
                               float(p50), float(x.max()))
        else:
            out[h] = HeadNoise(name, 0, q, None, None, None)
    return out


def judge_near_ties(dd: DecisionDiff, rows: np.ndarray, head: np.ndarray, heads: list[str], policy: Policy,
                    noise: dict[int, HeadNoise]) -> None:
    """Decide which of ``rows`` (both sides present, different tokens) are near ties.

    Writes ``dd.near_tie``, ``dd.rule`` (a code into :data:`RULES`) and ``dd.noise`` (the
    noise of the row's head, NaN when unmeasured) in place.
    """
    n = dd.a_gap.size
    dd.near_tie = np.zeros(n, bool)
    dd.rule = np.zeros(n, np.int8)
    dd.noise = np.full(n, np.nan)
    for h, hn in noise.items():
        if hn.value is not None:
            dd.noise[head == h if len(heads) > 1 else slice(None)] = hn.value
    idx = np.flatnonzero(rows)
    if not idx.size:
        return
    ga, gb = dd.a_gap[idx], dd.b_gap[idx]
    with np.errstate(invalid="ignore"):
        known = (dd.a_rank_of_b[idx] >= 0) & (dd.b_rank_of_a[idx] >= 0) & np.isfinite(ga) & np.isfinite(gb)
        worst = np.fmax(ga, gb)
        shift = ga + gb
    rule = np.zeros(idx.size, np.int8)
    hcodes = head[idx]
    for h in np.unique(hcodes):
        m = known & (hcodes == h)
        tol = policy.for_head(heads[h] if heads else "")
        if tol.epsilon is not None:
            rule[m & (worst <= tol.epsilon)] = EPSILON
            continue
        noise_h = noise.get(int(h))
        explained = np.zeros(idx.size, bool)
        if noise_h is not None and noise_h.value is not None:
            explained = shift <= min(noise_h.value, tol.noise_cap)
        # the first rule that holds is reported: grid, then coin toss, then noise
        coin = worst <= np.minimum(tol.coin_toss * dd.scale[idx], tol.noise_cap)
        for code, ok in ((NOISE, explained), (COIN_TOSS, coin),
                         (GRID, worst <= dd.epsilon[idx])):
            rule[m & ok] = code
    dd.rule[idx] = rule
    dd.near_tie[idx] = rule > 0


def ulps(dd: DecisionDiff, i: int, grid: str) -> tuple[float | None, float | None]:
    """Both gaps of row ``i`` in units in the last place of ``grid`` at the step's logit scale."""
    u = float(ulp(grid, dd.scale[i])) if np.isfinite(dd.scale[i]) else float("nan")
    a, b = dd.a_gap[i], dd.b_gap[i]
    return (None if not np.isfinite(a) else float(a / u)), (None if not np.isfinite(b) else float(b / u))
