"""The tensor metrics as differ/metrics.py computed them before the single-pass rewrite (issue 14),
kept verbatim as the reference the rewrite is tested against (tests/test_differ_metrics_onepass.py).
Only the entry point is renamed (``legacy_compare_values``); the result type, the tolerance check
and the shape rule are the shipped ones.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from steptrace.differ.metrics import BASIS_VALUES, TensorMetrics, judge, squeeze_shape
from steptrace.differ.policy import TensorTolerance
from steptrace.tracefmt.dtypes import widen_float16

#: Elements per chunk: two inputs and two float32 scratch buffers stay in L2 cache.
CHUNK = 1 << 15
#: Tensors with at least this many elements are split over threads when asked.
PARALLEL_MIN = 1 << 18


def _work_dtype(a: np.ndarray, b: np.ndarray) -> np.dtype:
    if a.dtype == np.float64 or b.dtype == np.float64 or a.dtype.kind in "iub" or b.dtype.kind in "iub":
        return np.dtype(np.float64)
    return np.dtype(np.float32)


class _Acc:
    """Running sums of one comparison."""

    __slots__ = ("mx", "s", "dd", "aa", "bb", "ab", "rel", "bad", "n", "nan_mis", "inf_mis", "nan_both")

    def __init__(self) -> None:
        self.mx = self.s = self.dd = self.aa = self.bb = self.ab = self.rel = 0.0
        self.bad = self.n = self.nan_mis = self.inf_mis = self.nan_both = 0

    def merge(self, o: _Acc) -> None:
        """Add another accumulator's sums (the two covered disjoint ranges)."""
        self.mx, self.rel = max(self.mx, o.mx), max(self.rel, o.rel)
        for k in ("s", "dd", "aa", "bb", "ab", "bad", "n", "nan_mis", "inf_mis", "nan_both"):
            setattr(self, k, getattr(self, k) + getattr(o, k))


class _Scratch:
    """Reusable chunk buffers (fresh memory is slow to touch; reuse it)."""

    def __init__(self, dtype: np.dtype, size: int = CHUNK) -> None:
        self.d = np.empty(size, dtype)
        self.t = np.empty(size, dtype)
        self.u = np.empty(size, dtype)
        self.m = np.empty(size, bool)
        self.ones = np.ones(size, dtype)
        self.a = np.empty(size, dtype)  # inputs widened to the working dtype
        self.b = np.empty(size, dtype)


_local = threading.local()


def _scratch(dtype: np.dtype) -> _Scratch:
    """This thread's chunk buffers of ``dtype``, kept between calls."""
    cache = _local.__dict__.setdefault("scratch", {})
    sc = cache.get(dtype)
    if sc is None:
        sc = cache[dtype] = _Scratch(dtype)
    return sc


def _finish(acc: _Acc, ac: np.ndarray, bc: np.ndarray, d: np.ndarray, m: float, tol: TensorTolerance,
            sums: bool, sc: _Scratch) -> None:
    """Fold a chunk whose |a-b| (``d``, max ``m``) is finite everywhere."""
    n = ac.size
    ones = sc.ones[:n]
    acc.mx = max(acc.mx, m)
    acc.s += float(np.dot(d, ones))  # BLAS: 3x faster than ndarray.sum on float32
    acc.dd += float(np.dot(d, d))
    if sums:
        acc.aa += float(np.dot(ac, ac))
        acc.bb += float(np.dot(bc, bc))
    u = np.abs(ac, out=sc.u[:n])
    t = np.divide(d, u, out=sc.t[:n])  # |d|/|a|: 0/0 -> NaN (skipped by fmax), d/0 -> inf
    r = float(np.fmax.reduce(t))
    if r > acc.rel:
        acc.rel = r
    # An element breaks atol + rtol|a| only if |d| > atol and |d|/|a| > rtol (atol >= 0): count
    # them only when the chunk may hold one (1e-6: margin for the rounding of d/|a| and rtol|a|).
    if m > tol.atol and r >= tol.rtol * (1.0 - 1e-6):
        u *= tol.rtol
        u += tol.atol
        acc.bad += int(np.count_nonzero(np.greater(d, u, out=sc.m[:n])))
    acc.n += n


def _fold(acc: _Acc, ac: np.ndarray, bc: np.ndarray, tol: TensorTolerance, sums: bool, sc: _Scratch) -> None:
    """Fold one chunk into ``acc``, taking the slow path only where non-finite values occur."""
    if not ac.size:
        return
    d = np.subtract(ac, bc, out=sc.d[: ac.size])
    np.abs(d, out=d)
    m = float(d.max())  # NaN propagates; any Inf or NaN on either side makes m non-finite
    if math.isfinite(m):
        _finish(acc, ac, bc, d, m, tol, sums, sc)
        return
    na, nb = np.isnan(ac), np.isnan(bc)
    acc.nan_mis += int(np.count_nonzero(na != nb))
    acc.nan_both += int(np.count_nonzero(na & nb))
    acc.inf_mis += int(np.count_nonzero((ac == np.inf) != (bc == np.inf)))
    acc.inf_mis += int(np.count_nonzero((ac == -np.inf) != (bc == -np.inf)))
    both = np.isfinite(ac) & np.isfinite(bc)
    if both.any():
        a2, b2 = ac[both], bc[both]
        d2 = np.abs(a2 - b2)
        m2 = float(d2.max())
        if math.isfinite(m2):
            _finish(acc, a2, b2, d2, m2, tol, sums, sc)
        else:  # finite inputs whose difference overflows the dtype: redo in float64
            a3, b3 = a2.astype(np.float64), b2.astype(np.float64)
            d3 = np.abs(a3 - b3)
            _finish(acc, a3, b3, d3, float(d3.max()), tol, sums, _Scratch(np.dtype(np.float64), a3.size))


