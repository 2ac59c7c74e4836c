"""Tensor comparison metrics: computed from values when both sides recorded them, vectorised
numpy in cache-sized chunks; the statistics-only path lives in :mod:`steptrace.differ.tensors`.

Definitions (a = reference, b = candidate, over elements finite on both sides):
``max_abs = max|a-b|``, ``mean_abs = mean|a-b|``, ``max_rel = max(|a-b| / |a|)`` (elements with a = b = 0 skipped;
inf where a = 0 != b), ``cosine = a.b / (|a| |b|)``,
``sqnr_db = 10 log10(sum a^2 / sum (a-b)^2)`` (inf when equal), ``bad`` = elements with
``|a-b| > atol + rtol |a|``. NaN/Inf that sit at different places are counted in
``nan_mismatch`` / ``inf_mismatch``.

Precision: values compare in the working dtype (float32 for float16/float32 pairs, float64 when
either side is float64 or an integer). ``max_abs``, ``max_rel`` and ``bad`` are exact in it
(``|a-b|`` and ``|a-b|/|a|`` rounded once, the threshold ``atol + rtol|a|`` rounded as written);
a difference past the dtype's range is taken in float64. The sums behind ``mean_abs``,
``cosine`` and ``sqnr_db`` are BLAS dot products in the working dtype per chunk, added in
float64 (float64 for a chunk whose sums overflow or underflow float32); ``a.b`` is
``(sum a^2 + sum b^2 - sum (a-b)^2) / 2`` when ``sum a^2`` and ``sum b^2`` are within 4x of each
other, else a float64 pass of its own (the difference would cancel).

Two implementations fold the chunks, chosen by :mod:`steptrace.differ.kernelpolicy`
(``STEPTRACE_KERNEL``). :mod:`steptrace.differ.onepass` (numpy, always there), per chunk of values
finite on both sides: ``a-b`` once into a reused buffer and ``|.|`` in place, ``sum|a-b|`` by BLAS
(not finite: some value is NaN or Inf, and the chunk takes the NaN-aware path), ``sum (a-b)^2``,
``sum a^2``, ``sum b^2`` by BLAS, ``|a|``, ``|a-b|/|a|``, both maxima in one reduction, and the
tolerance count only when the chunk can hold an element beyond it. :mod:`steptrace.differ.kernel`
(compiled by numba, the ``fast`` extra): one loop per chunk for all of it, ``sum ab`` included;
its sums run in the working dtype over blocks of 256 elements, added in float64 (element by
element in float64 for a chunk whose float32 sums leave float32's range). ``max_abs``,
``max_rel`` and ``bad`` are the same in both; the sums agree within the precision above.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


from .kernelpolicy import accumulator, use_kernel
from .onepass import CHUNK, dot_finite, work_dtype
from .policy import TensorTolerance

#: Tensors with at least this many elements are split over threads when asked.
PARALLEL_MIN = 1 << 18

#: Where a comparison's numbers come from.
BASIS_DIGEST = "digest"  # bit-identical by digest: every error is 0, no values needed
BASIS_VALUES = "values"  # exact metrics from both sides' values
BASIS_STATS = "stats"  # from statistics only: max_abs / mean_abs are lower bounds


@dataclass(frozen=True)
class TensorMetrics:
    """How two recordings of one tensor compare.

    Attributes:
        basis: ``digest``, ``values`` or ``stats`` (see module docstring); with ``stats``,
            ``max_abs`` and ``mean_abs`` are lower bounds and ``cosine``/``sqnr_db`` are None.
        bitexact: equal digests (or bytes) with equal dtype and shape; None when unknown.
        within: inside the tolerance the policy gives this tensor.
        reason: the first check that failed (``elements``, ``nan``, ``inf``, ``shape``,
            ``max_abs``, ``mean_abs``, ``cosine``, ``sqnr_db``), None when within.
    """

    basis: str
    bitexact: bool | None
    within: bool
    reason: str | None = None
    max_abs: float | None = None
    mean_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    bad: int | None = None
    numel: int = 0
    nan_mismatch: int = 0
    inf_mismatch: int = 0
    shape_mismatch: bool = False
    dtype_mismatch: bool = False

    def __str__(self) -> str:
        if self.bitexact:
            return "bit-exact"
        parts = [("within" if self.within else f"BEYOND ({self.reason})"), f"[{self.basis}]"]
        lb = "≥" if self.basis == BASIS_STATS else "="
        for k in ("max_abs", "mean_abs", "max_rel"):
            v = getattr(self, k)
            if v is not None:
                parts.append(f"{k}{lb}{v:.3g}")
        if self.cosine is not None:
            parts.append(f"cos={self.cosine:.6f}")
        if self.sqnr_db is not None:
            parts.append(f"sqnr={self.sqnr_db:.1f}dB")
        if self.nan_mismatch or self.inf_mismatch:
            parts.append(f"nan≠{self.nan_mismatch} inf≠{self.inf_mismatch}")
        if self.shape_mismatch:
            parts.append("shape≠")
        return " ".join(parts)

    def to_json(self) -> dict[str, Any]:
        """Return the metrics as a JSON object (non-finite floats as strings "inf", "nan")."""
        return {k: json_float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def json_float(v: float | None) -> float | str | None:
    """Return ``v`` for JSON: finite floats as they are, non-finite as ``"inf"``/``"-inf"``/``"nan"``."""
    if v is None or math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")


def squeeze_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Return ``shape`` without size-1 dimensions ([1, 48, 1024] and [48, 1024] compare)."""
    return tuple(s for s in shape if s != 1)


