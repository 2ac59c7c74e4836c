"""The compiled one-pass statistics kernel (tracefmt.statskernel, numba) gives numpy's results bit
for bit (the same pairwise sums, the same range, NaN/Inf chunks handed back to numpy), and the
policy (tracefmt.statspolicy) takes it only where it says: forced by STEPTRACE_KERNEL=numba, or,
under auto, in a writer process past its threshold; never in a recording process by default."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from steptrace.tracefmt import TraceReader, TraceWriter, statspolicy
from steptrace.tracefmt.dtypes import widen_bfloat16, widen_float16
from steptrace.tracefmt.errors import TraceUsageError
from steptrace.tracefmt.stats import compute_stats

pytest.importorskip("numba", reason="the compiled statistics kernel needs numba (the fast extra)")
from steptrace.tracefmt.statskernel import chunk_stats
from test_format_writer_process import assert_same_trace


@pytest.fixture(autouse=True)
def fresh_policy(monkeypatch):
    monkeypatch.delenv(statspolicy.KERNEL_ENV, raising=False)
    statspolicy.reset()
    yield
    statspolicy.reset()


def numpy_chunk(c: np.ndarray, name: str) -> tuple[float, float, float, float]:
    """What compute_stats' numpy path takes from one all-finite chunk."""
    w = widen_float16(c) if name == "float16" else widen_bfloat16(c) if name == "bfloat16" else c
    w64 = w.astype(np.float64)
    with np.errstate(over="ignore"):  # float64 squares past its range: inf on both sides
        return float(np.add.reduce(w64)), float(np.add.reduce(w64 * w64)), float(w.min()), float(w.max())


def same(x: float, y: float) -> bool:
    return x == y and np.signbit(x) == np.signbit(y) or (np.isnan(x) and np.isnan(y))


CONTAINERS = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16}


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(CONTAINERS)), data=st.data())
def test_a_chunk_reduces_to_numpys_pairwise_sums_and_range(name, data):
    dt = CONTAINERS[name]
    n = data.draw(st.one_of(st.integers(1, 300), st.integers(300, 5000)))
    a = data.draw(hnp.arrays(dt, n, elements=None if name != "bfloat16" else st.integers(0, 2**16 - 1)))
    s, q, lo, hi = chunk_stats(a, name)
    w = widen_float16(a) if name == "float16" else widen_bfloat16(a) if name == "bfloat16" else a
    if not np.isfinite(w).all():
        assert not np.isfinite(s)  # the caller takes the numpy path for this chunk
        return
    rs, rq, rlo, rhi = numpy_chunk(a, name)
    assert same(s, rs) and same(q, rq) or (np.isinf(q) and np.isinf(rq))
    assert lo == rlo and hi == rhi


@pytest.mark.parametrize("name", sorted(CONTAINERS))
def test_compute_stats_with_the_kernel_is_numpys_bit_for_bit(name, monkeypatch):
    rng = np.random.default_rng(7)
    x = rng.standard_normal(600_001) * 10.0 ** rng.integers(-4, 4, 600_001)
    if name == "bfloat16":
        arrays = [(x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)]
    else:
        arrays = [x.astype(CONTAINERS[name])]
    specials = arrays[0].copy()  # NaN and ±Inf in two of the three chunks
    if name == "bfloat16":
        specials[[5, 300_000, 300_001]] = [0x7FC0, 0x7F80, 0xFF80]
    else:
        specials[[5, 300_000, 300_001]] = [np.nan, np.inf, -np.inf]
    arrays.append(specials)
    if name == "float16":
        arrays.append(np.full(70_000, np.float16(6e-8)))  # subnormals
    if name == "float64":
        arrays.append(x * 1e200)  # squares overflow: the rescaled sums
    for a in arrays:
        monkeypatch.setenv(statspolicy.KERNEL_ENV, "numpy")
        statspolicy.reset()
        want = compute_stats(a, name)
        monkeypatch.setenv(statspolicy.KERNEL_ENV, "numba")
        statspolicy.reset()
        got = compute_stats(a, name)
        assert statspolicy.kernel_for(a.size) is chunk_stats
        assert got == want, (got, want)


def test_auto_never_loads_the_kernel_in_a_recording_process():
    assert statspolicy.kernel_for(1 << 40) is None  # however much was reduced: the model's thread never waits on numba
    statspolicy.allow_kernel_after(1 << 20)  # a writer process
    assert statspolicy.kernel_for(1 << 19) is None
    assert statspolicy.kernel_for(100) is None  # small tensors never count nor take it
    assert statspolicy.kernel_for(1 << 19) is chunk_stats
    assert statspolicy.kernel_for(1 << 16) is chunk_stats
    assert statspolicy.kernel_for((1 << 16) - 1) is None


def test_numpy_is_never_the_kernel_and_bad_values_fail_when_a_writer_opens(tmp_path, monkeypatch):
    monkeypatch.setenv(statspolicy.KERNEL_ENV, "numpy")
    statspolicy.allow_kernel_after(0)
    assert statspolicy.kernel_for(1 << 30) is None
    monkeypatch.setenv(statspolicy.KERNEL_ENV, "fast")
    with pytest.raises(TraceUsageError, match="STEPTRACE_KERNEL='fast': expected one of numpy, numba, auto"):
        TraceWriter(tmp_path / "t.trace")
    assert not (tmp_path / "t.trace").exists()
    monkeypatch.setenv(statspolicy.KERNEL_ENV, "numba")
    monkeypatch.setattr(statspolicy.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TraceUsageError, match=r"numba is not installed: pip install 'steptrace\[fast\]'"):
        TraceWriter(tmp_path / "t.trace")


def test_a_writer_process_with_the_kernel_writes_the_threads_numpy_trace(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(1 << 17).astype(dt) for dt in ("float32", "float16", "float64")]
    arrays[1][[9, 99]] = [np.nan, np.inf]
    for kernel, process in (("numpy", False), ("numba", True)):
        monkeypatch.setenv(statspolicy.KERNEL_ENV, kernel)  # the child inherits it
        with TraceWriter(tmp_path / f"{kernel}.trace", process=process) as w:
            for step in range(3):
                for i, a in enumerate(arrays):
                    w.add_tensor("s", step, f"t{i}", a * (step + 1), values=i == 0)
    assert_same_trace(tmp_path / "numpy.trace", tmp_path / "numba.trace")
    t = TraceReader(tmp_path / "numba.trace").tensors()
    assert t.num_rows == 9 and set(t["nan_count"].to_pylist()) == {0, 1}
