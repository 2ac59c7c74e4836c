"""Lazy, batch-wise access to a trace's part files for the viewer.

The viewer never loads a whole decisions or tensors table. It reads the *key columns* of each
record batch once, one batch at a time, and keeps only a compact index:

- decisions: per (sample, head), *runs* — stretches of rows where the step grows by one and the
  row number by a constant stride (one run per batch for a writer that records steps in order;
  a shuffled trace degrades to short runs, still correct);
- tensors: a *zone map* — per batch and sample, the smallest and largest step.

Rows are then read by (part, batch, row) through a byte-bounded LRU cache of projected record
batches, so memory depends on the batch size and the cache bound, not on the number of steps.
Files are read through :meth:`tracefmt.TraceReader.part_files` (:class:`steptrace.tracefmt.DataFile`):
memory-mapped, projected to the columns asked for, interrupted parts recovered, and every
pyarrow failure already a TraceError there.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steptrace.tracefmt import DataFile, TraceReader

#: Head codes are packed with sample codes as ``sample * _HEADS + head``.
_HEADS = 1 << 16


class BatchCache:
    """A thread-safe LRU of record batches bounded by their total size in bytes.

    Args:
        max_bytes: evict least recently used batches above this many bytes.
    """

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[tuple, pa.RecordBatch] = OrderedDict()
        self._loading: dict[tuple, threading.Lock] = {}
        self._lock = threading.Lock()

    def get(self, key: tuple) -> pa.RecordBatch | None:
        """Return the cached batch for ``key`` (marking it recently used), or None."""
        with self._lock:
            b = self._items.get(key)
            if b is not None:
                self._items.move_to_end(key)
            return b

    def load(self, key: tuple, loader: Callable[[], pa.RecordBatch]) -> pa.RecordBatch:
        """Return the batch for ``key``, calling ``loader()`` on a miss; concurrent misses of one
        key wait for the first loader instead of decoding the same batch twice."""
        b = self.get(key)
        if b is not None:
            return b
        with self._lock:
            lock = self._loading.setdefault(key, threading.Lock())
        with lock:
            b = self.get(key)
            if b is None:
                b = loader()
                self.put(key, b)
        with self._lock:
            self._loading.pop(key, None)
        return b

    def put(self, key: tuple, batch: pa.RecordBatch) -> None:
        """Cache ``batch`` under ``key``, evicting old batches beyond the byte bound."""
        with self._lock:
            if key in self._items:
                return
            self._items[key] = batch
            self.bytes += batch.nbytes
            while self.bytes > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes


def codes(col: pa.Array, table: dict[str, int]) -> np.ndarray:
    """Map a string (or dictionary) column to integer codes shared across batches via ``table``."""
    if not pa.types.is_dictionary(col.type):
        col = pc.dictionary_encode(col)
    mapping = np.array([table.setdefault(v, len(table)) for v in col.dictionary.to_pylist()], np.int64)
    idx = col.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return mapping[idx] if mapping.size else np.zeros(0, np.int64)


@dataclass
class Runs:
    """The rows of one (sample, head) as arithmetic runs, sorted by step.

    ``row i`` of the sample (0-based, in step order) lies in run ``r`` with
    ``start[r] <= i < start[r+1]`` at step ``step[r] + i - start[r]`` and file row
    ``row[r] + (i - start[r]) * stride[r]`` of batch ``batch[r]`` of part ``part[r]``.
    """

    step: np.ndarray
    start: np.ndarray  # len(runs) + 1 cumulative row counts
    part: np.ndarray
    batch: np.ndarray
    row: np.ndarray
    stride: np.ndarray

    def __len__(self) -> int:
        return int(self.start[-1])

    def locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Return (step, part, batch, file row) of sample rows ``rows`` (vectorised)."""
        rows = np.asarray(rows, np.int64)
        r = np.searchsorted(self.start, rows, side="right") - 1
        off = rows - self.start[r]
        return self.step[r] + off, self.part[r], self.batch[r], self.row[r] + off * self.stride[r]

    def steps(self, rows: np.ndarray) -> np.ndarray:
        """Return the steps of sample rows ``rows``."""
        return self.locate(rows)[0]

    def nearest_row(self, step: int) -> int:
        """Return the row of ``step``, or of the first recorded step after it (clamped to the last row)."""
        n = len(self)
        if n == 0:
            return 0
        r = int(np.searchsorted(self.step, step, side="right")) - 1
        if r < 0:
            return 0
        off = step - int(self.step[r])
        length = int(self.start[r + 1] - self.start[r])
        return min(int(self.start[r]) + off if off < length else int(self.start[r + 1]), n - 1)


