"""Column helpers shared by the differ: shared integer codes for strings, packed composite keys,
and dense views of Arrow list columns — the pieces that keep alignment and comparison vectorised.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import AlignmentError


def combined(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    """Return one contiguous Arrow array for a (chunked) column."""
    if isinstance(col, pa.ChunkedArray):
        return col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    return col


def codes(col: pa.ChunkedArray | pa.Array, universe: list[str]) -> np.ndarray:
    """Return the index of each string of ``col`` in the sorted ``universe`` (-1 if absent).

    Codes from a sorted universe sort like the strings themselves.
    """
    arr = combined(col)
    if pa.types.is_dictionary(arr.type):
        arr = arr.cast(arr.type.value_type)
    idx = pc.index_in(arr, value_set=pa.array(universe, pa.utf8()))
    return idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def numpy_col(col: pa.ChunkedArray | pa.Array, dtype: type, fill: float | int) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(values, valid)``: a numpy array of ``dtype`` with nulls replaced by ``fill``."""
    arr = combined(col)
    if arr.null_count == 0:
        vals = arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
        return vals, np.ones(len(arr), dtype=bool)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    vals = arr.fill_null(fill).to_numpy(zero_copy_only=False).astype(dtype, copy=False)
    return vals, valid


def dense_lists(col: pa.ChunkedArray | pa.Array, dtype: type | None, fill: float | int) -> tuple[np.ndarray, np.ndarray]:
    """Return a list column as a dense ``(rows, kmax)`` array padded with ``fill``, and lengths.

    ``dtype`` None keeps the values' own dtype (no copy when every list has the same length).
    """
    arr = combined(col)
    n = len(arr)
    lens = pc.list_value_length(arr).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False)
    if dtype is not None:
        flat = flat.astype(dtype, copy=False)
    k = int(lens.max()) if n else 0
    if n and (lens == k).all():
        return flat.reshape(n, k), lens
    out = np.full((n, max(k, 1)), fill, dtype=flat.dtype)
    rows = np.repeat(np.arange(n), lens)
    starts = np.cumsum(lens) - lens
    pos = np.arange(flat.size) - np.repeat(starts, lens)
    out[rows, pos] = flat
    return out, lens


def pack_pair(ca: list[np.ndarray], cb: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pack two sides' non-negative integer key columns into int64 keys that sort like the
    tuples, with bit widths shared by both sides so that the keys compare.

    Raises:
        AlignmentError: the columns need more than 63 bits together.
    """
    width = []
    for a, b in zip(ca, cb):
        hi = max(int(a.max()) if a.size else 0, int(b.max()) if b.size else 0)
        width.append(max(hi.bit_length(), 1))
    if sum(width) > 63:
        raise AlignmentError("alignment keys span too many values to be packed into 64-bit keys")

    def one(cols: list[np.ndarray]) -> np.ndarray:
        key = np.zeros(cols[0].size, dtype=np.int64)
        for c, w in zip(cols, width):
            key = (key << w) | c.astype(np.int64)
        return key

    return one(ca), one(cb)


def _increasing(k: np.ndarray) -> bool:
    """Whether ``k`` is strictly increasing (sorted, no duplicates)."""
    return k.size < 2 or bool((k[1:] > k[:-1]).all())


def merge_sorted(ka: np.ndarray, kb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Full outer join of two unique int64 key arrays.

    Returns:
        ``(keys, ia, ib)``: the sorted union and, for each key, its row in ``ka``/``kb`` or -1.
    """
    if _increasing(ka) and _increasing(kb):  # the usual case: rows come sorted by key
        if ka.size == kb.size and bool((ka == kb).all()):
            rows = np.arange(ka.size, dtype=np.int64)
            return ka.copy(), rows, rows.copy()
        keys = np.concatenate([ka, kb])
        keys.sort()
        keys = keys[np.r_[True, keys[1:] != keys[:-1]]] if keys.size else keys
    else:
        keys = np.union1d(ka, kb)
    return keys, _lookup(ka, keys), _lookup(kb, keys)


def _lookup(k: np.ndarray, keys: np.ndarray) -> np.ndarray:
    order = None
    if not _increasing(k):
        order = np.argsort(k, kind="stable")
        k = k[order]
    pos = np.searchsorted(k, keys)
    pos_c = np.minimum(pos, max(k.size - 1, 0))
    hit = (pos < k.size) & (k[pos_c] == keys) if k.size else np.zeros(keys.size, bool)
    rows = pos_c if order is None else order[pos_c]
    return np.where(hit, rows, -1)


def duplicates(k: np.ndarray) -> np.ndarray:
    """Return the key values that occur more than once in ``k``."""
    if _increasing(k):
        return k[:0]
    s = np.sort(k)
    return np.unique(s[1:][s[1:] == s[:-1]])
