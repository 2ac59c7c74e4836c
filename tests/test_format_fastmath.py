"""The fast numeric paths against the numpy reference definitions they replace: float16
widening by bit arithmetic, the writer's statistics (SPEC.md §4.4) and the differ's value
metrics (differ/metrics.py's definitions), ties, NaN, ±Inf, subnormals and huge values included."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from steptrace.differ import TensorTolerance, compare_values
from steptrace.tracefmt import compute_stats
from steptrace.tracefmt.dtypes import widen_float16
from steptrace.tracefmt.payload import compute_stats_many


def test_widen_float16_is_exact_for_every_bit_pattern():
    h = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    want = h.astype(np.float32)
    got = widen_float16(h)
    nan = np.isnan(want)
    np.testing.assert_array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all()
    out = np.empty(1 << 16, np.int32)
    assert widen_float16(h.reshape(256, 256), out).shape == (256, 256)


def _reference_stats(x: np.ndarray) -> dict:
    """SPEC.md §4.4 in plain float64 numpy."""
    f = x.astype(np.float64).reshape(-1)
    fin = f[np.isfinite(f)]
    out = {"numel": f.size, "nan": int(np.isnan(f).sum()), "inf": int(np.isinf(f).sum())}
    if fin.size:
        out.update(min=fin.min(), max=fin.max(), mean=fin.mean(), std=fin.std(), l2=math.sqrt(float((fin * fin).sum())))
    return out


F16 = hnp.arrays(np.float16, st.integers(0, 3000), elements=st.one_of(
    st.floats(width=16, allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 6e-8, -6e-8, 65504.0])))


@settings(max_examples=150, deadline=None)
@given(x=F16)
def test_float16_statistics_match_the_reference(x):
    got = compute_stats(x, "float16")
    ref = _reference_stats(x)
    assert (got.numel, got.nan_count, got.inf_count) == (ref["numel"], ref["nan"], ref["inf"])
    if "min" not in ref:
        assert got.min is None and got.max is None
        return
    assert (got.min, got.max) == (ref["min"], ref["max"])
    for k in ("mean", "std", "l2"):
        assert math.isclose(getattr(got, k), ref[k], rel_tol=1e-9, abs_tol=1e-9 * max(abs(ref["min"]), abs(ref["max"]))), k
    many = compute_stats_many([x, x[: len(x) // 2]], ["float16", "float16"])[0]
    assert (many.min, many.max, many.nan_count, many.inf_count) == (got.min, got.max, got.nan_count, got.inf_count)


def _reference_metrics(a: np.ndarray, b: np.ndarray, atol: float, rtol: float) -> dict:
    """differ/metrics.py's definitions in float64 numpy, over elements finite on both sides."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    both = np.isfinite(a64) & np.isfinite(b64)
    x, y = a64[both], b64[both]
    d = np.abs(x - y)
    out = {"n": int(both.sum()),
           "nan_mismatch": int((np.isnan(a64) != np.isnan(b64)).sum()),
           "inf_mismatch": int(((a64 == np.inf) != (b64 == np.inf)).sum() + ((a64 == -np.inf) != (b64 == -np.inf)).sum())}
    if d.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            rel = d / np.abs(x)
        out.update(max_abs=d.max(), mean_abs=d.mean(), max_rel=np.nanmax(rel) if (~np.isnan(rel)).any() else 0.0,
                   bad=int((d > atol + rtol * np.abs(x)).sum()))
    return out


@st.composite
def pairs(draw):
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    n = draw(st.integers(1, 70000))  # past one chunk (32,768 elements)
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * draw(st.sampled_from([1e-3, 1.0, 300.0]))).astype(dtype)
    noise = draw(st.sampled_from([0.0, 1e-6, 1e-3, 0.1]))
    b = (a.astype(np.float64) * (1 + noise * rng.standard_normal(n))).astype(dtype)
    for _ in range(draw(st.integers(0, 4))):  # zeros, NaN, Inf on either side
        i = int(rng.integers(0, n))
        special = draw(st.sampled_from([0.0, np.nan, np.inf, -np.inf]))
        (a if draw(st.booleans()) else b)[i] = special
    return a, b


@settings(max_examples=80, deadline=None)
@given(ab=pairs(), atol=st.sampled_from([0.0, 1e-6, 1e-3]), rtol=st.sampled_from([0.0, 1e-6, 1e-3, 0.05]))
def test_value_metrics_match_the_reference(ab, atol, rtol):
    a, b = ab
    m = compare_values(a, b, TensorTolerance(atol=atol, rtol=rtol), bitexact=False)
    ref = _reference_metrics(a, b, atol, rtol)
    assert (m.nan_mismatch, m.inf_mismatch) == (ref["nan_mismatch"], ref["inf_mismatch"])
    if not ref["n"]:
        assert m.max_abs is None
        return
    assert m.max_abs == pytest.approx(ref["max_abs"], rel=1e-6, abs=1e-30)
    assert m.mean_abs == pytest.approx(ref["mean_abs"], rel=1e-4, abs=1e-30)
    assert m.max_rel == pytest.approx(ref["max_rel"], rel=1e-6, abs=1e-30)
    # the threshold is computed in the working dtype (float32): elements at the boundary may differ
    assert abs(m.bad - ref["bad"]) <= max(1, ref["bad"] // 1000)
