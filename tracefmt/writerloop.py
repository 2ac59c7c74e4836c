"""The background thread of a :class:`steptrace.tracefmt.TraceWriter`: takes queued items, computes
statistics and digests, derives decisions from logits, has values compressed on an encoder
thread, and flushes record batches to the part's files."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa

from .batches import decisions_batch, tensors_batch, values_batch
from .decisions import decide, decide_many
from .errors import TraceError
from .ipcfile import ArrowAppender
from .outbox import BufferPool, Outbox
from .payload import SMALL_ELEMENTS, Encoder, compute_stats, compute_stats_many
from .writeitems import (
    CloseItem,
    DecisionBatchItem,
    DecisionItem,
    DecisionRow,
    FlushItem,
    LogitsItem,
    ManyItem,
    StatsItem,
    TensorItem,
    TensorRow,
    WakeItem,
    item_bytes,
    row_of_decision,
)


def _stats_of_small(items: list) -> None:
    """Fill in the statistics of the small tensor items without stats of ``items``, in place,
    with :func:`tracefmt.payload.compute_stats_many`."""
    small = [it for it in items if type(it) is TensorItem and it.stats is None and it.array.size <= SMALL_ELEMENTS]
    if len(small) < 2:
        return
    for it, st in zip(small, compute_stats_many([it.array for it in small], [it.dtype for it in small])):
        it.stats = st


def _decisions_of_logits(items: list) -> int:
    """Derive the decisions of the logits items of ``items`` in as few numpy calls as possible
    (:func:`tracefmt.decisions.decide_many` per group of equal shape, dtype, k and watched ids);
    each becomes a :class:`DecisionItem`, in place. Returns the logits' bytes, for the caller
    to give back to the queue's budget."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        if type(it) is LogitsItem:
            x = it.logits
            groups.setdefault((x.shape, x.dtype.str, it.k, tuple(it.watched)), []).append(i)
    freed = 0
    for (_shape, _dt, k, watched), group in groups.items():
        for at in range(0, len(group), 32):  # 32 rows at a time: the float64 scratch stays in cache
            idx = group[at : at + 32]
            xs = np.stack([items[i].logits for i in idx])
            decisions = decide_many(xs, k=k, chosen=[items[i].chosen for i in idx], watched=list(watched))
            for i, d in zip(idx, decisions):
                it = items[i]
                items[i] = DecisionItem(row_of_decision(it.sample, it.step, it.head, d, it.keys))
                freed += it.logits.nbytes
    return freed


