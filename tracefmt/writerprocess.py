"""A writer's background work in a process of its own (``TraceWriter(process=True)``).

In a recording process the writer's thread shares the GIL with the model's: PyTorch releases
the GIL around every operator, and each time the writer's thread runs Python then, the model's
thread waits for it at its next operator (``bench_record.py``'s KV workload loses more to that
than to the statistics themselves). With ``process=True`` the caller's side of the writer is
unchanged (the same checks, the same :class:`~tracefmt.lane.RecorderLane`), but items go to a
child process (:mod:`steptrace.tracefmt.writerchild`) that runs the background loop and owns
the part's data files:

- arrays are copied into a shared ring (an anonymous memory file both processes map), and
  items travel as records (:mod:`steptrace.tracefmt.wire`) through a pipe, a frame per batch of
  held rows (or per item, when not holding);
- the child copies the arrays out of the ring and releases it; the caller waits only when the
  ring is full (counted in ``WriteSummary.stall_seconds``);
- ``flush()`` and ``close()`` wait for the child's answer; the child compacts the files at close
  and the caller writes the part's status, as an in-process writer does;
- a recording process killed (or exiting without ``close()``) closes the pipe: the child writes
  every row it was given, leaves the part open, as a killed writer's, and exits; a child that
  dies makes the caller's next call raise :class:`~tracefmt.errors.TraceWriteError`.

Rows held while the caller runs (``lane.hold()``) travel when the next row finds them older than
``flush_ms / 2``, at ``flush()`` and at ``close()``: no thread of the recording process watches
them.
"""

from __future__ import annotations

import json
import mmap
import os
import select
import subprocess
import sys
import time
from itertools import accumulate
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TraceWriteError
from .wire import ALIGN, CLOSE, CONFIG, FLUSH, ITEMS, REPLY, read_frame, write_frame

#: Bytes of the ring's header: the child's released position (int64).
HEADER = ALIGN
_PAD = bytes(ALIGN)  # the zeros between arrays joined by WriterProcess.place_many
#: Past this far into the ring, arrays go back to its start once the child is nearly done with
#: what lies before (:meth:`WriterProcess._start_over`): a ring that the child keeps up with
#: then uses its first MBs over and over (its pages mapped, mostly in cache), not its whole
#: size, whose every page is touched for the first time on the model's thread (place_many of
#: 64 small arrays: 1.0 us per array over a 4 MB ring, 1.5-2.0 us over the default 256 MB
#: one). A lap holds more than a writer holds back (8 MB at most): the rows of a new lap's
#: arrays travel only when the held rows go, and until the child has them it cannot release
#: the old lap's bytes there (a 4 MB lap made bench_record.py's KV workload wait ~5 ms every
#: 4 MB: 15-20 ms per 256 steps; 16 MB, none; measured 2026-12-04).
RECYCLE_BYTES = 16 << 20
#: The pipe's buffer is raised to this (Linux), so that a child still starting does not block the caller.
PIPE_BYTES = 1 << 20


class ChildFailed(Exception):
    """What the writer process reported (or that it exited); the writer raises it as
    :class:`~tracefmt.errors.TraceWriteError`."""


