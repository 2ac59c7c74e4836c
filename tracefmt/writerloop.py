"""The background thread of a :class:`steptrace.tracefmt.TraceWriter`: takes queued items, derives
decisions from logits, has large tensors' statistics, digests and payloads computed on job
threads (:mod:`steptrace.tracefmt.tensorjobs`), appends each payload to the values file as soon as
it and those before it are ready, and flushes record batches of rows to the part's files."""

from __future__ import annotations

import queue
import time
from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import pyarrow as pa

from .batches import decisions_batch, decisions_batch_of_columns, tensors_batch, values_batch
from .decisions import ExactColumns, decide, decide_columns
from .errors import TraceError
from .ipcfile import ArrowAppender
from .outbox import BufferPool, Outbox
from .payload import Encoder
from .pendingrows import (
    ColumnRows,
    PendingRow,
    SmallRows,
    add_columns,
    columns_of_small,
    item_runs,
    key_starts,
    pending_columns,
)
from .stats import SMALL_ELEMENTS, stats_columns
from .tensorjobs import TensorJobs, job_threads
from .writeitems import (
    WAKE,
    CloseItem,
    DecisionBatchItem,
    DecisionColumnsItem,
    DecisionItem,
    DecisionRow,
    FlushItem,
    LogitsItem,
    ManyItem,
    RowSetItem,
    StatsItem,
    TensorColumns,
    TensorItem,
    TensorRow,
    WakeItem,
    item_bytes,
    row_of_decision,
    rows_of_rowsets,
)


def _stats_of_small(items: list) -> SmallRows | None:
    """The statistics of the small tensor items without stats of ``items``, in a few numpy calls
    (:func:`tracefmt.stats.stats_columns`): items with values get theirs in place; those without
    (statistics and digest only) are returned with their statistics as columns. None: none of
    those, or fewer than two small items in all (reduced one at a time, as tensors outside batches
    are)."""
    small = [i for i, it in enumerate(items)
             if type(it) is TensorItem and it.stats is None and it.array.size <= SMALL_ELEMENTS]
    if len(small) < 2:
        return None
    arrays = [items[i].array for i in small]
    stats = stats_columns(arrays, [items[i].dtype for i in small])
    with_values = [k for k, i in enumerate(small) if items[i].values]
    if not with_values:
        return SmallRows(small, arrays, stats)
    for k in with_values:
        items[small[k]].stats = stats.row(k)
    if len(with_values) == len(small):
        return None
    keep = np.ones(len(small), bool)
    keep[with_values] = False
    kept = np.flatnonzero(keep).tolist()
    return SmallRows([small[k] for k in kept], [arrays[k] for k in kept], stats.take(keep))


def _positions(seq: list, value: Any) -> list[int]:
    """The positions of ``value`` in ``seq`` (found by ``list.index``: a Python step per match,
    not per element)."""
    out: list[int] = []
    at = -1
    try:
        while True:
            at = seq.index(value, at + 1)
            out.append(at)
    except ValueError:
        return out


