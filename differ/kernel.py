"""The compiled single-pass chunk kernel behind :func:`steptrace.differ.metrics.compare_values`
(numba, the optional ``fast`` extra: ``pip install 'steptrace[fast]'``).

This is the only module that imports numba; :mod:`steptrace.differ.kernelpolicy` decides when it
is imported (docs/differ.md §5, *Compiled kernel*). It computes what
:mod:`steptrace.differ.onepass` computes, with the same NaN/Inf rules and the same chunks of
``CHUNK`` elements, in one loop over ``a`` and ``b`` per chunk:

* the fast loop, per block of ``BLOCK`` elements: ``|a-b|`` in the working dtype, its maximum (an
  integer maximum of the bit patterns, which are ordered like the non-negative floats), the
  tolerance count ``|a-b| > atol + rtol|a|`` in the working dtype, and the sums ``sum|a-b|``,
  ``sum (a-b)^2``, ``sum a^2``, ``sum b^2``, ``sum ab`` in the working dtype's vector lanes, each
  block's sums added in float64. ``max |a-b|/|a|`` divides only in the blocks where some element
  may beat the maximum so far (``|a-b| >= |a| * rel (1 - 2^-20)``), so it is exact;
* the careful loop, for a chunk where the fast one saw a NaN or an Inf (``|a-b|`` not finite:
  either side NaN or Inf, or a difference past the dtype's range), or whose float32 sums left
  float32's range (over ``3e38``, or under ``TINY32`` while some value is not zero): element by
  element, NaN/Inf counted as onepass counts them, the sums in float64, and ``|a-b|``,
  ``|a-b|/|a|`` and the tolerance threshold in float64 for the whole chunk when a difference of
  finite values overflows the working dtype (as onepass redoes such a chunk).

So ``max_abs``, ``max_rel`` and ``bad`` equal onepass's exactly, and the sums agree within the
precision docs/differ.md gives (a float32 block of 256 sums 32 terms per lane, finer than a BLAS
dot over a whole chunk).

Compiled code is cached on disk (numba's ``cache=True``: ``__pycache__`` beside this file, else
numba's user cache directory or ``NUMBA_CACHE_DIR``); where no place is writable it is compiled
in memory once per process.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from .onepass import CHUNK, TINY32, Acc, scratch, widen
from .policy import TensorTolerance

#: Elements per block of the fast loop: its sums run in the working dtype, then go to float64.
BLOCK = 256
#: ``max|a-b|/|a|`` is taken in a block only where ``|a-b| >= |a| * rel * MARGIN`` for some
#: element: the rounding of the product and of a division stays well inside ``2**-20``.
MARGIN = 1.0 - 2.0**-20

_FAST = {"reassoc"}  # lane-wise sums; never nnan/ninf (NaN decides the path) nor contract (exact threshold)


def jit(fn: Callable, *, fastmath: set[str] | bool = False) -> Callable:
    """Return ``fn`` compiled by numba (no GIL, numpy's division rules), cached on disk when
    numba finds a writable cache location, else compiled in memory.

    Args:
        fn: a function numba can compile in nopython mode.
        fastmath: LLVM fast-math flags for it.

    Returns:
        The numba dispatcher.
    """
    opts = {"nogil": True, "error_model": "numpy", "fastmath": fastmath}
    try:
        return numba.njit(cache=True, **opts)(fn)
    except RuntimeError:  # numba: "cannot cache function ...: no locator available" (read-only install)
        return numba.njit(**opts)(fn)


@intrinsic
def _bits(typingctx, x):
    """The bit pattern of a float32 (uint32) or float64 (uint64)."""
    if x not in (types.float32, types.float64):
        return None
    width = x.bitwidth

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(width))

    return getattr(types, f"uint{width}")(x), codegen


@intrinsic
def _unbits(typingctx, u, like):
    """The float32 or float64 (the type of ``like``) whose bit pattern is ``u``."""
    if like not in (types.float32, types.float64) or u != getattr(types, f"uint{like.bitwidth}"):
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(like))

    return like(u, like), codegen


def _fast(a, b, lo, hi, c):
    """Fold ``[lo, hi)`` assuming every value is finite. Returns ``(ok, mx, rel, s, dd, aa, bb,
    ab, bad)``; ``ok`` is False, and the rest unset, when some ``|a-b|`` is not finite."""
    atol, rtol, margin, inf, one = c[0], c[1], c[2], c[3], c[4]
    zero = one - one
    inf_bits = _bits(inf)
    mb = _bits(zero)
    rel = zero
    s = dd = aa = bb = ab = 0.0
    bad = 0
    for k in range(lo, hi, BLOCK):
        e = min(k + BLOCK, hi)
        xa, xb = a[k:e], b[k:e]
        floor = rel * margin
        m1 = _bits(zero)
        cand = nbad = s1 = dd1 = aa1 = bb1 = ab1 = zero
        for i in range(xa.size):
            x, y = xa[i], xb[i]
            d = abs(x - y)
            ax = abs(x)
            m1 = max(m1, _bits(d))
            cand += one if d >= ax * floor else zero
            nbad += one if d > ax * rtol + atol else zero
            s1 += d
            dd1 += d * d
            aa1 += x * x
            bb1 += y * y
            ab1 += x * y
        if m1 >= inf_bits:
            return False, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0
        mb = max(mb, m1)
        s += s1
        dd += dd1
        aa += aa1
        bb += bb1
        ab += ab1
        bad += int(nbad)
        if cand > zero:
            for i in range(xa.size):
                r = abs(xa[i] - xb[i]) / abs(xa[i])  # 0/0 is NaN: never > rel
                if r > rel:
                    rel = r
    return True, float(_unbits(mb, zero)), float(rel), s, dd, aa, bb, ab, bad


def _careful(a, b, lo, hi, c, atol, rtol):
    """Fold ``[lo, hi)`` element by element: NaN/Inf counted, values finite on both sides
    compared, sums in float64. Returns ``(mx, rel, s, dd, aa, bb, ab, bad, n, nan_mis, inf_mis,
    nan_both)``."""
    atol_w, rtol_w, inf = c[0], c[1], c[3]
    nan_mis = inf_mis = nan_both = n = 0
    wide = False  # a difference of finite values overflows the working dtype: the chunk in float64
    for i in range(lo, hi):
        x, y = a[i], b[i]
        nx, ny = x != x, y != y
        nan_mis += nx != ny
        nan_both += nx and ny
        inf_mis += (x == inf) != (y == inf)
        inf_mis += (x == -inf) != (y == -inf)
        if abs(x) < inf and abs(y) < inf:
            n += 1
            if not abs(x - y) < inf:
                wide = True
    mx = rel = s = dd = aa = bb = ab = 0.0
    bad = 0
    for i in range(lo, hi):
        x, y = a[i], b[i]
        if not (abs(x) < inf and abs(y) < inf):
            continue
        x64, y64 = np.float64(x), np.float64(y)
        if wide:
            d = abs(x64 - y64)
            r = d / abs(x64)
            bad += d > abs(x64) * rtol + atol
        else:
            dw = abs(x - y)
            d = np.float64(dw)
            r = np.float64(dw / abs(x))
            bad += dw > abs(x) * rtol_w + atol_w
        if d > mx:
            mx = d
        if r > rel:  # 0/0 is NaN: skipped
            rel = r
        s += d
        dd += d * d
        aa += x64 * x64
        bb += y64 * y64
        ab += x64 * y64
    return mx, rel, s, dd, aa, bb, ab, bad, n, nan_mis, inf_mis, nan_both


def _nonzero(x, lo, hi):
    """Whether some value of ``x[lo:hi]`` is not zero (of either sign)."""
    for i in range(lo, hi):
        if x[i] != 0:
            return True
    return False


_fast = jit(_fast, fastmath=_FAST)
_careful = jit(_careful)
_nonzero = jit(_nonzero)


def _fold(a, b, lo, hi, c, atol, rtol):
    """Fold ``[lo, hi)`` chunk by chunk (chunks start at ``lo``). Returns ``(mx, rel, s, dd, aa,
    bb, ab, bad, n, nan_mis, inf_mis, nan_both)``."""
    tiny = c[5]
    mx = rel = s = dd = aa = bb = ab = 0.0
    bad = n = nan_mis = inf_mis = nan_both = 0
    for k in range(lo, hi, CHUNK):
        e = min(k + CHUNK, hi)
        ok, m1, r1, s1, dd1, aa1, bb1, ab1, bad1 = _fast(a, b, k, e, c)
        if ok:  # float32 sums past float32's range, or lost to underflow: the careful loop
            ok = math.isfinite(s1 + dd1 + aa1 + bb1 + ab1) and not (
                (dd1 < tiny and s1 > 0) or (aa1 < tiny and _nonzero(a, k, e))
                or (bb1 < tiny and _nonzero(b, k, e)))
        if ok:
            n1, nm1, im1, nb1 = e - k, 0, 0, 0
        else:
            m1, r1, s1, dd1, aa1, bb1, ab1, bad1, n1, nm1, im1, nb1 = _careful(a, b, k, e, c, atol, rtol)
        mx = max(mx, m1)
        rel = max(rel, r1)
        s += s1
        dd += dd1
        aa += aa1
        bb += bb1
        ab += ab1
        bad += bad1
        n += n1
        nan_mis += nm1
        inf_mis += im1
        nan_both += nb1
    return mx, rel, s, dd, aa, bb, ab, bad, n, nan_mis, inf_mis, nan_both


_fold = jit(_fold)


@functools.lru_cache(maxsize=64)
def _consts(atol: float, rtol: float, work: np.dtype) -> np.ndarray:
    """The kernel's constants in the working dtype: atol, rtol, MARGIN, inf, 1, the underflow
    bound (kept per tolerance: the kernel only reads them)."""
    tiny = TINY32 if work == np.float32 else 0.0
    return np.array([atol, rtol, MARGIN, np.inf, 1.0, tiny], dtype=work)


def _readonly(x: np.ndarray) -> np.ndarray:
    """``x`` as a read-only array: the kernel is compiled for read-only arrays only (one
    specialisation per dtype, whether the values come from a mapped trace or from memory)."""
    if not x.flags.writeable:
        return x
    v = x.view()
    v.flags.writeable = False
    return v


def _acc(r: tuple) -> Acc:
    acc = Acc()
    (acc.mx, acc.rel, acc.s, acc.dd, acc.aa, acc.bb, acc.ab, acc.bad, acc.n, acc.nan_mis, acc.inf_mis,
     acc.nan_both) = r
    return acc


def accumulate(fa: np.ndarray, fb: np.ndarray, lo: int, hi: int, tol: TensorTolerance, sums: bool,
               work: np.dtype) -> Acc:
    """Fold elements ``[lo, hi)`` into a fresh accumulator with the compiled kernel.

    Args:
        fa: reference values, flat.
        fb: candidate values, flat, as many.
        lo: first element.
        hi: one past the last element.
        tol: the tolerance whose ``atol``/``rtol`` the ``bad`` count uses.
        sums: unused (``sum a^2`` and ``sum b^2`` come with the single pass); the signature is
            :func:`steptrace.differ.onepass.accumulate`'s.
        work: the working dtype (:func:`~steptrace.differ.onepass.work_dtype`).

    Returns:
        The accumulator, ``ab`` (``sum ab``) included.
    """
    atol, rtol = float(tol.atol), float(tol.rtol)
    c = _consts(atol, rtol, work)
    if fa.dtype == work and fb.dtype == work and fa.flags.c_contiguous and fb.flags.c_contiguous:
        return _acc(_fold(_readonly(fa), _readonly(fb), lo, hi, c, atol, rtol))
    acc = _acc((0.0,) * 7 + (0,) * 5)
    sc = scratch(work)  # other dtypes, byte orders or strides: widened chunk by chunk as onepass does
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(lo, hi, CHUNK):
            j = min(i + CHUNK, hi)
            ac = widen(fa[i:j], sc.a[: j - i])
            bc = widen(fb[i:j], sc.b[: j - i])
            acc.merge(_acc(_fold(_readonly(ac), _readonly(bc), 0, j - i, c, atol, rtol)))
    return acc
