"""The compiled kernel (differ/kernel.py, numba) against the numpy path and the definitions, and
the policy that chooses between them (differ/kernelpolicy.py).

The kernel must give what the numpy path gives: ``max_abs``, ``max_rel``, ``bad``, the NaN/Inf
counts, ``numel`` and ``bitexact`` exactly; ``mean_abs``, ``cosine`` and ``sqnr_db`` within the
precision docs/differ.md §5 documents (both are checked against the whole-array float64
definitions as well). The inputs are those of tests/test_differ_metrics_onepass.py (NaN/Inf at
random places, signed zeros, subnormals, float32 overflow of the difference and of the squares,
every dtype pair, sizes across chunk boundaries). The kernel's tests skip where numba is not
installed; the policy's run everywhere.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from test_differ_metrics_onepass import EXACT, check_against_definitions, tolerances, value_pairs, work_dtype

from steptrace.differ import TensorTolerance, compare_values
from steptrace.differ import kernelpolicy
from steptrace.differ.errors import KernelError
from steptrace.differ.metrics import CHUNK, PARALLEL_MIN, TensorMetrics
from steptrace.tracefmt import TraceError, TraceWriter

needs_numba = pytest.mark.skipif(not kernelpolicy.numba_installed(),
                                 reason="numba is not installed (pip install 'steptrace[fast]'): "
                                        "the compiled kernel is not tested, the numpy path is")
SUMS = ("mean_abs", "cosine", "sqnr_db")
CAPS = {"mean_abs", "cosine", "sqnr_db"}  # the verdict checks that read a sum


def assert_kernel_agrees(k: TensorMetrics, np_: TensorMetrics, a: np.ndarray, b: np.ndarray) -> None:
    """Exact fields equal; sums close (float32: the numpy path's BLAS chunk sums are the coarser)."""
    f32 = work_dtype(a, b) is np.float32
    for f in EXACT:
        if f in ("within", "reason") and k.reason != np_.reason and {k.reason, np_.reason} <= CAPS | {None}:
            continue  # a sum on its cap's edge: both sides are checked against the definitions
        assert getattr(k, f) == getattr(np_, f), f
    for f in SUMS:
        x, y = getattr(k, f), getattr(np_, f)
        if x is None or y is None or not (math.isfinite(x) and math.isfinite(y)):
            assert x == y or (x is not None and y is not None and math.isnan(x) and math.isnan(y)), (f, x, y)
        elif f == "mean_abs":
            assert x == pytest.approx(y, rel=1e-4 if f32 else 1e-12, abs=1e-300), f
        elif f == "cosine":
            assert x == pytest.approx(y, abs=2e-4 if f32 else 1e-9), f
        else:
            assert x == pytest.approx(y, abs=1e-3 if f32 else 1e-7), f


@needs_numba
@settings(max_examples=300, deadline=None)
@given(ab=value_pairs(), tol=tolerances, known=st.sampled_from(["none", "bitexact", "sumsq"]))
def test_kernel_matches_the_numpy_path(ab, tol, known):
    a, b = ab
    kw: dict = {}
    if known == "bitexact":
        kw["bitexact"] = False
    elif known == "sumsq":
        with np.errstate(all="ignore"):
            fa, fb = a.astype(np.float64).reshape(-1), b.astype(np.float64).reshape(-1)
        if np.isfinite(fa).all() and np.isfinite(fb).all():
            kw["sumsq"] = (float(fa @ fa), float(fb @ fb))
    k = compare_values(a, b, tol, kernel=True, **kw)
    check_against_definitions(k, a, b, tol)
    assert_kernel_agrees(k, compare_values(a, b, tol, kernel=False, **kw), a, b)


@needs_numba
@settings(max_examples=200, deadline=None)
@given(a=hnp.arrays(st.sampled_from([np.float16, np.float32, np.float64]), st.integers(0, 40),
                    elements=st.floats(allow_nan=True, allow_infinity=True, width=16)),
       data=st.data(), tol=tolerances)
def test_kernel_on_small_arrays_of_any_floats(a, data, tol):
    b = data.draw(hnp.arrays(a.dtype, a.shape, elements=st.floats(allow_nan=True, allow_infinity=True, width=16)))
    if data.draw(st.booleans()):
        b = np.where(data.draw(hnp.arrays(bool, a.shape)), a, b)
    k = compare_values(a, b, tol, kernel=True)
    check_against_definitions(k, a, b, tol)
    assert_kernel_agrees(k, compare_values(a, b, tol, kernel=False), a, b)


def _pair(n: int, dtype=np.float32, seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(dtype)
    return a, (a * (1 + 1e-3 * rng.standard_normal(n))).astype(dtype)


@needs_numba
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_split_over_threads(threads: int) -> None:
    n = PARALLEL_MIN + 3 * CHUNK + 11
    a, b = _pair(n)
    a[[5, n // 2, n - 1]] = [np.nan, np.inf, 0.0]
    b[[5, n // 3, n - 2]] = [np.nan, -np.inf, 0.0]
    tol = TensorTolerance(atol=1e-4, rtol=1e-3, bad_fraction=0.5, nan_equal=True)
    k = compare_values(a, b, tol, threads=threads, kernel=True)
    check_against_definitions(k, a, b, tol)
    assert_kernel_agrees(k, compare_values(a, b, tol, threads=threads, kernel=False), a, b)


@needs_numba
def test_kernel_edge_chunks() -> None:
    """Chunks the fast loop hands to the careful one (float32 squares past range, tiny values, a
    difference that overflows float32) next to chunks it keeps (all zeros, ordinary values)."""
    rng = np.random.default_rng(3)
    n = 6 * CHUNK
    a = rng.standard_normal(n).astype(np.float32)
    a[:CHUNK] *= np.float32(1e20)  # squares overflow float32
    a[CHUNK:2 * CHUNK] *= np.float32(1e-25)  # squares underflow float32
    a[2 * CHUNK:3 * CHUNK] = 0  # zeros: no careful loop needed
    b = (a.astype(np.float64) * (1 + 1e-3 * rng.standard_normal(n))).astype(np.float32)
    a[3 * CHUNK + 5], b[3 * CHUNK + 5] = 3e38, -3e38  # |a-b| past float32: that chunk in float64
    b[4 * CHUNK + 9] = np.nan
    tol = TensorTolerance(rtol=0.01)
    k = compare_values(a, b, tol, kernel=True)
    check_against_definitions(k, a, b, tol)
    assert_kernel_agrees(k, compare_values(a, b, tol, kernel=False), a, b)
    assert k.max_abs == pytest.approx(6e38) and k.nan_mismatch == 1


@needs_numba
def test_kernel_takes_any_layout_and_byte_order() -> None:
    """Read-only, strided, big-endian and mixed-dtype inputs give what contiguous ones give."""
    a, b = _pair(3 * CHUNK + 17)
    tol = TensorTolerance(atol=1e-5, rtol=1e-4)
    want = compare_values(a, b, tol, kernel=True)
    ro = a.copy()
    ro.flags.writeable = False
    for x, y in ((ro, b), (a.astype(">f4"), b.astype(">f4"))):
        assert compare_values(x, y, tol, kernel=True) == want
    wide_a, wide_b = np.repeat(a, 2), np.repeat(b, 2)
    assert compare_values(wide_a[::2], wide_b[::2], tol, kernel=True) == want
    h16 = (a.astype(np.float16), b.astype(np.float32))
    assert_kernel_agrees(compare_values(*h16, tol, kernel=True), compare_values(*h16, tol, kernel=False), *h16)


@needs_numba
def test_jit_compiles_in_memory_where_numba_cannot_cache() -> None:
    """A function numba finds no cache location for (no source file: a read-only install is
    the same case) is compiled without a cache rather than failing."""
    from steptrace.differ.kernel import jit

    scope: dict = {}
    exec("def twice(x):\n    return 2 * x\n", scope)
    assert jit(scope["twice"])(21) == 42
    # the kernel module itself where numba finds no writable cache location at all
    code = ("import numba.core.caching as c; c.CacheImpl._locator_classes = []; import numpy as np; "
            "from steptrace.differ import TensorTolerance, compare_values; a = np.arange(9, dtype=np.float32); "
            "print(compare_values(a, a * 2, TensorTolerance(), kernel=True).max_abs)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.stdout.strip() == "8.0", res.stderr[-800:]


# ---------------------------------------------------------------------------- the policy


def test_policy_modes(monkeypatch) -> None:
    monkeypatch.setattr(kernelpolicy, "numba_installed", lambda: True)
    big, small = kernelpolicy.KERNEL_MIN_ELEMENTS, kernelpolicy.KERNEL_MIN_ELEMENTS - 1
    monkeypatch.delenv(kernelpolicy.KERNEL_ENV, raising=False)
    assert kernelpolicy.use_kernel(big) and not kernelpolicy.use_kernel(small)
    monkeypatch.setenv(kernelpolicy.KERNEL_ENV, "numpy")
    assert not kernelpolicy.use_kernel(big)
    monkeypatch.setenv(kernelpolicy.KERNEL_ENV, " Numba ")
    assert kernelpolicy.use_kernel(0)
    monkeypatch.setenv(kernelpolicy.KERNEL_ENV, "fast")
    with pytest.raises(KernelError, match="expected one of numpy, numba, auto"):
        kernelpolicy.use_kernel(big)
    assert issubclass(KernelError, TraceError)


def test_policy_without_numba(monkeypatch) -> None:
    """Where numba is not installed, auto takes numpy at any size and a forced numba says what to do."""
    monkeypatch.setattr(kernelpolicy, "numba_installed", lambda: False)
    monkeypatch.setenv(kernelpolicy.KERNEL_ENV, "auto")
    assert not kernelpolicy.use_kernel(10 * kernelpolicy.KERNEL_MIN_ELEMENTS)
    monkeypatch.setenv(kernelpolicy.KERNEL_ENV, "numba")
    with pytest.raises(KernelError, match=r"pip install 'steptrace\[fast\]'"):
        kernelpolicy.use_kernel(1)


def test_policy_when_numba_does_not_import(monkeypatch) -> None:
    """numba installed but broken (e.g. older than this numpy): auto warns and takes numpy;
    a forced numba is an error naming the cause."""
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "steptrace.differ.kernel", raising=False)
    monkeypatch.setenv(kernelpolicy.KERNEL_ENV, "auto")
    with pytest.warns(RuntimeWarning, match="comparing with numpy"):
        assert kernelpolicy.accumulator(True) is kernelpolicy.accumulate
    monkeypatch.setenv(kernelpolicy.KERNEL_ENV, "numba")
    with pytest.raises(KernelError, match="does not import"):
        kernelpolicy.accumulator(True)
    a, b = _pair(100)
    monkeypatch.setenv(kernelpolicy.KERNEL_ENV, "numpy")
    assert compare_values(a, b, TensorTolerance()).within is not None  # the numpy path needs no numba


def _traces(tmp_path) -> tuple[str, str]:
    paths = []
    for side, noise in (("a", 0.0), ("b", 1e-3)):
        rng = np.random.default_rng(0)
        x = rng.standard_normal(4096).astype(np.float32)
        path = tmp_path / f"{side}.trace"
        with TraceWriter(path, metadata={"precision": "fp32"}) as w:
            w.add_tensor("u", 0, "layer", (x * np.float32(1 + noise)).astype(np.float32))
            w.add_decisions({"sample": ["u"], "step": [0], "chosen": [1], "topk_ids": [[1, 2]],
                             "topk_logits": [[2.0, 1.0]]})
        paths.append(str(path))
    return paths[0], paths[1]


#: In a fresh interpreter: a `trace diff` comparing tensor values, then whether numba was imported.
_DIFF_CHILD = ("import sys; from steptrace.tui.cli import main; code = main(['diff', %r, %r, '--json', %r]); "
               "print('NUMBA', 'numba' in sys.modules, 'CODE', code)")


def test_trace_diff_imports_numba_only_when_it_pays(tmp_path) -> None:
    """Small traces: `import steptrace.differ` and a `trace diff` that compares values leave numba
    unimported under auto and numpy; under numba the kernel runs and the verdicts are the same."""
    import json

    a, b = _traces(tmp_path)
    modes = ["auto", "numpy"] + (["numba"] if kernelpolicy.numba_installed() else [])
    verdicts = set()
    for mode in modes:
        env = {**os.environ, kernelpolicy.KERNEL_ENV: mode}
        out = tmp_path / f"{mode}.json"
        res = subprocess.run([sys.executable, "-c", _DIFF_CHILD % (a, b, str(out))], capture_output=True,
                             text=True, env=env, timeout=300)
        assert f"NUMBA {mode == 'numba'} CODE" in res.stdout, res.stdout[-800:] + res.stderr[-800:]
        doc = json.loads(out.read_text())
        assert doc["candidates"][0]["tensors"]["by_basis"] == {"values": 1}, mode
        verdicts.add((doc["verdict"], json.dumps(doc["candidates"][0]["tensors"], sort_keys=True)))
        res = subprocess.run([sys.executable, "-c", "import sys, steptrace.differ; print('numba' in sys.modules)"],
                             capture_output=True, text=True, env=env, check=True)
        assert res.stdout.strip() == "False", mode
    assert len(verdicts) == 1, verdicts