class Worker:
    """The loop of a writer's background thread and the state only it touches.

    Failures are kept in :attr:`error` (the writer raises them on its caller's next call);
    after one, items are drained and their bytes given back, nothing more is written.

    Args:
        outbox: where items come from.
        pool: recycled copy buffers to give back.
        files: the part's appenders by kind.
        encoder: the value encoder (used by the one encoder thread only).
        flush_steps: flush after this many distinct new steps.
        flush_s: flush at least this often while data is pending.
        digest: the part's digest function (:func:`tracefmt.payload.digest_function`).
    """

    def __init__(self, outbox: Outbox, pool: BufferPool, files: dict[str, ArrowAppender], encoder: Encoder, *,
                 flush_steps: int, flush_s: float, digest: Callable[[Any], bytes]) -> None:
        self.error: BaseException | None = None
        self.counts = {"decisions": 0, "tensors": 0, "values": 0, "tensor_bytes": 0}
        self._outbox = outbox
        self._queue = outbox.queue
        self._budget = outbox.budget
        self._pool = pool
        self._files = files
        self._encoder = encoder
        self._encoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steptrace-encoder")
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
                    self._encoding.shutdown()
                    return
                if type(item) is FlushItem:
                    item.done.set()
                elif nbytes := item_bytes(item):
                    self._budget.give(nbytes)

    def _loop(self) -> None:
        dec: list[DecisionRow] = []
        ten: list[TensorRow] = []
        val: list[tuple[str, Future]] = []
        steps_seen: set[tuple[str, int]] = set()  # distinct steps since the last flush
        deadline: float | None = None
        outbox = self._outbox
        counts = self.counts

        def flush() -> None:
            nonlocal dec, ten, val, deadline
            # One value per record batch: value_ref i is batch i + 1 (batch 0 is the empty batch
            # that carries the schema), so a reader finds a value without reading every batch.
            for enc, fut in val:  # payloads are compressed on the encoder thread; in order
                self._files["values"].write(values_batch([(enc, fut.result())]))
            if ten:
                self._files["tensors"].write(tensors_batch(ten))
            if dec:
                self._files["decisions"].write(decisions_batch(dec))
            dec, ten, val = [], [], []
            steps_seen.clear()
            deadline = None

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
            if type(got) is ManyItem:  # rows handed over together: small tensors' stats in one go
                items = got.items
                self._guard(_stats_of_small, items)
                if self.error is None:
                    try:
                        if logits_bytes := _decisions_of_logits(items):
                            self._budget.give(logits_bytes)
                    except (ValueError, TypeError, TraceError) as exc:
                        self.error = exc
            for item in items:
                kind = type(item)
                if kind is TensorItem and item.stats is not None and not item.values and self.error is None:
                    # statistics known, no values (small tensors handed over together): only
                    # the digest is left; a few Python steps per row, the budget given back
                    # per batch (each step here is a step the model's thread may wait for)
                    a = item.array
                    ten.append(TensorRow(item.sample, item.step, item.name, item.call, item.order, item.source,
                                         item.dtype, a.shape, item.stats, self._digest(a), None))
                    steps_seen.add((item.sample, item.step))
                    freed += a.nbytes
                    n_fast += 1
                    if item.pooled is not None:
                        self._pool.give(item.pooled)
                    if len(steps_seen) > self._flush_steps:
                        self._guard(flush)
                    continue
                if kind is CloseItem:
                    self._guard(flush)
                    self._encoding.shutdown()
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
                steps_seen.add((item.row.sample, item.row.step) if kind is DecisionItem else (item.sample, item.step))
                if self.error is None:
                    self._guard(self._accept, item, dec, ten, val)  # gives a tensor's bytes back when done
                elif kind is TensorItem:
                    self._budget.give(item.array.nbytes)
                if deadline is None:
                    deadline = time.monotonic() + self._flush_s
                if len(steps_seen) > self._flush_steps:
                    self._guard(flush)
            if n_fast:
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

    def _give_when_done(self, nbytes: int, jobs: list[Future], pooled: np.ndarray | None) -> Callable[[], None]:
        """Give ``nbytes`` back to the queue budget (and ``pooled`` to the buffer pool) when every
        job has finished and the returned callable has been called (by the stats' thread)."""
        left = [len(jobs) + 1]
        lock = threading.Lock()

        def done(_f: Future | None = None) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._budget.give(nbytes)
                if pooled is not None:
                    self._pool.give(pooled)

        for job in jobs:
            job.add_done_callback(done)
        return done

    def _accept(self, item: Any, dec: list[DecisionRow], ten: list[TensorRow], val: list) -> None:
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
        if not item.values:  # statistics and digest only: no encoder job to wait for
            try:
                if stats is None:
                    stats = compute_stats(a, item.dtype)
                dig = self._digest(memoryview(a).cast("B") if a.size else b"")
            finally:
                self._budget.give(a.nbytes)
                if item.pooled is not None:
                    self._pool.give(item.pooled)
            counts["tensor_bytes"] += a.nbytes
            ten.append(TensorRow(item.sample, item.step, item.name, item.call, item.order, item.source, item.dtype,
                                 a.shape, stats, dig, None))
            counts["tensors"] += 1
            return
        buf = memoryview(a).cast("B") if a.size else memoryview(b"")
        # Compression runs on the encoder thread while this one computes the stats and the
        # digest (zstd, the digest and numpy reductions release the GIL; a third thread measured
        # slower on two cores); the queue's bytes are given back when both are done.
        pending = self._encoding.submit(self._encoder.encode, buf, a.dtype.itemsize)
        ref = counts["values"]
        val.append((self._encoder.encoding, pending))
        counts["values"] += 1
        stats_done = self._give_when_done(a.nbytes, [pending], item.pooled)
        try:
            if stats is None:
                stats = compute_stats(a, item.dtype)
            dig = self._digest(buf)
        finally:
            stats_done()
        counts["tensor_bytes"] += a.nbytes
        ten.append(TensorRow(item.sample, item.step, item.name, item.call, item.order, item.source, item.dtype,
                             a.shape, stats, dig, ref))
        counts["tensors"] += 1