def _widen(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``x`` converted exactly into ``out`` (the working dtype): float16 by bit arithmetic, which
    is ~8x faster here than numpy's cast."""
    if x.dtype == np.float16 and out.dtype == np.float32:
        return widen_float16(x, out)
    np.copyto(out, x, casting="unsafe")
    return out


def _accumulate(fa: np.ndarray, fb: np.ndarray, lo: int, hi: int, tol: TensorTolerance, sums: bool,
                work: np.dtype) -> _Acc:
    """Fold elements ``[lo, hi)`` chunk by chunk into a fresh accumulator."""
    acc = _Acc()
    sc = _scratch(work)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for i in range(lo, hi, CHUNK):
            j = min(i + CHUNK, hi)
            ac, bc = fa[i:j], fb[i:j]
            if ac.dtype != work:
                ac = _widen(fa[i:j], sc.a[: j - i])
            if bc.dtype != work:
                bc = _widen(fb[i:j], sc.b[: j - i])
            _fold(acc, ac, bc, tol, sums, sc)
    return acc


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="steptrace-metrics")
    return _pools[threads]


def legacy_compare_values(
    a: np.ndarray,
    b: np.ndarray,
    tol: TensorTolerance,
    *,
    bitexact: bool | None = None,
    sumsq: tuple[float | None, float | None] = (None, None),
    threads: int = 1,
) -> TensorMetrics:
    """Compare two tensors' values under ``tol``.

    Args:
        a: reference values (any SPEC.md dtype; bfloat16 already widened to float32).
        b: candidate values; shapes must agree up to size-1 dimensions.
        tol: the tolerance to judge by.
        bitexact: known from digests; computed from the bytes when None.
        sumsq: ``(sum a^2, sum b^2)`` over finite elements when known (from the trace's ``l2``
            statistics), which saves two passes; computed when None.
        threads: split tensors of at least ``PARALLEL_MIN`` elements over this many threads
            (numpy releases the GIL); keep 1 inside worker processes.

    Returns:
        The :class:`TensorMetrics` with ``basis = "values"``.
    """
    shape_mismatch = squeeze_shape(a.shape) != squeeze_shape(b.shape)
    dtype_mismatch = a.dtype != b.dtype
    if shape_mismatch:
        return TensorMetrics(BASIS_VALUES, False, False, "shape", numel=int(a.size), shape_mismatch=True,
                             dtype_mismatch=dtype_mismatch)
    if bitexact is None:
        bitexact = not dtype_mismatch and a.shape == b.shape and a.tobytes() == b.tobytes()
    fa, fb = np.ascontiguousarray(a).reshape(-1), np.ascontiguousarray(b).reshape(-1)
    work = _work_dtype(fa, fb)
    sums = sumsq[0] is None or sumsq[1] is None
    n = fa.size
    if threads > 1 and n >= PARALLEL_MIN:
        bounds = np.linspace(0, n, threads + 1).astype(np.int64) // CHUNK * CHUNK
        bounds[-1] = n
        jobs = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        accs = list(_pool(threads).map(lambda r: _accumulate(fa, fb, r[0], r[1], tol, sums, work), jobs))
        acc = accs[0]
        for other in accs[1:]:
            acc.merge(other)
    else:
        acc = _accumulate(fa, fb, 0, n, tol, sums, work)
    aa, bb = (acc.aa, acc.bb) if sums else (float(sumsq[0]), float(sumsq[1]))
    dd = acc.dd
    if acc.n:
        mean_abs = acc.s / acc.n
        ab = (aa + bb - dd) / 2.0
        cosine = ab / math.sqrt(aa * bb) if aa > 0 and bb > 0 else (1.0 if aa == bb == 0 else 0.0)
        cosine = max(-1.0, min(1.0, cosine))
        sqnr = math.inf if dd == 0 else (10.0 * math.log10(aa / dd) if aa > 0 else -math.inf)
        max_abs, max_rel = acc.mx, acc.rel
    else:
        mean_abs = max_abs = max_rel = cosine = sqnr = None
    reason = None
    if not bitexact:
        reason = judge(tol, numel=n, bad=acc.bad, max_abs=max_abs, mean_abs=mean_abs, cosine=cosine,
                       sqnr_db=sqnr, nan_mismatch=acc.nan_mis, inf_mismatch=acc.inf_mis,
                       nan_both=acc.nan_both, shape_mismatch=False)
    return TensorMetrics(
        BASIS_VALUES, bool(bitexact), reason is None, reason,
        max_abs=max_abs, mean_abs=mean_abs, max_rel=max_rel, cosine=cosine, sqnr_db=sqnr, bad=acc.bad,
        numel=int(n), nan_mismatch=acc.nan_mis, inf_mismatch=acc.inf_mis, dtype_mismatch=dtype_mismatch,
    )