def _decisions_of_logits(items: list) -> int:
    """Derive the decisions of the logits items of ``items`` in as few numpy calls as possible
    (:func:`tracefmt.decisions.decide_columns` per group of equal shape, dtype, k and watched
    ids), in place: a chunk's exactly derived rows become one :class:`DecisionColumnsItem`
    (a record batch built from the columns, at the first of their items; the others become
    :data:`WAKE`), any other row a :class:`DecisionItem`. The writer's thread then holds the
    GIL for no Python step per decision but the keyed columns'. Returns the logits' bytes, for
    the caller to give back to the queue's budget."""
    groups: dict[tuple, list[int]] = {}
    for i in _positions(list(map(type, items)), LogitsItem):
        it = items[i]
        x = it.logits
        groups.setdefault((x.shape, x.dtype.str, it.k, tuple(it.watched)), []).append(i)
    freed = 0
    for (shape, _dt, k, watched), group in groups.items():
        # a chunk's float64 scratch (1 MB: 32 rows of 4096 logits) stays in cache; fewer, larger
        # numpy calls for smaller vocabularies (each hands the GIL back and forth)
        rows = max(32, min(512, (1 << 17) // max(shape[0], 1)))
        exact: list[ExactColumns] = []
        where: list[int] = []  # the items of the exact rows, in order
        for at in range(0, len(group), rows):
            idx = group[at : at + rows]
            its = [items[i] for i in idx]
            xs = np.stack([it.logits for it in its])
            freed += xs.nbytes
            cols, rest = decide_columns(xs, k=k, chosen=[it.chosen for it in its], watched=list(watched))
            for j, d in rest.items():
                it = its[j]
                items[idx[j]] = DecisionItem(row_of_decision(it.sample, it.step, it.head, d, it.keys))
            if cols is not None:
                exact.append(cols)
                where += [idx[j] for j in cols.rows.tolist()]
        if exact:  # one record batch for the group: building one costs ~60-100 us, whatever its rows
            cols = exact[0] if len(exact) == 1 else ExactColumns(*(np.concatenate(f) for f in zip(*exact)))
            picked = [items[i] for i in where]
            samples, steps = [it.sample for it in picked], [it.step for it in picked]
            batch = decisions_batch_of_columns(cols, samples, steps, [it.head for it in picked],
                                               [it.keys for it in picked], list(watched))
            for i in where:
                items[i] = WAKE
            items[where[0]] = DecisionColumnsItem(batch, list(zip(samples, steps)))
    return freed


class Worker:
    """The loop of a writer's background thread and the state only it touches.

    Failures are kept in :attr:`error` (the writer raises them on its caller's next call);
    after one, items are drained and their bytes given back, nothing more is written.

    Args:
        outbox: where items come from.
        pool: recycled copy buffers to give back.
        files: the part's appenders by kind.
        encoder: the value encoding and zstd level (each job thread builds its own).
        flush_steps: flush after this many distinct new steps.
        flush_s: flush at least this often while data is pending.
        digest: the part's digest function (:func:`tracefmt.payload.digest_function`).
        threads: job threads; None: :func:`tracefmt.tensorjobs.job_threads`.
    """

    def __init__(self, outbox: Outbox, pool: BufferPool, files: dict[str, ArrowAppender], encoder: Encoder, *,
                 flush_steps: int, flush_s: float, digest: Callable[[Any], bytes], threads: int | None = None) -> None:
        self.error: BaseException | None = None
        self.counts = {"decisions": 0, "tensors": 0, "values": 0, "tensor_bytes": 0}
        self._outbox = outbox
        self._queue = outbox.queue
        self._budget = outbox.budget
        self._pool = pool
        self._files = files
        self._jobs = TensorJobs(encoder, digest, threads=threads or job_threads())
        self._encoding = encoder.encoding
        self._unwritten: deque[Future] = deque()  # jobs whose payload is not in the values file yet
        self._flush_steps = flush_steps
        self._flush_s = flush_s
        self._digest = digest

    def run(self) -> None:
        """The thread's target: loop until a :class:`CloseItem`."""
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 (a bug here must not leave callers waiting on a dead thread)
            self.error = self.error or exc
            self._drain_after_error()

    def _drain_after_error(self) -> None:
        """After a failure: take items until close, giving their bytes back (nothing is written)."""
        while True:
            got = self._queue.get()
            for item in got.items if type(got) is ManyItem else (got,):
                if type(item) is CloseItem:
                    self._jobs.shutdown()
                    return
                if type(item) is FlushItem:
                    item.done.set()
                elif nbytes := item_bytes(item):
                    self._budget.give(nbytes)

    def _loop(self) -> None:
        dec: list[DecisionRow] = []
        decb: list[pa.RecordBatch] = []  # decisions derived as columns (DecisionColumnsItem)
        ten: list[TensorRow | PendingRow | ColumnRows] = []
        steps_seen: set[tuple[str, int]] = set()  # distinct steps since the last flush
        deadline: float | None = None
        outbox = self._outbox
        counts = self.counts
        flush_steps = self._flush_steps

        def flush() -> None:
            nonlocal dec, decb, ten, deadline
            # Values first: every tensor row written below references a value already in the file.
            self._write_values(wait=True)
            if ten:
                self._files["tensors"].write(tensors_batch(pending_columns(ten)))
            if dec:
                self._files["decisions"].write(decisions_batch(dec))
            for batch in decb:
                self._files["decisions"].write(batch)
            dec, decb, ten = [], [], []
            steps_seen.clear()
            deadline = None

        def take(cols: TensorColumns, starts: list[int], j0: int, j1: int) -> None:
            # rows j0..j1 of cols: flushed where the row path flushes (after the row that brings
            # the step count past flush_steps), with a Python step per new key, not per row
            start = at = j0
            while at < j1:
                key = (cols.sample[at], cols.step[at])
                if key not in steps_seen:
                    steps_seen.add(key)
                    if len(steps_seen) > flush_steps:
                        add_columns(ten, cols, start, at + 1)
                        self._guard(flush)
                        if self.error is not None:
                            return
                        start = at = at + 1
                        continue  # the next row's key starts the new count
                nxt = bisect_right(starts, at)
                at = starts[nxt] if nxt < len(starts) and starts[nxt] < j1 else j1
            if start < j1:
                add_columns(ten, cols, start, j1)

        while True:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if outbox.holding:  # wake up to take rows held too long (a caller that hangs)
                timeout = outbox.hold_s if timeout is None else min(timeout, outbox.hold_s)
            try:
                got = self._queue.get(timeout=timeout)
            except queue.Empty:
                age = outbox.held_age()
                if age is not None and age >= outbox.hold_s:
                    outbox.send_held(force=True)  # picked up by the next get()
                elif deadline is not None and time.monotonic() >= deadline:
                    self._guard(flush)
                continue
            items: Any = (got,)
            freed = n_fast = 0
            runs: list[tuple[int, int, int]] = []
            if type(got) is ManyItem:  # rows handed over together: small tensors' stats in one go
                items = got.items
                if RowSetItem in map(type, items):
                    items = rows_of_rowsets(items)
                if self.error is None:
                    try:
                        small = _stats_of_small(items)
                        if small is not None:  # stats-only small tensors: columns, no Python step per row
                            cols, pooled, freed = columns_of_small(items, small, self._digest)
                            starts = key_starts(cols)
                            runs = item_runs(small.index)
                            n_fast = len(cols)
                            for buf in pooled:
                                if buf is not None:
                                    self._pool.give(buf)
                        if logits_bytes := _decisions_of_logits(items):
                            self._budget.give(logits_bytes)
                    except (ValueError, TypeError, TraceError, pa.ArrowException) as exc:
                        self.error = exc
            at, n_items, r = 0, len(items), 0
            while at < n_items:
                if r < len(runs) and runs[r][0] == at:
                    first, at, row = runs[r]
                    r += 1
                    if self.error is None:
                        take(cols, starts, row, row + at - first)
                    continue
                item = items[at]
                at += 1
                kind = type(item)
                if kind is TensorItem and item.stats is not None and not item.values and self.error is None:
                    # statistics given by the caller, no values: only the digest is left
                    a = item.array
                    ten.append(TensorRow(item.sample, item.step, item.name, item.call, item.order, item.source,
                                         item.dtype, a.shape, item.stats, self._digest(a), None))
                    steps_seen.add((item.sample, item.step))
                    freed += a.nbytes
                    n_fast += 1
                    if item.pooled is not None:
                        self._pool.give(item.pooled)
                    if len(steps_seen) > flush_steps:
                        self._guard(flush)
                    continue
                if kind is CloseItem:
                    self._guard(flush)
                    self._jobs.shutdown()
                    return
                if kind is FlushItem:
                    self._guard(flush)
                    item.done.set()
                    continue
                if kind is WakeItem:
                    continue
                if kind is DecisionBatchItem:  # a whole batch of decisions: written as it is
                    self._guard(flush)
                    self._guard(self._files["decisions"].write, item.batch)
                    counts["decisions"] += item.batch.num_rows
                    continue
                if kind is DecisionColumnsItem:  # written with the rows at the next flush
                    decb.append(item.batch)
                    counts["decisions"] += item.batch.num_rows
                    steps_seen.update(item.keys)
                else:
                    steps_seen.add((item.row.sample, item.row.step) if kind is DecisionItem else (item.sample, item.step))
                    if self.error is None:
                        self._guard(self._accept, item, dec, ten)  # gives a tensor's bytes back when done
                    elif kind is TensorItem:
                        self._budget.give(item.array.nbytes)
                if deadline is None:
                    deadline = time.monotonic() + self._flush_s
                if len(steps_seen) > flush_steps:
                    self._guard(flush)
            if n_fast:  # the budget given back per batch (each step here is one the model's thread may wait for)
                self._budget.give(freed)
                counts["tensors"] += n_fast
                counts["tensor_bytes"] += freed
                if deadline is None:
                    deadline = time.monotonic() + self._flush_s

    def _guard(self, fn: Callable[..., Any], *args: Any) -> None:
        if self.error is not None:
            return
        try:
            fn(*args)
        except (OSError, pa.ArrowException, ValueError, TypeError, TraceError) as exc:  # reported on the next call
            self.error = exc

    def _give_when_done(self, nbytes: int, job: Future, pooled: np.ndarray | None) -> None:
        """Give ``nbytes`` back to the queue budget (and ``pooled`` to the buffer pool) once
        ``job`` has finished with the array."""

        def done(_f: Future) -> None:
            self._budget.give(nbytes)
            if pooled is not None:
                self._pool.give(pooled)

        job.add_done_callback(done)

    def _write_values(self, *, wait: bool) -> None:
        """Append the payloads of finished jobs to the values file, in ``value_ref`` order, up to
        the first job still running (``wait``: every job's, waiting for them). Each payload is
        one record batch: value_ref i is batch i + 1 (SPEC.md §5.4)."""
        unwritten = self._unwritten
        while unwritten and (wait or unwritten[0].done()):
            res = unwritten[0].result()  # raises what the job raised
            self._files["values"].write(values_batch([(self._encoding, res.payload)]))
            res.payload = None  # the row keeps the result until the flush; the bytes can go now
            unwritten.popleft()

    def _accept(self, item: Any, dec: list[DecisionRow], ten: list[TensorRow | PendingRow]) -> None:
        kind = type(item)
        counts = self.counts
        if kind is DecisionItem:
            dec.append(item.row)
            counts["decisions"] += 1
            return
        if kind is LogitsItem:  # logits from add_logits: derive the decision here
            try:
                d = decide(item.logits, k=item.k, chosen=item.chosen, watched=item.watched)
                dec.append(row_of_decision(item.sample, item.step, item.head, d, item.keys))
            finally:
                self._budget.give(item.logits.nbytes)
            counts["decisions"] += 1
            return
        if kind is StatsItem:  # precomputed stats
            ten.append(TensorRow(item.sample, item.step, item.name, item.call, item.order, item.source, item.dtype,
                                 item.shape, item.stats, item.digest, None))
            counts["tensors"] += 1
            return
        a, stats = item.array, item.stats
        counts["tensor_bytes"] += a.nbytes
        counts["tensors"] += 1
        if not item.values and a.nbytes < JOB_BYTES:  # statistics and digest only, cheaper here than a job
            try:
                res = self._jobs.run_here(a, item.dtype, stats, values=False)
            finally:
                self._budget.give(a.nbytes)
                if item.pooled is not None:
                    self._pool.give(item.pooled)
            ten.append(TensorRow(item.sample, item.step, item.name, item.call, item.order, item.source, item.dtype,
                                 a.shape, res.stats, res.digest, None))
            return
        # statistics, digest and payload on a job thread; the queue's bytes are given back when
        # it is done, its payload is written once those before it are
        job = self._jobs.submit(a, item.dtype, stats, item.values)
        self._give_when_done(a.nbytes, job, item.pooled)
        ref = None
        if item.values:
            ref = counts["values"]
            counts["values"] += 1
            self._unwritten.append(job)
        # the row keeps the shape, not the array: its memory goes back when the job is done
        ten.append(PendingRow(TensorRow(item.sample, item.step, item.name, item.call, item.order, item.source,
                                         item.dtype, a.shape, None, None, ref), job))  # type: ignore[arg-type]
        self._write_values(wait=False)


#: Tensors recorded without values get a job of their own from this many bytes (smaller ones
#: are reduced on the loop's thread); tensors with values always do.
JOB_BYTES = 64 << 10
