"""The tensor rows a writer's background thread keeps until a flush: finished rows, rows whose
job is still running, and the rows of small tensors kept as columns (:class:`ColumnRows`) from
the moment their statistics are computed, so that neither statistics, rows nor the record batch
take a Python step per row."""

from __future__ import annotations

import operator
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .stats import StatsColumns
from .writeitems import TensorColumns, TensorRow


class SmallRows(NamedTuple):
    """The small tensor items of a :class:`tracefmt.writeitems.ManyItem` recorded without values,
    with their statistics as columns (what ``writerloop._stats_of_small`` finds)."""

    index: list[int]  # positions in the ManyItem's items, ascending
    arrays: list[np.ndarray]
    stats: StatsColumns


_getters = [operator.attrgetter(f) for f in ("sample", "step", "name", "call", "order", "source", "dtype", "pooled")]
_shape_of = operator.attrgetter("shape")
_nbytes_of = operator.attrgetter("nbytes")


def columns_of_small(items: list, small: SmallRows, digest: Callable[[Any], bytes]) -> tuple[TensorColumns, list, int]:
    """The rows of ``small`` (of ``items``) as columns, their digests computed. Returns (the
    columns, the items' pooled buffers (None for most), their arrays' bytes)."""
    rows = list(map(items.__getitem__, small.index))
    # a pass per field: no tuple per row (each would count towards a garbage collection)
    sample, step, name, call, order, source, dtype, pooled = (list(map(get, rows)) for get in _getters)
    arrays = small.arrays
    cols = TensorColumns(sample, step, name, call, order, source, dtype, list(map(_shape_of, arrays)), small.stats,
                         list(map(digest, arrays)), [None] * len(arrays))
    return cols, pooled, sum(map(_nbytes_of, arrays))


def item_runs(index: list[int]) -> list[tuple[int, int, int]]:
    """The runs of consecutive positions in ``index``: (first position, last + 1, where the run
    starts in ``index``)."""
    breaks = (np.flatnonzero(np.diff(index) != 1) + 1).tolist()
    firsts = [0, *breaks]
    return [(index[a], index[b - 1] + 1, a) for a, b in zip(firsts, [*breaks, len(index)])]


def key_starts(cols: TensorColumns) -> list[int]:
    """The rows of ``cols`` whose (sample, step) may differ from the row before (row 0 and
    every change of step or of the sample string object: a superset of the changes of key)."""
    n = len(cols)
    step = np.array(cols.step, np.int64)
    sample = np.fromiter(map(id, cols.sample), np.int64, n)
    change = np.ones(n, bool)
    np.not_equal(step[1:], step[:-1], out=change[1:])
    change[1:] |= sample[1:] != sample[:-1]
    return np.flatnonzero(change).tolist()


@dataclass(slots=True)
class ColumnRows:
    """Rows ``start`` to ``stop`` of columns waiting for the flush."""

    cols: TensorColumns
    start: int
    stop: int


class PendingRow(NamedTuple):
    """A tensor row (without statistics and digest yet) and the job computing them."""

    row: TensorRow
    job: Future


def finished_row(r: TensorRow | PendingRow) -> TensorRow:
    """The finished row of ``r``, waiting for a pending row's job."""
    if type(r) is TensorRow:
        return r
    res = r.job.result()
    return r.row._replace(stats=res.stats, digest=res.digest)


def add_columns(ten: list, cols: TensorColumns, start: int, stop: int) -> None:
    """Add rows ``start`` to ``stop`` of ``cols`` to the rows waiting for the flush (extending
    the last entry when it ends where they begin)."""
    last = ten[-1] if ten else None
    if type(last) is ColumnRows and last.cols is cols and last.stop == start:
        last.stop = stop
    else:
        ten.append(ColumnRows(cols, start, stop))


def pending_columns(ten: list[TensorRow | PendingRow | ColumnRows]) -> TensorColumns:
    """The rows waiting for the flush as columns, in order (pending rows' jobs waited for)."""
    parts: list[TensorColumns] = []
    rows: list[TensorRow] = []
    for r in ten:
        if type(r) is ColumnRows:
            if rows:
                parts.append(TensorColumns.of_rows(rows))
                rows = []
            parts.append(r.cols.take(r.start, r.stop))
        else:
            rows.append(finished_row(r))
    if rows or not parts:
        parts.append(TensorColumns.of_rows(rows))
    return TensorColumns.concat(parts)
