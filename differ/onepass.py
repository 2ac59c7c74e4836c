"""The chunked one-pass accumulation behind :func:`steptrace.differ.metrics.compare_values`.

Per chunk of ``CHUNK`` elements: ``a - b`` once into a reused scratch row, ``|a - b|`` in place,
BLAS dots for the sums of squares, one fused pass for the relative error, and a NaN/Inf path
that runs only when a chunk's sums are not finite. The results equal the whole-array numpy
definitions of :mod:`steptrace.differ.metrics` (tests/test_differ_metrics_onepass.py).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from steptrace.tracefmt.dtypes import widen_float16

from .policy import TensorTolerance

#: Elements per chunk: the chunk's inputs and its scratch rows (about 5 x 128 KB) stay in L2 cache.
CHUNK = 1 << 15
#: A float32 chunk's sum of squares below this may have lost digits to subnormal squares (each
#: below 2**-126; 2**15 of them lose at most 2**-111, relative 2**-31 of this): redone in float64.
TINY32 = 2.0**-80


def work_dtype(a: np.ndarray, b: np.ndarray) -> np.dtype:
    if a.dtype == np.float64 or b.dtype == np.float64 or a.dtype.kind in "iub" or b.dtype.kind in "iub":
        return np.dtype(np.float64)
    return np.dtype(np.float32)


class Acc:
    """Running sums of one comparison; ``ab`` (``sum ab``) is None where it was not summed."""

    __slots__ = ("mx", "s", "dd", "aa", "bb", "ab", "rel", "bad", "n", "nan_mis", "inf_mis", "nan_both")

    def __init__(self) -> None:
        self.mx = self.s = self.dd = self.aa = self.bb = self.rel = 0.0
        self.ab: float | None = None
        self.bad = self.n = self.nan_mis = self.inf_mis = self.nan_both = 0

    def merge(self, o: Acc) -> None:
        """Add another accumulator's sums (the two covered disjoint ranges)."""
        self.mx, self.rel = max(self.mx, o.mx), max(self.rel, o.rel)
        self.ab = None if self.ab is None or o.ab is None else self.ab + o.ab
        for k in ("s", "dd", "aa", "bb", "bad", "n", "nan_mis", "inf_mis", "nan_both"):
            setattr(self, k, getattr(self, k) + getattr(o, k))


class _Rows(NamedTuple):
    """Views of the scratch buffers for one chunk of ``n`` elements."""

    dt: np.ndarray  # (2, n): |a-b| and |a-b|/|a|, reduced by one call
    d: np.ndarray
    t: np.ndarray
    u: np.ndarray  # |a|, then the threshold atol + rtol|a|
    m: np.ndarray  # bool
    ones: np.ndarray


class _Scratch:
    """Reusable chunk buffers of one working dtype (fresh memory is slow to touch; reuse it)."""

    def __init__(self, dtype: np.dtype, size: int = CHUNK) -> None:
        self.size = size
        self._dt = np.empty((2, size), dtype)
        self._u = np.empty(size, dtype)
        self._m = np.empty(size, bool)
        self._ones = np.ones(size, dtype)
        self.a = np.empty(size, dtype)  # inputs widened to the working dtype
        self.b = np.empty(size, dtype)
        self.full = self._views(size)

    def _views(self, n: int) -> _Rows:
        dt = self._dt[:, :n]
        return _Rows(dt, dt[0], dt[1], self._u[:n], self._m[:n], self._ones[:n])

    def rows(self, n: int) -> _Rows:
        """The buffers cut to ``n <= size`` elements."""
        return self.full if n == self.size else self._views(n)


_local = threading.local()


def scratch(dtype: np.dtype) -> _Scratch:
    """This thread's chunk buffers of ``dtype``, kept between calls."""
    cache = _local.__dict__.setdefault("scratch", {})
    sc = cache.get(dtype)
    if sc is None:
        sc = cache[dtype] = _Scratch(dtype)
    return sc


def _sums64(ac: np.ndarray, bc: np.ndarray, sums: bool) -> tuple[float, float, float, float]:
    """``(sum|a-b|, sum (a-b)^2, sum a^2, sum b^2)`` of finite values in float64: for the rare
    chunk whose sums leave float32's range."""
    a64, b64 = ac.astype(np.float64), bc.astype(np.float64)
    d64 = np.abs(a64 - b64)
    aa, bb = (float(np.dot(a64, a64)), float(np.dot(b64, b64))) if sums else (0.0, 0.0)
    return float(d64.sum()), float(np.dot(d64, d64)), aa, bb


def _underflow32(ac: np.ndarray, bc: np.ndarray, s: float, dd: float, aa: float, bb: float, sums: bool) -> bool:
    """Whether a float32 chunk's sums of squares lost their precision to underflow: a sum below
    ``TINY32`` of values that are not all zero (squares of values below ~1e-19 are subnormal or 0)."""
    if dd < TINY32 and s > 0:
        return True
    return sums and ((aa < TINY32 and (aa > 0 or bool(ac.any()))) or (bb < TINY32 and (bb > 0 or bool(bc.any()))))


