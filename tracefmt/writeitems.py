"""What a :class:`steptrace.tracefmt.TraceWriter` hands its background thread: named queue items, and the
decision and tensor rows built from them in one place each, in SPEC.md §3.1 / §4.1 column order.

Every item is a small named record; the background thread dispatches on its type. Rows are
NamedTuples whose field names are the schema's column names (checked when this module is
imported), so adding a column to :data:`tracefmt.schema.DECISIONS` or
:data:`tracefmt.schema.TENSORS` without adding it here fails at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from itertools import chain
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa

from .checks import I64, opt_i32, opt_int, opt_str
from .decisions import Decision
from .errors import TraceUsageError
from .schema import DECISIONS, TENSORS
from .stats import StatsColumns, TensorStats


class _Now:
    """Default of ``time_us``: the wall-clock time of the call."""

    def __repr__(self) -> str:
        return "NOW"


NOW = _Now()


# ---------------------------------------------------------------------- rows
class RowKeys(NamedTuple):
    """The optional columns of a decision row a caller gives as keywords, checked."""

    forced: bool
    piece: str | None
    frame: int | None
    chunk: int | None
    position: int | None
    emission: int | None
    time: int | None  # microseconds since the epoch


class DecisionRow(NamedTuple):
    """One decisions row, field for field the columns of :data:`tracefmt.schema.DECISIONS`."""

    sample: str
    step: int
    head: str
    chosen: int
    argmax: int
    forced: bool
    topk_ids: np.ndarray  # int32
    topk_logits: np.ndarray  # float32
    margin: float
    logsumexp: float | None
    chosen_logit: float | None
    chosen_rank: int | None
    watched: list[dict] | None
    piece: str | None
    frame: int | None
    chunk: int | None
    position: int | None
    emission: int | None
    time: int | None


class TensorRow(NamedTuple):
    """One processed tensor: what :func:`tracefmt.batches.tensors_batch` turns into a row of
    :data:`tracefmt.schema.TENSORS` (``stats`` spreads over ``numel`` … ``inf_count``)."""

    sample: str
    step: int
    name: str
    call: int
    order: int
    source: str | None
    dtype: str
    shape: tuple[int, ...]
    stats: TensorStats
    digest: bytes | None
    value_ref: int | None


@dataclass(slots=True)
class TensorColumns:
    """Processed tensor rows column by column, field for field a :class:`TensorRow`: what
    :func:`tracefmt.batches.tensors_batch` turns into a record batch without a Python step
    per row. The writer builds them for small tensors as it computes their statistics."""

    sample: list[str]
    step: list[int]
    name: list[str]
    call: list[int]
    order: list[int]
    source: list[str | None]
    dtype: list[str]
    shape: list[tuple[int, ...]]
    stats: StatsColumns
    digest: list[bytes | None]
    value_ref: list[int | None]

    def __len__(self) -> int:
        return len(self.sample)

    def take(self, start: int, stop: int) -> TensorColumns:
        """Rows ``start`` to ``stop`` (excluded)."""
        s = slice(start, stop)
        return TensorColumns(self.sample[s], self.step[s], self.name[s], self.call[s], self.order[s], self.source[s],
                             self.dtype[s], self.shape[s], self.stats.take(s), self.digest[s], self.value_ref[s])

    @staticmethod
    def of_rows(rows: Sequence[TensorRow]) -> TensorColumns:
        """The columns of ``rows``.

        Raises:
            pyarrow.ArrowException, TypeError: a statistic is not a number or None.
        """
        if not rows:
            return TensorColumns([], [], [], [], [], [], [], [], StatsColumns.of_stats([]), [], [])
        sample, step, name, call, order, source, dtype, shape, stats, digest, ref = map(list, zip(*rows))
        return TensorColumns(sample, step, name, call, order, source, dtype, shape, StatsColumns.of_stats(stats),
                             digest, ref)

    @staticmethod
    def concat(parts: Sequence[TensorColumns]) -> TensorColumns:
        """The rows of ``parts``, one after the other."""
        if len(parts) == 1:
            return parts[0]
        lists = [list(chain.from_iterable(getattr(p, f) for p in parts)) for f in _LIST_FIELDS]
        stats = StatsColumns.concat([p.stats for p in parts])
        return TensorColumns(*lists[:8], stats, *lists[8:])


_LIST_FIELDS = tuple(f for f in TensorRow._fields if f != "stats")
_STAT_FIELDS = ("numel", "min", "max", "mean", "std", "abs_max", "l2", "nan_count", "inf_count")
if DecisionRow._fields != tuple(DECISIONS.names):
    raise AssertionError("DecisionRow must list the DECISIONS columns in schema order")
if (*TensorRow._fields[:8], *_STAT_FIELDS, *TensorRow._fields[9:]) != tuple(TENSORS.names):
    raise AssertionError("TensorRow (with stats spread) must list the TENSORS columns in schema order")
if tuple(f.name for f in fields(TensorColumns)) != TensorRow._fields:
    raise AssertionError("TensorColumns must list the fields of TensorRow in order")

ROW_KEYS = ("forced", "piece", "frame", "chunk", "position", "emission", "time_us")


def row_keys(keys: Mapping[str, Any]) -> RowKeys:
    """Check the optional columns of a decision row given as keywords.

    Args:
        keys: any of ``forced``, ``piece``, ``frame``, ``chunk``, ``position``, ``emission``,
            ``time_us`` (microseconds since the epoch; :data:`NOW` or absent: now; None: no time).

    Returns:
        The :class:`RowKeys`.

    Raises:
        TraceUsageError: an unknown keyword or a value of the wrong type.
    """
    if not keys.keys() - {"forced", "piece"}:  # a recorder's call: the common keys only
        piece = keys.get("piece")
        if piece is not None and type(piece) is not str:
            raise TraceUsageError(f"piece must be a string or None, got {piece!r}")
        return RowKeys(bool(keys.get("forced", False)), piece, None, None, None, None, time.time_ns() // 1000)
    unknown = keys.keys() - set(ROW_KEYS)
    if unknown:
        raise TraceUsageError(f"unknown decision field(s) {', '.join(sorted(unknown))}; use {', '.join(ROW_KEYS)}")
    t = keys.get("time_us", NOW)
    return RowKeys(
        bool(keys.get("forced", False)), opt_str("piece", keys.get("piece")), opt_i32("frame", keys.get("frame")),
        opt_i32("chunk", keys.get("chunk")), opt_i32("position", keys.get("position")),
        opt_i32("emission", keys.get("emission")),
        time.time_ns() // 1000 if t is NOW else opt_int("time_us", t, I64),
    )


def decision_row(
    sample: str, step: int, head: str, *, chosen: int, argmax: int, topk_ids: np.ndarray, topk_logits: np.ndarray,
    margin: float, logsumexp: float | None, chosen_logit: float | None, chosen_rank: int | None,
    watched: list[dict] | None, keys: RowKeys,
) -> DecisionRow:
    """Build a decision row from checked values (the one place decision rows are made).

    Args:
        sample, step, head: the row's key.
        chosen, argmax, topk_ids, topk_logits, margin, logsumexp, chosen_logit, chosen_rank,
            watched: the SPEC.md §3.1 columns of the same names (``watched`` None when empty).
        keys: the optional keyed columns.

    Returns:
        The :class:`DecisionRow`.
    """
    return DecisionRow(sample, step, head, chosen, argmax, keys.forced, topk_ids, topk_logits, margin, logsumexp,
                       chosen_logit, chosen_rank, watched, keys.piece, keys.frame, keys.chunk, keys.position,
                       keys.emission, keys.time)


def row_of_decision(sample: str, step: int, head: str, d: Decision, keys: RowKeys) -> DecisionRow:
    """The row of a :class:`tracefmt.decisions.Decision` from :func:`tracefmt.decisions.decide`
    (whose fields have the row's types already). ``chosen_logit``/``chosen_rank`` only when
    ``chosen`` is outside the top-k (SPEC.md §3.1 lets readers derive them otherwise)."""
    in_top = d.chosen == d.argmax or d.chosen in d.topk_ids  # the argmax is the first of the top k
    return decision_row(
        sample, step, head, chosen=d.chosen, argmax=d.argmax, topk_ids=d.topk_ids, topk_logits=d.topk_logits,
        margin=d.margin, logsumexp=d.logsumexp, chosen_logit=None if in_top else d.chosen_logit,
        chosen_rank=None if in_top else d.chosen_rank, watched=d.watched or None, keys=keys,
    )


# ---------------------------------------------------------------------- queue items
@dataclass(slots=True)
class TensorItem:
    """A tensor's canonical array on its way to statistics, digest and (``values``) encoding.

    ``pooled`` is the recycled buffer holding ``array``, given back when the item is done.
    """

    sample: str
    step: int
    name: str
    call: int
    order: int
    source: str | None
    dtype: str
    array: np.ndarray
    values: bool
    stats: TensorStats | None
    pooled: np.ndarray | None


class RowSetItem(NamedTuple):
    """A step's rows from a :class:`~tracefmt.lane.RowTemplate`: their arrays as one block
    (``RowTemplate.block``), made into :class:`TensorItem` rows on the writer's thread."""

    template: Any
    sample: str
    step: int
    order: int
    block: bytes


class StatsItem(NamedTuple):
    """A tensor whose statistics (and digest) were computed elsewhere."""

    sample: str
    step: int
    name: str
    call: int
    order: int
    source: str | None
    dtype: str
    shape: tuple[int, ...]
    stats: TensorStats
    digest: bytes | None


class LogitsItem(NamedTuple):
    """A copy of full logits whose decision the background thread derives."""

    sample: str
    step: int
    head: str
    logits: np.ndarray
    k: int
    chosen: int
    watched: list[int]
    keys: RowKeys


class DecisionItem(NamedTuple):
    """One finished decision row."""

    row: DecisionRow


class DecisionBatchItem(NamedTuple):
    """A whole checked record batch of decisions, written as it is."""

    batch: pa.RecordBatch


class DecisionColumnsItem(NamedTuple):
    """Decisions the background thread derived column by column (:func:`tracefmt.batches.decisions_batch_of_columns`),
    in place of the first of their logits items (the others become :data:`WAKE`)."""

    batch: pa.RecordBatch
    keys: list[tuple[str, int]]  # (sample, step) of each row


class ManyItem(NamedTuple):
    """Rows held by :meth:`tracefmt.lane.RecorderLane.hold` and handed over together."""

    items: list


class FlushItem(NamedTuple):
    """Write everything before this item, then set ``done``."""

    done: threading.Event


class CloseItem(NamedTuple):
    """Write everything before this item and end the background thread."""


class WakeItem(NamedTuple):
    """Wake the background thread (it then watches held rows' age)."""


CLOSE = CloseItem()
WAKE = WakeItem()


def rows_of_rowsets(items: list) -> list:
    """``items`` with each :class:`RowSetItem` replaced by its rows' :class:`TensorItem`."""
    out: list = []
    for it in items:
        if type(it) is RowSetItem:
            out += it.template.items(it.sample, it.step, it.order, it.block)
        else:
            out.append(it)
    return out


def item_bytes(item: Any) -> int:
    """The queue-budget bytes ``item`` holds (its array or logits), 0 for others."""
    if type(item) is TensorItem:
        return item.array.nbytes
    if type(item) is LogitsItem:
        return item.logits.nbytes
    if type(item) is RowSetItem:
        return item.template.nbytes
    return 0
