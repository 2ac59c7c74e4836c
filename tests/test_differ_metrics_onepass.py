"""``compare_values`` (one pass over each chunk's differences) against two references.

1. ``legacy_compare_values`` (tests/metrics_legacy.py): the implementation before the rewrite,
   kept verbatim. Same chunking and the same BLAS calls per chunk, so every field agrees
   exactly, except where the legacy code's float32 sums overflowed (it reported inf/NaN there,
   the rewrite takes that chunk's sums in float64) and the cosine's last bits (the rewrite
   divides by ``sqrt(aa) * sqrt(bb)``, which cannot overflow, not by ``sqrt(aa * bb)``).
2. ``definitions``: whole-array numpy, one expression per quantity as docs/differ.md §5 and the
   metrics module docstring define them, sums in float64: ``max_abs``, ``max_rel`` and ``bad``
   exactly in the working dtype, the sums within the documented precision.

Inputs cover NaN/Inf on either side at random places, zeros of both signs, subnormals, values
whose difference or squares overflow float32, empty and 0-d tensors, size-1 dimensions,
float16/float32/float64, integers and bool, and mixed dtypes; sizes cross chunk boundaries.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from metrics_legacy import legacy_compare_values

from steptrace.differ import TensorTolerance, compare_values
from steptrace.differ.metrics import CHUNK, PARALLEL_MIN, TensorMetrics

DTYPES = ["float16", "float32", "float64", "int8", "int32", "int64", "uint8", "bool"]
PAIRS = [(d, d) for d in DTYPES] + [("float32", "float16"), ("float16", "float32"), ("float32", "float64"),
                                    ("float64", "float16"), ("int32", "float32"), ("float16", "int8"),
                                    ("int64", "float64"), ("bool", "float32")]
SIZES = [0, 1, 2, 7, 100, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5, 70_000]
EXACT = ("basis", "within", "reason", "max_abs", "max_rel", "bad", "numel", "nan_mismatch", "inf_mismatch",
         "shape_mismatch", "dtype_mismatch", "bitexact")


def work_dtype(a: np.ndarray, b: np.ndarray) -> type:
    floats64 = {a.dtype, b.dtype} & {np.dtype(np.float64)}
    return np.float64 if floats64 or a.dtype.kind in "iub" or b.dtype.kind in "iub" else np.float32


def definitions(a: np.ndarray, b: np.ndarray, tol: TensorTolerance) -> dict:
    """The metrics from their definitions, whole-array (sums in float64)."""
    work = work_dtype(a, b)
    fa, fb = a.reshape(-1).astype(work), b.reshape(-1).astype(work)
    na, nb = np.isnan(fa), np.isnan(fb)
    out = {
        "nan_mismatch": int((na != nb).sum()),
        "inf_mismatch": int(((fa == np.inf) != (fb == np.inf)).sum() + ((fa == -np.inf) != (fb == -np.inf)).sum()),
        "n": 0,
    }
    fin = np.isfinite(fa) & np.isfinite(fb)
    x, y = fa[fin], fb[fin]
    if not x.size:
        return out
    with np.errstate(all="ignore"):
        d = np.abs(x - y)
        if not np.isfinite(d).all():  # the difference overflows the working dtype: float64
            x, y = x.astype(np.float64), y.astype(np.float64)
            d = np.abs(x - y)
        rel = np.fmax.reduce(d / np.abs(x))  # 0/0 skipped; only 0/0 gives NaN: 0
        bad = int((d > (np.abs(x) * x.dtype.type(tol.rtol) + x.dtype.type(tol.atol))).sum())
    x64, y64, d64 = x.astype(np.float64), y.astype(np.float64), d.astype(np.float64)
    aa, bb, dd = float(x64 @ x64), float(y64 @ y64), float(d64 @ d64)
    out.update(n=int(x.size), max_abs=float(d.max()), max_rel=0.0 if np.isnan(rel) else float(rel), bad=bad,
               mean_abs=float(d64.mean()), aa=aa, bb=bb, dd=dd,
               cosine=float(x64 @ y64) / math.sqrt(aa * bb) if aa > 0 and bb > 0 else None,
               sqnr_db=math.inf if dd == 0 else (10 * math.log10(aa / dd) if aa > 0 else -math.inf))
    return out


def fill(rng: np.random.Generator, n: int, dtype: str, scale: float) -> np.ndarray:
    if dtype == "bool":
        return rng.random(n) < 0.5
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        lo, hi = max(info.min, -(1 << 40)), min(info.max, 1 << 40)
        return rng.integers(lo, hi, n, endpoint=True).astype(dtype)
    with np.errstate(over="ignore"):
        return (rng.standard_normal(n) * scale).astype(dtype)


SPECIALS = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, 5e-324, 3e38, -3e38, 65504.0, 1e20]


@st.composite
def value_pairs(draw) -> tuple[np.ndarray, np.ndarray]:
    da, db = draw(st.sampled_from(PAIRS))
    n = draw(st.sampled_from(SIZES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 300.0, 1e20]))
    a = fill(rng, n, da, scale)
    how = draw(st.sampled_from(["noise", "copy", "independent", "zeros"]))
    with np.errstate(all="ignore"):
        if how == "copy":
            b = a.astype(db)
        elif how == "independent":
            b = fill(rng, n, db, scale)
        elif how == "zeros":
            a[rng.random(n) < 0.3] = 0
            b = np.where(rng.random(n) < 0.5, a, 0).astype(db)
        else:
            noise = draw(st.sampled_from([1e-7, 1e-3, 0.1]))
            b = (a.astype(np.float64) * (1 + noise * rng.standard_normal(n))).astype(db)
    for _ in range(draw(st.integers(0, 6)) if n else 0):  # NaN, Inf, zeros, extremes on either side
        x = a if draw(st.booleans()) else b
        if x.dtype.kind == "f":
            with np.errstate(over="ignore"):
                x[int(rng.integers(0, n))] = draw(st.sampled_from(SPECIALS))
    shape = draw(st.sampled_from(["flat", "unit", "2d"]))
    if shape == "unit":
        a, b = a.reshape(1, n), b.reshape(n, 1) if draw(st.booleans()) else b.reshape(1, n)
    elif shape == "2d" and n % 2 == 0 and n:
        a, b = a.reshape(2, n // 2), b.reshape(2, n // 2)
    return a, b


tolerances = st.builds(
    TensorTolerance,
    atol=st.sampled_from([0.0, 1e-6, 2.0**-18, 1e-3, 0.5]),
    rtol=st.sampled_from([0.0, 1e-6, 2.0**-18, 1e-2]),
    bad_fraction=st.sampled_from([0.0, 0.01, 1.0]),
    max_abs=st.sampled_from([None, 1e-3]),
    mean_abs=st.sampled_from([None, 1e-4]),
    cosine_min=st.sampled_from([None, 0.999]),
    sqnr_db_min=st.sampled_from([None, 40.0]),
    nan_equal=st.booleans(),
)


def float32_sums_out_of_range(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether a float32 chunk's sums of squares may leave float32's range (over- or underflow:
    the legacy code reported inf, NaN or 0 there; the rewrite takes them in float64)."""
    if work_dtype(a, b) is not np.float32:
        return False
    with np.errstate(all="ignore"):
        x, y = a.reshape(-1).astype(np.float32), b.reshape(-1).astype(np.float32)
        fin = np.isfinite(x) & np.isfinite(y)
        v = np.abs(np.concatenate([x[fin], y[fin], x[fin] - y[fin]]).astype(np.float64))
    v = v[v > 0]
    return bool(v.size) and (float(v.max()) > 1e17 or float(v.min()) < 1e-15)


