"""Report values of a divergence: where a sample's decisions first part
(:class:`FirstDivergence`), where its numbers first drift (:class:`DriftOnset`), the tensor to
blame (:class:`Culprit`), watched tokens involved (:class:`WatchedToken`) and the near-tie
figures (:class:`NearTieEvidence`). Each has a one-line ``__str__`` and a ``to_json()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .jsonvalues import jsonable
from .metrics import TensorMetrics


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "?" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


@dataclass(frozen=True)
class Culprit:
    """The first tensor in execution order beyond tolerance at a step."""

    name: str
    call: int
    step: int
    order: int
    metrics: TensorMetrics

    def __str__(self) -> str:
        call = f" (call {self.call})" if self.call else ""
        return f"{self.name}{call} at step {self.step}: {self.metrics}"

    def to_json(self) -> dict[str, Any]:
        """Return the culprit as a JSON object."""
        return {"name": self.name, "call": self.call, "step": self.step, "order": self.order,
                "metrics": self.metrics.to_json()}


@dataclass(frozen=True)
class WatchedToken:
    """A watched token (e.g. EOS) involved in a divergence: where each side ranked it."""

    token: str
    id: int
    a_rank: int | None
    b_rank: int | None
    a_lost_by: float | None  # top logit minus its logit on the reference side (0 if chosen)
    b_lost_by: float | None
    b_bias: float | None  # smallest bias on its logit that changes the candidate's decision

    def __str__(self) -> str:
        side = f"{self.token.upper()} rank {self.b_rank} in candidate"
        if self.b_rank and self.b_lost_by is not None:
            side += f", lost by {self.b_lost_by:.3g} logits (bias {self.b_bias:+.3g} flips it)"
        elif self.b_rank == 0 and self.b_bias is not None:
            side += f", chosen by {-self.b_bias:.3g} logits"
        return side + f"; reference rank {'–' if self.a_rank is None else self.a_rank}"

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object."""
        return jsonable(dict(self.__dict__))


@dataclass(frozen=True)
class NearTieEvidence:
    """The numbers that decided whether a token flip is a near tie (docs/differ.md §4).

    Attributes:
        rule: the rule that explained the swap (``grid``, ``coin_toss``, ``noise``,
            ``epsilon``), or None: nothing did (``divergent``).
        shift: how far the two tokens' logit difference moved between the runs (both gaps added).
        noise: the pair's logit noise on agreeing steps of this head (its ``percentile``), or
            None when too few steps agree to measure it.
        noise_steps: agreeing steps it was measured on (every sample of the pair).
        noise_cap: the largest shift noise may explain.
        grid: the computation grid (coarser side) of the logits.
        grid_epsilon: 4 ulps of that grid at the logits' magnitude (or the fixed ``--epsilon``).
        coin_toss: the coin-toss threshold at this step (0.5 % of the logit scale, at most the cap).
        a_gap_ulps, b_gap_ulps: both gaps in ulps of the grid at the logits' magnitude.
    """

    rule: str | None
    shift: float | None
    noise: float | None
    noise_percentile: float
    noise_steps: int
    noise_cap: float
    grid: str
    grid_epsilon: float | None
    coin_toss: float | None
    a_gap_ulps: float | None
    b_gap_ulps: float | None

    def __str__(self) -> str:
        noise = (f"noise {_fmt(self.noise)} (p{self.noise_percentile:g} of {self.noise_steps} agreeing steps)"
                 if self.noise is not None else f"noise unmeasured ({self.noise_steps} agreeing steps)")
        why = {"grid": "within the grid ε", "coin_toss": "a coin toss", "noise": "explained by the pair's noise",
               "epsilon": "within --epsilon"}.get(self.rule or "", "not explained")
        return (f"shift {_fmt(self.shift)} needed; {noise}; grid {self.grid} ε {_fmt(self.grid_epsilon)}: {why}")

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object."""
        return jsonable(dict(self.__dict__))


@dataclass(frozen=True)
class FirstDivergence:
    """Where a sample's decisions first part (or, if they never do, where numbers first drift).

    ``step`` is the reference's step (the candidate's when the reference has none).
    """

    sample: str
    step: int
    a_step: int | None
    b_step: int | None
    head: str | None
    kind: str  # a verdict name: drift, flip, divergent, missing
    detail: str | None  # for missing: "candidate ended early" / "candidate over-generates" / "inserted" / "dropped"
    a_token: int | None
    b_token: int | None
    a_piece: str | None
    b_piece: str | None
    a_margin: float | None
    b_margin: float | None
    a_rank_of_b: int | None  # rank of the candidate's token in the reference's top-k (None: beyond it)
    b_rank_of_a: int | None
    a_gap: float | None  # reference: logit(a_token) - logit(b_token)
    b_gap: float | None
    epsilon: float | None
    culprit: Culprit | None
    watched: list[WatchedToken] = field(default_factory=list)
    evidence: NearTieEvidence | None = None  # what decided flip vs divergent (different tokens only)
    confirm_with_values: list[str] = field(default_factory=list)  # stats-only tensors to re-record with values

    def __str__(self) -> str:
        head = f"/{self.head}" if self.head else ""
        if self.kind == "missing":
            return f"{self.sample} step {self.step}{head}: missing ({self.detail})"
        tok = f"{self.a_token} {self.a_piece!r} vs {self.b_token} {self.b_piece!r}" if self.a_token is not None else ""
        s = (f"{self.sample} step {self.step}{head}: {self.kind} {tok} margins {_fmt(self.a_margin)}/"
             f"{_fmt(self.b_margin)}")
        if self.culprit:
            s += f"; culprit {self.culprit.name}"
        return s

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object (culprit and watched tokens nested)."""
        d = {k: v for k, v in self.__dict__.items()}
        return jsonable(d)


@dataclass(frozen=True)
class DriftOnset:
    """The first step of a sample where any number left tolerance (tensors, or the decision's
    logits when ``culprit`` is None), at or before its first divergence."""

    sample: str
    step: int
    head: str | None
    culprit: Culprit | None
    logit_diff: float | None

    def __str__(self) -> str:
        what = str(self.culprit) if self.culprit else f"logits moved by {_fmt(self.logit_diff)}"
        return f"drift from {self.sample} step {self.step}: {what}"

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object."""
        return jsonable(dict(self.__dict__))
