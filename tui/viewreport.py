"""Reports for the viewer: a saved ``trace diff --json`` report, and one sample's rows cut out of
the differ's :class:`~differ.report.PairReport` (its ``steps_table`` and ``tensors_table``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tracefmt.errors import TraceFormatError, TraceUsageError

DIFF_SCHEMA = "steptrace.diff/1"


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

    per_sample: list[dict[str, Any]]
    first: dict[str, Any] | None
    align: str
    notes: tuple[str, ...] = ()


def load_report(path: Path, candidate: Path) -> SavedReport:
    """Read a saved ``trace diff --json`` report and pick the candidate matching ``candidate``.

    Raises:
        TraceUsageError: the file is missing or not JSON.
        TraceFormatError: it is not a steptrace diff report.
    """
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise TraceUsageError(f"cannot read the diff report {path}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TraceUsageError(f"{path} is not JSON ({exc}); pass a file written by `trace diff --json FILE`") from None
    if not isinstance(doc, dict) or doc.get("schema") != DIFF_SCHEMA or not doc.get("candidates"):
        raise TraceFormatError(f"{path} is not a steptrace diff report (schema {DIFF_SCHEMA})")
    cands = doc["candidates"]
    want = candidate.resolve()
    idx = next((i for i, c in enumerate(cands) if Path(str(c.get("candidate", {}).get("path", ""))).resolve() == want),
               None)
    notes = []
    if idx is None:
        idx = int(doc.get("worst_candidate", 0))
        notes.append(f"the diff report does not name {candidate}; showing its worst candidate's verdicts")
    source = (doc.get("policy") or {}).get("source")
    if source not in (None, "built-in"):
        notes.append(f"the report was judged with policy {source}; step verdicts here use the built-in policy")
    c = cands[idx]
    return SavedReport(c.get("per_sample") or [], c.get("first_divergence"),
                       (c.get("alignment") or {}).get("mode") or "step", tuple(notes))
