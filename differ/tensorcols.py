"""One trace's tensor table as numpy columns (codes, statistics, digests, shape hashes) for the
tensor join, and the encodings of the comparison columns (``BASES``, ``REASONS``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from steptrace.tracefmt import TraceReader

from .columns import codes, combined, numpy_col
from .metrics import BASIS_DIGEST, BASIS_STATS, BASIS_VALUES, TensorMetrics

TENSOR_COLUMNS = ["sample", "step", "name", "call", "order", "dtype", "shape", "numel", "min", "max", "mean", "std",
                  "abs_max", "l2", "nan_count", "inf_count", "digest", "has_values"]
BASES = (BASIS_DIGEST, BASIS_VALUES, BASIS_STATS)
REASONS = (None, "shape", "nan", "inf", "elements", "max_abs", "mean_abs", "cosine", "sqnr_db")


@dataclass
class TensorSide:
    """One trace's tensor rows as numpy columns (sample and name as codes into the universes
    given to :func:`load_tensor_side`)."""

    table: pa.Table
    sample: np.ndarray
    step: np.ndarray
    name: np.ndarray
    call: np.ndarray
    order: np.ndarray
    dtype: list[str]
    numel: np.ndarray
    stats: dict[str, np.ndarray]
    nan: np.ndarray
    inf: np.ndarray
    digest: np.ndarray  # (rows, 2) uint64
    digest_ok: np.ndarray
    shape_full: np.ndarray  # hash of the shape
    shape_sq: np.ndarray  # hash of the shape without size-1 dims
    values: np.ndarray


def _shape_hashes(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = combined(col)
    n = len(arr)
    import pyarrow.compute as pc

    lens = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    vals = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(np.uint64)
    rows = np.repeat(np.arange(n), lens)
    out = []
    for keep in (np.ones(vals.size, bool), vals != 1):
        v, r = vals[keep], rows[keep]
        starts = np.searchsorted(r, np.arange(n))
        pos = np.arange(v.size) - starts[r] if v.size else np.zeros(0, np.int64)
        mult = np.uint64(0x9E3779B97F4A7C15) * (pos.astype(np.uint64) + np.uint64(1))
        h = np.zeros(n, dtype=np.uint64)
        with np.errstate(over="ignore"):
            np.add.at(h, r, (v + np.uint64(1)) * mult)
            h = h * np.uint64(31) + np.bincount(r, minlength=n).astype(np.uint64)
        out.append(h)
    return out[0], out[1]


def _digests(col: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    arr = combined(col)
    n = len(arr)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    if n == 0:
        return np.zeros((0, 2), np.uint64), valid
    buf = arr.buffers()[1]
    raw = np.frombuffer(buf, dtype=np.uint8)[arr.offset * 16 : (arr.offset + n) * 16]
    return raw.view(np.uint64).reshape(n, 2), valid


def digest_algorithm(reader: TraceReader) -> str | None:
    """The digest algorithm every part of ``reader``'s trace uses; None when parts differ."""
    algorithms = {p.digest for p in reader.parts}
    return algorithms.pop() if len(algorithms) == 1 else None


def load_tensor_side(reader: TraceReader, samples: list[str], names: list[str],
                     rename: Callable[[str], str] | None) -> TensorSide:
    """Read a trace's tensor table into numpy columns.

    Args:
        reader: the trace.
        samples: the sorted sample universe; rows of other samples are dropped.
        names: the sorted name universe the name codes index (names after ``rename``).
        rename: maps this trace's tensor names to reference names; None keeps them.

    Returns:
        The :class:`TensorSide` of the trace.
    """
    t = reader.tensors(columns=TENSOR_COLUMNS)
    sample_codes = codes(t["sample"], samples)
    if (sample_codes < 0).any():  # samples filtered out
        t = t.filter(pa.array(sample_codes >= 0))
    name_col = t["name"]
    if rename is not None:
        mapped = [rename(x) for x in combined(name_col).to_pylist()]
        name_col = pa.array(mapped, pa.utf8())
    shape_full, shape_sq = _shape_hashes(t["shape"])
    digest, digest_ok = _digests(t["digest"])
    return TensorSide(
        table=t,
        sample=codes(t["sample"], samples),
        step=numpy_col(t["step"], np.int64, 0)[0],
        name=codes(name_col, names),
        call=numpy_col(t["call"], np.int64, 0)[0],
        order=numpy_col(t["order"], np.int64, 0)[0],
        dtype=combined(t["dtype"]).to_pylist(),
        numel=numpy_col(t["numel"], np.int64, 0)[0],
        stats={c: numpy_col(t[c], np.float64, np.nan)[0] for c in ("min", "max", "mean", "std", "abs_max", "l2")},
        nan=numpy_col(t["nan_count"], np.int64, 0)[0],
        inf=numpy_col(t["inf_count"], np.int64, 0)[0],
        digest=digest,
        digest_ok=digest_ok,
        shape_full=shape_full,
        shape_sq=shape_sq,
        values=numpy_col(t["has_values"], bool, False)[0],
    )


def tensor_names(reader: TraceReader, rename: Callable[[str], str] | None = None) -> list[str]:
    """Return the distinct tensor names of a trace (after ``rename``)."""
    names = reader.tensor_names()
    return sorted({rename(n) for n in names}) if rename else names


def step_signature(reader: TraceReader, sample: str, step: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """Return ``(name, dtype, shape)`` of one step's tensors in execution order (for guessing a mapping)."""
    t = reader.tensors(sample=sample, step=step, columns=["name", "dtype", "shape"]).to_pylist()
    return [(r["name"], r["dtype"], tuple(r["shape"])) for r in t]


def shape_rows(col: pa.ChunkedArray, rows: np.ndarray, rank: int) -> np.ndarray:
    """Return the shapes of ``rows`` of a shape column as an ``(rows, rank)`` int64 matrix (every
    row must have that rank)."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(combined(col).take(pa.array(rows, pa.int64())))
    return flat.to_numpy(zero_copy_only=False).astype(np.int64).reshape(rows.size, rank)


def store_values_metrics(cols: dict[str, np.ndarray], i: int, m: TensorMetrics, *, bitexact: bool) -> None:
    """Write a values comparison into row ``i`` of the tensor-diff columns."""
    cols["basis"][i] = BASES.index(BASIS_VALUES)
    cols["bitexact"][i] = bitexact
    cols["within"][i] = m.within
    cols["reason"][i] = REASONS.index(m.reason)
    for key in ("max_abs", "mean_abs", "max_rel", "cosine", "sqnr_db"):
        v = getattr(m, key)
        cols[key][i] = np.nan if v is None else v
    cols["bad"][i] = -1 if m.bad is None else m.bad
    cols["nan_mismatch"][i] = m.nan_mismatch
    cols["inf_mismatch"][i] = m.inf_mismatch
