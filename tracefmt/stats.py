"""Tensor statistics (SPEC.md §4.4): of one canonical array (:func:`compute_stats`) and of many
small ones in a few numpy calls, column by column (:func:`stats_columns`, :class:`StatsColumns`).

Everything here works on the canonical bytes of a tensor: little-endian, C order, one byte per
bool, bfloat16 as its 16-bit pattern.
"""

from __future__ import annotations

import math
import operator
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import pyarrow as pa

from .dtypes import DTYPES, F16_SPECIAL_MAGNITUDE, widen_bfloat16, widen_float16
from .statspolicy import kernel_for

#: The SPEC.md dtypes the compiled kernel reduces (:data:`steptrace.tracefmt.statskernel.KINDS`).
KERNEL_DTYPES = frozenset({"float32", "float64", "float16", "bfloat16"})


@dataclass(frozen=True, slots=True)
class TensorStats:
    """Summary statistics of one tensor over its finite elements (NaN and ±Inf only counted)."""

    numel: int
    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    abs_max: float | None
    l2: float | None
    nan_count: int
    inf_count: int



def _as_float64(flat: np.ndarray, name: str) -> np.ndarray:
    """The elements of a canonical array as float64 (rare path: huge values)."""
    if name == "bfloat16":
        return widen_bfloat16(flat).astype(np.float64)
    return flat.astype(np.float64)


_CHUNK = 1 << 18  # elements per pass: each statistic reads a cache-sized chunk, not the whole tensor
_scratch = threading.local()


def _scratch64(n: int) -> np.ndarray:
    """A per-thread float64 buffer of ``n <= _CHUNK`` elements (fresh memory is slow to touch)."""
    buf = getattr(_scratch, "f64", None)
    if buf is None:
        buf = _scratch.f64 = np.empty(_CHUNK, np.float64)
    return buf[:n]


