"""The writer process of ``TraceWriter(process=True)`` (:mod:`steptrace.tracefmt.writerprocess`):
the part's data files and the background loop, fed through a pipe and a shared ring.

Run by the writer as ``python -c "...writerchild import main; main()" RING_FD``; it reads frames
(:mod:`steptrace.tracefmt.wire`) on stdin and answers on stdout. It ignores SIGINT (a Ctrl-C
reaches the recording process, whose ``close()`` then finishes this one) and, when the pipe ends
without a CLOSE (the recording process was killed or exited without closing), writes every row
it was given and exits, leaving the part open as a killed writer leaves it.
"""

from __future__ import annotations

import json
import mmap
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .checksum import file_checksum
from .errors import TraceError
from .ipcfile import ArrowAppender, finish_file
from .outbox import Budget, BufferPool, Outbox
from .payload import Encoder, digest_function
from .schema import PARTS_DIR, data_file
from .statspolicy import KERNEL_AFTER_ELEMENTS, allow_kernel_after
from .wire import CLOSE, CONFIG, FLUSH, ITEMS, REPLY, ItemDecoder, read_frame, write_frame
from .writeitems import CLOSE as CLOSE_ITEM
from .writeitems import FlushItem, ManyItem
from .writerloop import Worker
from .writerprocess import HEADER


def _reply(doc: dict[str, Any]) -> None:
    write_frame(1, REPLY, json.dumps(doc).encode())


class _Child:
    def __init__(self, ring_fd: int, cfg: dict[str, Any]) -> None:
        size = int(cfg["ring_bytes"])
        self._map = mmap.mmap(ring_fd, HEADER + size)
        os.close(ring_fd)
        self.released = np.ndarray((1,), np.int64, buffer=self._map, offset=0)
        self.decoder = ItemDecoder(np.ndarray((size,), np.uint8, buffer=self._map, offset=HEADER))
        self.part = cfg["part"]
        self.compact = bool(cfg["compact"])
        self.compact_level = int(cfg["compact_level"])
        parts = Path(cfg["path"]) / PARTS_DIR
        self.files = {
            kind: ArrowAppender(parts / data_file(self.part, kind), kind, self.part, level=level,
                                fsync=bool(cfg["fsync"]))
            for kind, level in (("values", None), ("tensors", 1), ("decisions", 1))
        }
        queue_bytes = int(cfg["queue_bytes"])
        flush_s = float(cfg["flush_ms"]) / 1000.0
        self.outbox = Outbox(Budget(queue_bytes), hold_bytes=max(min(queue_bytes // 4, 8 << 20), 1), hold_rows=2048,
                             hold_s=flush_s / 2)
        self.worker = Worker(self.outbox, BufferPool(queue_bytes), self.files,
                             Encoder(cfg["encoding"], int(cfg["zstd_level"])), flush_steps=int(cfg["flush_steps"]),
                             flush_s=flush_s, digest=digest_function(cfg["digest"]))
        self.thread = threading.Thread(target=self.worker.run, name=f"steptrace-writer-{self.part}", daemon=True)
        self.outbox.consumer = self.thread
        self.thread.start()
        self.reported = False

    def items(self, payload: bytes) -> None:
        items, nbytes, end = self.decoder.decode(payload)
        self.released[0] = end  # the arrays are copies now: the ring is free up to there
        if nbytes:
            self.outbox.budget.take(nbytes, self.thread)
        self.outbox.queue.put(ManyItem(items))
        self.report()

    def report(self) -> None:
        if self.worker.error is not None and not self.reported:
            self.reported = True
            _reply({"error": str(self.worker.error)})

    def flush(self) -> None:
        done = threading.Event()
        self.outbox.queue.put(FlushItem(done))
        while not done.wait(0.1):
            if not self.thread.is_alive():
                break

    def close(self) -> dict[str, Any]:
        self.outbox.queue.put(CLOSE_ITEM)
        self.thread.join()
        if self.worker.error is not None:
            return {"error": str(self.worker.error)}
        files = self.files
        try:
            sizes = {kind: finish_file(f, rewrite=self.compact and kind != "values", level=self.compact_level)
                     for kind, f in files.items()}
            sums = {kind: file_checksum(f.path) for kind, f in files.items()}
        except OSError as exc:
            return {"error": f"closing the part's files failed: {exc}"}
        return {"closed": True, "counts": self.worker.counts, "rows": {k: f.rows for k, f in files.items()},
                "bytes": sizes, "checksums": sums, "stalled": self.outbox.budget.stalled}


def main() -> None:
    """The writer process's entry point (see the module docstring)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # no model thread here to wait on numba's load: under auto, a long recording takes the kernel
    allow_kernel_after(KERNEL_AFTER_ELEMENTS)
    ring_fd = int(sys.argv[1])
    first = read_frame(0)
    if first is None or first[0] != CONFIG:
        sys.exit(2)
    try:
        child = _Child(ring_fd, json.loads(first[1]))
    except (OSError, TraceError, ValueError, KeyError) as exc:
        _reply({"error": f"the writer process could not start: {exc}"})
        sys.exit(1)
    while True:
        try:
            frame = read_frame(0)
        except TraceError:
            frame = None
        if frame is None:  # the recording process is gone: write what it gave, leave the part open
            child.flush()
            os._exit(0)
        kind, payload = frame
        if kind == ITEMS:
            try:
                child.items(payload)
            except TraceError as exc:
                _reply({"error": str(exc)})
                child.flush()
                os._exit(1)
        elif kind == FLUSH:
            child.flush()
            child.report()
            _reply({"flushed": True})
        elif kind == CLOSE:
            _reply(child.close())
            return
