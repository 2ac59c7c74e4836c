"""The way from a :class:`steptrace.tracefmt.TraceWriter`'s callers to its background thread: a queue
bounded in bytes (:class:`Budget`), recycled copy buffers (:class:`BufferPool`), rows held
back to travel in batches (:class:`Outbox`), and the order/call counts of rows given without
them (:class:`StepCounter`)."""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from .checks import opt_i32
from .writeitems import WAKE, ManyItem


class Budget:
    """Bytes queued for the background thread; blocks producers above a limit.

    Args:
        limit: the most bytes queued before :meth:`take` waits.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.stalled = 0.0
        self._cv = threading.Condition()

    def force(self, n: int) -> None:
        """Take ``n`` bytes without waiting."""
        with self._cv:
            self.used += n

    def take(self, n: int, alive: threading.Thread) -> None:
        """Take ``n`` bytes, waiting (while ``alive`` runs) until they fit; time waited adds to
        :attr:`stalled`."""
        with self._cv:
            if self.used and self.used + n > self.limit:
                t0 = time.perf_counter()
                while self.used and self.used + n > self.limit and alive.is_alive():
                    self._cv.wait(0.1)
                self.stalled += time.perf_counter() - t0
            self.used += n

    def give(self, n: int) -> None:
        """Give ``n`` bytes back and wake waiting producers."""
        with self._cv:
            self.used -= n
            self._cv.notify_all()


class BufferPool:
    """Recycled copy buffers: copying into fresh memory runs at ~1 GB/s here (first touch of every
    page), into reused memory at ~14 GB/s. Buffers come in power-of-two sizes from 64 KiB.

    Args:
        limit: the most bytes kept for reuse.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pooled = 0
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def copy(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return (a copy of ``a`` in a pooled buffer, the buffer to give back), or a plain copy."""
        if a.nbytes < (64 << 10):
            return a.copy(), None
        size = 1 << (a.nbytes - 1).bit_length()
        with self._lock:
            free = self._free.get(size)
            buf = free.pop() if free else None
            if buf is not None:
                self.pooled -= size
        if buf is None:
            buf = np.empty(size, np.uint8)
        out = buf[: a.nbytes].view(a.dtype).reshape(a.shape)
        np.copyto(out, a)
        return out, buf

    def give(self, buf: np.ndarray) -> None:
        """Take ``buf`` back for reuse (dropped if the pool is full)."""
        with self._lock:
            if self.pooled + buf.nbytes <= self.limit:
                self._free.setdefault(buf.nbytes, []).append(buf)
                self.pooled += buf.nbytes


class Outbox:
    """The queue to the background thread, and the rows held back from it.

    Each item put on the queue wakes the background thread: a GIL hand-off that costs the
    caller ~10-30 us and stalls a Python-bound caller while that thread runs Python. While
    holding (:meth:`hold`), rows collect here and travel as one :class:`ManyItem` when they
    reach ``hold_rows`` rows or ``hold_bytes`` bytes, or when the oldest has waited ``hold_s``.

    Args:
        budget: the queue's byte budget.
        hold_bytes, hold_rows, hold_s: when held rows travel.
    """

    #: Whether :meth:`put` copies an item's arrays before returning (no: the caller's copy travels).
    copies_on_put = False

    def __init__(self, budget: Budget, *, hold_bytes: int, hold_rows: int, hold_s: float) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.budget = budget
        self.lock = threading.Lock()  # also guards the writer's own counters (add_* from several threads)
        self.hold_s = hold_s
        self._hold_bytes = hold_bytes
        self._hold_rows = hold_rows
        self._held: list | None = None
        self._held_bytes = 0
        self._held_since = 0.0
        self.consumer: threading.Thread | None = None  # the background thread, once started

    @property
    def holding(self) -> bool:
        """Rows are being held."""
        return self._held is not None

    def put(self, item: Any, nbytes: int = 0) -> None:
        """Queue ``item`` (taking ``nbytes`` of the budget), or hold it (see :meth:`hold`)."""
        if self._held is not None and self._hold([item], nbytes):
            return
        if nbytes:
            self.budget.take(nbytes, self.consumer)  # type: ignore[arg-type]
        self.queue.put(item)

    def put_many(self, items: list, nbytes: int) -> None:
        """:meth:`put` of each of ``items`` (``nbytes`` in all), queued as one
        :class:`ManyItem` when not holding."""
        if self._held is not None and self._hold(items, nbytes):
            return
        if nbytes:
            self.budget.take(nbytes, self.consumer)  # type: ignore[arg-type]
        self.queue.put(ManyItem(items))

    def _hold(self, items: list, nbytes: int) -> bool:
        """Add ``items`` to the held rows, sending them all once a limit is reached; False:
        holding stopped meanwhile (the caller queues them)."""
        with self.lock:
            held = self._held
            if held is None:
                return False
            held.extend(items)
            self._held_bytes += nbytes
            if (self._held_bytes < self._hold_bytes and len(held) < self._hold_rows
                    and time.monotonic() - self._held_since < self.hold_s):
                return True
        self.send_held()
        return True

    def hold(self) -> None:
        """Start holding rows (no-op when holding already)."""
        with self.lock:
            if self._held is None:
                self._held = []
                self._held_bytes = 0
                self._held_since = time.monotonic()
                self.queue.put(WAKE)  # the background thread now wakes up to take old rows

    def send_held(self, *, stop: bool = False, force: bool = False) -> None:
        """Queue the held rows as one item (``stop``: and stop holding); ``force``: take their
        bytes of the budget without waiting (the background thread taking them itself)."""
        with self.lock:
            held, nbytes = self._held, self._held_bytes
            if held is None or (not held and not stop):
                return
            self._held = None if stop else []
            self._held_bytes = 0
            self._held_since = time.monotonic()
        if not held:
            return
        if force:
            self.budget.force(nbytes)
        elif nbytes:
            self.budget.take(nbytes, self.consumer)  # type: ignore[arg-type]
        self.queue.put(ManyItem(held))

    def held_age(self) -> float | None:
        """Seconds the oldest held row has waited; None when nothing is held."""
        with self.lock:
            return time.monotonic() - self._held_since if self._held else None


#: Steps whose order/call counters a :class:`StepCounter` keeps; a writer returning to an older
#: step must pass ``order`` and ``call`` itself.
COUNTED_STEPS = 4096


class StepCounter:
    """Execution order and call indices of the tensors a writer is given without them, per
    (sample, step), over the :data:`COUNTED_STEPS` most recent steps.

    Args:
        lock: the lock serialising counts made from several threads.
    """

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        # (sample, step) -> [next order, {name: next call}], for the most recent steps
        self._steps: OrderedDict[tuple[str, int], list] = OrderedDict()

    def order_call(self, sample: str, step: int, name: str, order: int | None, call: int | None) -> tuple[int, int]:
        """Return (order, call): the caller's values (checked), or the next ones counted for
        (sample, step).

        Raises:
            TraceUsageError: ``order`` or ``call`` is not a 32-bit integer.
        """
        if order is not None and call is not None:
            return opt_i32("order", order), opt_i32("call", call)
        with self._lock:
            auto_order, auto_call = self._next(sample, step, name)
        return (auto_order if order is None else opt_i32("order", order),
                auto_call if call is None else opt_i32("call", call))

    def _next(self, sample: str, step: int, name: str) -> tuple[int, int]:
        """Return (order, call) for the next tensor of ``name`` at (sample, step)."""
        key = (sample, step)
        st = self._steps.get(key)
        if st is None:
            st = self._steps[key] = [0, {}]
            if len(self._steps) > COUNTED_STEPS:
                self._steps.popitem(last=False)
        else:
            self._steps.move_to_end(key)
        order = st[0]
        call = st[1].get(name, 0)
        st[0] = order + 1
        st[1][name] = call + 1
        return order, call