def _widened(c: np.ndarray, name: str, *, specials: bool = True) -> np.ndarray:
    """Return chunk ``c`` as numbers numpy reduces natively (float16/bfloat16 widened exactly to
    float32 in a reused per-thread buffer: fresh memory is slow to touch). ``specials=False``:
    float16 ±inf/NaN come out as finite values of magnitude >= 2**16 (see
    :func:`tracefmt.dtypes.widen_float16`)."""
    if name == "bool":
        return c.view(np.uint8)
    if name not in ("float16", "bfloat16"):
        return c
    buf = getattr(_scratch, "f32", None)
    if buf is None:
        buf = _scratch.f32 = np.empty(_CHUNK, np.float32)
    out = buf[: c.size]
    if name == "float16":  # numpy's float16 cast is not vectorised here: ~8x slower
        widen_float16(c, out, specials=specials)
    else:
        np.left_shift(c, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def compute_stats(a: np.ndarray, name: str) -> TensorStats:
    """Compute the SPEC.md statistics of a canonical array of dtype ``name``.

    min/max/mean/std/abs_max/l2 are taken over finite elements in float64 accumulation; std is
    the population standard deviation. They are ``None`` when no element is finite; l2 is 0.0
    for an empty tensor.

    Args:
        a: canonical array (see :func:`tracefmt.dtypes.canonical`).
        name: its SPEC.md dtype name.

    Returns:
        The statistics.
    """
    n = int(a.size)
    if n == 0:
        return TensorStats(0, None, None, None, None, None, 0.0, 0, 0)
    flat = a.reshape(-1)
    is_float = DTYPES[name][1] == "f"
    # the compiled one-pass kernel (statspolicy says when): the same sums and range, bit for bit
    kernel = kernel_for(n) if name in KERNEL_DTYPES and flat.flags.c_contiguous else None
    lo, hi, total, sumsq, count, nan_count, inf_count = math.inf, -math.inf, 0.0, 0.0, 0, 0, 0
    with np.errstate(invalid="ignore", over="ignore"):  # +inf + -inf, overflow: handled below
        for start in range(0, n, _CHUNK):
            chunk = flat[start : start + _CHUNK]
            if kernel is not None:
                s, q, lo_c, hi_c = kernel(chunk, name)
                if math.isfinite(s):  # no NaN or ±Inf in the chunk (else the numpy path counts them)
                    lo, hi = min(lo, lo_c), max(hi, hi_c)
                    total += s
                    sumsq += q
                    count += chunk.size
                    continue
            c = _widened(chunk, name, specials=False)
            lo_c, hi_c = float(c.min()), float(c.max())
            if name == "float16" and max(-lo_c, hi_c) >= F16_SPECIAL_MAGNITUDE:
                c = _widened(chunk, name)  # ±inf/NaN in the chunk: widened as they are, filtered below
            # Σx and Σx² from a float64 copy of the chunk in a reused buffer: x² of a float32
            # is exact in float64, and two vectorised passes over a cached chunk cost less
            # than a casting reduction plus einsum (no BLAS: its threads thrash on a busy machine)
            w = _scratch64(c.size)
            np.copyto(w, c, casting="unsafe")
            s = float(np.add.reduce(w))
            if is_float and not math.isfinite(s):
                bad = ~np.isfinite(c)
                nans = int(np.count_nonzero(np.isnan(c)))
                nan_count += nans
                inf_count += int(np.count_nonzero(bad)) - nans
                c = c[~bad]
                if not c.size:
                    continue
                w = w[: c.size]
                np.copyto(w, c, casting="unsafe")
                s = float(np.add.reduce(w))
                lo_c, hi_c = float(c.min()), float(c.max())
            lo = min(lo, lo_c)
            hi = max(hi, hi_c)
            total += s
            sumsq += float(np.add.reduce(np.multiply(w, w, out=w)))
            count += int(c.size)
    if count == 0:
        return TensorStats(n, None, None, None, None, None, None, nan_count, inf_count)
    abs_max = max(abs(lo), abs(hi))
    scale = 1.0
    if abs_max > 1e150:  # huge values: redo the sums scaled, so squares cannot overflow float64
        scale = abs_max
        x = _as_float64(flat, name) / scale
        x = x[np.isfinite(x)]
        total, sumsq = float(x.sum()), float(np.einsum("i,i->", x, x))
    mean = total / count
    var = max(sumsq / count - mean * mean, 0.0)
    return TensorStats(
        numel=n,
        min=lo,
        max=hi,
        mean=mean * scale,
        std=math.sqrt(var) * scale,
        abs_max=abs_max,
        l2=math.sqrt(sumsq) * scale,
        nan_count=nan_count,
        inf_count=inf_count,
    )


#: Tensors up to this many elements are reduced together by :func:`compute_stats_many`.
SMALL_ELEMENTS = 1 << 14


def _widened_all(a: np.ndarray, name: str) -> np.ndarray:
    """A 1-d canonical array of a dtype numpy does not reduce natively, as numbers it does."""
    if name == "bfloat16":
        return widen_bfloat16(a)
    if name == "float16":
        return widen_float16(a)
    return a.view(np.uint8)  # bool


@dataclass(slots=True)
class StatsColumns:
    """The statistics of many tensors, one numpy array per field of :class:`TensorStats`: how
    a writer keeps the rows of small tensors until a flush writes them column by column.

    ``floats`` holds min, max, mean, std, abs_max and l2 (:data:`FLOAT_FIELDS`) as rows of a
    2-d float64 array, 0.0 where ``valid`` (same shape) marks the statistic null.
    """

    numel: np.ndarray  # int64
    floats: np.ndarray  # float64, (6, n)
    valid: np.ndarray  # bool, (6, n)
    nan_count: np.ndarray  # int64
    inf_count: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.numel)

    @classmethod
    def empty(cls, n: int) -> StatsColumns:
        """Columns of ``n`` rows of empty tensors (numel 0, l2 0.0, the rest null)."""
        valid = np.zeros((len(FLOAT_FIELDS), n), bool)
        valid[-1] = True
        return cls(np.zeros(n, np.int64), np.zeros((len(FLOAT_FIELDS), n)), valid, np.zeros(n, np.int64),
                   np.zeros(n, np.int64))

    def set_row(self, i: int, st: TensorStats) -> None:
        """Put ``st`` in row ``i``."""
        self.numel[i], self.nan_count[i], self.inf_count[i] = st.numel, st.nan_count, st.inf_count
        for k, v in enumerate((st.min, st.max, st.mean, st.std, st.abs_max, st.l2)):
            self.valid[k, i] = v is not None
            self.floats[k, i] = 0.0 if v is None else v

    def row(self, i: int) -> TensorStats:
        """The statistics of row ``i``."""
        fl = [v if ok else None for v, ok in zip(self.floats[:, i].tolist(), self.valid[:, i].tolist())]
        return TensorStats(int(self.numel[i]), *fl, int(self.nan_count[i]), int(self.inf_count[i]))

    def take(self, rows: slice | np.ndarray) -> StatsColumns:
        """The columns of ``rows`` (a slice: views, no copy)."""
        return StatsColumns(self.numel[rows], self.floats[:, rows], self.valid[:, rows], self.nan_count[rows],
                            self.inf_count[rows])

    @staticmethod
    def concat(parts: Sequence[StatsColumns]) -> StatsColumns:
        """The rows of ``parts``, one after the other."""
        if len(parts) == 1:
            return parts[0]
        return StatsColumns(*(np.concatenate([getattr(p, f) for p in parts], axis=-1)
                              for f in ("numel", "floats", "valid", "nan_count", "inf_count")))

    @staticmethod
    def of_stats(stats: Sequence[TensorStats]) -> StatsColumns:
        """The columns of ``stats`` (any values a :class:`TensorStats` holds: a column of the wrong
        type raises here, as converting it to Arrow would).

        Raises:
            pyarrow.ArrowException, TypeError: a field is not a number (or an integer) or None.
        """
        cols = list(zip(*map(_fields_of, stats))) if stats else [()] * 9
        ints = [pa.array(c, pa.int64()).to_numpy() for c in (cols[0], cols[7], cols[8])]
        floats = [pa.array(c, pa.float64()) for c in cols[1:7]]
        valid = np.array([_validity(f) for f in floats], bool).reshape(len(floats), len(stats))
        values = np.array([f.to_numpy(zero_copy_only=False) for f in floats], np.float64).reshape(valid.shape)
        values[~valid] = 0.0
        return StatsColumns(ints[0], values, valid, ints[1], ints[2])


