"""Importing a JSONL interchange file (SPEC.md §6) into a trace, streamed line by line."""

from __future__ import annotations

import io
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zstandard

from .errors import (
    JsonlError,
    TraceError,
    TraceExistsError,
    TraceNotFoundError,
    TraceUsageError,
    TraceWriteError,
)
from .jsonio import parse_json
from .jsonl_fields import LineContext, json_type
from .jsonl_lines import Vocab, add_decision, add_tensor, parse_meta
from .metadata import TraceMetadata
from .payload import SHA256_128
from .schema import KINDS, MANIFEST, PARTS_DIR, data_file, part_file
from .writer import TraceWriter

_MODES = ("create", "append", "overwrite")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_PROGRESS_EVERY_S = 0.1
#: Longest line accepted (bytes); a longer one is refused with its line number (SPEC.md §6).
MAX_LINE_BYTES = 256 << 20
#: Compressed bytes inflated at a time: zstd expands a block at most ~43,700-fold (RLE blocks),
#: so one step yields at most ~11 MiB and a decompression bomb cannot fill memory.
_ZSTD_STEP = 256

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ImportSummary:
    """What :func:`import_jsonl` read and recorded."""

    lines: int  # physical lines read, blank and ignored ones included
    decisions: int
    tensors: int  # tensor rows, full-logits tensors of keep_logits included
    samples: int  # distinct sample ids
    seconds: float
    #: the digest algorithm of the part written: the file's (its meta line's ``digest``)
    digest: str = SHA256_128
    #: statistics-only lines recorded without their digest, which was of another algorithm
    digests_dropped: int = 0

    def __str__(self) -> str:
        def n(k: int, word: str) -> str:
            return f"{k:,} {word}{'' if k == 1 else 's'}"

        dropped = (f"; {n(self.digests_dropped, 'statistics-only digest')} not of the file's {self.digest} "
                   "left out" if self.digests_dropped else "")
        return (f"imported {n(self.lines, 'line')}: {n(self.decisions, 'decision')}, {n(self.tensors, 'tensor')}, "
                f"{n(self.samples, 'sample')} in {self.seconds:.2f} s{dropped}")


