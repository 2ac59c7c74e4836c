"""TraceReader: metadata, decisions, tensor statistics and tensor values of a trace.

Data files are memory-mapped and loaded lazily, one kind at a time: asking for decisions never
touches tensor files; reading one tensor's values maps the values file and inflates that one
payload only. The files themselves are opened, checked and concatenated by
:class:`steptrace.tracefmt.partdata.PartData`.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .arrowio import DataFile, read_vocab
from .dtypes import widen_bfloat16
from .errors import TraceCorruptError, TraceNotFoundError, TraceUsageError, ValuesNotRecordedError
from .metadata import TraceMetadata, read_manifest
from .partdata import PartData
from .parts import scan_parts
from .payload import DEFAULT_MAX_TENSOR_BYTES, decode_values
from .payload import digest as tracefmt_digest


@dataclass
class StepView:
    """Everything recorded at one (sample, step)."""

    sample: str
    step: int
    decisions: pa.Table
    tensors: pa.Table


class TraceReader:
    """Reads a trace directory written by any SPEC.md v1 writer.

    Args:
        path: the trace directory.
        max_tensor_bytes: refuse to inflate a single tensor larger than this.
        verify_checksums: verify the checksums recorded at close as files are opened (see
            :meth:`part_files`); False skips it (batches are then validated in full instead).

    Raises:
        TraceNotFoundError: no such path.
        TraceFormatError: not a trace, or malformed.
        TraceVersionError: written by a newer major format version.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
        verify_checksums: bool = True,
    ) -> None:
        self.path = Path(path)
        self._manifest = read_manifest(self.path)
        self.metadata = TraceMetadata.from_manifest(self._manifest)
        self.max_tensor_bytes = max_tensor_bytes
        self.parts = scan_parts(self.path)
        self._part_data = PartData(self.path, self.parts, verify_checksums=verify_checksums)
        self._keys: dict[tuple[str, int, str, int], int] | None = None
        self._vocab: list[str | None] | None = None

    @property
    def verify_checksums(self) -> bool:
        """Whether checksums recorded at close are verified as files are opened."""
        return self._part_data.verify_checksums

    @verify_checksums.setter
    def verify_checksums(self, value: bool) -> None:
        self._part_data.verify_checksums = value

    # ------------------------------------------------------------------ parts
    def part_files(self, kind: str) -> list[DataFile | None]:
        """Open the ``kind`` data file of every part, in :attr:`parts` order (batches are read on
        demand: see :class:`steptrace.tracefmt.DataFile`); None for an interrupted part that never created one.

        At the first call, every closed part's files are checked against the sizes recorded at
        close (so a truncated values file fails reading decisions too); a file's checksum is
        verified first when it is a decisions or tensors file, or a values file of at most
        :data:`~steptrace.tracefmt.partdata.VERIFY_VALUES_BYTES` (a larger values file is verified
        by ``trace validate``, and each of its batches is validated in full as it is read).

        Args:
            kind: ``decisions``, ``tensors`` or ``values``.

        Returns:
            One entry per part.

        Raises:
            TraceFormatError: a file is foreign or of a newer format.
            TraceCorruptError: a closed part's file is missing, of the wrong size or checksum, or damaged.
        """
        return self._part_data.files(kind)

    def verify(self) -> list[str]:
        """Verify every checksum recorded at close (all data files and the vocabulary).

        Returns:
            One message per file that does not match (empty when all match or none is recorded).
        """
        return self._part_data.verify()

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest ``steptrace.json`` as read (SPEC.md §2), unknown keys included."""
        return dict(self._manifest)

    @property
    def complete(self) -> bool:
        """Every part was closed cleanly (a trace with no parts is complete and empty)."""
        return all(p.complete for p in self.parts)

    def _load(self, kind: str) -> list[DataFile]:
        """Every part's ``kind`` file, its row count checked (:meth:`PartData.load`)."""
        return self._part_data.load(kind)

    def _table(self, kind: str) -> pa.Table:
        """All parts' rows of ``kind``, unified to SPEC.md columns, with a ``_part`` column."""
        return self._part_data.table(kind)

    # ------------------------------------------------------------------ vocabulary
    @property
    def vocab(self) -> list[str | None] | None:
        """Token pieces indexed by id (None for ids without a piece), or None if not recorded."""
        name = self._manifest.get("vocab")
        if not name:
            return None
        if self._vocab is None:
            path = self.path / name
            writer = next((p for p in self.parts if name == f"vocab-{p.id}.arrow" and p.complete), None)
            checksum = writer.checksums.get("vocab") if writer is not None and self.verify_checksums else None
            ids, pieces = read_vocab(path, checksum=checksum)
            vocab: list[str | None] = [None] * (int(ids.max()) + 1 if ids.size else 0)
            for i, p in zip(ids.tolist(), pieces):
                vocab[i] = p
            self._vocab = vocab
        return self._vocab

    def piece(self, token: int) -> str | None:
        """Return the piece of ``token``, or None when unknown."""
        v = self.vocab
        return v[token] if v is not None and 0 <= token < len(v) else None

    # ------------------------------------------------------------------ decisions
    def decisions(
        self,
        *,
        sample: str | list[str] | None = None,
        head: str | None = None,
        columns: list[str] | None = None,
        derive: bool = True,
    ) -> pa.Table:
        """Return decision rows sorted by (sample, step, head).

        Args:
            sample: keep only these sample ids.
            head: keep only this head.
            columns: keep only these columns (SPEC.md names).
            derive: fill ``chosen_logit`` and ``chosen_rank`` from the top-k where the writer
                left them null because ``chosen`` was among the top-k.

        Returns:
            A pyarrow Table with the SPEC.md decision columns.
        """
        t = self._table("decisions")
        if sample is not None:
            t = t.filter(pc.is_in(t["sample"], pa.array([sample] if isinstance(sample, str) else sample)))
        if head is not None:
            t = t.filter(pc.equal(t["head"], head))
        t = t.drop_columns(["_part"]).sort_by([("sample", "ascending"), ("step", "ascending"), ("head", "ascending")])
        if derive and t.num_rows:
            t = _derive_chosen(t)
        if columns is not None:
            t = t.select(columns)
        return t

    def samples(self) -> list[str]:
        """Return every sample id that has decisions or tensors, sorted."""
        ids = set(pc.unique(self._table("decisions")["sample"]).to_pylist())
        ids |= set(pc.unique(self._table("tensors")["sample"]).to_pylist())
        return sorted(ids)

    def heads(self) -> list[str]:
        """Return the decision heads present, sorted."""
        return sorted(pc.unique(self._table("decisions")["head"]).to_pylist())

    # ------------------------------------------------------------------ tensors
    def tensors(
        self,
        *,
        sample: str | None = None,
        step: int | None = None,
        name: str | None = None,
        columns: list[str] | None = None,
    ) -> pa.Table:
        """Return tensor rows (statistics, digest, no values) sorted by sample, step, order.

        Args:
            sample: keep this sample.
            step: keep this step.
            name: keep names matching this glob (``encoder.layers.*``) or equal to it.
            columns: keep only these columns.

        Returns:
            A table with the SPEC.md tensor columns plus ``has_values``; ``value_ref`` dropped.
        """
        t = self._select_tensors(sample, step, name)
        t = t.append_column("has_values", pc.is_valid(t["value_ref"])).drop_columns(["value_ref", "_part"])
        if columns is not None:
            t = t.select(columns)
        return t

    def _select_tensors(self, sample: str | None, step: int | None, name: str | None) -> pa.Table:
        t = self._table("tensors")
        mask = None

        def both(m: pa.ChunkedArray) -> pa.ChunkedArray:
            return m if mask is None else pc.and_(mask, m)

        if sample is not None:
            mask = both(pc.equal(t["sample"], sample))
        if step is not None:
            mask = both(pc.equal(t["step"], step))
        if name is not None:
            if any(ch in name for ch in "*?["):
                regex = fnmatch.translate(name)
                mask = both(pc.match_substring_regex(t["name"], regex))
            else:
                mask = both(pc.equal(t["name"], name))
        if mask is not None:
            t = t.filter(mask)
        return t.sort_by([("sample", "ascending"), ("step", "ascending"), ("order", "ascending")])

    def tensor_names(self) -> list[str]:
        """Return the distinct tensor names, sorted."""
        return sorted(pc.unique(self._table("tensors")["name"]).to_pylist())

    def tensor(
        self, sample: str, step: int, name: str, *, call: int = 0, raw_bits: bool = False, verify: bool = True
    ) -> np.ndarray:
        """Return one tensor's values.

        Args:
            sample, step, name, call: which tensor.
            raw_bits: for bfloat16, return the uint16 bit patterns instead of exact float32.
            verify: check the values against the recorded digest.

        Returns:
            A read-only numpy array (little-endian, the tensor's shape).

        Raises:
            TraceNotFoundError: no such tensor row.
            ValuesNotRecordedError: the row exists but holds statistics only.
            TraceCorruptError: the payload is damaged or does not match its digest.
        """
        if any(c in name for c in "*?["):
            raise TraceUsageError(f"tensor() takes an exact name, not a pattern: {name!r}")
        i = self._key_index().get((sample, step, name, call))
        if i is None:
            raise TraceNotFoundError(
                f"no tensor {name!r} (call {call}) at sample {sample!r} step {step}; "
                "`trace info` lists the tensor names"
            )
        row = self._table("tensors").slice(i, 1).to_pylist()[0]
        if row["value_ref"] is None:
            raise ValuesNotRecordedError(
                f"tensor {name!r} at sample {sample!r} step {step} was recorded as statistics only; "
                "record it with values (capture 'full') to read its values"
            )
        return self.tensor_at(
            row["_part"], row["value_ref"], dtype=row["dtype"], shape=row["shape"], digest=row["digest"],
            raw_bits=raw_bits, verify=verify, where=f"tensor {name!r} at sample {sample!r} step {step}",
        )

    def tensor_at(
        self,
        part: int,
        value_ref: int,
        *,
        dtype: str,
        shape: Sequence[int],
        digest: bytes | None = None,
        raw_bits: bool = False,
        verify: bool = True,
        where: str = "tensor",
        max_bytes: int | None = None,
    ) -> np.ndarray:
        """Return the values stored at ``value_ref`` of part number ``part`` (an index into
        :attr:`parts`), for callers that already hold the tensor rows (exports, viewers).

        Args:
            part, value_ref: where the values are.
            dtype, shape, digest: from the tensor row (the digest is checked when given).
            raw_bits: for bfloat16, return the uint16 bit patterns instead of exact float32.
            verify: check the values against ``digest``.
            where: names the tensor in error messages.
            max_bytes: refuse a tensor larger than this (default: the reader's ``max_tensor_bytes``).

        Returns:
            A read-only numpy array.

        Raises:
            TraceCorruptError: the value is missing or damaged, or does not match its digest.
        """
        enc, data = self._part_data.value_payload(part, value_ref)
        limit = self.max_tensor_bytes if max_bytes is None else max_bytes
        arr = decode_values(data, enc, dtype, tuple(shape), max_bytes=limit)
        if verify and digest is not None and tracefmt_digest(
                memoryview(arr).cast("B") if arr.size else b"", self.parts[part].digest) != digest:
            raise TraceCorruptError(f"{where}: values do not match their digest; the trace is damaged")
        if dtype == "bfloat16" and not raw_bits:
            return widen_bfloat16(arr)
        return arr

    def _key_index(self) -> dict[tuple[str, int, str, int], int]:
        """(sample, step, name, call) -> row of the tensors table; built once, on first use."""
        if self._keys is None:
            t = self._table("tensors")
            cols = [t[c].to_pylist() for c in ("sample", "step", "name", "call")]
            self._keys = {k: i for i, k in enumerate(zip(*cols))}
        return self._keys

    # ------------------------------------------------------------------ iteration
    def iter_steps(self, *, sample: str | None = None) -> Iterator[StepView]:
        """Yield every (sample, step) in order with its decisions and tensor statistics."""
        dec = self.decisions(sample=sample)
        ten = self.tensors(sample=sample)
        keys = sorted(
            set(zip(dec["sample"].to_pylist(), dec["step"].to_pylist()))
            | set(zip(ten["sample"].to_pylist(), ten["step"].to_pylist()))
        )
        d_idx = _group_bounds(dec)
        t_idx = _group_bounds(ten)
        empty_d, empty_t = dec.slice(0, 0), ten.slice(0, 0)
        for key in keys:
            d = dec.slice(*d_idx[key]) if key in d_idx else empty_d
            t = ten.slice(*t_idx[key]) if key in t_idx else empty_t
            yield StepView(key[0], key[1], d, t)

    # ------------------------------------------------------------------ bookkeeping
    def close(self) -> None:
        """Release the memory maps (tables handed out before stay valid while referenced)."""
        self._part_data.clear()
        self._keys = None

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _group_bounds(t: pa.Table) -> dict[tuple[str, int], tuple[int, int]]:
    """Map (sample, step) -> (offset, length) in a table sorted by sample then step."""
    if t.num_rows == 0:
        return {}
    samples = np.asarray(t["sample"].to_pylist(), dtype=object)
    steps = t["step"].to_numpy()
    change = np.flatnonzero((samples[1:] != samples[:-1]) | (steps[1:] != steps[:-1])) + 1
    starts = np.concatenate([[0], change])
    ends = np.concatenate([change, [t.num_rows]])
    return {(samples[s], int(steps[s])): (int(s), int(e - s)) for s, e in zip(starts, ends)}