def _validity(a: pa.Array) -> np.ndarray:
    """Which values of ``a`` are not null, from its validity bitmap (``a.is_valid()`` would
    import ``pyarrow.compute``: ~50 ms that a writer needs nowhere else)."""
    if a.null_count == 0:
        return np.ones(len(a), bool)
    bits = np.frombuffer(a.buffers()[0], np.uint8)
    return np.unpackbits(bits, count=a.offset + len(a), bitorder="little")[a.offset:].astype(bool)


#: The float fields of :class:`StatsColumns`, in its ``floats`` rows' order (SPEC.md §4.1).
FLOAT_FIELDS = ("min", "max", "mean", "std", "abs_max", "l2")
_fields_of = operator.attrgetter("numel", *FLOAT_FIELDS, "nan_count", "inf_count")
_size_of = operator.attrgetter("size")
_PLAIN = frozenset(("bfloat16", "float16", "bool"))  # dtypes numpy does not reduce as they are


#: Elements :func:`stats_columns` widens and reduces at a time (256 KB of float64).
_GROUP = 1 << 15


def _joined(arrays: Sequence[np.ndarray], name: str) -> np.ndarray:
    """The elements of canonical arrays of dtype ``name``, one after the other, as one 1-d array
    (a bytes join of C-contiguous arrays takes a fraction of ``np.concatenate``'s steps per array,
    which flattens each one first)."""
    try:
        return np.frombuffer(b"".join(arrays), DTYPES[name][0])  # type: ignore[arg-type]
    except (BufferError, TypeError, ValueError):  # an array that is not C-contiguous
        return np.concatenate(arrays, axis=None)