def _finish(acc: Acc, ac: np.ndarray, bc: np.ndarray, r: _Rows, s: float, tol: TensorTolerance,
            sums: bool) -> None:
    """Fold a chunk of values finite on both sides whose |a-b| is in ``r.d`` (sum ``s``)."""
    d = r.d
    dd = float(np.dot(d, d))  # BLAS: one pass each, faster than the ndarray reductions
    aa, bb = (float(np.dot(ac, ac)), float(np.dot(bc, bc))) if sums else (0.0, 0.0)
    if not math.isfinite(s + dd + aa + bb) or (
            d.dtype == np.float32 and min(dd, aa if sums else 1.0, bb if sums else 1.0) < TINY32
            and _underflow32(ac, bc, s, dd, aa, bb, sums)):  # squares past float32's range
        s, dd, aa, bb = _sums64(ac, bc, sums)
    acc.s += s
    acc.dd += dd
    acc.aa += aa
    acc.bb += bb
    u = np.abs(ac, out=r.u)
    np.divide(d, u, out=r.t)  # |d|/|a|: 0/0 -> NaN (skipped by fmax), d/0 -> inf
    mx, rel = np.fmax.reduce(r.dt, axis=1).tolist()
    if mx > acc.mx:
        acc.mx = mx
    if rel > acc.rel:
        acc.rel = rel
    # An element breaks atol + rtol|a| only if |d| > atol and |d|/|a| > rtol (atol >= 0): count
    # them only when the chunk may hold one (1e-6: margin for the rounding of d/|a| and rtol|a|).
    if mx > tol.atol and rel >= tol.rtol * (1.0 - 1e-6):
        atol = d.dtype.type(tol.atol)
        if tol.rtol:
            u *= tol.rtol
            if tol.atol:
                u += atol
            bad = np.greater(d, u, out=r.m)
        else:  # rtol|a| + atol is atol for every finite a
            bad = np.greater(d, atol, out=r.m)
        acc.bad += int(np.count_nonzero(bad))
    acc.n += d.size


def _fold(acc: Acc, ac: np.ndarray, bc: np.ndarray, tol: TensorTolerance, sums: bool, sc: _Scratch) -> None:
    """Fold one chunk into ``acc``: |a-b| once into the scratch rows, its sum by BLAS, and the
    NaN/Inf-aware path only when that sum is not finite (a NaN or Inf on either side makes it so)."""
    r = sc.rows(ac.size)
    d = np.subtract(ac, bc, out=r.d)
    np.abs(d, out=d)
    s = float(np.dot(d, r.ones))
    if math.isfinite(s):
        _finish(acc, ac, bc, r, s, tol, sums)
        return
    na, nb = np.isnan(ac), np.isnan(bc)
    acc.nan_mis += int(np.count_nonzero(na != nb))
    acc.nan_both += int(np.count_nonzero(na & nb))
    acc.inf_mis += int(np.count_nonzero((ac == np.inf) != (bc == np.inf)))
    acc.inf_mis += int(np.count_nonzero((ac == -np.inf) != (bc == -np.inf)))
    both = np.isfinite(ac) & np.isfinite(bc)
    if not both.any():
        return
    a2, b2 = (ac, bc) if both.all() else (ac[both], bc[both])
    r = sc.rows(a2.size)
    d = np.subtract(a2, b2, out=r.d)
    np.abs(d, out=d)
    if math.isfinite(float(d.max())):
        _finish(acc, a2, b2, r, float(np.dot(d, r.ones)), tol, sums)
    else:  # finite inputs whose difference overflows the dtype: redo in float64
        a3, b3 = a2.astype(np.float64), b2.astype(np.float64)
        r3 = _Scratch(np.dtype(np.float64), a3.size).full
        np.abs(np.subtract(a3, b3, out=r3.d), out=r3.d)
        _finish(acc, a3, b3, r3, float(r3.d.sum()), tol, sums)


def widen(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``x`` converted exactly into ``out`` (the working dtype): float16 by bit arithmetic, which
    is ~8x faster here than numpy's cast."""
    if x.dtype == np.float16 and out.dtype == np.float32:
        return widen_float16(x, out)
    np.copyto(out, x, casting="unsafe")
    return out


def accumulate(fa: np.ndarray, fb: np.ndarray, lo: int, hi: int, tol: TensorTolerance, sums: bool,
                work: np.dtype) -> Acc:
    """Fold elements ``[lo, hi)`` chunk by chunk into a fresh accumulator."""
    acc = Acc()
    sc = scratch(work)
    wa, wb = fa.dtype == work, fb.dtype == work
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i in range(lo, hi, CHUNK):
            j = min(i + CHUNK, hi)
            ac = fa[i:j] if wa else widen(fa[i:j], sc.a[: j - i])
            bc = fb[i:j] if wb else widen(fb[i:j], sc.b[: j - i])
            _fold(acc, ac, bc, tol, sums, sc)
    return acc


def dot_finite(fa: np.ndarray, fb: np.ndarray, work: np.dtype) -> float:
    """``sum a*b`` over the elements finite on both sides, in float64 chunk by chunk."""
    sc = scratch(work)
    total = 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        for i in range(0, fa.size, CHUNK):
            j = min(i + CHUNK, fa.size)
            ac = widen(fa[i:j], sc.a[: j - i]).astype(np.float64)
            bc = widen(fb[i:j], sc.b[: j - i]).astype(np.float64)
            both = np.isfinite(ac) & np.isfinite(bc)
            total += float(np.dot(ac, bc)) if both.all() else float(np.dot(ac[both], bc[both]))
    return total

