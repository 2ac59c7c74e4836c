"""The compiled one-pass statistics of a chunk behind :func:`steptrace.tracefmt.stats.compute_stats`
(numba, the optional ``fast`` extra: ``pip install 'steptrace[fast]'``).

This is the only module of tracefmt that imports numba; :mod:`steptrace.tracefmt.stats`
decides when it is imported. :func:`chunk_stats` reads a chunk once and returns what the numpy
path gets from six passes over it (min, max, widened float64 copy, its sum, its squares, their
sum): the minimum and maximum, and ``sum x`` and ``sum x^2`` in float64 **with numpy's own
pairwise summation** (``np.add.reduce`` of a contiguous float64 array: blocks of at most 128
elements summed in 8 lanes, halves split at a multiple of 8, added to 0.0), so the statistics
are the numpy path's bit for bit, not merely within SPEC.md's precision (a zero minimum or
maximum may differ in sign where both zeros occur, as numpy's own reductions may). float16 and bfloat16 are widened
to float32 in the loop, exactly as :func:`steptrace.tracefmt.dtypes.widen_float16` does.

A chunk holding NaN or ±Inf comes back with a sum that is not finite; the caller then takes the
numpy path for that chunk (its counts and its filtered sums), as it does for every chunk
without the kernel.

Compiled code is cached on disk (numba's ``cache=True``: ``__pycache__`` beside this file, else
numba's user cache directory or ``NUMBA_CACHE_DIR``); where no place is writable it is compiled
in memory once per process.
"""

from __future__ import annotations

from collections.abc import Callable

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

__all__ = ["KINDS", "chunk_stats"]

#: The kinds of chunk the kernel reads: SPEC.md dtype -> (container dtype, widening code).
KINDS = {"float32": (np.float32, 0), "float64": (np.float64, 0), "float16": (np.uint16, 1), "bfloat16": (np.uint16, 2)}

_F16_BODY = np.int32(0x8FFFE000 - (1 << 32))  # as tracefmt.dtypes: sign, exponent and mantissa bits
_F16_SCALE = np.float32(2.0**112)


def _jit(fn: Callable) -> Callable:
    """``fn`` compiled by numba without the GIL, cached on disk where numba can write."""
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available" (read-only install)
        return numba.njit(nogil=True)(fn)


@intrinsic
def _f32_of_bits(typingctx, u):
    """The float32 whose bit pattern is the uint32 ``u``."""
    if u != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(u), codegen


def _value(x, i, kind):
    """Element ``i`` of ``x`` as the number numpy reduces: itself, or (``x`` of uint16 bits)
    float16 (``kind`` 1) or bfloat16 (``kind`` 2) widened to float32, exactly (exponent 31 of
    float16 becomes float32's inf/NaN). Compiled per array type by :func:`_value_impl`."""
    raise NotImplementedError("compiled only")


@overload(_value)
def _value_impl(x, i, kind):
    if x.dtype in (types.float32, types.float64):
        return lambda x, i, kind: x[i]
    if x.dtype != types.uint16:
        return None

    def widened(x, i, kind):
        b = np.int32(x[i])
        if kind == 2:
            return _f32_of_bits(np.uint32(b << 16))
        o = (np.int32(np.int16(x[i])) << 13) & _F16_BODY  # sign-extended, shifted into place
        special = np.int32((b & 0x7C00) == 0x7C00)  # no branch: the loop stays vectorisable
        o |= special * np.int32(0x7F800000)
        return _f32_of_bits(np.uint32(o & 0xFFFFFFFF)) * _F16_SCALE

    return widened


def _sequential(x, lo, hi, kind, s, q, mn, mx):
    """Add ``x[lo:hi]`` one by one to the sums ``s`` and ``q`` (of squares) and the range."""
    for i in range(lo, hi):
        v = _value(x, i, kind)
        w = np.float64(v)
        s += w
        q += w * w
        mn = min(mn, v)
        mx = max(mx, v)
    return s, q, mn, mx


_sequential = _jit(_sequential)


