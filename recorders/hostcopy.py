"""Host data from devices: the :class:`HostCopy` protocol, the torch copy that implements it
(:class:`DeviceCopy`: statistics reduced on the device, values copied to pinned host memory),
the thread that finishes copies, and the non-finite check the budget's trigger uses.

A framework recorder whose tensors live on a device (CUDA) starts the reduction and the
device-to-host copy without waiting and hands the recorder a :class:`HostCopy`. The
:class:`Finisher` thread waits for each copy in turn, digests the host bytes and passes the row
to the :class:`steptrace.tracefmt.TraceWriter`, so the model thread never waits for a copy or a digest.

torch is not imported here: the functions that call it take the torch module as an argument
(:mod:`steptrace.recorders.torch`, the one module that imports torch, passes it).
"""

from __future__ import annotations

import math
import queue
import threading
from typing import Any, Protocol, runtime_checkable

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

def device_sums(torch: Any, t: Any) -> Any:
    """Reduce a torch tensor on its device to SPEC.md §4.4 sums, without a host synchronisation
    (:func:`recorders.torch.device_stats`).

    Args:
        torch: the torch module.
        t: a dense tensor of a SPEC.md dtype (bfloat16 as itself, not its bits).

    Returns:
        A float64 tensor on ``t``'s device: ``[finite count, min, max, Σx, Σx², nan_count,
        inf_count, scale]`` over the finite elements (x divided by ``scale``, 1 unless float64
        values beyond 1e150 would overflow Σx²).
    """
    x = t.detach().reshape(-1).double()
    finite = x.isfinite()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    xf = torch.where(finite, x, zero)
    lo = torch.where(finite, x, float("inf")).amin()
    hi = torch.where(finite, x, float("-inf")).amax()
    scale = torch.ones_like(zero)
    if t.dtype == torch.float64:
        big = torch.maximum(lo.abs(), hi.abs())
        scale = torch.where(finite.any() & (big > 1e150), big, scale)
        xf = xf / scale
    return torch.stack([finite.sum().double(), lo, hi, xf.sum(), (xf * xf).sum(), x.isnan().sum().double(),
                        x.isinf().sum().double(), scale])


def stats_from_sums(numel: int, s: np.ndarray) -> TensorStats:
    """Return the statistics of a tensor of ``numel`` elements from its :func:`device_sums`.

    Args:
        numel: the tensor's element count.
        s: the eight sums, on the host.
    """
    count, lo, hi, total, sumsq, nans, infs, scale = (float(v) for v in s)
    if count == 0:
        return TensorStats(numel, None, None, None, None, None, 0.0 if numel == 0 else None, int(nans), int(infs))
    mean = total / count
    std = max(sumsq / count - mean * mean, 0.0) ** 0.5
    return TensorStats(numel, lo, hi, mean * scale, std * scale, max(abs(lo), abs(hi)), sumsq**0.5 * scale,
                       int(nans), int(infs))


class DeviceCopy:
    """A :class:`recorders.capture.HostCopy` of a torch tensor: statistics reduced on its
    device, values copied to (pinned, for CUDA) host memory without blocking the caller.

    Args:
        torch: the torch module.
        t: the tensor.
        dtype: its SPEC.md dtype name.
    """

    def __init__(self, torch: Any, t: Any, dtype: str) -> None:
        self.dtype = dtype
        self.numel = t.numel()
        src = t.detach()
        if dtype == "bfloat16":
            src = src.view(torch.int16)
        cuda = src.device.type == "cuda"
        stats = device_sums(torch, t) if self.numel else None
        if cuda:
            self._host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self._host.copy_(src, non_blocking=True)
            self._stats = None if stats is None else torch.empty(8, dtype=torch.float64, pin_memory=True)
            if stats is not None:
                self._stats.copy_(stats, non_blocking=True)
            self._event: Any = torch.cuda.Event()
            self._event.record()
        else:
            self._host = src.to("cpu", copy=True, memory_format=torch.contiguous_format)
            self._stats = None if stats is None else stats.cpu()
            self._event = None

    def done(self) -> bool:
        """Return whether the copy has landed (never blocks)."""
        return self._event is None or bool(self._event.query())

    def _wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> tuple[np.ndarray, TensorStats]:
        """Wait for the copy; return the canonical host array and the device statistics."""
        self._wait()
        arr = self._host.numpy()
        if self.dtype == "bfloat16":
            arr = arr.view(np.uint16)
        stats = stats_from_sums(0, np.zeros(8)) if self._stats is None else stats_from_sums(self.numel, self._stats.numpy())
        return arr, stats

    def nonfinite(self) -> bool:
        """Wait for the copy; return whether the tensor holds NaN or ±Inf."""
        self._wait()
        return self._stats is not None and bool(self._stats[5] + self._stats[6] > 0)


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
