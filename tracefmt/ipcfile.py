"""Arrow IPC data files: appending with crash safety, reading complete or interrupted files.

A data file is a standard Arrow IPC *file*. While it is written, its bytes are the file magic
followed by an IPC *stream*; the footer comes at close. A file whose writer was killed has no
footer, and :func:`read_arrow` recovers every complete record batch from its stream part.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from .errors import TraceCorruptError, TraceFormatError
from .metadata import check_version
from .schema import DICTIONARY_COLUMNS, META_KIND, META_VERSION, REQUIRED, SCHEMAS, file_metadata

MAGIC = b"ARROW1"
_READ_ERRORS = (pa.ArrowInvalid, pa.ArrowIOError, OSError, pa.ArrowNotImplementedError)


def write_options(level: int | None) -> pa.ipc.IpcWriteOptions:
    """Return IPC write options: zstd buffer compression at ``level``, or none for ``None``."""
    if level is None:
        return pa.ipc.IpcWriteOptions()
    return pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", compression_level=level))


class ArrowAppender:
    """Appends record batches to one Arrow IPC file, flushing each to the OS.

    Every batch that :meth:`write` returned from survives a SIGKILL of the process (and, with
    ``fsync=True``, a power loss).
    """

    def __init__(self, path: Path, kind: str, part: str, *, level: int | None, fsync: bool) -> None:
        self.path = path
        self.kind = kind
        self.schema = SCHEMAS[kind].with_metadata(file_metadata(kind, part))
        self.rows = 0
        self._fsync = fsync
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self.schema, options=write_options(level))
        # Write the schema message now, so that even an empty interrupted file parses.
        self._writer.write_batch(pa.RecordBatch.from_pylist([], schema=self.schema))
        self._sync()

    def _sync(self) -> None:
        self._sink.flush()
        if self._fsync:
            os.fsync(self._sink.fileno())

    def write(self, batch: pa.RecordBatch) -> None:
        """Append ``batch`` (of this file's schema) and flush it to the OS."""
        self._writer.write_batch(batch)
        self.rows += batch.num_rows
        self._sync()

    def close(self) -> None:
        """Write the footer and close the file."""
        self._writer.close()
        self._sync()
        self._sink.close()


class ArrowData:
    """The record batches of one data file; a complete file's batches are read on demand."""

    def __init__(
        self,
        schema: pa.Schema,
        batches: list[pa.RecordBatch] | None,
        complete: bool,
        damaged_tail: bool,
        reader: pa.ipc.RecordBatchFileReader | None = None,
    ) -> None:
        self.schema = schema
        self.complete = complete  # the file has its footer
        self.damaged_tail = damaged_tail  # bytes after the last complete batch could not be read
        self._reader = reader
        self._batches = batches

    @property
    def num_batches(self) -> int:
        """Number of record batches (from the footer: no batch is read)."""
        return self._reader.num_record_batches if self._batches is None else len(self._batches)

    def batch(self, i: int) -> pa.RecordBatch:
        """Return batch ``i`` (memory-mapped; only that batch is read)."""
        return self._reader.get_batch(i) if self._batches is None else self._batches[i]

    @property
    def batches(self) -> list[pa.RecordBatch]:
        """All batches (reads each batch once)."""
        if self._batches is None:
            self._batches = [self._reader.get_batch(i) for i in range(self._reader.num_record_batches)]
        return self._batches

    @property
    def num_rows(self) -> int:
        """Rows in all batches."""
        return sum(b.num_rows for b in self.batches)

    def table(self) -> pa.Table:
        """Return all batches as one table."""
        return pa.Table.from_batches(self.batches, schema=self.schema)


def _check_schema(schema: pa.Schema, kind: str, path: Path) -> None:
    md = schema.metadata or {}
    if md.get(META_KIND) != kind.encode():
        raise TraceFormatError(
            f"{path} is an Arrow file but not a steptrace {kind} file (its schema lacks "
            f"steptrace.kind={kind}); do not put foreign files in a trace's parts/ folder"
        )
    check_version(md.get(META_VERSION, b"").decode(errors="replace"), str(path))
    missing = [c for c in REQUIRED[kind] if c not in schema.names]
    if missing:
        raise TraceFormatError(f"{path} lacks required column(s) {', '.join(missing)} (SPEC.md §3)")


def read_arrow(path: Path, kind: str, *, allow_partial: bool) -> ArrowData:
    """Read a data file, memory-mapped (values are not copied for uncompressed files).

    Args:
        path: the file.
        kind: ``decisions``, ``tensors`` or ``values``.
        allow_partial: the part was never closed: recover the complete batches of a file
            without footer instead of failing.

    Returns:
        The batches.

    Raises:
        TraceFormatError: the file is empty, foreign, or not Arrow at all.
        TraceCorruptError: a closed part's file lacks its footer or is damaged.
        TraceVersionError: the file is of a newer major format version.
    """
    try:
        mm = pa.memory_map(str(path))
    except FileNotFoundError:
        if allow_partial:
            return ArrowData(SCHEMAS[kind], [], False, False)
        raise TraceCorruptError(f"{path} is missing; the trace is damaged") from None
    size = mm.size()
    head = mm.read(8) if size >= 8 else mm.read()
    if size == 0:
        if allow_partial:
            return ArrowData(SCHEMAS[kind], [], False, False)
        raise TraceCorruptError(f"{path} is empty (0 bytes) but its part was closed; the trace is damaged")
    if not (head.startswith(MAGIC) or MAGIC.startswith(head)):
        raise TraceFormatError(f"{path} is not an Arrow IPC file (wrong magic bytes {head[:6]!r})")
    try:
        reader = pa.ipc.open_file(mm)
        schema = reader.schema
        _check_schema(schema, kind, path)
        return ArrowData(schema, None, True, False, reader=reader)
    except _READ_ERRORS as exc:
        if not allow_partial:
            raise TraceCorruptError(
                f"{path} is truncated or damaged ({exc}) although its part was closed; "
                "restore it from a copy, or delete the part's .json to read it as an interrupted part"
            ) from None
    # Interrupted writer: magic + IPC stream without footer.
    mm.seek(8)
    body = mm.read_buffer(size - 8) if size > 8 else pa.py_buffer(b"")
    try:
        stream = pa.ipc.open_stream(pa.BufferReader(body))
    except _READ_ERRORS:
        return ArrowData(SCHEMAS[kind], [], False, size > 8)
    _check_schema(stream.schema, kind, path)
    batches: list[pa.RecordBatch] = []
    damaged = False
    while True:
        try:
            batches.append(stream.read_next_batch())
        except StopIteration:
            break
        except _READ_ERRORS:
            damaged = True
            break
    return ArrowData(stream.schema, batches, False, damaged)


def unify(table: pa.Table, kind: str) -> pa.Table:
    """Return ``table`` with dictionary columns decoded and absent optional columns as nulls,
    in SPEC.md column order; unknown columns are dropped."""
    schema = SCHEMAS[kind]
    cols = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            if pa.types.is_dictionary(col.type):
                col = col.cast(col.type.value_type)
            if col.type != f.type:
                col = col.cast(f.type)
            cols.append(col)
        else:
            cols.append(pa.nulls(table.num_rows, f.type))
    return pa.Table.from_arrays(cols, schema=pa.schema([f.with_nullable(True) for f in schema]))


def compact(path: Path, kind: str, part: str, *, level: int, batch_rows: int = 1 << 14) -> int:
    """Rewrite a closed data file in large batches, dictionary-encoding repetitive strings.

    The new file replaces the old one atomically; a crash mid-way leaves the old file.

    Returns:
        The size of the new file in bytes.
    """
    data = read_arrow(path, kind, allow_partial=False)
    table = data.table().combine_chunks()  # to_batches() below splits chunks but never merges them
    fields = []
    arrays = []
    for f in table.schema:
        col = table.column(f.name)
        if f.name in DICTIONARY_COLUMNS[kind] and not pa.types.is_dictionary(f.type):
            col = pc.dictionary_encode(col)
            f = pa.field(f.name, col.type, f.nullable)
        fields.append(f)
        arrays.append(col)
    out = pa.Table.from_arrays(arrays, schema=pa.schema(fields, metadata=data.schema.metadata))
    tmp = path.with_name(path.name + ".compact")
    with pa.OSFile(str(tmp), "wb") as sink:
        with pa.ipc.new_file(sink, out.schema, options=write_options(level)) as writer:
            for batch in out.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
        sink.flush()
        os.fsync(sink.fileno())
    os.replace(tmp, path)
    return os.path.getsize(path)
