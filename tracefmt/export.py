"""Exporting a trace to Parquet, and scanning tensor rows together with their value bytes.

:class:`TensorScan` walks the tensor rows once, in batches bounded in rows and bytes, and reads
each row's values by its ``value_ref`` (SPEC.md §5.4) through the reader.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import TraceExistsError, TraceUsageError, TraceWriteError
from .metadata import write_json_atomic
from .reader import TraceReader
from .schema import TENSORS

#: Columns of a tensor row as :class:`TensorScan` yields them (SPEC.md §4.1 without value_ref).
TENSOR_COLUMNS = [f.name for f in TENSORS if f.name != "value_ref"]
_PARQUET_MAX_VALUE = 2**31 - 1
_FILES = ("decisions", "tensors", "vocab")


def as_reader(trace: str | os.PathLike[str] | TraceReader) -> TraceReader:
    """Return ``trace`` if it is a :class:`TraceReader`, else open the trace directory it names.

    Raises:
        TraceNotFoundError, TraceFormatError: as :class:`TraceReader`.
    """
    return trace if isinstance(trace, TraceReader) else TraceReader(trace)


def _canonical_bytes(arr: np.ndarray) -> memoryview:
    return memoryview(arr.reshape(-1)).cast("B")


class TensorScan:
    """Every tensor row of a trace with the canonical bytes of its values, part by part, in
    batches bounded in rows and bytes (values are read through :meth:`TraceReader.tensor_at`).

    Args:
        reader: the trace.

    Raises:
        TraceCorruptError: a closed part's tensors file is damaged or holds the wrong row count.
    """

    def __init__(self, reader: TraceReader) -> None:
        self._reader = reader
        self._table = reader._table("tensors").sort_by(
            [("_part", "ascending"), ("sample", "ascending"), ("step", "ascending"), ("order", "ascending")]
        )
        self.num_rows = self._table.num_rows
        #: The part index of each row, in the order :meth:`batches` yields the rows.
        self.row_parts: np.ndarray = self._table["_part"].to_numpy()
        #: The digest algorithm of each part (SPEC.md §4.5), by part index.
        self.part_digests: list[str] = [p.digest for p in reader.parts]

    def batches(
        self, *, max_rows: int = 1024, max_bytes: int = 64 << 20
    ) -> Iterator[tuple[pa.Table, list[memoryview | None]]]:
        """Yield tensor rows sorted by (sample, step, order) within each part, with their values.

        Args:
            max_rows: most rows per batch.
            max_bytes: a batch ends once its values reach this many bytes (one larger tensor
                still makes a batch of its own).

        Yields:
            (rows with :data:`TENSOR_COLUMNS`, canonical bytes per row or None where the values
            were not recorded, or were lost with an interrupted part). bfloat16 values are their
            16-bit patterns. The bytes are valid until the next batch is asked for.

        Raises:
            TraceCorruptError: a payload is damaged or does not match its digest.
        """
        if max_rows < 1 or max_bytes < 1:
            raise TraceUsageError("max_rows and max_bytes must be positive")
        if any(self._table["value_ref"].is_valid().to_pylist()):
            self._reader._load("values")  # sets each part's recovered value count
        for offset in range(0, self.num_rows, max_rows):
            chunk = self._table.slice(offset, max_rows)
            rows = chunk.select(TENSOR_COLUMNS)
            meta = chunk.select(["_part", "value_ref", "sample", "step", "name", "dtype", "shape", "digest"]).to_pylist()
            data: list[memoryview | None] = []
            start = used = 0
            for i, row in enumerate(meta):
                d = None if row["value_ref"] is None else self._payload(row)
                data.append(d)
                used += 0 if d is None else d.nbytes
                if used >= max_bytes:
                    yield rows.slice(start, i + 1 - start), data
                    data, start, used = [], i + 1, 0
            if start < len(meta):
                yield rows.slice(start), data

    def _payload(self, row: dict) -> memoryview | None:
        part = self._reader.parts[row["_part"]]
        if not part.complete and row["value_ref"] >= part.recovered.get("values", 0):
            return None  # interrupted recording: its values were never flushed
        arr = self._reader.tensor_at(
            row["_part"], row["value_ref"], dtype=row["dtype"], shape=row["shape"], digest=row["digest"],
            raw_bits=True, where=f"tensor {row['name']!r} at sample {row['sample']!r} step {row['step']}",
        )
        return _canonical_bytes(arr)


def export_parquet(
    trace: str | os.PathLike[str] | TraceReader, out_dir: str | os.PathLike[str], *, overwrite: bool = False
) -> dict[str, str]:
    """Write a trace as Parquet files (zstd) for tools without Arrow IPC support.

    Files written into ``out_dir``:

    - ``decisions.parquet``: SPEC.md §3 columns, sorted by (sample, step, head), with
      ``chosen_logit``/``chosen_rank`` filled from the top-k as :meth:`TraceReader.decisions` does;
    - ``tensors.parquet``: SPEC.md §4.1 columns (without ``value_ref``) plus ``data``, the
      canonical bytes of the values (little-endian, C order, bfloat16 as 16-bit patterns),
      null where only statistics were recorded; written in batches of bounded size;
    - ``vocab.parquet`` (``id``, ``piece``) when the trace has a vocabulary;
    - ``metadata.json``: the manifest, with ``vocab`` naming ``vocab.parquet`` (or null).

    Args:
        trace: a trace directory or an open :class:`TraceReader`.
        out_dir: the folder to write (created with its parents).
        overwrite: write into an existing non-empty folder, replacing these files there (other
            files are left alone).

    Returns:
        File kind (``decisions``, ``tensors``, ``vocab``, ``metadata``) -> path written.

    Raises:
        TraceExistsError: ``out_dir`` is a file, or a non-empty folder without ``overwrite``.
        TraceUsageError: a tensor exceeds Parquet's 2 GiB limit for one value.
        TraceCorruptError: the trace is damaged.
        TraceWriteError: a file cannot be written (permissions, disk full).
    """
    reader = as_reader(trace)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TraceExistsError(f"{out} is a file; choose a folder for the Parquet export")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise TraceExistsError(f"{out} is not empty; pass overwrite=True (CLI: --overwrite) to write into it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        return _write_parquet(reader, out)
    except OSError as exc:
        raise TraceWriteError(f"writing the Parquet export to {out} failed: {exc}") from exc


def _write_parquet(reader: TraceReader, out: Path) -> dict[str, str]:
    paths = {kind: out / f"{kind}.parquet" for kind in _FILES}
    tmp = {kind: p.with_name(f".{p.name}.{os.getpid()}.tmp") for kind, p in paths.items()}
    vocab = reader.vocab
    try:
        pq.write_table(reader.decisions(), tmp["decisions"], compression="zstd", row_group_size=1 << 17)
        _write_tensors(reader, tmp["tensors"])
        if vocab is not None:
            ids = np.array([i for i, p in enumerate(vocab) if p is not None], dtype=np.int32)
            table = pa.table({"id": ids, "piece": pa.array([vocab[i] for i in ids], pa.utf8())})
            pq.write_table(table, tmp["vocab"], compression="zstd")
        for kind in _FILES:
            if tmp[kind].exists():
                os.replace(tmp[kind], paths[kind])
            else:
                paths[kind].unlink(missing_ok=True)  # a vocab.parquet left by an earlier export
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)
    manifest = reader.metadata.to_manifest(vocab="vocab.parquet" if vocab is not None else None)
    write_json_atomic(out / "metadata.json", manifest)
    written = {kind: str(p) for kind, p in paths.items() if kind != "vocab" or vocab is not None}
    written["metadata"] = str(out / "metadata.json")
    return written


def _write_tensors(reader: TraceReader, path: Path) -> None:
    scan = TensorScan(reader)
    fields = [f.with_nullable(True) for f in TENSORS if f.name != "value_ref"]
    schema = pa.schema([*fields, pa.field("data", pa.large_binary())])
    with pq.ParquetWriter(path, schema, compression="zstd") as writer:
        for rows, data in scan.batches(max_bytes=32 << 20):
            for i, d in enumerate(data):
                if d is not None and d.nbytes > _PARQUET_MAX_VALUE:
                    raise TraceUsageError(
                        f"tensor {rows['name'][i].as_py()!r} holds {d.nbytes} bytes, more than Parquet stores in one "
                        "value (2 GiB); export it with export_jsonl or read it with TraceReader.tensor"
                    )
            column = pa.array(data, pa.large_binary())
            writer.write_table(pa.Table.from_arrays([*rows.columns, column], schema=schema))
