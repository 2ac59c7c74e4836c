"""Tensor statistics (SPEC.md §4.4): of one canonical array (:func:`compute_stats`) and of many
small ones in a few numpy calls (:func:`compute_stats_many`).

Everything here works on the canonical bytes of a tensor: little-endian, C order, one byte per
bool, bfloat16 as its 16-bit pattern.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import numpy as np

from .dtypes import DTYPES, F16_SPECIAL_MAGNITUDE, widen_bfloat16, widen_float16


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
    lo, hi, total, sumsq, count, nan_count, inf_count = math.inf, -math.inf, 0.0, 0.0, 0, 0, 0
    with np.errstate(invalid="ignore", over="ignore"):  # +inf + -inf, overflow: handled below
        for start in range(0, n, _CHUNK):
            chunk = flat[start : start + _CHUNK]
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


def compute_stats_many(arrays: list[np.ndarray], names: list[str]) -> list[TensorStats]:
    """Compute :func:`compute_stats` of many small canonical arrays in a few numpy calls.

    A recorder hooking every module of a model decoding one token per step hands the writer
    dozens of tensors of a few KB per step; reducing each in its own numpy calls costs more in
    Python (and in the GIL the model's thread waits for) than in arithmetic. Here the arrays
    are widened into one float64 buffer and reduced per segment (``ufunc.reduceat``). Arrays
    holding NaN/Inf or huge values are handed to :func:`compute_stats`, which treats them
    exactly; the others may differ from it in the last bits of mean/std/l2 (SPEC.md §4.4
    allows that: the summation order differs).

    Args:
        arrays: canonical arrays (see :func:`tracefmt.dtypes.canonical`).
        names: their SPEC.md dtype names.

    Returns:
        Their statistics, in order.
    """
    out: list[TensorStats | None] = [None] * len(arrays)
    todo = [i for i, a in enumerate(arrays) if a.size]
    for i in range(len(arrays)):
        if not arrays[i].size:
            out[i] = compute_stats(arrays[i], names[i])
    if todo:
        plain = ("bfloat16", "float16", "bool")
        parts = [arrays[i].reshape(-1) if names[i] not in plain else _widened_all(arrays[i].reshape(-1), names[i])
                 for i in todo]
        x = np.concatenate(parts, dtype=np.float64, casting="unsafe")  # exact: every SPEC dtype fits float64
        sizes = np.fromiter(map(len, parts), np.int64, len(parts))
        starts = np.zeros(len(parts), np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        with np.errstate(invalid="ignore", over="ignore"):
            total = np.add.reduceat(x, starts)
            lo = np.minimum.reduceat(x, starts)
            hi = np.maximum.reduceat(x, starts)
            sumsq = np.add.reduceat(np.multiply(x, x, out=x), starts)
            mean = total / sizes
            std = np.sqrt(np.maximum(sumsq / sizes - mean * mean, 0.0))
            abs_max = np.maximum(np.abs(lo), np.abs(hi))
            l2 = np.sqrt(sumsq)
        # NaN/Inf anywhere in a segment makes its sums non-finite; so do values whose squares
        # overflow: both go to compute_stats (which also scales values beyond 1e150)
        exact = (np.isfinite(sumsq) & (abs_max <= 1e150)).tolist()
        # one conversion per column, not one numpy scalar per field and row
        rows = zip(todo, exact, sizes.tolist(), lo.tolist(), hi.tolist(), mean.tolist(), std.tolist(),
                   abs_max.tolist(), l2.tolist())
        for i, ok, n, lo_, hi_, mean_, std_, am, l2_ in rows:
            out[i] = TensorStats(n, lo_, hi_, mean_, std_, am, l2_, 0, 0) if ok else compute_stats(arrays[i], names[i])
    return out  # type: ignore[return-value]
