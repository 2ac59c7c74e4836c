"""Corpus figures of one candidate, as the seeds quote them: token changes by the reference's
margin (are the flips all near ties?), llama.cpp-style KL divergence (mean ± standard error,
median, 99th percentile, maximum), the RMS of Δp, and "same top-1" with its binomial error.

Computed from a :class:`~differ.report.PairReport`'s ``steps_table`` (one row per aligned
decision), vectorised. Only *fresh* rows count: both sides have the step and no earlier token
fed back differed (rows after a free-running divergence see different contexts, so comparing
their distributions says nothing about the runtime).

    from steptrace.differ import diff
    from steptrace.differ.corpusstats import corpus_stats
    stats = corpus_stats(diff("ref.trace", ["cand.trace"]).worst.steps_table)
    print(stats)          # one line
    stats.to_json()       # the figures
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .align import BOTH
from .metrics import json_float

#: Bucket edges (logits) of the reference margin for the flips-vs-margin table.
MARGIN_BUCKETS = (0.0, 0.01, 0.05, 0.1, 0.5, 1.0, 2.0, 5.0, math.inf)


def _fmt(x: float | None, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


@dataclass(frozen=True)
class MarginBucket:
    """Fresh steps whose reference margin lies in ``[lo, hi)`` and how many of them changed token.

    Attributes:
        lo, hi: the bucket's edges in logits (``hi`` may be ``inf``).
        steps: fresh steps compared in the bucket.
        changes: of those, steps where the two runs chose different tokens.
        near_ties: of the changes, those judged near-tie flips (within ε on both sides).
    """

    lo: float
    hi: float
    steps: int
    changes: int
    near_ties: int

    @property
    def label(self) -> str:
        """The bucket as text: ``0.01–0.05``, ``≥ 5``."""
        return f"≥ {self.lo:g}" if math.isinf(self.hi) else f"{self.lo:g}–{self.hi:g}"

    def to_json(self) -> dict[str, Any]:
        """Return the bucket as a JSON object (``hi`` of the last bucket is null)."""
        return {"lo": self.lo, "hi": None if math.isinf(self.hi) else self.hi, "steps": self.steps,
                "changes": self.changes, "near_ties": self.near_ties}


@dataclass(frozen=True)
class Estimate:
    """A mean-like figure with its standard error and distribution (``None`` when no row had one).

    Attributes:
        n: rows that had the value.
        value: the estimate (a mean, an RMS, a rate).
        error: its standard error.
        p50, p99, max: median, 99th percentile and maximum of the per-row values (None for rates).
    """

    n: int
    value: float | None
    error: float | None
    p50: float | None = None
    p99: float | None = None
    max: float | None = None

    def __str__(self) -> str:
        if self.value is None:
            return "–"
        s = f"{self.value:.4g} ± {_fmt(self.error, '.2g')}"
        if self.p50 is not None:
            s += f" (p50 {self.p50:.3g}, p99 {_fmt(self.p99)}, max {_fmt(self.max)})"
        return s

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object (non-finite floats as strings)."""
        return {k: json_float(v) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class CorpusStats:
    """One candidate's corpus figures over fresh aligned steps (see the module docstring).

    Attributes:
        compared: fresh steps present on both sides.
        same_top1: rate of those where both runs' argmax is the same token, with its binomial
            standard error ``sqrt(p (1 - p) / (n - 1))`` (llama.cpp's "Same top p").
        kld: per-step KL divergence reference → candidate (top-k or full softmax, as the
            report's ``decisions.kld.basis`` says): mean ± standard error, p50, p99, max.
        dp_rms: RMS of Δp, the change of the probability of the reference's top token, with
            the standard error of the RMS (propagated from that of the mean of Δp²).
        changes: fresh steps where the tokens differ; ``near_ties`` of them are flips.
        buckets: changes next to all steps by the reference's margin (:data:`MARGIN_BUCKETS`).
        change_margin_max: the largest reference margin at a token change (None: no change).
    """

    compared: int
    same_top1: Estimate
    kld: Estimate
    dp_rms: Estimate
    changes: int
    near_ties: int
    buckets: list[MarginBucket] = field(default_factory=list)
    change_margin_max: float | None = None

    @property
    def divergent(self) -> int:
        """Token changes that are not near ties."""
        return self.changes - self.near_ties

    def headline(self) -> str:
        """The flips sentence: ``278 token changes (278 near-tie flips), all with reference margin < 0.05``."""
        n = self.changes
        if n == 0:
            return f"no token change in {self.compared:,} compared step{'s' if self.compared != 1 else ''}"
        kinds = f"{self.near_ties:,} near-tie flip{'s' if self.near_ties != 1 else ''}"
        if self.divergent:
            kinds += f", {self.divergent:,} divergent"
        s = f"{n:,} token change{'s' if n != 1 else ''} ({kinds})"
        top = self.change_margin_max
        if top is None:
            return s
        bound = next((b.hi for b in self.buckets if top < b.hi), math.inf)
        if math.isinf(bound):
            return s + f", reference margins up to {top:.3g}"
        return s + (", all" if n > 1 else ",") + f" with reference margin < {bound:g}"

    def __str__(self) -> str:
        return (f"{self.headline()}; same top-1 {self.same_top1}; KLD {self.kld}; Δp RMS {self.dp_rms}")

    def to_json(self) -> dict[str, Any]:
        """Return the figures as a JSON object."""
        return {"compared": self.compared, "same_top1": self.same_top1.to_json(), "kld": self.kld.to_json(),
                "dp_rms": self.dp_rms.to_json(), "changes": self.changes, "near_ties": self.near_ties,
                "change_margin_max": json_float(self.change_margin_max) if self.change_margin_max is not None
                else None, "margin_buckets": [b.to_json() for b in self.buckets]}


def _col(t: pa.Table, name: str, dtype: type, fill: float) -> np.ndarray:
    c = t[name]
    if pa.types.is_dictionary(c.type):
        c = c.cast(c.type.value_type)
    return c.fill_null(fill).to_numpy().astype(dtype, copy=False)


def _mean_estimate(x: np.ndarray, *, quantiles: bool) -> Estimate:
    """Mean ± standard error (and p50/p99/max) of the finite entries of ``x``."""
    x = x[np.isfinite(x)]
    n = int(x.size)
    if n == 0:
        return Estimate(0, None, None)
    mean = float(x.mean())
    err = float(x.std(ddof=1) / math.sqrt(n)) if n > 1 else None
    if not quantiles:
        return Estimate(n, mean, err)
    p50, p99 = np.percentile(x, [50, 99])
    return Estimate(n, mean, err, float(p50), float(p99), float(x.max()))


#: The last few results, by table identity: the report, its JSON and a gate ask for the same table.
_RECENT: dict[tuple[int, str | None], tuple[weakref.ref, CorpusStats]] = {}


def corpus_stats(steps: pa.Table | None, *, head: str | None = None) -> CorpusStats:
    """Compute the corpus figures of one candidate from its ``steps_table`` (remembered for the
    same table object while it lives: tables are immutable).

    Args:
        steps: a :class:`~differ.report.PairReport`'s ``steps_table`` (None or empty: no rows).
        head: count only this decision head (default: every head).

    Returns:
        The :class:`CorpusStats`.
    """
    if steps is None:
        return _compute(None, head)
    key = (id(steps), head)
    hit = _RECENT.get(key)
    if hit is not None and hit[0]() is steps:
        return hit[1]
    stats = _compute(steps, head)
    if len(_RECENT) >= 8:
        _RECENT.clear()
    _RECENT[key] = (weakref.ref(steps), stats)
    return stats


def _compute(steps: pa.Table | None, head: str | None) -> CorpusStats:
    empty = Estimate(0, None, None)
    if steps is None or steps.num_rows == 0:
        return CorpusStats(0, empty, empty, empty, 0, 0, _buckets(np.zeros(0), np.zeros(0, bool), np.zeros(0, bool)))
    t = steps
    if head is not None:
        t = t.filter(pc.equal(t["head"].cast(pa.string()), head))
    fresh = (_col(t, "gap", np.int64, -1) == BOTH) & ~_col(t, "after", bool, True)
    a_tok, b_tok = _col(t, "a_token", np.int64, -1)[fresh], _col(t, "b_token", np.int64, -1)[fresh]
    verdict = t["verdict"]
    verdict = (verdict.cast(verdict.type.value_type) if pa.types.is_dictionary(verdict.type) else verdict)
    near = pc.equal(verdict, "flip").fill_null(False).to_numpy(zero_copy_only=False)[fresh]
    margin = np.abs(_col(t, "a_margin", np.float64, np.nan)[fresh])
    kld = _col(t, "kld", np.float64, np.nan)[fresh]
    dp = _col(t, "dp", np.float64, np.nan)[fresh]
    n = int(fresh.sum())
    changed = a_tok != b_tok
    near &= changed
    same = n - int(changed.sum())
    p = same / n if n else None
    same_est = Estimate(n, p, math.sqrt(p * (1 - p) / (n - 1)) if p is not None and n > 1 else None)
    dp2 = _mean_estimate(dp**2, quantiles=False)
    if dp2.value is None:
        rms = empty
    else:
        r = math.sqrt(dp2.value)
        rms = Estimate(dp2.n, r, (dp2.error / (2 * r) if r > 0 else 0.0) if dp2.error is not None else None)
    cm = margin[changed & ~np.isnan(margin)]
    return CorpusStats(
        compared=n, same_top1=same_est, kld=_mean_estimate(kld, quantiles=True), dp_rms=rms,
        changes=int(changed.sum()), near_ties=int(near.sum()), buckets=_buckets(margin, changed, near),
        change_margin_max=float(cm.max()) if cm.size else None,
    )


def _buckets(margin: np.ndarray, changed: np.ndarray, near: np.ndarray) -> list[MarginBucket]:
    edges = np.array(MARGIN_BUCKETS)
    known = ~np.isnan(margin)
    at = np.searchsorted(edges, margin[known], side="right") - 1  # bucket i holds [edges[i], edges[i+1])
    nb = len(edges) - 1
    steps = np.bincount(at, minlength=nb)[:nb]
    ch = np.bincount(at[changed[known]], minlength=nb)[:nb]
    nt = np.bincount(at[near[known]], minlength=nb)[:nb]
    return [MarginBucket(float(edges[i]), float(edges[i + 1]), int(steps[i]), int(ch[i]), int(nt[i]))
            for i in range(nb)]


__all__ = ["MARGIN_BUCKETS", "CorpusStats", "Estimate", "MarginBucket", "corpus_stats"]