def check_against_definitions(m: TensorMetrics, a: np.ndarray, b: np.ndarray, tol: TensorTolerance) -> None:
    ref = definitions(a, b, tol)
    assert (m.nan_mismatch, m.inf_mismatch) == (ref["nan_mismatch"], ref["inf_mismatch"])
    if m.shape_mismatch:
        return
    assert m.numel == a.size
    if not ref["n"]:
        assert m.max_abs is m.mean_abs is m.max_rel is m.cosine is m.sqnr_db is None
        return
    assert (m.max_abs, m.max_rel, m.bad) == (ref["max_abs"], ref["max_rel"], ref["bad"])
    f32 = work_dtype(a, b) is np.float32
    assert m.mean_abs == pytest.approx(ref["mean_abs"], rel=1e-4 if f32 else 1e-9, abs=1e-300)
    if ref["dd"] == 0:
        assert m.sqnr_db == math.inf
    elif ref["aa"] > 0 and math.isfinite(ref["sqnr_db"]):
        assert m.sqnr_db == pytest.approx(ref["sqnr_db"], abs=1e-3 if f32 else 1e-7)
    if ref["cosine"] is not None and math.isfinite(ref["cosine"]):
        assert m.cosine == pytest.approx(max(-1.0, min(1.0, ref["cosine"])), abs=2e-4 if f32 else 1e-9)