def _derive_chosen(t: pa.Table) -> pa.Table:
    """Fill null chosen_logit / chosen_rank where chosen is in the top-k (vectorised)."""
    ids = pc.list_flatten(t["topk_ids"]).to_numpy()
    logits = pc.list_flatten(t["topk_logits"]).to_numpy()
    parents = pc.list_parent_indices(t["topk_ids"]).to_numpy()
    offsets = np.zeros(t.num_rows + 1, dtype=np.int64)
    np.cumsum(pc.list_value_length(t["topk_ids"]).to_numpy(), out=offsets[1:])
    hit = np.flatnonzero(ids == t["chosen"].to_numpy()[parents])
    rows, first = np.unique(parents[hit], return_index=True)  # first hit of each row
    pos = hit[first]
    out = t
    for col, found, dtype in (
        ("chosen_logit", logits[pos], pa.float32()),
        ("chosen_rank", pos - offsets[rows], pa.int32()),
    ):
        valid = t[col].is_valid().to_numpy()
        values = t[col].to_numpy().astype(np.float64)
        need = ~valid[rows]
        values[rows[need]] = found[need]
        valid[rows[need]] = True
        values = np.where(valid, values, 0).astype(dtype.to_pandas_dtype())
        out = out.set_column(out.schema.get_field_index(col), col, pa.array(values, dtype, mask=~valid))
    return out
