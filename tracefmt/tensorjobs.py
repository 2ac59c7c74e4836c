"""A writer's tensor work on worker threads: statistics, the digest and the encoded payload of
one tensor per job, a few jobs at once (zstd, xxh3 and numpy's reductions release the GIL).

The writer's background thread submits jobs in order and takes their results in the same
order (:mod:`steptrace.tracefmt.writerloop`): payloads go into the values file in
``value_ref`` order, tensor rows into the tensors file after the values they reference.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from .payload import Encoder
from .stats import TensorStats, compute_stats

#: Jobs run on at most this many threads (zstd-1 runs at ~0.6-0.8 GB/s per thread).
MAX_THREADS = 4


def job_threads() -> int:
    """The number of job threads a writer uses: one per CPU this process may run on, 1 to
    :data:`MAX_THREADS`. Each job holds the whole work of one tensor, so with two threads on
    two cores both cores compress and reduce, rather than one compressing while the other
    waits for it."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cpus))


@dataclass(slots=True)
class TensorResult:
    """What one job computed. ``payload`` is None for a tensor recorded without values, and
    once the writer has written it (so its bytes are freed before the row is)."""

    stats: TensorStats
    digest: bytes
    payload: bytes | None


class TensorJobs:
    """Runs :meth:`submit`'s jobs on a few threads, each with its own zstd compressor.

    Args:
        encoder: the value encoding and zstd level (each thread builds its own :class:`Encoder`).
        digest: the part's digest function (:func:`tracefmt.payload.digest_function`).
        threads: job threads.
    """

    def __init__(self, encoder: Encoder, digest: Callable[[Any], bytes], *, threads: int) -> None:
        self.encoding = encoder.encoding
        self._level = encoder.level
        self._digest = digest
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="steptrace-tensors")
        self._local = threading.local()

    def submit(self, a: np.ndarray, dtype: str, stats: TensorStats | None, values: bool) -> Future:
        """Queue a job for the canonical array ``a`` of SPEC.md dtype ``dtype``, which must stay
        unchanged until the returned future is done.

        Args:
            a: the canonical array.
            dtype: its SPEC.md dtype name.
            stats: its statistics when already known (computed by the job when None).
            values: also encode its values.

        Returns:
            A future of the :class:`TensorResult`.
        """
        return self._pool.submit(self._run, a, dtype, stats, values)

    def run_here(self, a: np.ndarray, dtype: str, stats: TensorStats | None, *, values: bool) -> TensorResult:
        """Do :meth:`submit`'s job on the calling thread (for tensors too small to hand over)."""
        return self._run(a, dtype, stats, values)

    def shutdown(self) -> None:
        """Wait for every submitted job and stop the threads."""
        self._pool.shutdown()

    def _run(self, a: np.ndarray, dtype: str, stats: TensorStats | None, values: bool) -> TensorResult:
        buf = memoryview(a).cast("B") if a.size else memoryview(b"")
        if stats is None:
            stats = compute_stats(a, dtype)
        dig = self._digest(buf)
        payload = None
        if values:
            enc = getattr(self._local, "encoder", None)
            if enc is None:
                enc = self._local.encoder = Encoder(self.encoding, self._level)
            payload = enc.encode(buf, a.dtype.itemsize)
        return TensorResult(stats, dig, payload)