def assert_sqnr_agree(new: TensorMetrics, old: TensorMetrics) -> None:
    """The SQNRs agree to rounding (the rewrite subtracts logarithms, which cannot underflow)."""
    if old.sqnr_db is None or not math.isfinite(old.sqnr_db):
        assert new.sqnr_db == old.sqnr_db
    else:
        assert new.sqnr_db == pytest.approx(old.sqnr_db, rel=1e-13, abs=1e-12)


def assert_cosines_agree(new: TensorMetrics, old: TensorMetrics, a: np.ndarray, b: np.ndarray) -> None:
    """The cosines agree to rounding where the legacy formula was well conditioned (sum a^2 and
    sum b^2 within 4x); elsewhere the rewrite takes sum a*b itself (checked by the definitions)."""
    assert (new.cosine is None) == (old.cosine is None)
    ref = definitions(a, b, TensorTolerance())
    if new.cosine is not None and ref["aa"] > 0 and ref["bb"] > 0 and 0.3 * ref["bb"] <= ref["aa"] <= 3.3 * ref["bb"]:
        assert new.cosine == pytest.approx(old.cosine, rel=1e-14, abs=1e-14)


def assert_same(new: TensorMetrics, old: TensorMetrics, a: np.ndarray, b: np.ndarray) -> None:
    """Every field as the legacy code gave it: exact, the sums' results to rounding; where the
    legacy cosine cancelled (sum a^2 and sum b^2 apart in scale), the verdict may differ by it."""
    ref = definitions(a, b, TensorTolerance())
    cancelled = bool(ref["n"]) and ref["aa"] > 0 and ref["bb"] > 0 and not (
        0.3 * ref["bb"] <= ref["aa"] <= 3.3 * ref["bb"])
    for k in EXACT + ("mean_abs",):
        if cancelled and k in ("within", "reason") and "cosine" in (new.reason, old.reason):
            continue
        assert getattr(new, k) == getattr(old, k), k
    assert_sqnr_agree(new, old)
    assert_cosines_agree(new, old, a, b)


@settings(max_examples=300, deadline=None)
@given(ab=value_pairs(), tol=tolerances, known=st.sampled_from(["none", "bitexact", "sumsq"]))
def test_one_pass_matches_the_legacy_implementation(ab, tol, known):
    a, b = ab
    kw: dict = {}
    if known == "bitexact":
        kw["bitexact"] = False
    elif known == "sumsq":  # the differ passes the traces' l2 statistics when both sides are finite
        with np.errstate(all="ignore"):
            fa, fb = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
        if np.isfinite(fa).all() and np.isfinite(fb).all():
            kw["sumsq"] = (float(fa @ fa), float(fb @ fb))
    new = compare_values(a, b, tol, **kw)
    check_against_definitions(new, a, b, tol)
    try:
        old = legacy_compare_values(a, b, tol, **kw)
    except ValueError:  # log10(0): the legacy sqnr of a tiny sum a^2 over an overflowed float32 sum
        assert float32_sums_out_of_range(a, b)
        return
    if float32_sums_out_of_range(a, b):  # the legacy sums were inf/NaN/0 there: definitions decide
        assert all(getattr(new, k) == getattr(old, k) for k in ("max_abs", "max_rel", "bad", "nan_mismatch",
                                                                "inf_mismatch", "bitexact", "numel"))
        return
    assert_same(new, old, a, b)


@settings(max_examples=200, deadline=None)
@given(a=hnp.arrays(st.sampled_from([np.float16, np.float32, np.float64]), st.integers(0, 40),
                    elements=st.floats(allow_nan=True, allow_infinity=True, width=16)),
       data=st.data(), tol=tolerances)
