"""The one door through which tracefmt reads Arrow data files (SPEC.md §1, §2.2, §5).

Every pyarrow call on a trace file happens inside :func:`guarded`, which turns any pyarrow or
OS error (and the ``UnicodeDecodeError``/``MemoryError`` a damaged buffer can cause) into a
:class:`TraceCorruptError` or :class:`TraceFormatError` that names the file and says what to do.
Before pyarrow sees a closed part's file, its size is compared with the size recorded at close
and, where the caller asks, its checksum is verified (:mod:`steptrace.tracefmt.checksum`). A batch read from
a file whose checksum was not verified (the values file on open, interrupted parts, parts
written before format 1.1) is validated in full (``RecordBatch.validate(full=True)``: offsets,
dictionary indices, UTF-8) before anything else touches it, so damaged bytes give an error, never
a crash or a wrong row.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from .checksum import verify_file
from .errors import TraceCorruptError, TraceError, TraceFormatError
from .jsonio import quote
from .metadata import check_version
from .schema import META_KIND, META_VERSION, REQUIRED, SCHEMAS

MAGIC = b"ARROW1"
#: What pyarrow raises on damaged input (ArrowException covers ArrowInvalid, ArrowKeyError,
#: ArrowMemoryError, ...; OSError covers ArrowIOError and "Invalid flatbuffers message").
ARROW_ERRORS = (pa.ArrowException, OSError, UnicodeDecodeError, MemoryError, IndexError, KeyError, ValueError)
_ADVICE = "restore it from a copy, or run `trace validate` on the trace to see every damaged file"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= 160 else text[:155] + "..."


@contextmanager
def guarded(path: Path, action: str, *, advice: str = _ADVICE) -> Iterator[None]:
    """Run pyarrow calls on ``path``, translating their failures to TraceCorruptError.

    Args:
        path: the file being read.
        action: what is being done ("reading record batch 3"), for the message.
        advice: what the user should do.

    Raises:
        TraceCorruptError: pyarrow or the OS failed on the file.
    """
    try:
        yield
    except TraceError:
        raise
    except FileNotFoundError:
        raise TraceCorruptError(f"{path} is missing; the trace is damaged ({advice})") from None
    except ARROW_ERRORS as exc:
        raise TraceCorruptError(f"{path}: {action} failed ({_short(exc)}); the file is damaged: {advice}") from None


def check_schema(schema: pa.Schema, kind: str, path: Path) -> None:
    """Check that ``schema`` is a steptrace ``kind`` file's schema of a version this reader reads.

    Raises:
        TraceFormatError: foreign file or missing required column.
        TraceVersionError: newer major version.
    """
    with guarded(path, "reading the schema"):
        _check_schema(schema, kind, path)


def _check_schema(schema: pa.Schema, kind: str, path: Path) -> None:
    md = schema.metadata or {}
    if md.get(META_KIND) != kind.encode():
        raise TraceFormatError(
            f"{path} is an Arrow file but not a steptrace {kind} file (its schema lacks "
            f"steptrace.kind={kind}); do not put foreign files in a trace's parts/ folder"
        )
    check_version(md.get(META_VERSION, b"").decode(errors="replace")[:20], str(path))
    missing = [c for c in REQUIRED.get(kind, ()) if c not in schema.names]
    if missing:
        raise TraceFormatError(f"{path} lacks required column(s) {', '.join(missing)} (SPEC.md §3, §4)")
    expected = SCHEMAS.get(kind)
    if expected is not None:
        for f in expected:
            if f.name in schema.names:
                got = schema.field(f.name).type
                base = got.value_type if pa.types.is_dictionary(got) else got
                if base != f.type and not (pa.types.is_large_string(base) and pa.types.is_string(f.type)):
                    raise TraceFormatError(
                        f"{path}: column {f.name} is {quote(str(got))}, SPEC.md says {f.type}; "
                        "the file was not written by a steptrace writer"
                    )


class DataFile:
    """One data file of a part (``decisions``, ``tensors`` or ``values``), read batch by batch.

    A closed part's file is memory-mapped and read through its footer; batches are read on
    demand, projected to the columns asked for. An interrupted part's file (magic + IPC stream,
    no footer) is recovered: every complete, valid batch is kept; reading stops at the first one
    that is not.

    Args:
        path: the ``.arrow`` file.
        kind: its kind.
        complete: the part was closed (its files have footers).
        size: for a closed part, the file size recorded at close (checked before parsing).
        checksum: for a closed part, the checksum recorded at close.
        verify: verify ``checksum`` now (else batches are validated in full as they are read).

    Raises:
        TraceFormatError: the file is foreign or of an unknown layout.
        TraceCorruptError: a closed part's file is missing, of the wrong size or checksum, or
            damaged.
        TraceVersionError: a newer major format version.
    """

    def __init__(
        self,
        path: Path,
        kind: str,
        *,
        complete: bool,
        size: int | None = None,
        checksum: str | None = None,
        verify: bool = True,
    ) -> None:
        self.path = path
        self.kind = kind
        self.complete = complete
        self.damaged_tail = False
        self.verified = False
        self._batches: list[pa.RecordBatch] | None = None
        self._reader: pa.ipc.RecordBatchFileReader | None = None
        self._projected: dict[tuple[str, ...], pa.ipc.RecordBatchFileReader] = {}
        self._lock = threading.Lock()
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            if not complete:
                self._empty()
                return
            raise TraceCorruptError(f"{path} is missing; the trace is damaged") from None
        except OSError as exc:
            raise TraceCorruptError(f"{path} cannot be read ({exc.strerror or exc})") from None
        if complete and size is not None and actual != size:
            raise TraceCorruptError(
                f"{path} holds {actual} bytes but its part was closed with {size}; the file was "
                f"truncated or changed: {_ADVICE}"
            )
        if complete and actual == 0:
            raise TraceCorruptError(f"{path} is empty (0 bytes) but its part was closed; the trace is damaged")
        if not complete and actual == 0:
            self._empty()
            return
        with guarded(path, "opening"):
            self._mm = pa.memory_map(str(path))
            head = self._mm.read(8)
        if not (head.startswith(MAGIC) or MAGIC.startswith(head)):
            raise TraceFormatError(f"{path} is not an Arrow IPC file (wrong magic bytes {head[:6]!r})")
        if complete:
            if checksum is not None and verify:
                verify_file(path, checksum, where=f"part file {path.name}")
                self.verified = True
            with guarded(path, "reading the footer", advice="restore it from a copy, or delete the part's .json "
                         "to read it as an interrupted part"):
                self._reader = pa.ipc.open_file(self._mm)
                self.schema = self._reader.schema
            check_schema(self.schema, kind, path)
        else:
            self._recover(actual)

    def _empty(self) -> None:
        self.schema = SCHEMAS[self.kind]
        self._batches = []

    def _recover(self, size: int) -> None:
        self._mm.seek(8)
        body = self._mm.read_buffer(size - 8) if size > 8 else pa.py_buffer(b"")
        try:
            stream = pa.ipc.open_stream(pa.BufferReader(body))
            schema = stream.schema
        except ARROW_ERRORS:
            self._empty()
            self.damaged_tail = size > 8
            return
        check_schema(schema, self.kind, self.path)
        self.schema = schema
        batches: list[pa.RecordBatch] = []
        while True:
            try:
                batch = stream.read_next_batch()
                batch.validate(full=True)
            except StopIteration:
                break
            except ARROW_ERRORS:
                self.damaged_tail = True
                break
            batches.append(batch)
        self._batches = batches

    # ------------------------------------------------------------------ reading
    @property
    def num_batches(self) -> int:
        """Number of record batches (from the footer of a closed file: no batch is read)."""
        return self._reader.num_record_batches if self._batches is None else len(self._batches)

    def _check(self, batch: pa.RecordBatch, i: int) -> pa.RecordBatch:
        if self.verified:
            batch.validate()
        else:
            batch.validate(full=True)
        return batch

    def batch(self, i: int, columns: Sequence[str] | None = None) -> pa.RecordBatch:
        """Return batch ``i``, with only ``columns`` when given (absent optional columns as nulls).

        Args:
            i: the batch number, ``0 <= i < num_batches``.
            columns: SPEC.md column names to return, in this order; None for all.

        Returns:
            The batch (memory-mapped where the file is uncompressed).

        Raises:
            TraceCorruptError: the batch cannot be decoded or is invalid.
        """
        names = self.schema.names
        have = tuple(names) if columns is None else tuple(c for c in columns if c in names)
        with guarded(self.path, f"reading record batch {i}"):
            if self._batches is not None:
                b = self._batches[i]
                if columns is not None:
                    b = b.select(list(have))
            elif columns is None:
                with self._lock:
                    b = self._reader.get_batch(i)
                b = self._check(b, i)
            else:
                with self._lock:  # one projected reader per column set, used by one thread at a time
                    r = self._projected.get(have)
                    if r is None:
                        idx = [self.schema.get_field_index(c) for c in have]
                        r = pa.ipc.open_file(self._mm, options=pa.ipc.IpcReadOptions(included_fields=idx))
                        self._projected[have] = r
                    b = r.get_batch(i)
                b = self._check(b, i)
        if columns is None or len(have) == len(columns):
            return b if columns is None or tuple(b.schema.names) == tuple(columns) else b.select(list(columns))
        full = SCHEMAS[self.kind]
        arrays = [b.column(c) if c in have else pa.nulls(b.num_rows, full.field(c).type) for c in columns]
        return pa.RecordBatch.from_arrays(arrays, names=list(columns))

    @property
    def batches(self) -> list[pa.RecordBatch]:
        """All batches, every column (each read once, then kept)."""
        if self._batches is None:
            self._batches = [self.batch(i) for i in range(self.num_batches)]
        return self._batches

    @property
    def num_rows(self) -> int:
        """Rows in all batches."""
        return sum(b.num_rows for b in self.batches)

    def table(self) -> pa.Table:
        """Return all batches as one table."""
        with guarded(self.path, "combining record batches"):
            return pa.Table.from_batches(self.batches, schema=self.schema)


def read_vocab(path: Path, *, checksum: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Read a vocabulary file (SPEC.md §2.2), checked: ids unique, in [0, 2**31), bounded.

    Args:
        path: the vocabulary file.
        checksum: its checksum recorded at close by the part that wrote it, if any.

    Returns:
        (ids as int64, pieces), in file order.

    Raises:
        TraceCorruptError: the file is missing, damaged, or its ids break SPEC.md §2.2.
    """
    from .checks import check_vocab_ids

    if checksum is not None:
        verify_file(path, checksum, where="vocabulary")
    with guarded(path, "reading the vocabulary"):
        mm = pa.memory_map(str(path))
        reader = pa.ipc.open_file(mm)
        table = reader.read_all()
        table.validate(full=checksum is None)
        if "id" not in table.column_names or "piece" not in table.column_names:
            raise TraceFormatError(f"vocabulary file {path} lacks its id or piece column (SPEC.md §2.2)")
        ids = table.column("id").cast(pa.int64()).to_numpy(zero_copy_only=False)
        pieces = table.column("piece").cast(pa.utf8()).to_pylist()
    problem = check_vocab_ids(ids)
    if problem:
        raise TraceCorruptError(f"vocabulary file {path}: {problem}; the trace is damaged")
    return ids, pieces