def _ring_file(size: int) -> int:
    """A file descriptor of ``size`` bytes of anonymous shared memory (the caller closes it)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("steptrace-ring", os.MFD_CLOEXEC)
    else:  # macOS: an unlinked temporary file
        import tempfile

        with tempfile.NamedTemporaryFile(prefix="steptrace-ring-", delete=False) as f:
            fd = os.dup(f.fileno())
        os.unlink(f.name)
    os.ftruncate(fd, size)
    return fd


def _child_code() -> str:
    """The child's ``python -c`` program: it imports the steptrace this process runs (found
    first on ``sys.path`` when the package sits in a directory of that name, as a plain install
    or ``PYTHONPATH`` has it; an editable install's finder is inherited with site-packages), so
    both sides read the same wire format."""
    package = Path(os.path.abspath(__file__)).parent.parent
    head = f"import sys; sys.path.insert(0, {str(package.parent)!r}); " if package.name == "steptrace" else ""
    return _POPULATE + head + "from steptrace.tracefmt.writerchild import main; main()"


# The child's first act (before its imports): the ring's first lap allocated in one call. A page
# of shared memory the caller writes first costs it a fault that allocates and zeroes the page
# (~2.9 us per 4 KB page on the bench VM: 12 ms per 16 MB lap); once the child has the pages, the
# caller's first write of each maps it (~1.5 us). Linux 5.14+ (MADV_POPULATE_WRITE); elsewhere
# the pages come as they are written.
_POPULATE = (
    "import sys\n"
    "if sys.platform.startswith('linux'):\n"
    "    import mmap, os\n"
    "    try:\n"
    f"        _n = min(os.fstat(int(sys.argv[1])).st_size, {HEADER + RECYCLE_BYTES + (1 << 20)})\n"
    "        _m = mmap.mmap(int(sys.argv[1]), _n)\n"
    "        _m.madvise(23, 0, _n)\n"
    "        _m.close()\n"
    "    except (OSError, ValueError):\n"
    "        pass\n"
)


class WriterProcess:
    """The child process, the pipes to it and the ring: the caller's view of the background loop
    (``error`` and ``counts`` as a :class:`~tracefmt.writerloop.Worker` has them).

    Args:
        path: the trace directory.
        part: this part's id.
        ring_bytes: the ring's size (the most array bytes on their way to the child).
        config: the background loop's options (flush_steps, flush_ms, queue_bytes, encoding,
            zstd_level, fsync, digest, compact, compact_level).
    """

    def __init__(self, path: Path, part: str, *, ring_bytes: int, config: dict[str, Any]) -> None:
        self.error: BaseException | None = None
        self.counts = {"decisions": 0, "tensors": 0, "values": 0, "tensor_bytes": 0}
        self.size = ring_bytes
        try:
            fd = _ring_file(HEADER + ring_bytes)
            try:
                self._map = mmap.mmap(fd, HEADER + ring_bytes)
                self._proc = subprocess.Popen(
                    [sys.executable, "-c", _child_code(), str(fd)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=(fd,), start_new_session=True,
                )
            finally:
                os.close(fd)
        except OSError as exc:
            raise TraceWriteError(f"could not start the writer process: {exc}; write from a thread instead "
                                  "(trace record --writer thread, TraceWriter(process=False))") from exc
        self._out = self._proc.stdin.fileno()  # type: ignore[union-attr]
        self._in = self._proc.stdout.fileno()  # type: ignore[union-attr]
        import fcntl

        if hasattr(fcntl, "F_SETPIPE_SZ"):  # Linux
            try:
                fcntl.fcntl(self._out, fcntl.F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass  # above /proc/sys/fs/pipe-max-size: the default buffer then
        self.released = np.ndarray((1,), np.int64, buffer=self._map, offset=0)
        self.ring = np.ndarray((ring_bytes,), np.uint8, buffer=self._map, offset=HEADER)
        self._bytes = memoryview(self._map)[HEADER:]
        self.head = 0  # bytes placed so far, skipped tails included
        self.sent = 0  # the head when records were last sent: the child may release up to it
        self.pos = 0  # where the next array goes (head modulo size)
        self.limit = ring_bytes  # head may grow up to this before the child's released position is read again
        self._recycle_at = RECYCLE_BYTES if ring_bytes >= 2 * RECYCLE_BYTES else ring_bytes + 1
        self.stalled = 0.0
        self._send(CONFIG, json.dumps({**config, "path": str(path), "part": part, "ring_bytes": ring_bytes}).encode())

    # ------------------------------------------------------------------ the ring
    def place(self, a: np.ndarray, unsent: Callable[[], None]) -> int:
        """Copy ``a`` into the ring; return its offset. While the ring is full, ``unsent`` is
        called first (it sends the records not sent yet, whose arrays the child has to release),
        then this waits."""
        nb = a.nbytes
        n = (nb + ALIGN - 1) & -ALIGN
        pos = self.pos
        if pos >= self._recycle_at:
            pos = self._start_over(n)
        if pos + n > self.size or self.head + n > self.limit:
            pos = self._make_room(n, nb, unsent)
        if nb:
            try:
                self._bytes[pos : pos + nb] = a.data.cast("B")
            except TypeError:  # not C-contiguous
                np.copyto(self.ring[pos : pos + nb].view(a.dtype).reshape(a.shape), a)
        self.head += n
        self.pos = pos + n
        return pos

    def place_many(self, arrays: list[np.ndarray], unsent: Callable[[], None]) -> list[int]:
        """:meth:`place` of each of ``arrays``, in order: small C-contiguous arrays (a quarter of
        the ring in all, at most) are joined and copied as one block, which the ring's tail is
        skipped for when it does not fit there."""
        if not arrays:
            return []
        sizes = [a.nbytes for a in arrays]
        padded = [(nb + ALIGN - 1) & -ALIGN for nb in sizes]
        n = sum(padded)
        if n > self.size >> 2:
            return [self.place(a, unsent) for a in arrays]
        parts: list[Any] = []
        try:
            for a, nb, p in zip(arrays, sizes, padded):
                if nb:
                    parts.append(a.data.cast("B"))
                if p != nb:
                    parts.append(_PAD[: p - nb])
        except TypeError:  # one is not C-contiguous
            return [self.place(a, unsent) for a in arrays]
        return list(accumulate(padded[:-1], initial=self.place_block(parts, n, unsent)))

    def place_block(self, parts: list[Any], n: int, unsent: Callable[[], None]) -> int:
        """Copy the buffers ``parts`` (``n`` bytes in all, a multiple of :data:`ALIGN`, at most a
        quarter of the ring) into the ring one after the other; return the first's offset (the
        ring's tail is skipped for them when they do not fit there)."""
        pos = self.pos
        if pos >= self._recycle_at:
            pos = self._start_over(n)
        if pos + n > self.size or self.head + n > self.limit:
            pos = self._make_room(n, n, unsent)
        if n:
            self._bytes[pos : pos + n] = b"".join(parts)
        self.head += n
        self.pos = pos + n
        return pos

    def _start_over(self, n: int) -> int:
        """Go back to the ring's start (see :data:`RECYCLE_BYTES`) when the child has released
        the lap's first ``n`` bytes and is nearly done with what it was sent (all but a quarter
        of a lap; rows still held are not its to release). Return where the next array goes.

        A child further behind (still starting, or slower than the model for a while) would
        make each array of the new lap wait for its old-lap bytes, as a ring of this lap's
        size would: the arrays go on forward through the rest of the ring instead."""
        released = int(self.released[0])
        if released >= self.head - self.pos + n and self.sent - released <= self.pos >> 2:
            self.head += self.size - self.pos
            self.pos = 0
            self.limit = released + self.size
        return self.pos

    def _make_room(self, n: int, nb: int, unsent: Callable[[], None]) -> int:
        if n > self.size:
            raise TraceWriteError(
                f"a {nb}-byte array does not fit the writer process's {self.size}-byte ring; "
                "pass a larger ring_bytes (or write without process=True)"
            )
        if self.pos + n > self.size:  # the ring's tail is skipped: arrays never wrap
            self.head += self.size - self.pos
            self.pos = 0
        self.limit = int(self.released[0]) + self.size
        if self.head + n > self.limit:
            unsent()
            self._wait_room(n)
        return self.pos

    def _wait_room(self, n: int) -> None:
        t0 = time.perf_counter()
        while self.head + n > self.limit:
            self._poll()
            if self.error is not None:
                raise TraceWriteError(f"the writer process failed: {self.error}")
            if self._proc.poll() is not None:
                self._fail(ChildFailed(f"the writer process exited (code {self._proc.returncode})"))
                raise TraceWriteError(f"the writer process failed: {self.error}")
            time.sleep(0.0002)
            self.limit = int(self.released[0]) + self.size
        self.stalled += time.perf_counter() - t0

    # ------------------------------------------------------------------ the pipes
    def _send(self, kind: int, payload: bytes | bytearray) -> None:
        t0 = time.perf_counter()
        try:
            write_frame(self._out, kind, payload)
        except OSError as exc:
            self._fail(ChildFailed(f"the writer process is gone ({exc}; exit code {self._proc.poll()})"))
            return
        dt = time.perf_counter() - t0
        if dt > 1e-3:  # the pipe was full: the child is behind
            self.stalled += dt

    def send_items(self, records: bytearray) -> None:
        """Send an ITEMS frame of ``records`` (the ring up to :attr:`head` holds their arrays)."""
        self._poll()
        if self.error is None:
            self._send(ITEMS, self.head.to_bytes(8, "little") + records)
            self.sent = self.head

    def _fail(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc

    def _poll(self) -> None:
        """Take a failure the child reported, without waiting."""
        if self.error is None and select.select([self._in], [], [], 0)[0]:
            self._reply()

    def _reply(self) -> dict[str, Any]:
        try:
            frame = read_frame(self._in)
        except (OSError, TraceWriteError) as exc:
            frame = None
            self._fail(ChildFailed(str(exc)))
        if frame is None:
            self._fail(ChildFailed(f"the writer process exited (code {self._proc.wait()})"))
            return {}
        kind, payload = frame
        doc = json.loads(payload) if kind == REPLY else {"error": f"unexpected frame kind {kind}"}
        if doc.get("error"):
            self._fail(ChildFailed(doc["error"]))
        return doc

    def flush(self) -> None:
        """Have every item sent so far written to disk; return when it is there."""
        self._send(FLUSH, b"")
        while self.error is None and "flushed" not in self._reply():
            pass

    def close(self) -> dict[str, Any]:
        """Finish the child: every item written, the files closed and compacted.

        Returns:
            The child's account: ``counts``, ``rows``, ``bytes`` and ``checksums`` per file.

        Raises:
            TraceWriteError: the child failed (before or while closing).
        """
        self._send(CLOSE, b"")
        doc: dict[str, Any] = {}
        while self.error is None and "closed" not in doc:
            doc = self._reply()
        self._proc.stdin.close()  # type: ignore[union-attr]
        self._proc.wait()
        self._proc.stdout.close()  # type: ignore[union-attr]
        self._bytes.release()
        del self.released, self.ring
        self._map.close()
        if self.error is not None:
            raise TraceWriteError(f"the writer process failed: {self.error}") from self.error
        self.counts.update(doc["counts"])
        return doc

    def abandon(self) -> None:
        """Close the pipe without a CLOSE: the child writes what it was given and leaves the part
        open (what a killed recording process leaves)."""
        try:
            self._proc.stdin.close()  # type: ignore[union-attr]
        except OSError:
            pass
