"""The data files of a trace's parts, as :class:`steptrace.tracefmt.TraceReader` reads them.

Files are memory-mapped and loaded lazily, one kind at a time: asking for decisions never
touches tensor files; reading one tensor's values maps the values file and finds that one
payload only. Each file is checked against what its part recorded at close (sizes, row
counts, checksums).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from .arrowio import DataFile, guarded
from .checksum import verify_file
from .errors import TraceCorruptError, TraceFormatError, TraceUsageError
from .ipcfile import unify
from .parts import PartInfo, check_sizes
from .schema import KINDS, PARTS_DIR, data_file

#: A closed part's values file up to this size has its checksum verified when it is opened
#: (about 12 ms at the ~20 GB/s xxh3 runs at here); larger ones by ``trace validate``.
VERIFY_VALUES_BYTES = 256 << 20


class PartData:
    """Every part's data files of one trace, opened, loaded and concatenated on demand.

    Args:
        path: the trace directory.
        parts: the trace's parts (their ``recovered`` and ``damaged_tail`` are filled in as
            files are loaded).
        verify_checksums: verify the checksums recorded at close as files are opened.
    """

    def __init__(self, path: Path, parts: list[PartInfo], *, verify_checksums: bool) -> None:
        self.path = path
        self.parts = parts
        self.verify_checksums = verify_checksums
        self._sizes_checked = False
        self._files: dict[str, list[DataFile | None]] = {}
        self._data: dict[str, list[DataFile]] = {}
        self._tables: dict[str, pa.Table] = {}
        self._value_index: dict[int, np.ndarray] = {}

    def files(self, kind: str) -> list[DataFile | None]:
        """The ``kind`` data file of every part (see :meth:`steptrace.tracefmt.TraceReader.part_files`).

        Raises:
            TraceFormatError: a file is foreign or of a newer format.
            TraceCorruptError: a closed part's file is missing, of the wrong size or checksum, or damaged.
        """
        if kind not in KINDS:
            raise TraceUsageError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if not self._sizes_checked:  # every file of every part, at the first data read (a stat each)
            check_sizes(self.path, self.parts)
            self._sizes_checked = True
        if kind not in self._files:
            out: list[DataFile | None] = []
            for part in self.parts:
                path = self.path / PARTS_DIR / data_file(part.id, kind)
                if not part.complete and kind not in part.file_bytes:
                    out.append(None)
                    continue
                size = part.file_bytes.get(kind, 0)
                verify = self.verify_checksums and (kind != "values" or size <= VERIFY_VALUES_BYTES)
                out.append(DataFile(path, kind, complete=part.complete, size=part.sizes_at_close.get(kind),
                                    checksum=part.checksums.get(kind), verify=verify))
            self._files[kind] = out
        return self._files[kind]

    def verify(self) -> list[str]:
        """Verify every checksum recorded at close (all data files and the vocabulary).

        Returns:
            One message per file that does not match (empty when all match or none is recorded).
        """
        problems = []
        for part in self.parts:
            if not part.complete:
                continue
            for kind, expected in sorted(part.checksums.items()):
                name = f"vocab-{part.id}.arrow" if kind == "vocab" else f"{PARTS_DIR}/{data_file(part.id, kind)}"
                try:
                    verify_file(self.path / name, expected, where=f"part {part.id}")
                except TraceFormatError as exc:
                    problems.append(str(exc))
        return problems

    def load(self, kind: str) -> list[DataFile]:
        """Every part's ``kind`` file, its row count checked against the count recorded at close
        (an interrupted part without a file gets an empty one).

        Raises:
            TraceCorruptError: a closed part's file holds a different number of rows.
        """
        if kind not in self._data:
            out = []
            for part, d in zip(self.parts, self.files(kind)):
                if d is None:
                    d = DataFile(self.path / PARTS_DIR / data_file(part.id, kind), kind, complete=False)
                expected = part.counts.get(kind)
                if kind == "values" and part.complete and d.num_batches == (expected or 0) + 1:
                    # one value per batch (SPEC.md §5.4): the count checks out without reading
                    # every batch of a large file; `trace validate --deep` reads them all
                    part.recovered[kind] = expected
                    out.append(d)
                    continue
                if part.complete and expected is not None and d.num_rows != expected:
                    raise TraceCorruptError(
                        f"part {part.id}: {kind} file holds {d.num_rows} rows but the part was closed "
                        f"with {part.counts[kind]}; the trace is damaged"
                    )
                part.recovered[kind] = d.num_rows
                part.damaged_tail = part.damaged_tail or d.damaged_tail
                out.append(d)
            self._data[kind] = out
        return self._data[kind]

    def table(self, kind: str) -> pa.Table:
        """All parts' rows of ``kind``, unified to SPEC.md columns, with a ``_part`` column."""
        if kind not in self._tables:
            tables = []
            for i, d in enumerate(self.load(kind)):
                with guarded(d.path, "decoding its columns"):
                    t = unify(d.table(), kind)
                tables.append(t.append_column("_part", pa.array(np.full(t.num_rows, i, np.int32))))
            if tables:
                table = pa.concat_tables(tables)
            else:
                table = unify(pa.table({}), kind).append_column("_part", pa.array([], pa.int32()))
            self._tables[kind] = table
        return self._tables[kind]

    def value_payload(self, part: int, ref: int) -> tuple[str, memoryview]:
        """Return (encoding, stored bytes) of value ``ref`` of part number ``part``.

        Raises:
            TraceCorruptError: ``ref`` points past the part's stored values.
        """
        data = self.load("values")[part]
        batch, j = self._value_location(part, data, ref)
        enc = batch.column("encoding")[j].as_py()
        col = batch.column("data")
        offsets = np.frombuffer(col.buffers()[1], dtype=np.int64, count=len(col) + 1, offset=col.offset * 8)
        buf = col.buffers()[2]
        start, end = int(offsets[j]), int(offsets[j + 1])
        return enc, memoryview(buf)[start:end]

    def _value_location(self, part: int, data: DataFile, ref: int) -> tuple[pa.RecordBatch, int]:
        """Return (batch, row) holding value ``ref`` of ``part``.

        Files with one value per batch after the schema-carrying empty batch (what TraceWriter
        writes) map ``ref`` to batch ``ref + 1`` directly; other layouts use cumulative counts.
        """
        info = self.parts[part]
        n = data.num_batches
        if info.complete and n == info.counts.get("values", -1) + 1 and 0 <= ref < n - 1:
            batch = data.batch(ref + 1)
            if batch.num_rows == 1:
                return batch, 0
        if part not in self._value_index:
            self._value_index[part] = np.cumsum([0] + [data.batch(i).num_rows for i in range(n)])
        bounds = self._value_index[part]
        if not 0 <= ref < bounds[-1]:
            raise TraceCorruptError(
                f"part {info.id}: value_ref {ref} points past the {bounds[-1]} stored values"
                + ("" if info.complete else " (interrupted recording: its values were not flushed)")
            )
        i = int(np.searchsorted(bounds, ref, side="right") - 1)
        return data.batch(i), ref - int(bounds[i])

    def clear(self) -> None:
        """Release the memory maps (tables handed out before stay valid while referenced)."""
        self._files.clear()
        self._data.clear()
        self._tables.clear()
        self._value_index.clear()