def _pairwise(x, lo, n, kind):
    """numpy's pairwise sum of ``x[lo:lo+n]`` as float64, of their squares too, and their range.

    Returns ``(sum, sum of squares, min, max)`` (``min``/``max`` of the widened values)."""
    if n < 8:
        v = _value(x, lo, kind)
        return _sequential(x, lo, lo + n, kind, 0.0, 0.0, v, v)
    if n <= 128:
        v0, v1, v2, v3 = _value(x, lo, kind), _value(x, lo + 1, kind), _value(x, lo + 2, kind), _value(x, lo + 3, kind)
        v4, v5, v6, v7 = (_value(x, lo + 4, kind), _value(x, lo + 5, kind), _value(x, lo + 6, kind),
                          _value(x, lo + 7, kind))
        mn = min(min(min(v0, v1), min(v2, v3)), min(min(v4, v5), min(v6, v7)))
        mx = max(max(max(v0, v1), max(v2, v3)), max(max(v4, v5), max(v6, v7)))
        r0, r1, r2, r3 = np.float64(v0), np.float64(v1), np.float64(v2), np.float64(v3)
        r4, r5, r6, r7 = np.float64(v4), np.float64(v5), np.float64(v6), np.float64(v7)
        q0, q1, q2, q3, q4, q5, q6, q7 = r0 * r0, r1 * r1, r2 * r2, r3 * r3, r4 * r4, r5 * r5, r6 * r6, r7 * r7
        end = lo + n - n % 8
        i = lo + 8
        while i < end:
            v0, v1, v2, v3 = _value(x, i, kind), _value(x, i + 1, kind), _value(x, i + 2, kind), _value(x, i + 3, kind)
            v4, v5, v6, v7 = (_value(x, i + 4, kind), _value(x, i + 5, kind), _value(x, i + 6, kind),
                              _value(x, i + 7, kind))
            mn = min(mn, min(min(min(v0, v1), min(v2, v3)), min(min(v4, v5), min(v6, v7))))
            mx = max(mx, max(max(max(v0, v1), max(v2, v3)), max(max(v4, v5), max(v6, v7))))
            w0, w1, w2, w3 = np.float64(v0), np.float64(v1), np.float64(v2), np.float64(v3)
            w4, w5, w6, w7 = np.float64(v4), np.float64(v5), np.float64(v6), np.float64(v7)
            r0 += w0
            r1 += w1
            r2 += w2
            r3 += w3
            r4 += w4
            r5 += w5
            r6 += w6
            r7 += w7
            q0 += w0 * w0
            q1 += w1 * w1
            q2 += w2 * w2
            q3 += w3 * w3
            q4 += w4 * w4
            q5 += w5 * w5
            q6 += w6 * w6
            q7 += w7 * w7
            i += 8
        s = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        q = ((q0 + q1) + (q2 + q3)) + ((q4 + q5) + (q6 + q7))
        return _sequential(x, i, lo + n, kind, s, q, mn, mx)  # the rest past a multiple of 8
    n2 = n // 2
    n2 -= n2 % 8
    s1, q1, mn1, mx1 = _pairwise(x, lo, n2, kind)
    s2, q2, mn2, mx2 = _pairwise(x, lo + n2, n - n2, kind)
    return s1 + s2, q1 + q2, min(mn1, mn2), max(mx1, mx2)


_pairwise = _jit(_pairwise)


def chunk_stats(chunk: np.ndarray, name: str) -> tuple[float, float, float, float]:
    """The sum, sum of squares (float64, numpy's pairwise order), minimum and maximum of a
    non-empty 1-d C-contiguous chunk of a canonical array.

    Args:
        chunk: the chunk (float16 as numpy's float16 or as its uint16 bits; bfloat16 as bits).
        name: its SPEC.md dtype: one of :data:`KINDS`.

    Returns:
        ``(sum, sum of squares, min, max)``; the sum is not finite when the chunk holds NaN or
        ±Inf (the minimum and maximum then mean nothing). The minimum and maximum equal numpy's
        but for the sign of a zero where both signs occur (numpy's own reductions pick either).
    """
    container, kind = KINDS[name]
    x = chunk if chunk.dtype == container else chunk.view(container)  # float16: its bits
    s, q, mn, mx = _pairwise(x, 0, x.size, kind)
    # numpy's reduction adds the pairwise sum to its identity, 0.0 (so -0.0 sums to 0.0)
    return 0.0 + float(s), 0.0 + float(q), float(mn), float(mx)
