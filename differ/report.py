"""Report values: what a diff found, as dataclasses with a one-line ``__str__`` and a stable
``to_json()`` (schema ``steptrace.diff/1``, documented in docs/differ.md). Rendering is elsewhere
(``tui/render/diff.py``).

The values of a divergence (:class:`FirstDivergence`, :class:`DriftOnset`, :class:`Culprit`,
:class:`WatchedToken`, :class:`NearTieEvidence`) are defined in :mod:`steptrace.differ.divergence`
and importable from here too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from .corpusstats import corpus_stats
from .divergence import Culprit, DriftOnset, FirstDivergence, NearTieEvidence, WatchedToken
from .jsonvalues import jsonable
from .mapping import NameMapping
from .verdict import VERDICTS

__all__ = [
    "SCHEMA",
    "CrossCheck",
    "Culprit",
    "DiffReport",
    "DriftOnset",
    "FirstDivergence",
    "NearTieEvidence",
    "PairReport",
    "SampleResult",
    "TraceInfo",
    "WatchedToken",
]

SCHEMA = "steptrace.diff/1"


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
        return jsonable(dict(self.__dict__))


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
        return jsonable({
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
            "policy": jsonable(self.policy),
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
