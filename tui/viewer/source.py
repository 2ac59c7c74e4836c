"""TraceSource: one trace, read lazily for the viewer (rows on demand, bounded memory).

Opening reads the manifest and the decisions files' key columns (``sample``, ``step``,
``head``), batch by batch, into a :class:`~steptrace.tui.viewer.index.DecisionIndex`. Everything else —
decision rows, tensor records, tensor values, per-sample scans for plots, searches — is read on
demand through projected record batches and a byte-bounded :class:`~steptrace.tui.viewer.index.BatchCache`.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steptrace.tracefmt import DataFile, TraceReader
from steptrace.tracefmt.errors import TraceCorruptError, ValuesNotRecordedError

from steptrace.tui.viewer.index import BatchCache, DecisionIndex, Runs, TensorIndex, codes, open_files
from steptrace.tui.viewer.values import Decision, TensorStat

ROW_COLUMNS = ("step", "head", "chosen", "argmax", "forced", "topk_ids", "topk_logits", "margin", "logsumexp",
               "watched", "piece")
TENSOR_COLUMNS = ("sample", "step", "name", "call", "order", "source", "dtype", "shape", "min", "max", "mean",
                  "abs_max", "nan_count", "inf_count", "digest", "value_ref")
PREVIEW_MAX_BYTES = 64 << 20


def bucket_max(out: np.ndarray, flag: np.ndarray, steps: np.ndarray, vals: np.ndarray, bad: np.ndarray,
               lo: int, hi: int) -> None:
    """Fold values at ``steps`` into per-bucket maxima ``out`` (and ``flag |= bad``) over ``lo..hi``."""
    ok = (steps >= lo) & (steps <= hi)
    idx = np.clip((steps[ok] - lo) * out.size // max(hi - lo + 1, 1), 0, out.size - 1)
    np.maximum.at(out, idx, np.where(np.isnan(vals[ok]), -np.inf, vals[ok]))
    np.logical_or.at(flag, idx, bad[ok])


def _f(x: object) -> float | None:
    return None if x is None else float(x)  # type: ignore[arg-type]


class TraceSource:
    """One trace opened for viewing.

    Args:
        path: the trace directory.
        cache: shared batch cache (a new 32 MB one by default).

    Raises:
        TraceNotFoundError, TraceFormatError, TraceVersionError: not a readable trace (from the
            manifest); data-file damage is raised later, by :meth:`open` and the readers.
    """

    def __init__(self, path: str | os.PathLike[str], *, cache: BatchCache | None = None) -> None:
        self.path = Path(path)
        self.reader = TraceReader(self.path)
        self.label = self.path.name or str(self.path)
        m = self.reader.metadata
        self.describe = " ".join(x for x in (m.runtime, m.precision) if x) or "trace"
        self.watched = dict(m.watched)
        self._watched_names = {v: k for k, v in self.watched.items()}
        self.vocab_head = m.vocab_head or "token"
        self.cache = cache or BatchCache()
        self.complete = self.reader.complete
        self.samples: dict[str, int] = {}
        self.index: DecisionIndex | None = None
        self._tindex: TensorIndex | None = None
        self._tfiles: list[DataFile | None] | None = None
        self._files: list[DataFile | None] = []
        self._vocab: list[str | None] | None = None
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ opening
    def open(self) -> list[str]:
        """Index the decisions (key columns only); return notices for the user.

        Raises:
            TraceCorruptError, TraceFormatError: a data file is damaged or foreign.
        """
        self._files = open_files(self.reader, "decisions")
        self.index = DecisionIndex(self._files, self.samples)
        notices = []
        for part, rows in zip(self.reader.parts, self.index.file_rows):
            want = part.counts.get("decisions")
            if part.complete and want is not None and rows != want:
                raise TraceCorruptError(f"part {part.id}: decisions file holds {rows} rows but the part was closed "
                                        f"with {want}; the trace is damaged")
        if not self.complete:
            open_parts = [p for p in self.reader.parts if not p.complete]
            damaged = any(f is not None and f.damaged_tail for f in self._files)
            notices.append(f"{self.label} is INCOMPLETE (interrupted or still being written): "
                           f"{len(open_parts)} open part(s); showing the {self.index.rows:,} decisions flushed"
                           + (", a damaged last batch was dropped" if damaged else ""))
        self._vocab = self.reader.vocab
        return notices

    def sample_names(self) -> list[str]:
        """Sample ids with decisions, sorted."""
        assert self.index is not None
        have = self.index.sample_codes()
        return sorted(n for n, c in self.samples.items() if c in have)

    def _head(self, sample: int) -> int | None:
        assert self.index is not None
        heads = self.index.heads_of(sample)
        code = self.index.heads.get(self.vocab_head)
        if code in heads:
            return code
        return heads[0] if heads else None

    def runs(self, sample: str) -> Runs:
        """The rows of ``sample`` on the vocabulary head (or its first head), in step order."""
        assert self.index is not None
        code = self.samples.get(sample)
        head = self._head(code) if code is not None else None
        if head is None:
            return self.index.runs(-1, -1)
        return self.index.runs(code, head)

    def piece(self, token: int) -> str | None:
        """The vocabulary piece of ``token``, or None."""
        v = self._vocab
        return v[token] if v is not None and 0 <= token < len(v) else None

    def token_ids(self, query: str) -> np.ndarray:
        """Ids whose piece contains ``query`` (smart case), or the id itself when ``query`` is a number."""
        q = query.strip()
        if q.lstrip("-").isdigit():
            return np.array([int(q)], np.int64)
        if self._vocab is None:
            return np.zeros(0, np.int64)
        fold = q == q.lower()
        hits = [i for i, p in enumerate(self._vocab) if p is not None and q in (p.lower() if fold else p)]
        return np.array(hits, np.int64)

    # ------------------------------------------------------------------ decisions
    def _batch(self, part: int, batch: int, columns: tuple[str, ...], kind: str = "decisions") -> pa.RecordBatch:
        files = self._files if kind == "decisions" else self._tensor_files()
        f = files[part]
        assert f is not None
        return self.cache.load((id(self), kind, part, batch, columns), lambda: f.batch(batch, columns))

    def _decision(self, d: dict) -> Decision:
        ids = tuple(d["topk_ids"] or ())
        watched = tuple((self._watched_names.get(w["id"], str(w["id"])), w["id"], _f(w["logit"]), w["rank"])
                        for w in (d["watched"] or ()))
        piece = d["piece"] if d["piece"] is not None else self.piece(d["chosen"])
        return Decision(
            step=d["step"], head=d["head"], chosen=d["chosen"], argmax=d["argmax"] if d["argmax"] is not None else ids[0],
            forced=bool(d["forced"]), topk_ids=ids, topk_logits=tuple(float(x) for x in (d["topk_logits"] or ())),
            topk_pieces=tuple(self.piece(i) for i in ids), margin=float(d["margin"]) if d["margin"] is not None else
            float("nan"), logsumexp=_f(d["logsumexp"]), piece=piece, watched=watched,
        )

    def decisions(self, runs: Runs, rows: np.ndarray) -> list[Decision | None]:
        """Return the decisions at sample rows ``rows`` of ``runs`` (None for rows out of range)."""
        rows = np.asarray(rows, np.int64)
        out: list[Decision | None] = [None] * rows.size
        ok = (rows >= 0) & (rows < len(runs))
        if not ok.any():
            return out
        pos = np.flatnonzero(ok)
        _, part, batch, frow = runs.locate(rows[ok])
        for p, b in sorted(set(zip(part.tolist(), batch.tolist()))):
            m = (part == p) & (batch == b)
            got = self._batch(p, b, ROW_COLUMNS).take(pa.array(frow[m])).to_pylist()
            for i, d in zip(pos[m].tolist(), got):
                out[i] = self._decision(d)
        return out

    def decisions_at_steps(self, runs: Runs, steps: np.ndarray) -> list[Decision | None]:
        """Return the decisions of ``runs`` at ``steps`` (None where a step was not recorded; -1 = none)."""
        return self.decisions(runs, self.rows_of(runs, steps))

    def _grouped(self, runs: Runs, rows: np.ndarray, column: str, cache: bool = False):
        """Yield (positions, column, file rows) per batch for valid sample rows ``rows`` (-1: skipped).

        Scans pass ``cache=False``: their columns are read, used and dropped, so a scan over
        millions of steps does not fill (or flush) the row cache."""
        ok = np.flatnonzero((rows >= 0) & (rows < len(runs)))
        if not ok.size:
            return
        _, part, batch, frow = runs.locate(rows[ok])
        key = part * (1 << 32) + batch
        for k in np.unique(key).tolist():
            m = key == k
            p, b = k >> 32, k & 0xFFFFFFFF
            if cache:
                col = self._batch(p, b, (column,)).column(0)
            else:
                f = self._files[p]
                assert f is not None
                col = f.batch(b, (column,)).column(0)
            yield ok[m], col, frow[m]

    def values_at(self, runs: Runs, rows: np.ndarray, column: str) -> np.ndarray:
        """Numeric ``column`` at sample rows ``rows`` as float64 (NaN where a row is -1 or null)."""
        rows = np.asarray(rows, np.int64)
        out = np.full(rows.size, np.nan)
        for pos, col, frow in self._grouped(runs, rows, column):
            vals = col.take(pa.array(frow))
            out[pos] = vals.to_numpy(zero_copy_only=False).astype(np.float64)
        return out

    def matches(self, runs: Runs, rows: np.ndarray, ids: np.ndarray, text: str | None) -> np.ndarray:
        """Whether the token at each sample row is one of ``ids`` or, without a vocabulary, its
        recorded piece contains ``text`` (smart case)."""
        rows = np.asarray(rows, np.int64)
        out = np.zeros(rows.size, bool)
        if text is not None and self._vocab is None:
            for pos, col, frow in self._grouped(runs, rows, "piece"):
                vals = col.take(pa.array(frow))
                if pa.types.is_dictionary(vals.type):
                    vals = vals.dictionary_decode()
                fold = text == text.lower()
                hit = pc.match_substring(vals, text, ignore_case=fold)
                out[pos] = hit.fill_null(False).to_numpy(zero_copy_only=False)
            return out
        if not ids.size:
            return out
        for pos, col, frow in self._grouped(runs, rows, "chosen"):
            out[pos] = np.isin(col.to_numpy(zero_copy_only=False)[frow], ids)
        return out

    @staticmethod
    def rows_of(runs: Runs, steps: np.ndarray) -> np.ndarray:
        """Sample rows of ``steps`` in ``runs`` (-1 where not recorded), vectorised."""
        steps = np.asarray(steps, np.int64)
        if len(runs) == 0:
            return np.full(steps.size, -1, np.int64)
        r = np.searchsorted(runs.step, steps, side="right") - 1
        rc = np.maximum(r, 0)
        off = steps - runs.step[rc]
        ok = (r >= 0) & (off < runs.start[rc + 1] - runs.start[rc]) & (steps >= 0)
        return np.where(ok, runs.start[rc] + off, -1)

    def heads_at(self, sample: str, step: int) -> list[Decision]:
        """Every head's decision of ``sample`` at ``step``."""
        assert self.index is not None
        code = self.samples.get(sample)
        if code is None:
            return []
        names = {c: n for n, c in self.index.heads.items()}
        main = names.get(self._head(code) if self._head(code) is not None else -1)
        out = []
        for h in self.index.heads_of(code):
            runs = self.index.runs(code, h)
            d = self.decisions_at_steps(runs, np.array([step]))[0]
            if d is not None:
                out.append(d)
        out.sort(key=lambda d: (d.head != main, d.head))
        return out

    # ------------------------------------------------------------------ tensors
    def _tensor_files(self) -> list[DataFile | None]:
        with self._lock:
            if self._tfiles is None:
                self._tfiles = open_files(self.reader, "tensors")
            return self._tfiles

    def tensor_index(self) -> TensorIndex:
        """The zone map of the tensors files (built on first use)."""
        files = self._tensor_files()
        with self._lock:
            if self._tindex is None:
                self._tindex = TensorIndex(files, self.samples)
            return self._tindex

    def tensors_at(self, sample: str, step: int) -> list[TensorStat]:
        """Tensor records of ``sample`` at ``step``, in execution order."""
        code = self.samples.get(sample)
        if code is None or step is None:
            return []
        out = []
        for p, b in self.tensor_index().zones(code, step):
            batch = self._batch(p, b, TENSOR_COLUMNS, kind="tensors")
            st = batch.column(1).to_numpy(zero_copy_only=False)
            hit = np.flatnonzero(st == step)
            if not hit.size:
                continue
            for r in batch.take(pa.array(hit)).to_pylist():
                if r["sample"] != sample:
                    continue
                out.append(TensorStat(
                    name=r["name"], call=r["call"] or 0, order=r["order"] if r["order"] is not None else 0,
                    source=r["source"], dtype=r["dtype"], shape=tuple(r["shape"] or ()), min=r["min"], max=r["max"],
                    mean=r["mean"], abs_max=r["abs_max"], nan_count=r["nan_count"] or 0,
                    inf_count=r["inf_count"] or 0, part=p, value_ref=r["value_ref"], digest=r["digest"],
                ))
        out.sort(key=lambda t: (t.order, t.name, t.call))
        return out

    def tensor_series(self, sample: str, lo: int, hi: int, nb: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Per bucket of steps ``lo..hi`` (``nb`` buckets): the largest |x| of any tensor record of
        ``sample``, and whether one holds NaN/Inf; None when the sample has no tensors. Streams
        batch by batch (memory of ``nb``, not of the number of records)."""
        code = self.samples.get(sample)
        zones = self.tensor_index().zones(code) if code is not None else []
        if not zones:
            return None
        files = self._tensor_files()
        out, flag = np.full(nb, -np.inf), np.zeros(nb, bool)
        for p, b in zones:
            f = files[p]
            assert f is not None
            batch = f.batch(b, ("sample", "step", "abs_max", "nan_count", "inf_count"))
            m = codes(batch.column(0), self.samples) == code
            step, mag, nans, infs = (batch.column(i).to_numpy(zero_copy_only=False)[m] for i in range(1, 5))
            bucket_max(out, flag, step.astype(np.int64), mag.astype(np.float64), (nans + infs) > 0, lo, hi)
        out[np.isinf(out)] = np.nan
        return out, flag

    def tensor_values(self, t: TensorStat) -> np.ndarray:
        """The values of tensor record ``t``, checked against its digest.

        Raises:
            ValuesNotRecordedError: ``t`` holds statistics only.
            TraceCorruptError: the payload is missing, damaged or does not match its digest.
        """
        if t.value_ref is None:
            raise ValuesNotRecordedError(f"tensor {t.name!r} was recorded as statistics only")
        with self._lock:  # the reader loads its values files lazily; workers share it
            return self.reader.tensor_at(t.part, t.value_ref, dtype=t.dtype, shape=t.shape, digest=t.digest,
                                         where=f"tensor {t.name!r}", max_bytes=PREVIEW_MAX_BYTES)
