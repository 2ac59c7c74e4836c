"""Report values: what a diff found, as dataclasses with a one-line ``__str__`` and a stable
``to_json()`` (schema ``steptrace.diff/1``, documented in docs/differ.md). Rendering is elsewhere
(``tui/render/diff.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from .corpusstats import corpus_stats
from .mapping import NameMapping
from .metrics import TensorMetrics, json_float
from .verdict import VERDICTS

SCHEMA = "steptrace.diff/1"


def _j(v: Any) -> Any:
    """Make a value JSON-safe (non-finite floats become strings)."""
    if isinstance(v, float):
        return json_float(v)
    if isinstance(v, dict):
        return {k: _j(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_j(x) for x in v]
    if hasattr(v, "to_json"):
        return v.to_json()
    return v


def _fmt(v: float | None, spec: str = ".3g") -> str:
    return "?" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


@dataclass(frozen=True)
class TraceInfo:
    """Which trace a side of the comparison is."""

    path: str
    runtime: str | None
    precision: str | None
    model: str | None
    complete: bool
    grid: str  # dtype whose grid the logits live on (for the default ε)

    def __str__(self) -> str:
        bits = [self.runtime or "?", self.precision or "?"]
        return f"{self.path} ({', '.join(bits)}{'' if self.complete else ', INCOMPLETE'})"

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object."""
        return dict(self.__dict__)


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
        return _j(dict(self.__dict__))


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
        return _j(dict(self.__dict__))


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
        return _j(d)


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
        return _j(dict(self.__dict__))


@dataclass(frozen=True)
class SampleResult:
    """One sample's outcome."""

    sample: str
    verdict: str
    first_step: int | None
    head: str | None
    kind: str | None
    a_steps: int
    b_steps: int
    mismatches: int  # fresh (not after a divergence) flip/divergent/missing rows
    after: int  # rows after a divergence
    drift_step: int | None
    identical_sequence: bool
    token_edits: int
    culprit: str | None
    only_in: str | None  # "reference" / "candidate" when the other trace lacks the sample
    culprit_step: int | None = None  # the step the culprit was recorded at (earlier than first_step: looked back)

    def __str__(self) -> str:
        where = f" at step {self.first_step}" if self.first_step is not None else ""
        return f"{self.sample}: {self.verdict}{where} ({self.a_steps}/{self.b_steps} steps)"

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object."""
        return _j(dict(self.__dict__))


@dataclass
class PairReport:
    """One candidate compared to the reference.

    ``steps_table`` and ``tensors_table`` (pyarrow) hold every aligned row and every tensor
    comparison for viewers; ``to_json`` carries the summaries and per-sample rows only.
    """

    candidate: TraceInfo
    verdict: str
    first_divergence: FirstDivergence | None
    drift_onset: DriftOnset | None
    samples: dict[str, int]
    steps: dict[str, int]
    decisions: dict[str, Any]
    tensors: dict[str, Any]
    sequences: dict[str, Any]
    first_divergence_histogram: dict[str, list]
    culprits: list[dict[str, Any]]
    watched: dict[str, Any]
    per_sample: list[SampleResult]
    alignment: dict[str, Any]
    steps_table: pa.Table | None = None
    tensors_table: pa.Table | None = None
    mapping: NameMapping | None = None
    corpus: dict[str, Any] | None = None  # the corpus figures of a report loaded from JSON (no steps_table)

    def __str__(self) -> str:
        n = self.samples.get("total", 0)
        same = self.sequences.get("identical", 0)
        fd = f"; first divergence {self.first_divergence}" if self.first_divergence else ""
        return f"{self.candidate.path}: {self.verdict} (identical sequences on {same:,} / {n:,} samples){fd}"

    def to_json(self) -> dict[str, Any]:
        """Return the report of this candidate as a JSON object (schema in docs/differ.md)."""
        return _j({
            "candidate": self.candidate,
            "verdict": self.verdict,
            "first_divergence": self.first_divergence,
            "drift_onset": self.drift_onset,
            "samples": self.samples,
            "steps": self.steps,
            "decisions": self.decisions,
            "tensors": self.tensors,
            "sequences": self.sequences,
            "first_divergence_histogram": self.first_divergence_histogram,
            "culprits": self.culprits,
            "watched": self.watched,
            "alignment": self.alignment,
            "corpus": corpus_stats(self.steps_table) if self.steps_table is not None else self.corpus,
            "per_sample": self.per_sample,
        })


@dataclass(frozen=True)
class CrossCheck:
    """Two candidates compared with each other on their token sequences."""

    a: str
    b: str
    samples: int
    identical_sequences: int

    @property
    def identical(self) -> bool:
        """Every common sample has the same token sequence in both candidates."""
        return self.samples == self.identical_sequences

    def __str__(self) -> str:
        rel = "≡" if self.identical else "≠"
        return f"{self.a} {rel} {self.b}: identical sequences on {self.identical_sequences:,} / {self.samples:,}"

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object."""
        return {"a": self.a, "b": self.b, "samples": self.samples, "identical_sequences": self.identical_sequences,
                "identical": self.identical}