def _batch_runs(g: np.ndarray, st: np.ndarray) -> tuple[np.ndarray, ...]:
    """Split one batch's rows into runs; returns (group, first step, length, first row, stride)."""
    st = st.astype(np.int64)
    n = g.size
    dg, ds = np.diff(g), np.diff(st)
    in_order = bool(((dg > 0) | ((dg == 0) & (ds > 0))).all())
    order = np.arange(n) if in_order else np.lexsort((st, g))
    gs, ss = g[order], st[order]
    new = np.ones(n, bool)
    if n > 1:
        ok = (gs[1:] == gs[:-1]) & (np.diff(ss) == 1)
        stride = np.diff(order)
        new[1:] = ~ok
        if n > 2:
            new[2:] |= ok[:-1] & (stride[1:] != stride[:-1])
    starts = np.flatnonzero(new)
    lengths = np.diff(np.r_[starts, n])
    first = order[starts]
    second = order[np.minimum(starts + 1, n - 1)]
    strides = np.where(lengths > 1, second - first, 1)
    return gs[starts], ss[starts], lengths, first, strides


class DecisionIndex:
    """Runs of every (sample, head) over all decisions files of a trace.

    Args:
        files: the parts' decisions files.
        samples: shared sample-name -> code table (filled in).

    Raises:
        TraceCorruptError: a batch cannot be read.
    """

    KEYS = ("sample", "step", "head")

    def __init__(self, files: list[DataFile | None], samples: dict[str, int]) -> None:
        self.heads: dict[str, int] = {}
        self.rows = 0
        cols: list[list[np.ndarray]] = [[] for _ in range(7)]
        self.file_rows: list[int] = []
        for p, f in enumerate(files):
            self.file_rows.append(0)
            for b in range(f.num_batches if f is not None else 0):
                batch = f.batch(b, self.KEYS)
                self.file_rows[-1] += batch.num_rows
                s = codes(batch.column(0), samples)
                h = codes(batch.column(2), self.heads)
                st = batch.column(1).to_numpy(zero_copy_only=False)
                self.rows += batch.num_rows
                runs = _batch_runs(s * _HEADS + h, st)
                for c, v in zip(cols, (*runs, np.full(runs[0].size, p), np.full(runs[0].size, b))):
                    c.append(v)
        g, step, length, row, stride, part, batch = (np.concatenate(c) if c else np.zeros(0, np.int64) for c in cols)
        order = np.lexsort((step, g))
        g, step, length, row, stride, part, batch = (x[order] for x in (g, step, length, row, stride, part, batch))
        bounds = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if g.size else np.zeros(0, np.int64)
        ends = np.r_[bounds[1:], g.size]
        self._runs: dict[tuple[int, int], Runs] = {}
        for lo, hi in zip(bounds.tolist(), ends.tolist()):
            key = (int(g[lo] // _HEADS), int(g[lo] % _HEADS))
            start = np.r_[0, np.cumsum(length[lo:hi])].astype(np.int64)
            self._runs[key] = Runs(step[lo:hi], start, part[lo:hi], batch[lo:hi], row[lo:hi], stride[lo:hi])

    def runs(self, sample: int, head: int) -> Runs:
        """Return the runs of ``(sample, head)`` codes (empty when absent)."""
        r = self._runs.get((sample, head))
        if r is None:
            z = np.zeros(0, np.int64)
            return Runs(z, np.zeros(1, np.int64), z, z, z, z)
        return r

    def sample_codes(self) -> set[int]:
        """Codes of the samples that have decisions."""
        return {s for s, _ in self._runs}

    def heads_of(self, sample: int) -> list[int]:
        """Return the head codes recorded for ``sample``."""
        return sorted(h for s, h in self._runs if s == sample)


class TensorIndex:
    """A zone map of tensors files: per (part, batch, sample), the smallest and largest step."""

    def __init__(self, files: list[DataFile | None], samples: dict[str, int]) -> None:
        zs, lo, hi, zp, zb = [], [], [], [], []
        self.rows = 0
        for p, f in enumerate(files):
            for b in range(f.num_batches if f is not None else 0):
                batch = f.batch(b, ("sample", "step"))
                if batch.num_rows == 0:
                    continue
                self.rows += batch.num_rows
                s = codes(batch.column(0), samples)
                st = batch.column(1).to_numpy(zero_copy_only=False)
                order = np.argsort(s, kind="stable")
                us, first = np.unique(s[order], return_index=True)
                zs.append(us)
                lo.append(np.minimum.reduceat(st[order], first))
                hi.append(np.maximum.reduceat(st[order], first))
                zp.append(np.full(us.size, p))
                zb.append(np.full(us.size, b))
        cat = (lambda x: np.concatenate(x) if x else np.zeros(0, np.int64))
        self.sample, self.lo, self.hi, self.part, self.batch = cat(zs), cat(lo), cat(hi), cat(zp), cat(zb)

    def zones(self, sample: int, step: int | None = None) -> list[tuple[int, int]]:
        """Return the (part, batch) pairs that may hold rows of ``sample`` (at ``step``)."""
        m = self.sample == sample
        if step is not None:
            m &= (self.lo <= step) & (self.hi >= step)
        return list(zip(self.part[m].tolist(), self.batch[m].tolist()))


def open_files(reader: TraceReader, kind: str) -> list[DataFile | None]:
    """Open the ``kind`` file of every part of ``reader``'s trace, in ``reader.parts`` order
    (None for an interrupted part that never created one); see :meth:`TraceReader.part_files`.

    Raises:
        TraceFormatError, TraceCorruptError: a file is foreign or damaged.
    """
    return reader.part_files(kind)
