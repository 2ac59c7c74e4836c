"""Reports for the viewer: a saved ``trace diff --json`` report, and one sample's rows cut out of
the differ's :class:`~differ.report.PairReport` (its ``steps_table`` and ``tensors_table``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from steptrace.differ import FirstDivergence, SampleResult, load_report


@dataclass(frozen=True)
class SampleDiff:
    """The differ's rows of one sample (vocabulary head) and its tensor comparisons."""

    steps: pa.Table
    tensors: pa.Table | None
    first_step: int | None
    drift_step: int | None
    mapping: Any = None
    culprit: str | None = None
    culprit_step: int | None = None


def escape_glob(name: str) -> str:
    """``name`` as an fnmatch pattern matching only itself (the differ selects samples by glob)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def slice_sample(pair: Any, sample: str, vocab_head: str) -> SampleDiff:
    """Cut one sample's rows (vocabulary head, else its first head) out of a PairReport."""
    t = pair.steps_table
    t = t.filter(pc.equal(t["sample"], sample))
    heads = pc.unique(t["head"].cast(pa.string())).to_pylist() if t.num_rows else []
    head = vocab_head if vocab_head in heads else (min(heads) if heads else vocab_head)
    t = t.filter(pc.equal(t["head"].cast(pa.string()), head)) if t.num_rows else t
    tt = pair.tensors_table
    if tt is not None:
        tt = tt.filter(pc.equal(tt["sample"], sample))
    res = next((p for p in pair.per_sample if p.sample == sample), None)
    return SampleDiff(t, tt, res.first_step if res else None, res.drift_step if res else None, pair.mapping,
                      res.culprit if res else None, res.culprit_step if res else None)


@dataclass(frozen=True)
class SavedReport:
    """What the viewer uses of a saved report: one candidate's samples and first divergence."""

    per_sample: list[SampleResult]
    first: FirstDivergence | None
    align: str
    notes: tuple[str, ...] = ()


def load_saved(path: Path, candidate: Path) -> SavedReport:
    """Read a saved ``trace diff --json`` report (through :func:`steptrace.differ.load_report`) and pick the
    candidate matching ``candidate`` (else the worst one, with a notice).

    Raises:
        DiffFormatError: the file cannot be read or is not a steptrace diff report.
    """
    report = load_report(path)
    want = candidate.resolve()
    pick = next((c for c in report.candidates if Path(c.candidate.path).resolve() == want), None)
    notes = []
    if pick is None:
        pick = report.worst
        notes.append(f"the diff report does not name {candidate}; showing its worst candidate's verdicts")
    source = report.policy.get("source") if isinstance(report.policy, dict) else None
    if source not in (None, "built-in"):
        notes.append(f"the report was judged with policy {source}; step verdicts here use the built-in policy")
    return SavedReport(pick.per_sample, pick.first_divergence, pick.alignment.get("mode") or "step", tuple(notes))
