"""Arrow IPC data files on the writing side: appending with crash safety, compaction, and the
unified column layout readers hand out.

A data file is a standard Arrow IPC *file*. While it is written, its bytes are the file magic
followed by an IPC *stream*; the footer comes at close. Reading goes through
:mod:`steptrace.tracefmt.arrowio` (the one door that translates pyarrow's errors).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa

from .arrowio import MAGIC, DataFile
from .schema import DICTIONARY_COLUMNS, SCHEMAS, file_metadata

__all__ = ["MAGIC", "ArrowAppender", "compact", "unify", "write_options"]


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
        self.part = part
        self.schema = SCHEMAS[kind].with_metadata(file_metadata(kind, part))
        self.rows = 0
        self._fsync = fsync
        self._file = pa.OSFile(str(path), "wb")
        # buffered: a record batch is a dozen small writes (message, padding, buffers); each
        # flush below hands them to the OS in one or two
        self._sink = pa.BufferedOutputStream(self._file, 1 << 16)
        self._writer = pa.ipc.new_file(self._sink, self.schema, options=write_options(level))
        # Write the schema message now, so that even an empty interrupted file parses.
        self._writer.write_batch(pa.RecordBatch.from_pylist([], schema=self.schema))
        self._sync()

    def _sync(self) -> None:
        self._sink.flush()
        if self._fsync:
            os.fsync(self._file.fileno())

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


def finish_file(f: ArrowAppender, *, rewrite: bool, level: int) -> int:
    """Close an appender's file and (``rewrite``) compact it in large batches (:func:`compact`).

    Returns:
        The file's size in bytes.
    """
    f.close()
    if rewrite:
        return compact(f.path, f.kind, f.part, level=level)
    return os.path.getsize(f.path)


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


def _dictionary_encode(col: pa.ChunkedArray) -> pa.ChunkedArray:
    """``pyarrow.compute.dictionary_encode(col)`` without importing ``pyarrow.compute``: that
    import makes a Python wrapper of every compute function (~50 ms, a fixed cost of every
    ``trace record``), and nothing else a writer does needs it."""
    try:
        from pyarrow._compute import call_function
    except ImportError:  # a pyarrow without that module: the public one
        from pyarrow.compute import call_function
    return call_function("dictionary_encode", [col])


def compact(path: Path, kind: str, part: str, *, level: int, batch_rows: int = 1 << 14) -> int:
    """Rewrite a closed data file in large batches, dictionary-encoding repetitive strings.

    The new file replaces the old one atomically; a crash mid-way leaves the old file.

    Returns:
        The size of the new file in bytes.
    """
    data = DataFile(path, kind, complete=True)
    table = data.table().combine_chunks()  # to_batches() below splits chunks but never merges them
    fields = []
    arrays = []
    for f in table.schema:
        col = table.column(f.name)
        if f.name in DICTIONARY_COLUMNS[kind] and not pa.types.is_dictionary(f.type):
            col = _dictionary_encode(col)
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