def judge(
    tol: TensorTolerance,
    *,
    numel: int,
    bad: int | None,
    max_abs: float | None,
    mean_abs: float | None,
    cosine: float | None,
    sqnr_db: float | None,
    nan_mismatch: int,
    inf_mismatch: int,
    nan_both: int,
    shape_mismatch: bool,
) -> str | None:
    """Return the first tolerance check that fails, or None when all pass."""
    if shape_mismatch:
        return "shape"
    if nan_mismatch or (nan_both and not tol.nan_equal):
        return "nan"
    if inf_mismatch:
        return "inf"
    if bad is not None and bad > tol.bad_fraction * numel:
        return "elements"
    if tol.max_abs is not None and max_abs is not None and max_abs > tol.max_abs:
        return "max_abs"
    if tol.mean_abs is not None and mean_abs is not None and mean_abs > tol.mean_abs:
        return "mean_abs"
    if tol.cosine_min is not None and cosine is not None and not cosine >= tol.cosine_min:
        return "cosine"
    if tol.sqnr_db_min is not None and sqnr_db is not None and not sqnr_db >= tol.sqnr_db_min:
        return "sqnr_db"
    return None


_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="steptrace-metrics")
    return _pools[threads]


def compare_values(
    a: np.ndarray,
    b: np.ndarray,
    tol: TensorTolerance,
    *,
    bitexact: bool | None = None,
    sumsq: tuple[float | None, float | None] = (None, None),
    threads: int = 1,
    kernel: bool | None = None,
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
            (numpy and the compiled kernel release the GIL); keep 1 inside worker processes.
        kernel: fold with the compiled kernel (True) or with numpy (False); None decides by
            :func:`~steptrace.differ.kernelpolicy.use_kernel` for this tensor's elements.

    Returns:
        The :class:`TensorMetrics` with ``basis = "values"``.

    Raises:
        KernelError: ``STEPTRACE_KERNEL`` asks for numba where it cannot be used.
    """
    shape_mismatch = a.shape != b.shape and squeeze_shape(a.shape) != squeeze_shape(b.shape)
    dtype_mismatch = a.dtype != b.dtype
    if shape_mismatch:
        return TensorMetrics(BASIS_VALUES, False, False, "shape", numel=int(a.size), shape_mismatch=True,
                             dtype_mismatch=dtype_mismatch)
    fa, fb = a.reshape(-1), b.reshape(-1)
    work = work_dtype(fa, fb)
    sums = sumsq[0] is None or sumsq[1] is None
    n = fa.size
    accumulate = accumulator(use_kernel(n) if kernel is None else kernel)
    if threads > 1 and n >= PARALLEL_MIN:
        bounds = np.linspace(0, n, threads + 1).astype(np.int64) // CHUNK * CHUNK
        bounds[-1] = n
        jobs = [(int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]
        accs = list(_pool(threads).map(lambda r: accumulate(fa, fb, r[0], r[1], tol, sums, work), jobs))
        acc = accs[0]
        for other in accs[1:]:
            acc.merge(other)
    else:
        acc = accumulate(fa, fb, 0, n, tol, sums, work)
    if bitexact is None:  # equal bytes need equal values: compare bytes only when no value differs
        bitexact = (not dtype_mismatch and a.shape == b.shape and acc.mx == 0 and not acc.nan_mis
                    and not acc.inf_mis and a.tobytes() == b.tobytes())
    aa, bb = (acc.aa, acc.bb) if sums else (float(sumsq[0]), float(sumsq[1]))
    dd = acc.dd
    if acc.n:
        mean_abs = acc.s / acc.n
        # (sum a^2 + sum b^2 - sum (a-b)^2) / 2 keeps a cosine near 1 to a few ulps of 1 - cos, but
        # cancels when |a| and |b| differ in scale: there sum a*b is taken in a pass of its own
        if aa > 0 and bb > 0:
            if 0.25 * bb <= aa <= 4.0 * bb:
                ab = (aa + bb - dd) / 2.0
            else:
                ab = acc.ab if acc.ab is not None else dot_finite(fa, fb, work)
            cosine = max(-1.0, min(1.0, ab / (math.sqrt(aa) * math.sqrt(bb))))
        else:
            cosine = 1.0 if aa == bb == 0 else 0.0
        sqnr = math.inf if dd == 0 else (10.0 * (math.log10(aa) - math.log10(dd)) if aa > 0 else -math.inf)
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