def _reduce_group(arrays: Sequence[np.ndarray], names: str | Sequence[str], sizes: np.ndarray,
                  out: np.ndarray) -> None:
    """Σx, min, max and Σx² of each of ``arrays`` (non-empty; ``names`` their dtypes, or the one
    dtype of all) into the columns of ``out``, over their elements copied into a float64 buffer
    (``ufunc.reduceat``: each array's results depend on its own elements only)."""
    m = int(sizes.sum())
    x = _scratch64(m) if m <= _CHUNK else np.empty(m)
    if type(names) is str:  # one dtype: joined, then widened in one go
        flat = _joined(arrays, names)
        np.copyto(x, _widened_all(flat, names) if names in _PLAIN else flat, casting="unsafe")
    else:
        parts = [_widened_all(a.reshape(-1), nm) if nm in _PLAIN else a for a, nm in zip(arrays, names)]
        np.concatenate(parts, axis=None, out=x, casting="unsafe")  # exact: every SPEC dtype fits float64
    starts = np.zeros(len(sizes), np.int64)
    np.cumsum(sizes[:-1], out=starts[1:])
    np.add.reduceat(x, starts, out=out[0])
    np.minimum.reduceat(x, starts, out=out[1])
    np.maximum.reduceat(x, starts, out=out[2])
    np.add.reduceat(np.multiply(x, x, out=x), starts, out=out[3])


def stats_columns(arrays: Sequence[np.ndarray], names: Sequence[str]) -> StatsColumns:
    """Compute :func:`compute_stats` of many small canonical arrays in a few numpy calls, column
    by column.

    A recorder hooking every module of a model decoding one token per step hands the writer
    dozens of tensors of a few KB per step; reducing each in its own numpy calls costs more in
    Python (and in the GIL the model's thread waits for) than in arithmetic. Here the arrays
    are widened into one float64 buffer and reduced per segment (``ufunc.reduceat``). Arrays
    holding NaN/Inf or huge values are handed to :func:`compute_stats`, which treats them
    exactly; the others may differ from it in the last bits of mean/std/l2 (SPEC.md §4.4
    allows that: the summation order differs). Each tensor's statistics depend on its own
    elements only, not on the others reduced with it.

    Args:
        arrays: canonical arrays (see :func:`tracefmt.dtypes.canonical`).
        names: their SPEC.md dtype names.

    Returns:
        Their statistics, in order.
    """
    n = len(arrays)
    out = StatsColumns.empty(n)
    sizes = np.fromiter(map(_size_of, arrays), np.int64, n)
    todo = np.flatnonzero(sizes)
    if not len(todo):
        return out
    if len(todo) < n:
        arrays = [arrays[i] for i in todo.tolist()]
        names = [names[i] for i in todo.tolist()]
        sizes = sizes[todo]
    sums = np.empty((4, len(sizes)))  # Σx, min, max, Σx² per array
    # arrays in groups of about _GROUP elements: each group's float64 copy stays in cache
    group = np.cumsum(sizes)
    group -= sizes
    group //= _GROUP
    bounds = [0, *(np.flatnonzero(np.diff(group)) + 1).tolist(), len(sizes)]
    kinds = set(names)
    one_kind = names[0] if len(kinds) == 1 else None
    with np.errstate(invalid="ignore", over="ignore"):  # NaN casts, +inf + -inf, overflow: handled below
        for g0, g1 in pairwise(bounds):
            _reduce_group(arrays[g0:g1], one_kind or names[g0:g1], sizes[g0:g1], sums[:, g0:g1])
        total, lo, hi, sumsq = sums
        mean = total / sizes
        std = np.sqrt(np.maximum(sumsq / sizes - mean * mean, 0.0))
        abs_max = np.maximum(np.abs(lo), np.abs(hi))
        l2 = np.sqrt(sumsq)
    out.numel[todo] = sizes
    out.floats[:, todo] = (lo, hi, mean, std, abs_max, l2)
    out.valid[:, todo] = True
    # NaN/Inf anywhere in a segment makes its sums non-finite; so do values whose squares
    # overflow: both go to compute_stats (which also scales values beyond 1e150)
    for k in np.flatnonzero(~(np.isfinite(sumsq) & (abs_max <= 1e150))).tolist():
        out.set_row(int(todo[k]), compute_stats(arrays[k], names[k]))
    return out


def compute_stats_many(arrays: Sequence[np.ndarray], names: Sequence[str]) -> list[TensorStats]:
    """:func:`stats_columns` as one :class:`TensorStats` per array.

    Args:
        arrays: canonical arrays (see :func:`tracefmt.dtypes.canonical`).
        names: their SPEC.md dtype names.

    Returns:
        Their statistics, in order.
    """
    cols = stats_columns(arrays, names)
    return [cols.row(i) for i in range(len(cols))]