class _CountingReader(io.RawIOBase):
    """A raw binary reader that counts the bytes it hands out (progress for files and pipes)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer) or 0  # type: ignore[attr-defined]
        self.count += n
        return n


class _ZstdFrames(io.RawIOBase):
    """Inflates one or more concatenated zstd frames, refusing a stream that ends inside a frame.

    ``ZstdDecompressor.stream_reader`` reports a truncated file as a clean end of data, which
    would import the first part of a cut-off file as if it were whole.
    """

    def __init__(self, src: IO[bytes]) -> None:
        self._src = src
        self._dctx = zstandard.ZstdDecompressor()
        self._frame: Any = None  # decompressobj of the frame being read, None between frames
        self._out = b""
        self._pos = 0
        self._pending = b""  # compressed bytes read from src, inflated _ZSTD_STEP at a time
        self._pending_at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._pos >= len(self._out):
            if self._pending_at >= len(self._pending):
                self._pending, self._pending_at = self._src.read(1 << 16), 0
                if not self._pending:
                    if self._frame is not None:
                        raise zstandard.ZstdError("the data ends inside a zstd frame: the file is truncated")
                    return 0
            piece = self._pending[self._pending_at : self._pending_at + _ZSTD_STEP]
            self._pending_at += len(piece)
            self._out, self._pos = self._inflate(piece), 0
        n = min(len(buffer), len(self._out) - self._pos)
        buffer[:n] = self._out[self._pos : self._pos + n]
        self._pos += n
        return n

    def _inflate(self, chunk: bytes) -> bytes:
        out = []
        while chunk:
            if self._frame is None:
                self._frame = self._dctx.decompressobj()
            out.append(self._frame.decompress(chunk))
            chunk = b""
            if self._frame.eof:
                chunk, self._frame = self._frame.unused_data, None
        return b"".join(out)


@contextmanager
def _open_lines(src: Path) -> Iterator[tuple[IO[bytes], _CountingReader]]:
    """Open ``src`` (a file or a pipe) for reading binary lines, inflating zstd by its magic bytes.

    Yields:
        (line stream, the byte counter of ``src``).
    """
    with open(src, "rb", buffering=0) as fh:
        counter = _CountingReader(fh)
        with io.BufferedReader(counter, buffer_size=1 << 20) as stream:
            if stream.peek(4)[:4] != _ZSTD_MAGIC:
                yield stream, counter
            else:
                with io.BufferedReader(_ZstdFrames(stream), buffer_size=1 << 20) as lines:
                    yield lines, counter


class _Import:
    """The state of one import: options, the writer (opened at the first data line), counts."""

    def __init__(self, ctx: LineContext, dst: Path, mode: str) -> None:
        self.ctx = ctx
        self.dst = dst
        self.mode = mode
        self.existed = dst.exists()
        self.had_manifest = (dst / MANIFEST).exists()
        self.writer: TraceWriter | None = None
        self.meta: TraceMetadata | None = None
        self.vocab: Vocab | None = None
        self.counts = {"decision": 0, "tensor": 0}
        self.samples: set[str] = set()

    def open_writer(self) -> TraceWriter:
        if self.writer is None:
            meta = self.meta if self.meta is not None else TraceMetadata()
            self.ctx.watched = list(meta.watched.values())  # in manifest order, as TraceWriter.add_logits
            self.ctx.vocab_head = meta.vocab_head
            self.writer = TraceWriter(self.dst, metadata=meta, vocab=self.vocab, mode=self.mode,
                                      digest=self.ctx.digest)
        return self.writer

    def line(self, raw: bytes) -> None:
        ctx = self.ctx
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            ctx.fail(f"not valid UTF-8 (byte {exc.start + 1} of the line)")
        if ctx.line == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            return
        try:
            obj = parse_json(raw, text=text)
        except ValueError as exc:
            ctx.fail(str(exc).replace(" at line 1 column ", " at column "))
        if not isinstance(obj, dict):
            ctx.fail(f"a line must be a JSON object with a \"kind\", got {json_type(obj)}")
        kind = ctx.value(obj, "kind")
        if not isinstance(kind, str):
            ctx.fail(f"kind must be a string, got {json_type(kind)}")
        if kind == "meta":
            if self.meta is not None:
                ctx.fail("a second meta line; a file holds at most one")
            if self.writer is not None:
                ctx.fail("the meta line must come before every decision and tensor line")
            self.meta, self.vocab = parse_meta(ctx, obj)
        elif kind in self.counts:
            writer = self.open_writer()
            handler: Callable[[LineContext, dict[str, Any], TraceWriter], str] = (
                add_decision if kind == "decision" else add_tensor
            )
            try:
                sample = handler(ctx, obj, writer)
            except TraceUsageError as exc:  # the writer refused a value: report it on this line
                ctx.fail(str(exc))
            self.samples.add(sample)
            self.counts[kind] += 1
            if kind == "decision" and ctx.keep_logits and "logits" in obj:
                self.counts["tensor"] += 1
        # any other kind: ignored (SPEC.md §6), so newer files stay importable

    def discard(self, exc: BaseException) -> None:
        """Close the writer and remove what this import wrote, keeping any previous trace."""
        if self.writer is None:
            if not self.existed and self.dst.exists():  # the writer failed while creating it
                self._remove(self.dst, exc)
            return
        with suppress(TraceError):  # a failing close is secondary: `exc` is what the caller sees
            self.writer.close()
        if not self.existed or self.mode == "overwrite":  # the directory holds only this import
            self._remove(self.dst, exc)
            return
        parts = self.dst / PARTS_DIR
        part = self.writer.part
        for name in (part_file(part), *(data_file(part, k) + end for k in KINDS for end in ("", ".compact"))):
            self._remove(parts / name, exc)
        others = parts.is_dir() and any(parts.iterdir())
        if not self.had_manifest and not others:  # this import made the directory a trace
            self._remove(self.dst / MANIFEST, exc)
            self._remove(self.dst / f"vocab-{part}.arrow", exc)
            with suppress(OSError):
                parts.rmdir()

    @staticmethod
    def _remove(path: Path, exc: BaseException) -> None:
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        except OSError as err:
            exc.add_note(f"could not remove the partial output {path}: {err}")


def import_jsonl(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    mode: str = "create",
    k: int = 8,
    keep_logits: bool = False,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import a JSONL interchange file (SPEC.md §6) into a new trace, or into a trace as a new part.

    The file is read line by line (``.jsonl`` or zstd-compressed ``.jsonl.zst``, recognised by
    its magic bytes; a named pipe works too), never whole. ``npy`` and ``raw`` payload paths are
    relative to the JSONL file's folder and may not leave it. Decisions given as full ``logits``
    are ranked by SPEC.md §3.2; the manifest's ``watched`` ids are recorded on decisions of its
    ``vocab_head`` (default ``token``), the head whose ids name tokens. A decision without ``time`` gets the import's
    wall-clock time (the writer cannot record a null time).

    The part is written with the file's digest algorithm (the meta line's ``digest``, else
    ``sha256-128``). A digest beside values is checked with its own algorithm; a
    statistics-only digest of another algorithm than the file's is left out (never stored under
    the wrong name) and counted in :attr:`ImportSummary.digests_dropped`.

    If a line is bad (or anything else fails, Ctrl-C included), the writer is closed and what the
    import wrote is removed: the whole output directory when this import created it (or replaced
    it, ``mode="overwrite"``), else only its own part, so an existing trace is left as it was.

    Args:
        src: the JSONL file.
        dst: the trace directory to write.
        mode: ``"create"`` (fail if a trace exists), ``"append"`` (add a part to an existing
            trace, or create it), ``"overwrite"`` (replace an existing trace).
        k: top-k kept for ``logits`` lines that give no ``"k"`` of their own (at least 2).
        keep_logits: also store each ``logits`` line's full logits as tensor ``logits:<head>``
            (float32 when the values are exactly float32, else float64).
        progress: called as ``progress(lines_done, bytes_done)`` at most about 10 times a second
            and once at the end; ``bytes_done`` counts bytes read from ``src`` (compressed bytes
            for zstd; a little ahead of the lines, by read-ahead), to compare with
            ``os.path.getsize(src)``.

    Returns:
        The :class:`ImportSummary`.

    Raises:
        JsonlError: a line is malformed; the message gives the file, the 1-based line number and
            the reason.
        TraceNotFoundError: ``src`` does not exist.
        TraceExistsError: ``mode="create"`` and a trace exists at ``dst``.
        TraceUsageError: a bad option (mode, k), or ``src`` is a directory.
        TraceWriteError: reading ``src`` or writing the trace failed (I/O error, disk full).
    """
    if mode not in _MODES:
        raise TraceUsageError(f"mode {mode!r} is unknown; use one of {', '.join(_MODES)}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise TraceUsageError(f"k={k!r}: a decision keeps at least the top 2 candidates (k >= 2)")
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.exists():
        raise TraceNotFoundError(f"{src}: no such JSONL file")
    if src_path.is_dir():
        raise TraceUsageError(f"{src} is a directory; give the JSONL file (.jsonl or .jsonl.zst)")
    if mode == "create" and (dst_path / MANIFEST).exists():
        raise TraceExistsError(
            f"a trace already exists at {dst}; import with mode='append' or mode='overwrite' (CLI: --overwrite)"
        )
    t0 = time.perf_counter()
    base = Path(os.path.abspath(src_path)).parent.resolve()
    ctx = LineContext(path=str(src), base=base, k=k, keep_logits=keep_logits)
    job = _Import(ctx, dst_path, mode)
    next_report = time.monotonic() + _PROGRESS_EVERY_S
    try:
        with _open_lines(src_path) as (stream, counter):
            while True:
                ctx.line += 1
                try:
                    raw = stream.readline(MAX_LINE_BYTES + 1)
                except zstandard.ZstdError as exc:
                    reason = f"the zstd data is damaged ({exc}); found while reading ahead, it may lie a few lines on"
                    raise JsonlError(str(src), ctx.line, reason) from None
                if not raw:
                    ctx.line -= 1
                    break
                if len(raw) > MAX_LINE_BYTES:
                    raise JsonlError(str(src), ctx.line, f"the line is longer than {MAX_LINE_BYTES} bytes (SPEC.md §6)")
                job.line(raw)
                if progress is not None and time.monotonic() >= next_report:
                    progress(ctx.line, counter.count)
                    next_report = time.monotonic() + _PROGRESS_EVERY_S
            bytes_done = counter.count
        job.open_writer().close()
    except BaseException as exc:
        job.discard(exc)
        if isinstance(exc, OSError):
            raise TraceWriteError(f"importing {src} into {dst} failed: {exc}") from exc
        raise
    if progress is not None:
        progress(ctx.line, bytes_done)
    return ImportSummary(
        lines=ctx.line,
        decisions=job.counts["decision"],
        tensors=job.counts["tensor"],
        samples=len(job.samples),
        seconds=time.perf_counter() - t0,
        digest=ctx.digest,
        digests_dropped=ctx.digests_dropped,
    )