@dataclass
class DiffReport:
    """The answer of ``trace diff REF CAND [CAND ...]``.

    Attributes:
        reference: the reference trace.
        candidates: one :class:`PairReport` per candidate, in command-line order.
        cross: candidate-vs-candidate sequence checks (N-way only).
        fail_on: the verdict from which the diff counts as a mismatch.
        policy: the tolerance policy used (JSON form).
        seconds: time taken.
    """

    reference: TraceInfo
    candidates: list[PairReport]
    cross: list[CrossCheck]
    fail_on: str
    policy: dict[str, Any]
    seconds: float = 0.0

    @property
    def worst(self) -> PairReport:
        """The candidate with the worst verdict (the first of equals)."""
        return max(self.candidates, key=lambda c: (VERDICTS.index(c.verdict), -self.candidates.index(c)))

    @property
    def verdict(self) -> str:
        """The worst verdict over candidates."""
        return self.worst.verdict

    @property
    def mismatch(self) -> bool:
        """Whether the verdict reaches ``fail_on`` (the CLI's exit 1)."""
        return VERDICTS.index(self.verdict) >= VERDICTS.index(self.fail_on)

    def __str__(self) -> str:
        w = self.worst
        fd = f"; first divergence {w.first_divergence}" if w.first_divergence else ""
        n = len(self.candidates)
        return f"{self.verdict}{' (mismatch)' if self.mismatch else ''}: {n} candidate{'s' if n != 1 else ''} vs {self.reference.path}{fd}"

    def to_json(self) -> dict[str, Any]:
        """Return the stable JSON report (schema ``steptrace.diff/1``, docs/differ.md).

        The top-level ``verdict``, ``first_divergence``, ``drift_onset``, ``samples`` and
        ``per_sample`` are those of the worst candidate; ``candidates`` holds every candidate.
        """
        w = self.worst
        wj = w.to_json()
        return {
            "schema": SCHEMA,
            "verdict": self.verdict,
            "fail_on": self.fail_on,
            "mismatch": self.mismatch,
            "reference": self.reference.to_json(),
            "worst_candidate": self.candidates.index(w),
            "first_divergence": wj["first_divergence"],
            "drift_onset": wj["drift_onset"],
            "samples": wj["samples"],
            "per_sample": wj["per_sample"],
            "candidates": [c.to_json() for c in self.candidates],
            "cross": [c.to_json() for c in self.cross],
            "policy": _j(self.policy),
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def load(cls, path: str | Path) -> DiffReport:
        """Read a report saved by ``trace diff --json FILE`` (see :func:`differ.reportjson.load_report`).

        Raises:
            DiffFormatError: the file cannot be read or is not a diff report.
        """
        from .reportjson import load_report

        return load_report(path)

    def dumps(self) -> str:
        """Return the JSON report as text (sorted keys inside objects are not reordered)."""
        return json.dumps(self.to_json(), indent=1, ensure_ascii=False, allow_nan=False)
