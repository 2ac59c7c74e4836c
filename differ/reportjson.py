"""Reading a saved ``trace diff --json`` report (schema ``steptrace.diff/1``) back into the report
values of :mod:`steptrace.differ.report`, so viewers and scripts never parse the JSON themselves.

The per-row tables (``steps_table``, ``tensors_table``) are not in the JSON: a loaded
:class:`~differ.report.PairReport` has them as None.
"""

from __future__ import annotations

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

from .errors import DiffFormatError, ReportFileError
from .metrics import TensorMetrics
from .report import (
    SCHEMA,
    CrossCheck,
    Culprit,
    DiffReport,
    DriftOnset,
    FirstDivergence,
    NearTieEvidence,
    PairReport,
    SampleResult,
    TraceInfo,
    WatchedToken,
)

#: Largest report file read (bytes): a diff report of a large corpus is a few MB.
MAX_REPORT_BYTES = 256 << 20

_T = TypeVar("_T")
_NONFINITE = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def _float(v: Any) -> Any:
    return _NONFINITE.get(v, v) if isinstance(v, str) else v


def _build(cls: type[_T], d: Any, where: str, **nested: Any) -> _T:
    """Build dataclass ``cls`` from a JSON object, ignoring unknown keys (newer minor reports)."""
    if not isinstance(d, dict):
        raise DiffFormatError(f"{where} must be a JSON object, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    kw = {k: _float(v) for k, v in d.items() if k in names}
    kw.update({k: v for k, v in nested.items() if k in names})
    try:
        return cls(**kw)
    except TypeError as exc:
        raise DiffFormatError(f"{where} is missing fields ({exc})") from None


def _culprit(d: Any, where: str) -> Culprit | None:
    if d is None:
        return None
    return _build(Culprit, d, where, metrics=_build(TensorMetrics, d.get("metrics"), f"{where}.metrics"))


def _first(d: Any, where: str) -> FirstDivergence | None:
    if d is None:
        return None
    ev = d.get("evidence")
    return _build(FirstDivergence, d, where, culprit=_culprit(d.get("culprit"), f"{where}.culprit"),
                  watched=[_build(WatchedToken, w, f"{where}.watched") for w in d.get("watched") or []],
                  evidence=None if ev is None else _build(NearTieEvidence, ev, f"{where}.evidence"),
                  confirm_with_values=list(d.get("confirm_with_values") or []))


def _onset(d: Any, where: str) -> DriftOnset | None:
    if d is None:
        return None
    return _build(DriftOnset, d, where, culprit=_culprit(d.get("culprit"), f"{where}.culprit"))


def _pair(d: Any, where: str) -> PairReport:
    if not isinstance(d, dict):
        raise DiffFormatError(f"{where} must be a JSON object")
    return _build(
        PairReport, d, where,
        candidate=_build(TraceInfo, d.get("candidate"), f"{where}.candidate"),
        first_divergence=_first(d.get("first_divergence"), f"{where}.first_divergence"),
        drift_onset=_onset(d.get("drift_onset"), f"{where}.drift_onset"),
        per_sample=[_build(SampleResult, s, f"{where}.per_sample") for s in d.get("per_sample") or []],
    )


def report_from_json(doc: Any, source: str = "<report>") -> DiffReport:
    """Rebuild a :class:`~differ.report.DiffReport` from its JSON object.

    Raises:
        DiffFormatError: not a ``steptrace.diff/1`` report, or a field has the wrong shape.
    """
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        raise DiffFormatError(f"{source} is not a steptrace diff report (schema {SCHEMA}); "
                              "pass a file written by `trace diff --json FILE`")
    cands = doc.get("candidates")
    if not isinstance(cands, list) or not cands:
        raise DiffFormatError(f"{source} holds no candidates")
    return DiffReport(
        reference=_build(TraceInfo, doc.get("reference"), f"{source}: reference"),
        candidates=[_pair(c, f"{source}: candidates[{i}]") for i, c in enumerate(cands)],
        cross=[_build(CrossCheck, c, f"{source}: cross", ) for c in doc.get("cross") or [] if isinstance(c, dict)],
        fail_on=str(doc.get("fail_on", "drift")),
        policy=doc.get("policy") or {},
        seconds=float(doc.get("seconds") or 0.0),
    )


def load_report(path: str | Path) -> DiffReport:
    """Read a saved ``trace diff --json FILE`` report.

    Raises:
        ReportFileError: the file cannot be read or is not JSON.
        DiffFormatError: it is not a diff report.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_REPORT_BYTES:
            raise ReportFileError(f"{p} is {size:,} bytes, larger than any diff report ({MAX_REPORT_BYTES:,})")
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportFileError(f"cannot read the diff report {p}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ReportFileError(f"{p} is not JSON ({exc}); pass a file written by `trace diff --json FILE`") from None
    return report_from_json(doc, str(p))
