"""The viewer's data layer: one or two traces, the diff, and the rows of the step table.

:class:`ViewModel` sits between the reader/differ and the widgets. Widgets ask it, from worker
threads, for a window of rows (:meth:`ViewModel.fetch`), a step's detail, a sample's plot series,
search hits and filters; it answers with the frozen values of :mod:`steptrace.tui.viewer.values`. Nothing
here loops in Python over every step: scans go through numpy over projected batches, in chunks.

A :class:`RowMap` says which steps the table shows for a sample: one trace's steps, two traces
paired by step (before the diff is known), or the differ's aligned rows with verdicts.
"""

from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steptrace.tracefmt.errors import TraceError, TraceUsageError

from steptrace.tui.viewer.index import BatchCache, Runs
from steptrace.tui.viewer.report import SampleDiff, SavedReport, escape_glob, load_saved, slice_sample
from steptrace.tui.viewer.source import TraceSource
from steptrace.tui.viewer.tensors import tensor_lines, tensor_series
from steptrace.tui.viewer.values import VERDICTS, SampleRow, Series, StepDetail, StepRow

#: Rows scanned per chunk by searches, filters and plot scans.
CHUNK = 1 << 16
FLIP = VERDICTS.index("flip")


@dataclass(frozen=True)
class RowMap:
    """The rows the step table shows for one sample.

    ``kind`` is ``trace`` (one trace), ``steps`` (two traces paired by step number) or ``diff``
    (the differ's aligned rows, with ``a_step``/``b_step`` = -1 where a side has no step).
    ``select`` (a filter) maps shown rows to base rows.
    """

    sample: str
    kind: str
    base_size: int
    a_runs: Runs | None
    b_runs: Runs | None
    a_step: np.ndarray | None = None
    b_step: np.ndarray | None = None
    verdict: np.ndarray | None = None
    after: np.ndarray | None = None
    diff: SampleDiff | None = None
    select: np.ndarray | None = None
    filter_label: str | None = None

    @property
    def size(self) -> int:
        """Rows shown."""
        return int(self.select.size) if self.select is not None else self.base_size

    def base(self, rows: np.ndarray) -> np.ndarray:
        """Base rows of shown rows."""
        rows = np.asarray(rows, np.int64)
        return self.select[rows] if self.select is not None else rows

    def shown(self, base_row: int) -> int:
        """The shown row nearest to (at or after) ``base_row``."""
        if self.select is None:
            return min(max(base_row, 0), max(self.size - 1, 0))
        return min(int(np.searchsorted(self.select, base_row)), max(self.size - 1, 0))

    def steps(self, base: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(reference steps, candidate steps) of base rows (-1: none)."""
        if self.kind == "diff":
            return self.a_step[base], self.b_step[base]
        runs = self.a_runs if self.a_runs is not None and len(self.a_runs) else self.b_runs
        steps = runs.steps(base) if runs is not None and len(runs) else np.full(base.size, -1)
        return steps, (steps if self.kind == "steps" else None)

    def base_row_of_step(self, step: int) -> int:
        """The base row showing reference step ``step`` (or the next one)."""
        if self.kind == "diff":
            hit = np.flatnonzero(self.a_step >= step)
            if hit.size == 0:
                hit = np.flatnonzero(self.b_step >= step)
            return int(hit[0]) if hit.size else max(self.base_size - 1, 0)
        runs = self.a_runs if self.a_runs is not None and len(self.a_runs) else self.b_runs
        return runs.nearest_row(step) if runs is not None else 0


class ViewModel:
    """One trace, or a reference and a candidate with their diff, for the viewer.

    Args:
        paths: one or two trace directories (reference first).
        diff_json: a saved ``trace diff --json`` report to reuse instead of diffing everything.
        low_margin: margins below this (logits) are marked and kept by the low-margin filter.
        align: the differ's alignment mode when it runs here.

    Raises:
        TraceNotFoundError, TraceFormatError, TraceVersionError: a path is not a readable trace.
        TraceUsageError: a bad argument (three traces, an unreadable or foreign report).
    """

    def __init__(self, paths: list[str | os.PathLike[str]], *, diff_json: str | os.PathLike[str] | None = None,
                 low_margin: float = 1.0, align: str = "step") -> None:
        if not 1 <= len(paths) <= 2:
            raise TraceUsageError("view takes one trace, or a reference and a candidate")
        if diff_json is not None and len(paths) != 2:
            raise TraceUsageError("--diff-json needs the two traces the report compared")
        self.cache = BatchCache()
        self.a = TraceSource(paths[0], cache=self.cache)
        self.b = TraceSource(paths[1], cache=self.cache) if len(paths) == 2 else None
        self.low_margin = low_margin
        self.align = align
        self.report: Any = None  # differ.DiffReport once computed (differ is imported lazily)
        self.saved: SavedReport | None = load_saved(Path(diff_json), self.b.path) if diff_json is not None else None
        self.notices: list[str] = []
        self._diffs: OrderedDict[str, SampleDiff] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def pair(self) -> bool:
        """Two traces are shown."""
        return self.b is not None

    # ------------------------------------------------------------------ opening and diffing
    def open(self) -> list[str]:
        """Index both traces; return notices (incomplete traces, report mismatches)."""
        notes = self.a.open()
        if self.b is not None:
            try:
                notes += self.b.open()
            except TraceError as exc:
                notes.append(f"{self.b.label} cannot be read ({exc}); showing {self.a.label} alone")
                self.b = None
                self.saved = None
        if self.saved is not None:
            notes.extend(self.saved.notes)
        self.notices = notes
        return notes

    def compute_diff(self) -> None:
        """Run the differ over the whole pair (blocking: call from a worker thread).

        Raises:
            TraceError: the traces cannot be compared or read.
        """
        from steptrace.differ import DiffOptions, diff

        assert self.b is not None
        report = diff(self.a.reader, [self.b.reader], DiffOptions(align=self.align))
        with self._lock:
            self.report = report
            self._diffs.clear()

    def sample_diff(self, sample: str) -> SampleDiff | None:
        """The differ's rows of ``sample``: sliced from the full report, or — with a saved report
        — computed for this sample alone (blocking: call from a worker). None with one trace."""
        if self.b is None:
            return None
        with self._lock:
            if sample in self._diffs:
                self._diffs.move_to_end(sample)
                return self._diffs[sample]
            report = self.report
        if report is None:
            if self.saved is None:
                return None
            from steptrace.differ import DiffOptions, diff

            report = diff(self.a.reader, [self.b.reader], DiffOptions(align=self.saved.align,
                                                                     samples=[escape_glob(sample)]))
        sd = slice_sample(report.worst, sample, self.a.vocab_head)
        with self._lock:
            self._diffs[sample] = sd
            while len(self._diffs) > 4:
                self._diffs.popitem(last=False)
        return sd

    def samples(self) -> list[SampleRow]:
        """The samples pane's rows (verdicts once a report is known)."""
        names = set(self.a.sample_names()) | (set(self.b.sample_names()) if self.b else set())
        results = (self.report.worst.per_sample if self.report is not None
                   else self.saved.per_sample if self.saved is not None else [])
        per = {p.sample: p for p in results}
        out = []
        for s in sorted(names):
            p = per.get(s)
            out.append(SampleRow(sample=s, a_steps=len(self.a.runs(s)), b_steps=len(self.b.runs(s)) if self.b else None,
                                 verdict=p.verdict if p else None, first_step=p.first_step if p else None,
                                 kind=p.kind if p else None, drift_step=p.drift_step if p else None,
                                 culprit=p.culprit if p else None))
        return out

    def worst_sample(self) -> str | None:
        """The sample of the report's first divergence (worst verdict, earliest step), if known."""
        if self.report is not None and self.report.worst.first_divergence is not None:
            return self.report.worst.first_divergence.sample
        if self.saved is not None and self.saved.first:
            return self.saved.first.sample
        return None

    def landmarks(self, sample: str) -> tuple[int | None, int | None]:
        """(first divergence step, drift onset step) of ``sample``, when a report knows them."""
        results = (self.report.worst.per_sample if self.report is not None
                   else self.saved.per_sample if self.saved is not None else [])
        p = next((p for p in results if p.sample == sample), None)
        return (p.first_step, p.drift_step) if p else (None, None)

    # ------------------------------------------------------------------ rows
    def rowmap(self, sample: str, diff: SampleDiff | None = None) -> RowMap:
        """The rows of ``sample``: aligned by the differ when ``diff`` is given, else by step."""
        ra = self.a.runs(sample)
        rb = self.b.runs(sample) if self.b is not None else None
        if diff is not None:
            t = diff.steps
            verdict = np.asarray(pc.index_in(t["verdict"].cast(pa.string()), pa.array(VERDICTS)), np.int8) \
                if t.num_rows else np.zeros(0, np.int8)
            return RowMap(sample, "diff", t.num_rows, ra, rb,
                          a_step=t["a_step"].to_numpy(), b_step=t["b_step"].to_numpy(), verdict=verdict,
                          after=t["after"].to_numpy(zero_copy_only=False), diff=diff)
        size = len(ra) if len(ra) else (len(rb) if rb is not None else 0)
        return RowMap(sample, "steps" if self.b is not None else "trace", size, ra, rb)

    def fetch(self, rm: RowMap, r0: int, r1: int) -> list[StepRow]:
        """Rows ``r0..r1`` (shown rows) of ``rm`` with both sides' decisions."""
        rows = np.arange(max(r0, 0), min(r1, rm.size))
        base = rm.base(rows)
        a_steps, b_steps = rm.steps(base)
        a = self.a.decisions(rm.a_runs, TraceSource.rows_of(rm.a_runs, a_steps))
        b = (self.b.decisions(rm.b_runs, TraceSource.rows_of(rm.b_runs, b_steps))
             if self.b is not None and b_steps is not None else [None] * rows.size)
        out = []
        for i, (r, da, db) in enumerate(zip(rows.tolist(), a, b)):
            verdict = VERDICTS[int(rm.verdict[base[i]])] if rm.verdict is not None else None
            low = any(d is not None and d.margin < self.low_margin for d in (da, db))
            watched = []
            names = [w[0] for w in (da.watched if da else ())] or [w[0] for w in (db.watched if db else ())]
            for name in names:
                wa = next((w for w in (da.watched if da else ()) if w[0] == name), None)
                wb = next((w for w in (db.watched if db else ()) if w[0] == name), None)
                watched.append((name, wa[3] if wa else None, wb[3] if wb else None,
                                da.topk_logits[0] - wa[2] if da and wa and wa[2] is not None else None))
            out.append(StepRow(row=r, a_step=int(a_steps[i]) if a_steps[i] >= 0 else None,
                               b_step=int(b_steps[i]) if b_steps is not None and b_steps[i] >= 0 else None,
                               a=da, b=db, verdict=verdict, after=bool(rm.after[base[i]]) if rm.after is not None
                               else False, low=low, watched=tuple(watched)))
        return out

    def detail(self, rm: RowMap, row: int) -> StepDetail | None:
        """Everything about shown row ``row``: all heads of both sides, tensors with metrics."""
        got = self.fetch(rm, row, row + 1)
        if not got:
            return None
        r = got[0]
        a_heads = tuple(self.a.heads_at(rm.sample, r.a_step)) if r.a_step is not None else ()
        b_heads = tuple(self.b.heads_at(rm.sample, r.b_step)) if self.b is not None and r.b_step is not None else ()
        eps = evidence = pointer = None
        if rm.diff is not None and rm.diff.steps.num_rows:
            i = int(rm.base(np.array([row]))[0])
            e = rm.diff.steps["epsilon"][i].as_py()
            eps = None if e is None or math.isnan(e) else e
            if r.verdict in ("flip", "divergent") and "shift" in rm.diff.steps.column_names:
                evidence = near_tie_line(rm.diff.steps, i)
        lines = tensor_lines(self.a, self.b, rm.sample, r.a_step, r.b_step, rm.diff)
        d = rm.diff
        if (d is not None and d.culprit and d.culprit_step is not None and r.step == d.first_step
                and d.culprit_step != r.a_step):
            pointer = (f"the first divergence has no tensor beyond tolerance at this step; the culprit "
                       f"{d.culprit} was recorded at step {d.culprit_step} (g {d.culprit_step} goes there)")
        return StepDetail(rm.sample, r, a_heads, b_heads, tuple(lines), eps, f"{self.a.label} ({self.a.describe})",
                          f"{self.b.label} ({self.b.describe})" if self.b is not None else None, evidence, pointer)

    # ------------------------------------------------------------------ scans
    def _margins(self, rm: RowMap, base: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        a_steps, b_steps = rm.steps(base)
        if rm.kind == "diff":
            t = rm.diff.steps
            return (t["a_margin"].to_numpy(zero_copy_only=False)[base].astype(np.float64),
                    t["b_margin"].to_numpy(zero_copy_only=False)[base].astype(np.float64))
        ma = self.a.values_at(rm.a_runs, TraceSource.rows_of(rm.a_runs, a_steps), "margin")
        mb = (self.b.values_at(rm.b_runs, TraceSource.rows_of(rm.b_runs, b_steps), "margin")
              if self.b is not None and b_steps is not None else None)
        return ma, mb

    def low_rows(self, rm: RowMap) -> np.ndarray:
        """Base rows whose margin (either side) is below ``low_margin`` (chunked scan)."""
        hits = []
        for c0 in range(0, rm.base_size, CHUNK):
            base = np.arange(c0, min(c0 + CHUNK, rm.base_size))
            ma, mb = self._margins(rm, base)
            low = ma < self.low_margin
            if mb is not None:
                low |= mb < self.low_margin
            hits.append(base[low])
        return np.concatenate(hits) if hits else np.zeros(0, np.int64)

    def filtered(self, rm: RowMap, select: np.ndarray | None, label: str | None) -> RowMap:
        """``rm`` showing only base rows ``select`` (None: all rows)."""
        return replace(rm, select=None if select is None else np.asarray(select, np.int64), filter_label=label)

    def mismatch_rows(self, rm: RowMap) -> np.ndarray | None:
        """Shown rows where the decisions part (flip or worse, not after a divergence); None
        while no diff is known for the sample."""
        if rm.kind != "diff":
            return None
        base = np.flatnonzero((rm.verdict >= FLIP) & ~rm.after)
        if rm.select is None:
            return base
        pos = np.searchsorted(rm.select, base)
        ok = pos < rm.select.size
        return pos[ok][rm.select[pos[ok]] == base[ok]]

    def find(self, rm: RowMap, start: int, query: str, forward: bool = True) -> int | None:
        """The next shown row after ``start`` (before it when not ``forward``) whose token on
        either side matches ``query`` (a token id, or text in its piece; smart case)."""
        ids = self.a.token_ids(query)
        text = None if ids.size or query.strip().lstrip("-").isdigit() else query.strip()
        order = range(start + 1, rm.size, CHUNK) if forward else range(start - 1, -1, -CHUNK)
        for c in order:
            rows = np.arange(c, min(c + CHUNK, rm.size)) if forward else np.arange(max(c - CHUNK + 1, 0), c + 1)
            base = rm.base(rows)
            a_steps, b_steps = rm.steps(base)
            hit = self.a.matches(rm.a_runs, TraceSource.rows_of(rm.a_runs, a_steps), ids, text)
            if self.b is not None and b_steps is not None:
                hit |= self.b.matches(rm.b_runs, TraceSource.rows_of(rm.b_runs, b_steps), ids, text)
            idx = np.flatnonzero(hit)
            if idx.size:
                return int(rows[idx[0] if forward else idx[-1]])
        return None

    def series(self, rm: RowMap, buckets: int = 512) -> Series:
        """The sample's margins (smallest per bucket) and tensor errors over its steps."""
        base_all = rm.base_size
        lo_hi = rm.steps(np.array([0, max(base_all - 1, 0)])) if base_all else (np.array([0, 0]), None)
        lo, hi = int(max(lo_hi[0][0], 0)), int(max(lo_hi[0][1], 0))
        if rm.kind == "diff" and base_all:
            valid = rm.a_step[rm.a_step >= 0]
            lo, hi = (int(valid.min()), int(valid.max())) if valid.size else (0, 0)
        nb = max(min(buckets, hi - lo + 1), 1)
        am = np.full(nb, np.inf)
        bm = np.full(nb, np.inf) if self.b is not None else None
        for c0 in range(0, base_all, CHUNK):
            base = np.arange(c0, min(c0 + CHUNK, base_all))
            steps, _ = rm.steps(base)
            ma, mb = self._margins(rm, base)
            ok = steps >= 0
            idx = np.clip((steps[ok] - lo) * nb // max(hi - lo + 1, 1), 0, nb - 1)
            _bucket_min(am, idx, ma[ok])
            if bm is not None and mb is not None:
                _bucket_min(bm, idx, mb[ok])
        for m in (am, bm):
            if m is not None:
                m[np.isinf(m)] = np.nan
        first, drift = self.landmarks(rm.sample)
        t, bad, label = tensor_series(self.a, rm.sample, rm.diff, lo, hi, nb)
        return Series(rm.sample, lo, hi, am, bm, t, bad, label, first, drift, self.low_margin)


def _bucket_min(out: np.ndarray, idx: np.ndarray, vals: np.ndarray) -> None:
    """``out[idx] = min(out[idx], vals)`` per bucket, vectorised (NaN values ignored)."""
    np.minimum.at(out, idx, np.where(np.isnan(vals), np.inf, vals))


def near_tie_line(steps: pa.Table, i: int) -> str:
    """One line of the near-tie evidence of steps-table row ``i``: shift, noise, ε and the rule."""
    def val(name: str) -> float | None:
        v = steps[name][i].as_py()
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    def g(v: float | None) -> str:
        return "–" if v is None else f"{v:.3g}"

    rule = steps["near_tie_rule"][i].as_py() if "near_tie_rule" in steps.column_names else None
    why = {"grid": "near tie: within the grid's ε", "coin_toss": "near tie: a coin toss",
           "noise": "near tie: within the pair's noise", "epsilon": "near tie: within --epsilon"}.get(rule or "",
                                                                                                 "not explained")
    return (f"shift {g(val('shift'))} = gaps {g(val('a_gap'))} + {g(val('b_gap'))} · noise {g(val('noise'))} · "
            f"ε {g(val('epsilon'))} → {why}")