def test_small_arrays_of_any_floats(a, data, tol):
    """Hypothesis-chosen values (shrinking to the smallest failing case): NaN, Inf, ±0, subnormals."""
    b = data.draw(hnp.arrays(a.dtype, a.shape, elements=st.floats(allow_nan=True, allow_infinity=True, width=16)))
    if data.draw(st.booleans()):
        b = np.where(data.draw(hnp.arrays(bool, a.shape)), a, b)
    new = compare_values(a, b, tol)
    old = legacy_compare_values(a, b, tol)
    check_against_definitions(new, a, b, tol)
    assert_same(new, old, a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_split_past_parallel_min(threads: int) -> None:
    rng = np.random.default_rng(7)
    n = PARALLEL_MIN + 3 * CHUNK + 11
    a = rng.standard_normal(n).astype(np.float32)
    b = (a * (1 + 1e-3 * rng.standard_normal(n))).astype(np.float32)
    a[[5, n // 2, n - 1]] = [np.nan, np.inf, 0.0]
    b[[5, n // 3, n - 2]] = [np.nan, -np.inf, 0.0]
    tol = TensorTolerance(atol=1e-4, rtol=1e-3, bad_fraction=0.5, nan_equal=True)
    new = compare_values(a, b, tol, threads=threads)
    assert_same(new, legacy_compare_values(a, b, tol, threads=threads), a, b)
    check_against_definitions(new, a, b, tol)


def test_bitexact_from_the_bytes_when_not_given() -> None:
    """Unknown bit-exactness is settled by the bytes, which are read only when no value differs."""
    t = TensorTolerance()
    a = np.array([1.0, 0.0, np.nan, np.inf, -2.5], np.float32)
    cases = {
        "same": (a, a.copy(), True),
        "signed zero": (a, np.where(a == 0, np.float32(-0.0), a), False),
        "value": (a, np.where(a == 1, np.float32(1.5), a), False),
        "nan payload": (a, a.view(np.uint32).copy().__ior__(np.where(np.isnan(a), 1, 0).astype(np.uint32))
                        .view(np.float32), False),
        "nan place": (a, np.where(a == 1, np.float32(np.nan), a), False),
        "inf sign": (a, np.where(np.isinf(a), np.float32(-np.inf), a), False),
        "dtype": (a, a.astype(np.float64), False),
        "shape": (a.reshape(1, 5), a.copy(), False),
        "int64 past 2**53": (np.array([2**60], np.int64), np.array([2**60 + 1], np.int64), False),
        "int64 same": (np.array([2**60, -3], np.int64), np.array([2**60, -3], np.int64), True),
        "empty": (np.zeros(0, np.float32), np.zeros(0, np.float32), True),
        "0-d": (np.float32(3.0) * np.ones((), np.float32), np.ones((), np.float32), False),
    }
    for name, (x, y, want) in cases.items():
        m = compare_values(x, y, t)
        assert m.bitexact is want, name
        assert_same(m, legacy_compare_values(x, y, t), x, y)


def test_sums_past_float32_range_are_taken_in_float64() -> None:
    rng = np.random.default_rng(3)
    a = (rng.standard_normal(5000) * 1e20).astype(np.float32)  # a^2 overflows float32
    b = (a.astype(np.float64) * (1 + 1e-3 * rng.standard_normal(5000))).astype(np.float32)
    tol = TensorTolerance(rtol=0.05, cosine_min=0.9999, sqnr_db_min=50.0)
    m = compare_values(a, b, tol)
    check_against_definitions(m, a, b, tol)
    assert math.isfinite(m.mean_abs) and 55 < m.sqnr_db < 65 and 0.99999 < m.cosine <= 1.0
    assert m.within
    big = np.array([3e38, -3e38, 1.0], np.float32)  # the difference itself overflows float32
    m = compare_values(big, -big, TensorTolerance())
    assert m.max_abs == pytest.approx(6e38) and m.mean_abs == pytest.approx(4e38, rel=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
def test_cosine_of_tensors_at_different_scales(dtype: str) -> None:
    """Same direction, 1000x the scale: cosine 1 (the difference of sums of squares would cancel)."""
    rng = np.random.default_rng(11)
    a = (rng.standard_normal(CHUNK + 100) * 0.01).astype(dtype)
    b = (a.astype(np.float64) * 1000).astype(dtype)
    a[3], b[7] = np.nan, np.inf  # sum a*b skips what is not finite on both sides
    m = compare_values(a, b, TensorTolerance())
    check_against_definitions(m, a, b, TensorTolerance())
    assert m.cosine == pytest.approx(1.0, abs=1e-6)
    m = compare_values(a, -b, TensorTolerance())
    assert m.cosine == pytest.approx(-1.0, abs=1e-6)


def test_tiny_values_keep_their_sums() -> None:
    """float32 values near 1e-25: their squares underflow float32, the sums are taken in float64."""
    rng = np.random.default_rng(5)
    a = (rng.standard_normal(1000) * 1e-25).astype(np.float32)
    b = (a.astype(np.float64) * (1 + 1e-2 * rng.standard_normal(1000))).astype(np.float32)
    m = compare_values(a, b, TensorTolerance(rtol=0.1))
    check_against_definitions(m, a, b, TensorTolerance(rtol=0.1))
    assert 30 < m.sqnr_db < 50 and m.cosine == pytest.approx(1.0, abs=1e-3)
