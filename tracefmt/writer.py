"""TraceWriter: streaming, crash-safe writing of one part of a trace (SPEC.md §5), the
checked public API.

The caller's thread only validates its arguments and copies arrays; statistics, digests,
compression and disk I/O run on a background thread (:mod:`steptrace.tracefmt.writerloop`) behind a
queue bounded in bytes (:mod:`steptrace.tracefmt.outbox`). Items on the queue and the rows they become
are named in :mod:`steptrace.tracefmt.writeitems`; recorders' unchecked fast path is
:class:`tracefmt.lane.RecorderLane` (``TraceWriter.lane``).

This module holds the writer's set-up, its tensor methods, ``flush`` and ``close``; the decision
methods (``add_decision``, ``add_decisions``, ``add_decided``, ``add_logits``) are in
:mod:`steptrace.tracefmt.writerdecisions`.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .checks import DecisionKeys, check_key, opt_str
from .checksum import file_checksum
from .dtypes import DTYPES, canonical, dtype_name
from .errors import TraceError, TraceUsageError, TraceWriteError
from .ipcfile import ArrowAppender, finish_file
from .lane import RecorderLane
from .layout import claim_part, create_or_join, part_id
from .metadata import TraceMetadata, utc_now, write_json_atomic
from .outbox import Budget, BufferPool, Outbox, StepCounter
from .payload import DEFAULT_DIGEST, DIGEST_ALGORITHMS, ENCODINGS, Encoder, digest_function
from .schema import PARTS_DIR, data_file, part_file
from .stats import TensorStats
from .statspolicy import check_kernel_env
from .writeitems import CLOSE, NOW, FlushItem, StatsItem, TensorItem
from .writerdecisions import DecisionMethods
from .writerloop import Worker

if TYPE_CHECKING:
    from .processoutbox import ProcessOutbox
    from .writerprocess import WriterProcess

__all__ = ["NOW", "TraceWriter", "WriteSummary"]

_MODES = ("create", "append", "overwrite")


@dataclass(frozen=True)
class WriteSummary:
    """What :meth:`TraceWriter.close` wrote."""

    path: str
    part: str
    decisions: int
    tensors: int
    values: int
    tensor_bytes: int  # raw bytes of all tensors seen (stats computed over them)
    file_bytes: int  # bytes of this part's files on disk
    stall_seconds: float  # time the caller waited because the queue was full
    seconds: float  # from open to close

    def __str__(self) -> str:
        return (
            f"{self.path} part {self.part}: {self.decisions} decisions, {self.tensors} tensors "
            f"({self.values} with values), {self.file_bytes / 1e6:.1f} MB on disk"
        )


_open_writers: weakref.WeakSet[TraceWriter] = weakref.WeakSet()


@atexit.register
def _close_forgotten_writers() -> None:
    for w in list(_open_writers):
        try:
            w.close()
        except TraceError:
            pass  # already reported to the caller on its own calls; nothing more to do at exit


class TraceWriter(DecisionMethods):
    """Writes one part of a trace. Use as a context manager; several processes may write
    parts of the same trace at once (``mode="append"``), each recording its own samples.
    The ``add_*`` methods may be called from several threads of one process.

    Each ``add_*`` call hands its row to the background thread at once, which wakes that thread:
    a GIL hand-off between the two threads that costs the caller ~10-30 us here, and stalls a
    Python-bound caller while the background thread runs Python. A caller adding many rows per
    step (a recorder hooking every module) calls ``writer.lane.hold()``
    (:class:`tracefmt.lane.RecorderLane`): rows then travel in batches of up to 2048 rows, a
    quarter of ``queue_bytes`` (8 MB at most) or ``flush_ms / 2``.

    Args:
        path: the trace directory.
        metadata: run metadata (a :class:`TraceMetadata` or a dict of its fields). Stored in the
            manifest by the writer that creates the trace, and in this part's status file.
        vocab: token pieces, as a sequence indexed by id or a mapping id -> piece.
        mode: ``"create"`` (fail if a trace exists), ``"append"`` (add a part to an existing
            trace, or create it), ``"overwrite"`` (delete an existing trace first).
        flush_steps: flush to disk after this many new steps.
        flush_ms: flush at least this often (milliseconds) while data is pending.
        queue_bytes: most tensor bytes held in the queue before the caller waits.
        encoding: value encoding, one of ``raw``, ``zstd``, ``zstd-shuffle``.
        zstd_level: zstd level for values.
        compact: at close, rewrite the decisions and tensors files in large dictionary-encoded
            batches (smaller files, faster scans).
        compact_level: zstd level of the compacted files.
        fsync: fsync after every flush (survives power loss, not only a killed process).
        digest: the tensor digest algorithm of this part (SPEC.md §4.5), named in its status
            file: ``"xxh3-128"`` (default) or ``"sha256-128"`` (what format 1.0 writers used).
        process: run the background work (statistics, digests, batches, files) in a child
            process (:mod:`steptrace.tracefmt.writerprocess`) instead of a thread, so that it never
            holds this process's GIL: for a Python-bound caller whose framework releases the GIL
            around each operator (PyTorch), on a machine with a core to spare.
        ring_bytes: with ``process``, the shared ring's size: the most array bytes on their way to
            the child, and the largest single array (default ``queue_bytes``, at most 1 GiB).

    Raises:
        TraceExistsError: ``mode="create"`` and a trace exists at ``path``.
        TraceUsageError: a bad option.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: TraceMetadata | Mapping[str, Any] | None = None,
        vocab: Sequence[str] | Mapping[int, str] | None = None,
        mode: str = "create",
        flush_steps: int = 64,
        flush_ms: float = 1000.0,
        queue_bytes: int = 256 << 20,
        encoding: str = "zstd",
        zstd_level: int = 1,
        compact: bool = True,
        compact_level: int = 6,
        fsync: bool = False,
        digest: str = DEFAULT_DIGEST,
        process: bool = False,
        ring_bytes: int | None = None,
    ) -> None:
        if mode not in _MODES:
            raise TraceUsageError(f"mode {mode!r} is unknown; use one of {', '.join(_MODES)}")
        if encoding not in ENCODINGS:
            raise TraceUsageError(f"encoding {encoding!r} is unknown; use one of {', '.join(ENCODINGS)}")
        if flush_steps < 1 or flush_ms <= 0 or queue_bytes < 1:
            raise TraceUsageError("flush_steps, flush_ms and queue_bytes must be positive")
        ring = min(queue_bytes, 1 << 30) if ring_bytes is None else ring_bytes
        if process and os.name != "posix":
            raise TraceUsageError("a writer process (process=True) needs a POSIX system; write without it here")
        if process and (type(ring) is not int or ring < 1 << 16):
            raise TraceUsageError(f"ring_bytes={ring!r}: give the writer process a ring of at least 64 KiB")
        if digest not in DIGEST_ALGORITHMS:
            raise TraceUsageError(f"digest {digest!r} is unknown; use one of {', '.join(DIGEST_ALGORITHMS)}")
        check_kernel_env()  # a bad STEPTRACE_KERNEL fails here, not in the background work
        #: The digest algorithm of this part's tensor rows (SPEC.md §4.5).
        self.digest_algorithm = digest
        self.path = Path(path)
        self.part = part_id()
        self.metadata = TraceMetadata.coerce(dict(metadata) if isinstance(metadata, Mapping) else metadata)
        self._t0 = time.perf_counter()
        self._compact = compact
        self._compact_level = compact_level
        self._closed = False
        self._summary: WriteSummary | None = None

        create_or_join(self.path, mode=mode, metadata=self.metadata, part=self.part, vocab=vocab)
        parts = self.path / PARTS_DIR
        self._status_path = parts / part_file(self.part)
        claim_part(self._status_path, self.part)  # exclusive: a second writer of this part name fails here
        self._keys = DecisionKeys()
        self._status: dict[str, Any] = {
            "part": self.part,
            "status": "open",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": utc_now(),
            "metadata": self.metadata.to_manifest(),
            "digest": digest,
        }
        write_json_atomic(self._status_path, self._status)
        flush_s = flush_ms / 1000.0
        hold_bytes = max(min(queue_bytes // 4, 8 << 20), 1)
        self._pool = BufferPool(queue_bytes)
        self._files: dict[str, ArrowAppender] = {}
        self._thread: threading.Thread | None = None
        self._outbox: Outbox | ProcessOutbox
        self._worker: Worker | WriterProcess
        if process:
            from .processoutbox import ProcessOutbox
            from .writerprocess import WriterProcess

            config = {"flush_steps": flush_steps, "flush_ms": flush_ms, "queue_bytes": queue_bytes, "encoding": encoding,
                      "zstd_level": zstd_level, "fsync": fsync, "digest": digest, "compact": compact,
                      "compact_level": compact_level}
            self._worker = link = WriterProcess(self.path, self.part, ring_bytes=ring, config=config)
            self._outbox = ProcessOutbox(link, self._pool, hold_bytes=hold_bytes, hold_rows=2048, hold_s=flush_s / 2)
        else:
            self._files = {
                kind: ArrowAppender(parts / data_file(self.part, kind), kind, self.part, level=level, fsync=fsync)
                for kind, level in (("values", None), ("tensors", 1), ("decisions", 1))
            }
            self._outbox = Outbox(Budget(queue_bytes), hold_bytes=hold_bytes, hold_rows=2048, hold_s=flush_s / 2)
            self._worker = Worker(self._outbox, self._pool, self._files, Encoder(encoding, zstd_level),
                                  flush_steps=flush_steps, flush_s=flush_s, digest=digest_function(digest))
            self._thread = threading.Thread(target=self._worker.run, name=f"steptrace-writer-{self.part}", daemon=True)
            self._outbox.consumer = self._thread
        self._counter = StepCounter(self._outbox.lock)  # add_* may be called from several threads
        #: The recorders' fast path into this writer (an internal interface, see :mod:`steptrace.tracefmt.lane`).
        self.lane = RecorderLane(self, self._outbox, self._pool)  # type: ignore[arg-type]
        if self._thread is not None:
            self._thread.start()
        _open_writers.add(self)

    # ------------------------------------------------------------------ caller side
    def _failed_or_closed(self) -> bool:
        return self._worker.error is not None or self._closed

    def _check_open(self) -> None:
        err = self._worker.error
        if err is not None:
            raise TraceWriteError(f"writing {self.path} failed: {err}") from err
        if self._closed:
            raise TraceUsageError("this TraceWriter is closed")

    def add_tensor(
        self,
        sample: str,
        step: int,
        name: str,
        array: np.ndarray,
        *,
        values: bool = True,
        source: str | None = None,
        call: int | None = None,
        order: int | None = None,
        dtype: str | None = None,
        copy: bool = True,
        stats: TensorStats | None = None,
    ) -> None:
        """Record one tensor: statistics and digest always, values when ``values`` is true.

        Args:
            sample, step: the step it belongs to.
            name: tensor name (module path, ONNX value name, ...).
            array: the tensor (any SPEC.md dtype; bfloat16 as ml_dtypes or uint16 + ``dtype``).
            values: store the values too (else stats + digest only).
            source: where it came from (module class, ONNX node, CoreML op).
            call: call index of ``name`` within the step; counted automatically when None
                (over the 4096 most recent steps; pass it when returning to older steps).
            order: execution order within the step; counted automatically when None.
            dtype: SPEC.md dtype name overriding the array's (``"bfloat16"`` for uint16 bits).
            copy: copy the array before returning (set False only for arrays nobody mutates).
            stats: statistics already computed (e.g. on a GPU); computed here when None.

        Raises:
            UnsupportedDtypeError: the dtype is not a SPEC.md dtype.
            TraceUsageError: malformed arguments.
            TraceWriteError: the background writer failed earlier.
        """
        self._check_open()
        sample, step = check_key(sample, step)
        if not isinstance(name, str) or not name:
            raise TraceUsageError(f"tensor name must be a non-empty string, got {name!r}")
        opt_str("source", source)
        arr = np.asarray(array)
        dt = dtype_name(arr, dtype)
        a = canonical(arr, dt)
        pooled = None
        if copy and np.may_share_memory(a, arr):
            a, pooled = self._pool.copy(a)
        order, call = self._counter.order_call(sample, step, name, order, call)
        if stats is not None and not isinstance(stats, TensorStats):
            raise TraceUsageError("stats must be a tracefmt.TensorStats")
        self._outbox.put(TensorItem(sample, step, name, call, order, source, dt, a, bool(values), stats, pooled),
                         a.nbytes)

    def add_tensor_stats(
        self,
        sample: str,
        step: int,
        name: str,
        *,
        dtype: str,
        shape: Sequence[int],
        stats: TensorStats,
        digest: bytes | None,
        source: str | None = None,
        call: int | None = None,
        order: int | None = None,
    ) -> None:
        """Record a tensor whose statistics were computed elsewhere (on a GPU, in C++).

        Args:
            dtype, shape: of the tensor.
            stats: its :class:`TensorStats`.
            digest: the SPEC.md §4.5 digest of its canonical bytes (16 bytes) computed with this
                part's algorithm (:attr:`digest_algorithm`), or None if unknown.
            Other arguments as for :meth:`add_tensor`.
        """
        self._check_open()
        sample, step = check_key(sample, step)
        if not isinstance(name, str) or not name:
            raise TraceUsageError(f"tensor name must be a non-empty string, got {name!r}")
        opt_str("source", source)
        if not isinstance(stats, TensorStats):
            raise TraceUsageError("stats must be a tracefmt.TensorStats")
        if dtype not in DTYPES:
            raise TraceUsageError(f"dtype {dtype!r} is not a steptrace dtype")
        if digest is not None and len(digest) != 16:
            raise TraceUsageError("digest must be 16 bytes (SPEC.md §4.5)")
        shape_t = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape_t):
            raise TraceUsageError(f"shape {list(shape_t)} has a negative dimension")
        order, call = self._counter.order_call(sample, step, name, order, call)
        self._outbox.put(StatsItem(sample, step, name, call, order, source, dtype, shape_t, stats, digest))

    def flush(self) -> None:
        """Write everything queued so far to disk; returns when it is there."""
        self._check_open()
        self._outbox.send_held()
        if self._thread is None:
            self._worker.flush()  # type: ignore[union-attr]
        else:
            done = threading.Event()
            self._outbox.queue.put(FlushItem(done))  # type: ignore[union-attr]
            while not done.wait(0.1):
                if not self._thread.is_alive():
                    break
        self._check_open()

    def close(self) -> WriteSummary:
        """Flush, finish every file, compact, mark the part closed; idempotent.

        Returns:
            The :class:`WriteSummary`.

        Raises:
            TraceWriteError: writing failed (the data flushed before the failure stays readable).
        """
        if self._summary is not None:
            return self._summary
        remote: dict[str, Any] | None = None
        if not self._closed:
            self._closed = True
            self._outbox.send_held(stop=True)
            if self._thread is None:
                try:
                    remote = self._worker.close()  # type: ignore[union-attr]
                finally:
                    _open_writers.discard(self)
            else:
                self._outbox.queue.put(CLOSE)  # type: ignore[union-attr]
                self._thread.join()
                _open_writers.discard(self)
        if self._worker.error is not None:
            err = self._worker.error
            raise TraceWriteError(f"writing {self.path} failed: {err}") from err
        try:
            if remote is not None:  # the writer process closed and compacted the files
                rows, sizes, sums = remote["rows"], remote["bytes"], remote["checksums"]
                self._outbox.budget.stalled += self._worker.stalled + remote["stalled"]  # type: ignore[union-attr]
            else:
                sizes = {kind: finish_file(f, rewrite=self._compact and kind != "values", level=self._compact_level)
                         for kind, f in self._files.items()}
                rows = {kind: f.rows for kind, f in self._files.items()}
                sums = {kind: file_checksum(f.path) for kind, f in self._files.items()}
            vocab = self.path / f"vocab-{self.part}.arrow"
            if vocab.exists():
                sums["vocab"] = file_checksum(vocab)
            self._status.update(
                status="closed",
                closed=utc_now(),
                counts={k: rows[k] for k in ("decisions", "tensors", "values")},
                bytes=sizes,
                checksums=sums,
            )
            write_json_atomic(self._status_path, self._status)
        except OSError as exc:
            self._worker.error = exc
            raise TraceWriteError(f"closing {self.path} failed: {exc}") from exc
        self._summary = WriteSummary(
            path=str(self.path),
            part=self.part,
            decisions=self._worker.counts["decisions"],
            tensors=self._worker.counts["tensors"],
            values=self._worker.counts["values"],
            tensor_bytes=self._worker.counts["tensor_bytes"],
            file_bytes=sum(sizes.values()),
            stall_seconds=self._outbox.budget.stalled,
            seconds=time.perf_counter() - self._t0,
        )
        return self._summary

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
