"""Tensors for the viewer: one step's tensor lines (both sides and the differ's metrics), the
per-bucket tensor error (or magnitude) over a sample's steps for the plots, a tensor's values
preview, and the triage's root cause marked among a step's tensors."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.compute as pc

from steptrace.tracefmt.errors import TraceError
from steptrace.tui.viewer.source import TraceSource, bucket_max
from steptrace.tui.viewer.values import StepDetail, TensorCompare, TensorLine, TensorStat

if TYPE_CHECKING:
    from steptrace.tui.viewer.data import SampleDiff


def _num(x: Any) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _compares(diff: SampleDiff | None, a_step: int | None) -> dict[tuple[str, int], tuple[int, TensorCompare]]:
    """(reference name, call) -> (order, comparison) at reference step ``a_step``."""
    if diff is None or diff.tensors is None or a_step is None or diff.tensors.num_rows == 0:
        return {}
    t = diff.tensors.filter(pc.equal(diff.tensors["a_step"], a_step))
    out = {}
    for r in t.to_pylist():
        out[(r["name"], r["call"])] = (r["order"], TensorCompare(
            basis=r["basis"], bitexact=bool(r["bitexact"]), within=bool(r["within"]), reason=r["reason"],
            max_abs=_num(r["max_abs"]), max_rel=_num(r["max_rel"]), cosine=_num(r["cosine"]), sqnr_db=_num(r["sqnr_db"]),
        ))
    return out


def tensor_lines(a: TraceSource, b: TraceSource | None, sample: str, a_step: int | None, b_step: int | None,
                 diff: SampleDiff | None) -> list[TensorLine]:
    """The tensors of one row in execution order: reference and candidate records matched by
    (reference name, call), the differ's comparison, and the culprit (first beyond tolerance)."""
    ta = a.tensors_at(sample, a_step) if a_step is not None else []
    tb = b.tensors_at(sample, b_step) if b is not None and b_step is not None else []
    rename = diff.mapping.rename if diff is not None and diff.mapping is not None else (lambda n: n)
    cmp = _compares(diff, a_step)
    keys: dict[tuple[str, int], list[Any]] = {}
    for t in ta:
        keys.setdefault((t.name, t.call), [t.order, t, None])
    for t in tb:
        k = (rename(t.name), t.call)
        if k in keys:
            keys[k][2] = t
        else:
            keys[k] = [10**9 + t.order, None, t]
    for k, (order, _) in cmp.items():
        keys.setdefault(k, [order, None, None])
    lines = []
    culprit_seen = False
    for (name, call), (order, sa, sb) in sorted(keys.items(), key=lambda kv: (kv[1][0], kv[0])):
        c = cmp.get((name, call), (None, None))[1]
        culprit = c is not None and not c.within and not culprit_seen
        culprit_seen |= culprit
        lines.append(TensorLine(name, call, order if order < 10**9 else order - 10**9, sa, sb, c, culprit))
    return lines


def tensor_series(a: TraceSource, sample: str, diff: SampleDiff | None, lo: int, hi: int,
                  nb: int) -> tuple[np.ndarray | None, np.ndarray | None, str]:
    """Per bucket of steps ``lo..hi``: the largest tensor error (max_abs, with a diff) or
    magnitude (|x| max, one trace), and whether a tensor there is beyond tolerance (or holds
    NaN/Inf). Returns (None, None, label) when the sample has no tensors."""
    if diff is not None and diff.tensors is not None and diff.tensors.num_rows:
        t = diff.tensors
        out, flag = np.full(nb, -np.inf), np.zeros(nb, bool)
        bucket_max(out, flag, t["a_step"].to_numpy(), t["max_abs"].to_numpy(zero_copy_only=False).astype(np.float64),
                   ~t["within"].to_numpy(zero_copy_only=False).astype(bool), lo, hi)
        out[np.isinf(out)] = np.nan
        return out, flag, "tensor error (max |a-b|)"
    got = a.tensor_series(sample, lo, hi, nb)
    if got is None:
        return None, None, "tensors"
    return got[0], got[1], "tensor |x| max"


def preview(src: TraceSource, t: TensorStat, n: int = 12) -> np.ndarray:
    """The first ``n`` values of tensor record ``t``, flattened (raises like ``tensor_values``)."""
    return np.asarray(src.tensor_values(t)).reshape(-1)[:n]


def preview_text(a: TraceSource, b: TraceSource | None, ln: TensorLine) -> str:
    """The values preview of a tensors-pane line, one line per side that recorded the tensor:
    its first values, its statistics when it recorded statistics only, or why its values
    cannot be read (reads values: call from a worker)."""
    parts = []
    for label, src, t in (("A", a, ln.a), ("B", b, ln.b)):
        if t is None or src is None:
            continue
        if not t.has_values:
            parts.append(f"{label}: statistics only (min {t.min:.4g}, max {t.max:.4g}, mean {t.mean:.4g})"
                         if t.min is not None else f"{label}: statistics only")
            continue
        try:
            v = preview(src, t)
            more = " …" if t.shape and int(np.prod(t.shape)) > v.size else ""
            parts.append(f"{label}: " + " ".join(f"{x:.4g}" for x in v.tolist()) + more)
        except TraceError as exc:
            parts.append(f"{label}: {exc}")
    return "\n".join(parts)


def mark_root_cause(d: StepDetail, triage: dict | None) -> StepDetail:
    """The detail with the root cause of a ``trace triage --json`` report named
    ``NAME ◆ root cause`` at its step (``d`` itself elsewhere, or without a report)."""
    rc = (triage or {}).get("root_cause")
    if not rc or d.sample != rc.get("sample") or d.row.a_step != rc.get("step"):
        return d
    lines = tuple(dataclasses.replace(ln, name=f"{ln.name} ◆ root cause") if ln.name == rc.get("name") and not ln.call
                  else ln for ln in d.tensors)
    return dataclasses.replace(d, tensors=lines)


__all__ = ["mark_root_cause", "preview", "preview_text", "tensor_lines", "tensor_series"]
