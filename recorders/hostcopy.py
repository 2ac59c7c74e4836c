"""Host data from devices: the :class:`HostCopy` protocol, the thread that finishes copies, and
the non-finite check the budget's trigger uses.

A framework recorder whose tensors live on a device (CUDA) starts the reduction and the
device-to-host copy without waiting and hands the recorder a :class:`HostCopy`. The
:class:`Finisher` thread waits for each copy in turn, digests the host bytes and passes the row
to the :class:`steptrace.tracefmt.TraceWriter`, so the model thread never waits for a copy or a digest.
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Protocol, runtime_checkable

import numpy as np

from steptrace.tracefmt import TraceWriter
from steptrace.tracefmt.errors import TraceError
from steptrace.tracefmt.payload import TensorStats, digest

from .ring import HeldRow


@runtime_checkable
class HostCopy(Protocol):
    """A tensor on its way from a device to host memory, made by a framework recorder.

    Attributes:
        dtype: its SPEC.md dtype name.
    """

    dtype: str

    def done(self) -> bool:
        """Return whether the copy has landed (never blocks)."""

    def result(self) -> tuple[np.ndarray, TensorStats | None]:
        """Wait for the copy; return the canonical host array and device-computed statistics
        (None: let the writer compute them from the host bytes)."""

    def nonfinite(self) -> bool:
        """Wait for the copy; return whether the tensor holds a NaN or ±Inf."""


def has_nonfinite(a: np.ndarray, *, dtype: str | None = None) -> bool:
    """Return whether a host array holds a NaN or ±Inf (one pass; integers never do).

    Args:
        a: the array (bfloat16 as ml_dtypes or as uint16 bits with ``dtype="bfloat16"``).
        dtype: SPEC.md dtype name overriding the array's.

    Returns:
        True if some element is NaN or infinite.
    """
    if (dtype or a.dtype.name) == "bfloat16":
        return bool(((a.view(np.uint16) & 0x7F80) == 0x7F80).any())
    if a.dtype.kind != "f" or a.size == 0:
        return False
    with np.errstate(all="ignore"):
        if math.isfinite(float(np.add.reduce(a, axis=None, dtype=np.float64))):
            return False  # a float64 sum of float32/16 cannot overflow; float64 is re-checked below
    return not bool(np.isfinite(a).all())


class Finisher:
    """Finishes :class:`HostCopy` rows on its own thread, in the order they were queued.

    A failure is kept in :attr:`error` (later rows are dropped) for the recorder to raise on
    its caller's thread.

    Args:
        writer: the writer to hand finished rows to.
        lock: the lock serialising every call into ``writer``.
    """

    def __init__(self, writer: TraceWriter, lock: threading.Lock) -> None:
        self.error: BaseException | None = None
        self._writer = writer
        self._lock = lock
        self._queue: queue.SimpleQueue[tuple[HeldRow, bool] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="steptrace-recorder-finisher", daemon=True)
        self._thread.start()

    def put(self, row: HeldRow, values: bool) -> None:
        """Queue ``row`` (whose ``data`` is a :class:`HostCopy`), with or without its values."""
        self._queue.put((row, values))

    def stop(self) -> None:
        """Finish every queued row, then end the thread."""
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self.error is None:
                try:
                    self._finish(*item)
                except (TraceError, RuntimeError, OSError, ValueError) as exc:  # re-raised on the caller's thread
                    self.error = exc

    def _finish(self, row: HeldRow, values: bool) -> None:
        arr, stats = row.data.result()
        with self._lock:
            if values or stats is None:
                self._writer.add_tensor(row.sample, row.step, row.name, arr, values=values, source=row.source,
                                        call=row.call, order=row.order, dtype=row.dtype, copy=False)
            else:
                buf = memoryview(np.ascontiguousarray(arr).reshape(-1)).cast("B")
                self._writer.add_tensor_stats(row.sample, row.step, row.name, dtype=row.dtype, shape=arr.shape,
                                              stats=stats, digest=digest(buf, self._writer.digest_algorithm), source=row.source,
                                              call=row.call, order=row.order)
