"""Round trips through the writer and reader: every dtype and shape bit-exact, NaN/Inf kept (SPEC.md §3, §4)."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from steptrace.tracefmt import TraceReader, TraceWriter, compute_stats, digest
from steptrace.tracefmt.decisions import decide
from steptrace.tracefmt.dtypes import DTYPES, canonical
from steptrace.tracefmt.errors import TraceUsageError, TraceWriteError, UnsupportedDtypeError
from steptrace.tracefmt.payload import shuffle_bytes, unshuffle_bytes

NUMPY_DTYPES = [n for n in DTYPES if n != "bfloat16"]
SHAPES = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def arrays_of(name: str):
    dt = np.dtype(DTYPES[name][0] if name != "bool" else bool)
    elements = None
    if dt.kind == "f":
        elements = st.floats(width=dt.itemsize * 8, allow_nan=True, allow_infinity=True, allow_subnormal=True)
    return hnp.arrays(dt, SHAPES, elements=elements)


@st.composite
def tensors(draw):
    name = draw(st.sampled_from(NUMPY_DTYPES + ["bfloat16"]))
    if name == "bfloat16":
        return name, draw(hnp.arrays(np.uint16, SHAPES))
    a = draw(arrays_of(name))
    if draw(st.booleans()) and a.dtype.itemsize > 1:
        a = a.astype(a.dtype.newbyteorder(">"))  # big-endian input is stored little-endian
    if draw(st.booleans()) and a.ndim >= 2:
        a = a.T  # non-contiguous input is stored in C order
    return name, a


@SETTINGS
@given(items=st.lists(tensors(), min_size=1, max_size=6), encoding=st.sampled_from(["raw", "zstd", "zstd-shuffle"]))
def test_tensors_round_trip_bit_exact(tmp_path_factory, items, encoding):
    path = tmp_path_factory.mktemp("rt") / "t.trace"
    with TraceWriter(path, encoding=encoding, flush_steps=2) as w:
        for i, (name, a) in enumerate(items):
            w.add_tensor("s", i, f"t{i}", a, dtype="bfloat16" if name == "bfloat16" else None)
    r = TraceReader(path)
    rows = r.tensors().to_pylist()
    for i, (name, a) in enumerate(items):
        back = r.tensor("s", i, f"t{i}", raw_bits=True)
        expect = canonical(a, name)
        assert back.shape == a.shape
        assert back.dtype == DTYPES[name][0]
        assert back.tobytes() == expect.tobytes()  # bit-exact: NaN payloads, -0.0, byte order
        row = rows[i]
        assert row["dtype"] == name and row["shape"] == list(a.shape) and row["numel"] == a.size
        assert row["digest"] == digest(expect.tobytes(), "xxh3-128")
        if DTYPES[name][1] == "f":
            x = (expect.astype(np.uint32) << 16).view(np.float32) if name == "bfloat16" else expect
            assert row["nan_count"] == int(np.isnan(x).sum())
            assert row["inf_count"] == int(np.isinf(x).sum())


@SETTINGS
@given(a=hnp.arrays(np.float32, SHAPES, elements=st.floats(-1e6, 1e6, width=32)))
def test_stats_match_numpy(a):
    s = compute_stats(a, "float32")
    assert s.numel == a.size
    if a.size == 0:
        assert s.min is None and s.l2 == 0.0
        return
    x = a.astype(np.float64).ravel()
    assert s.min == x.min() and s.max == x.max() and s.abs_max == np.abs(x).max()
    assert math.isclose(s.mean, x.mean(), rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(s.std, x.std(), rel_tol=1e-6, abs_tol=1e-6)
    assert math.isclose(s.l2, math.sqrt((x * x).sum()), rel_tol=1e-9, abs_tol=1e-9)


def test_stats_exclude_nan_and_inf_and_count_them():
    a = np.array([1.0, np.nan, -np.inf, 3.0, np.inf, np.nan], np.float32)
    s = compute_stats(a, "float32")
    assert (s.nan_count, s.inf_count) == (2, 2)
    assert (s.min, s.max, s.mean, s.abs_max) == (1.0, 3.0, 2.0, 3.0)
    none = compute_stats(np.array([np.nan, np.inf], np.float16), "float16")
    assert none.min is None and none.l2 is None and none.nan_count == 1 and none.inf_count == 1


def test_bfloat16_widens_exactly_and_keeps_nan_bits():
    bits = np.array([0x3F80, 0xC000, 0x7FC1, 0xFF80, 0x0000, 0x8000], np.uint16)  # 1, -2, NaN, -inf, 0, -0
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with TraceWriter(f"{d}/t") as w:
            w.add_tensor("s", 0, "b", bits, dtype="bfloat16")
        r = TraceReader(f"{d}/t")
        assert r.tensor("s", 0, "b", raw_bits=True).tolist() == bits.tolist()
        f = r.tensor("s", 0, "b")
        assert f.dtype == np.float32
        assert (f.view(np.uint32) >> 16).astype(np.uint16).tolist() == bits.tolist()
        row = r.tensors().to_pylist()[0]
        assert (row["nan_count"], row["inf_count"], row["min"], row["max"]) == (1, 1, -2.0, 1.0)


@given(st.binary(max_size=64), st.sampled_from([1, 2, 4, 8]))
def test_shuffle_inverts(data, w):
    data = data[: len(data) // w * w]
    assert unshuffle_bytes(shuffle_bytes(data, w), w) == data


LOGITS = hnp.arrays(
    np.float32, st.integers(2, 40),
    elements=st.one_of(st.sampled_from([0.0, 1.0, -1.0, -np.inf, np.inf, np.nan]), st.floats(-50, 50, width=32)),
)


@given(logits=LOGITS, k=st.integers(2, 10))
def test_decide_follows_spec_order(logits, k):
    d = decide(logits, k=k, watched=[0])
    x = logits.astype(np.float64)
    # SPEC §3.2: larger first, ties by smaller id, NaN last (NaNs by id)
    order = sorted(range(x.size), key=lambda i: (np.isnan(x[i]), -x[i] if not np.isnan(x[i]) else 0, i))
    assert d.topk_ids.tolist() == order[: min(k, x.size)]
    assert d.argmax == order[0]
    assert d.chosen_rank == 0 and d.watched[0]["rank"] == order.index(0)
    l0, l1 = float(d.topk_logits[0]), float(d.topk_logits[1])
    with np.errstate(invalid="ignore"):
        m = np.float32(l0 - l1)
    assert (np.isnan(m) and np.isnan(d.margin)) or m == d.margin
    if np.isnan(x).any():
        assert np.isnan(d.logsumexp)
    elif np.isfinite(x).all():
        assert math.isclose(d.logsumexp, math.log(np.exp(x - x.max()).sum()) + x.max(), rel_tol=1e-9)


DECISION_ROWS = st.lists(
    st.fixed_dictionaries(
        {
            "chosen": st.integers(0, 2**31 - 1),
            "topk_ids": st.lists(st.integers(0, 2**31 - 1), min_size=2, max_size=9, unique=True),
            "forced": st.booleans(),
            "piece": st.one_of(st.none(), st.text(max_size=8)),
            "logsumexp": st.one_of(st.none(), st.floats(width=32)),
            "frame": st.one_of(st.none(), st.integers(-(2**31), 2**31 - 1)),
            "head": st.sampled_from(["token", "duration"]),
        }
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=DECISION_ROWS, data=st.data())
def test_decisions_round_trip(tmp_path_factory, rows, data):
    path = tmp_path_factory.mktemp("d") / "t.trace"
    expected = []
    with TraceWriter(path, flush_steps=3) as w:
        for step, r in enumerate(rows):
            k = len(r["topk_ids"])
            drawn = data.draw(st.lists(st.floats(width=32), min_size=k, max_size=k))
            logits = np.array(sorted(drawn, key=lambda v: (v != v, -v if v == v else 0)), np.float32)  # best first
            w.add_decision("s", step, chosen=r["chosen"], topk_ids=r["topk_ids"], topk_logits=logits,
                           head=r["head"], forced=r["forced"], piece=r["piece"], logsumexp=r["logsumexp"],
                           frame=r["frame"], watched=[{"id": 3, "logit": float(logits[0]), "rank": 0}])
            expected.append((step, r, logits))
    t = TraceReader(path).decisions()
    assert t.num_rows == len(rows)
    got = {(row["step"], row["head"]): row for row in t.to_pylist()}
    for step, r, logits in expected:
        row = got[(step, r["head"])]
        assert row["chosen"] == r["chosen"] and row["topk_ids"] == r["topk_ids"] and row["forced"] == r["forced"]
        assert np.array(row["topk_logits"], np.float32).tobytes() == logits.tobytes()
        assert row["piece"] == r["piece"] and row["frame"] == r["frame"]
        assert row["argmax"] == r["topk_ids"][0]
        if r["logsumexp"] is None:
            assert row["logsumexp"] is None
        else:
            assert np.float32(row["logsumexp"]).tobytes() == np.float32(r["logsumexp"]).tobytes()


def test_call_and_order_are_counted_per_step():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        with TraceWriter(f"{d}/t") as w:
            for step in range(2):
                for name in ("a", "b", "a", "c", "a"):
                    w.add_tensor("s", step, name, np.zeros(1), values=False)
        t = TraceReader(f"{d}/t").tensors(step=1)
        assert list(zip(t["name"].to_pylist(), t["call"].to_pylist(), t["order"].to_pylist())) == [
            ("a", 0, 0), ("b", 0, 1), ("a", 1, 2), ("c", 0, 3), ("a", 2, 4)]


def test_large_tensor_round_trip(tmp_path):
    a = np.random.default_rng(1).standard_normal((64, 1024, 64)).astype(np.float32)  # 16 MiB
    with TraceWriter(tmp_path / "t", queue_bytes=1 << 20) as w:  # queue smaller than the tensor
        w.add_tensor("s", 0, "big", a)
        w.add_tensor("s", 1, "big", a[::-1])
    r = TraceReader(tmp_path / "t")
    np.testing.assert_array_equal(r.tensor("s", 0, "big"), a)
    np.testing.assert_array_equal(r.tensor("s", 1, "big"), a[::-1])


def test_writer_does_not_keep_a_reference_to_caller_buffers(tmp_path):
    buf = np.zeros(1000, np.float32)
    with TraceWriter(tmp_path / "t") as w:
        for step in range(5):
            buf[:] = step
            w.add_tensor("s", step, "reused", buf)  # the caller reuses its buffer at once
    r = TraceReader(tmp_path / "t")
    for step in range(5):
        assert (r.tensor("s", step, "reused") == step).all()


@pytest.mark.parametrize("name", NUMPY_DTYPES)
def test_every_dtype_zero_d_and_empty(tmp_path, name):
    dt = DTYPES[name][0]
    with TraceWriter(tmp_path / "t") as w:
        w.add_tensor("s", 0, "scalar", np.array(1, dtype=dt))
        w.add_tensor("s", 0, "empty", np.zeros((0, 3), dtype=dt))
    r = TraceReader(tmp_path / "t")
    s = r.tensor("s", 0, "scalar")
    assert s.shape == () and s == 1
    e = r.tensor("s", 0, "empty")
    assert e.shape == (0, 3) and e.dtype == dt


def test_add_decisions_bulk_equals_row_by_row(tmp_path):
    import pyarrow as pa

    rng = np.random.default_rng(3)
    n = 5000
    ids = np.argsort(rng.random((n, 1000)), axis=1)[:, :4].astype(np.int32)  # 4 distinct ids per row
    logits = -np.sort(-rng.standard_normal((n, 4)).astype(np.float32), axis=1)
    samples = [f"s{i // 100}" for i in range(n)]
    steps = np.arange(n, dtype=np.int32) % 100
    with TraceWriter(tmp_path / "bulk") as w:
        assert w.add_decisions({"sample": samples, "step": steps, "chosen": ids[:, 0],
                                "topk_ids": list(ids), "topk_logits": list(logits), "time": pa.nulls(n, pa.int64())}) == n
    with TraceWriter(tmp_path / "rows") as w:
        for i in range(n):
            w.add_decision(samples[i], int(steps[i]), chosen=int(ids[i, 0]), topk_ids=ids[i], topk_logits=logits[i],
                           time_us=None)
    a = TraceReader(tmp_path / "bulk").decisions()
    b = TraceReader(tmp_path / "rows").decisions()
    assert a.equals(b)


@pytest.mark.parametrize(
    "bad, match",
    [({"topk_ids": [[1]], "topk_logits": [[0.5]]}, "length >= 2"),
     ({"step": [-1]}, "steps must be >= 0"),
     ({"sample": [""]}, "non-empty"),
     ({"colour": ["red"]}, "unknown column"),
     ({"chosen": ["x"]}, "wrong type")],
)
def test_add_decisions_refuses_bad_tables(tmp_path, bad, match):
    from steptrace.tracefmt import TraceUsageError

    row = {"sample": ["s"], "step": [0], "chosen": [1], "topk_ids": [[1, 2]], "topk_logits": [[1.0, 0.5]]}
    row.update(bad)
    with TraceWriter(tmp_path / "t") as w, pytest.raises(TraceUsageError, match=match):
        w.add_decisions(row)


# ---------------------------------------------------------------------- batched statistics
@SETTINGS
@given(items=st.lists(tensors(), min_size=1, max_size=12))
def test_stats_of_many_small_tensors_match_one_at_a_time(items):
    """compute_stats_many (the writer's path for a batch of small tensors) agrees with
    compute_stats: counts, min and max exactly, the sums to the last bits SPEC.md §4.4 allows."""
    from steptrace.tracefmt.payload import compute_stats_many

    arrays = [canonical(np.asarray(a), name) for name, a in items]
    names = [name for name, _ in items]
    for a, name, got in zip(arrays, names, compute_stats_many(arrays, names)):
        want = compute_stats(a, name)
        assert (got.numel, got.nan_count, got.inf_count) == (want.numel, want.nan_count, want.inf_count)
        assert (got.min, got.max, got.abs_max) == (want.min, want.max, want.abs_max)
        for field in ("mean", "l2", "std"):
            g, w = getattr(got, field), getattr(want, field)
            assert (g is None) == (w is None), field
            if w is not None:
                scale = max(want.abs_max or 0.0, 1e-300)
                assert math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-6 * scale), (field, g, w)


def test_writer_batches_small_tensors_and_reads_back_their_stats(tmp_path):
    """Rows handed over together (hold) get their statistics in one batch; NaN and huge values
    in the batch still take the exact path."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(int(n)).astype(np.float32) for n in rng.integers(1, 300, 40)]
    arrays[3][1] = np.nan
    arrays[5][0] = np.inf
    arrays.append(np.array([1e200, -3e199]))
    arrays.append(np.array([], np.float32))
    with TraceWriter(tmp_path / "t.trace") as w:
        w.lane.hold()
        for i, a in enumerate(arrays):
            w.add_tensor("s", 0, f"t{i}", a, values=False)
    t = TraceReader(tmp_path / "t.trace").tensors().to_pylist()
    assert len(t) == len(arrays)
    for row in t:
        want = compute_stats(arrays[int(row["name"][1:])], row["dtype"])
        assert (row["nan_count"], row["inf_count"], row["min"], row["max"]) == (
            want.nan_count, want.inf_count, want.min, want.max)
        if want.l2 is not None:
            assert math.isclose(row["l2"], want.l2, rel_tol=1e-9)


# ---------------------------------------------------------------------- decisions from logits
def _decision_rows(path):
    cols = ["sample", "step", "head", "chosen", "argmax", "forced", "topk_ids", "topk_logits", "margin",
            "logsumexp", "chosen_logit", "chosen_rank", "watched", "piece", "frame"]
    return repr(TraceReader(path).decisions(columns=cols, derive=False).to_pylist())  # repr: nan == nan


def test_add_logits_writes_what_add_decided_writes(tmp_path):
    """add_logits finds the chosen token on the caller's thread and derives the rest on the
    writer's: the rows equal those of decide() + add_decided(), NaN logits included."""
    rng = np.random.default_rng(1)
    cases = []
    for i in range(60):
        x = rng.standard_normal(int(rng.integers(2, 50))).astype(rng.choice([np.float32, np.float64]))
        if i % 7 == 0:
            x[rng.integers(0, x.size)] = np.nan
        if i % 5 == 0:
            x[:3] = 1.0  # ties
        chosen = int(rng.integers(0, x.size)) if i % 3 == 0 else None
        cases.append((x, chosen, [int(rng.integers(0, x.size))] if i % 2 else []))
    with TraceWriter(tmp_path / "a.trace") as a, TraceWriter(tmp_path / "b.trace") as b:
        a.lane.hold()
        for i, (x, chosen, watched) in enumerate(cases):
            got = a.add_logits("s", i, x, k=4, chosen=chosen, watched=watched, forced=chosen is not None,
                               piece=f"p{i}", frame=i)
            d = decide(x, k=4, chosen=chosen, watched=watched)
            assert got == d.chosen
            b.add_decided("s", i, d, forced=chosen is not None, piece=f"p{i}", frame=i)
    assert _decision_rows(tmp_path / "a.trace") == _decision_rows(tmp_path / "b.trace")


def test_add_logits_refuses_bad_arguments_at_once(tmp_path):
    with TraceWriter(tmp_path / "t.trace") as w:
        x = np.arange(10, dtype=np.float32)
        with pytest.raises(TraceUsageError, match="outside the logits"):
            w.add_logits("s", 0, x, chosen=10)
        with pytest.raises(TraceUsageError, match="outside the logits"):
            w.add_logits("s", 0, x, watched=[-1])
        with pytest.raises(TraceUsageError, match="1-d"):
            w.add_logits("s", 0, x.reshape(2, 5))
        with pytest.raises(TraceUsageError, match="unknown decision field"):
            w.add_logits("s", 0, x, colour="red")
        with pytest.raises(TraceUsageError, match="k="):
            w.add_logits("s", 0, x, k=1)
        assert w.add_logits("s", 0, x) == 9
    assert TraceReader(tmp_path / "t.trace").decisions().num_rows == 1


def test_held_rows_reach_the_disk_while_the_caller_hangs(tmp_path):
    """The writer's thread takes rows held longer than flush_ms / 2 itself: a run that stops
    calling (hangs) mid-step still gets its last rows flushed."""
    with TraceWriter(tmp_path / "t.trace", flush_ms=100) as w:
        w.lane.hold()
        w.add_logits("s", 0, np.array([0.0, 2.0, 1.0]))
        w.add_tensor("s", 0, "x", np.ones(4, np.float32))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = TraceReader(tmp_path / "t.trace")
            if r.decisions().num_rows == 1 and r.tensors().num_rows == 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail("held rows were not flushed while the caller waited")


def test_lane_tensor_row_copies_and_checks_the_dtype(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4).T  # not C-contiguous
    big = np.arange(1 << 15, dtype=np.float32)  # pooled copy
    with TraceWriter(tmp_path / "t.trace") as w:
        w.lane.tensor_row("s", 0, "a", 0, 0, "X", "float32", a, True)
        w.lane.tensor_row("s", 0, "big", 0, 1, None, "float32", big, True)
        a[0, 0] = big[0] = -1  # the writer copied both before returning
        with pytest.raises(UnsupportedDtypeError, match="cannot hold"):
            w.lane.tensor_row("s", 0, "c", 0, 2, None, "float64", a, False)
    r = TraceReader(tmp_path / "t.trace")
    np.testing.assert_array_equal(r.tensor("s", 0, "a"), np.arange(12, dtype=np.float32).reshape(3, 4).T)
    assert r.tensor("s", 0, "big")[0] == 0


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), v=st.integers(2, 40), k=st.integers(2, 10),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_decide_many_equals_decide_row_by_row(data, n, v, k, dtype):
    """The writer's batched derivation gives exactly what decide() gives, ties and NaN included."""
    from steptrace.tracefmt.decisions import decide_many

    x = data.draw(hnp.arrays(dtype, (n, v), elements=st.one_of(
        st.sampled_from([0.0, 1.0, -1.0, -np.inf, np.inf, np.nan]), st.floats(-50, 50, width=32))))
    chosen = data.draw(st.lists(st.one_of(st.none(), st.integers(0, v - 1)), min_size=n, max_size=n))
    watched = data.draw(st.lists(st.integers(0, v - 1), max_size=3))
    got = decide_many(x, k=k, chosen=chosen, watched=watched)
    assert [repr(d) for d in got] == [repr(decide(x[i], k=k, chosen=chosen[i], watched=watched)) for i in range(n)]


@settings(max_examples=150, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), v=st.integers(2, 40), k=st.integers(2, 10),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_decisions_derived_as_columns_are_the_rows_batch(data, n, v, k, dtype):
    """The writer's columnar decisions (decide_columns -> decisions_batch_of_columns) write the
    record batch the row path writes (decide -> row_of_decision -> decisions_batch)."""
    from steptrace.tracefmt.batches import decisions_batch, decisions_batch_of_columns
    from steptrace.tracefmt.decisions import decide_columns
    from steptrace.tracefmt.writeitems import row_keys, row_of_decision

    x = data.draw(hnp.arrays(dtype, (n, v), elements=st.one_of(
        st.sampled_from([0.0, 1.0, -1.0, -np.inf, np.inf, np.nan]), st.floats(-50, 50, width=32))))
    chosen = data.draw(st.lists(st.one_of(st.none(), st.integers(0, v - 1)), min_size=n, max_size=n))
    watched = data.draw(st.lists(st.integers(0, v - 1), max_size=3))
    keys = [row_keys(data.draw(st.fixed_dictionaries({}, optional={
        "forced": st.booleans(), "piece": st.one_of(st.none(), st.text(max_size=3)),
        "frame": st.integers(0, 9), "time_us": st.one_of(st.none(), st.integers(0, 2**40))}))) for _ in range(n)]
    cols, rest = decide_columns(x, k=k, chosen=chosen, watched=watched)
    assert set(rest) | set([] if cols is None else cols.rows.tolist()) == set(range(n))
    if cols is None:
        return
    rows = cols.rows.tolist()
    got = decisions_batch_of_columns(cols, [f"s{i}" for i in rows], rows, ["token"] * len(rows),
                                     [keys[i] for i in rows], watched)
    want = decisions_batch([row_of_decision(f"s{i}", i, "token", decide(x[i], k=k, chosen=chosen[i], watched=watched),
                                            keys[i]) for i in rows])
    assert got.schema == want.schema
    assert repr(got.to_pylist()) == repr(want.to_pylist())


def test_held_logits_of_many_chunks_are_decided_as_decide_does(tmp_path):
    """1,500 held logits (chunks of 512 rows, NaN rows among them, a token chosen outside the
    top k, watched ids): every decision row is decide()'s."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1500, 64)).astype(np.float32)
    x[[7, 700, 1400], 3] = np.nan
    chosen = [int(r.argmax()) if i % 97 else int(r.argmin()) for i, r in enumerate(x)]
    with TraceWriter(tmp_path / "t.trace", metadata={"watched": {"a": 5, "b": 9}}) as w:
        w.lane.hold()
        for i in range(1500):
            w.add_logits("s", i, x[i], k=4, chosen=chosen[i], piece=f"p{i % 3}")
    got = TraceReader(tmp_path / "t.trace").decisions().to_pylist()
    assert len(got) == 1500
    for i in (0, 1, 7, 96, 97, 511, 512, 700, 1023, 1024, 1400, 1499):
        d = decide(x[i], k=4, chosen=chosen[i], watched=[5, 9])
        row = got[i]
        assert row["step"] == i and row["chosen"] == d.chosen and row["argmax"] == d.argmax
        assert row["topk_ids"] == d.topk_ids.tolist() and row["topk_logits"] == d.topk_logits.tolist()
        assert row["margin"] == np.float32(d.margin)
        assert repr(np.float32(row["logsumexp"])) == repr(np.float32(d.logsumexp))  # NaN rows too
        assert row["piece"] == f"p{i % 3}" and [w["rank"] for w in row["watched"]] == [w["rank"] for w in d.watched]
        assert row["chosen_rank"] == d.chosen_rank  # stored, or derived by the reader within the top k
        assert repr(np.float32(row["chosen_logit"])) == repr(np.float32(d.chosen_logit))
    assert sum(r["chosen"] != r["argmax"] for r in got) >= 15  # the tokens chosen outside the argmax


def test_a_failure_on_the_writer_thread_is_reported_not_hung(tmp_path, monkeypatch):
    """An unexpected exception on the background thread surfaces as TraceWriteError on the
    caller's next call and at close, instead of leaving the caller waiting on a dead thread."""
    import steptrace.tracefmt.writerloop as writer_module

    def broken(items):
        raise RuntimeError("bug in the batch path")

    monkeypatch.setattr(writer_module, "_stats_of_small", broken)
    w = TraceWriter(tmp_path / "t.trace")
    w.lane.hold()
    for i in range(3):
        w.add_tensor("s", 0, f"x{i}", np.ones(4, np.float32))
    with pytest.raises(TraceWriteError, match="bug in the batch path"):
        w.flush()
    with pytest.raises(TraceWriteError, match="bug in the batch path"):
        w.close()


def test_held_rows_from_several_threads_under_a_small_queue_all_arrive(tmp_path):
    """hold() with rows added from two threads while the queue's budget is far smaller than
    what is added: the callers wait for room (stall), nothing is lost, nothing deadlocks."""
    import threading

    big = np.arange(1 << 16, dtype=np.float32)  # 256 KB: pooled copies
    with TraceWriter(tmp_path / "t.trace", queue_bytes=1 << 20) as w:
        w.lane.hold()

        def add(sample):
            for i in range(40):
                w.add_tensor(sample, i, "big", big + i, values=i % 2 == 0)
                w.add_tensor(sample, i, "small", np.full(3, i, np.int64), values=False)
                w.add_logits(sample, i, np.array([0.0, float(i), 1.0]))

        threads = [threading.Thread(target=add, args=(s,)) for s in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        summary = w.close()
    assert (summary.tensors, summary.values, summary.decisions) == (160, 40, 80)
    r = TraceReader(tmp_path / "t.trace")
    np.testing.assert_array_equal(r.tensor("b", 38, "big"), big + 38)
    rows = [t for t in r.tensors().to_pylist() if t["sample"] == "a" and t["name"] == "small"]
    assert [(t["step"], t["min"], t["max"]) for t in rows] == [(i, float(i), float(i)) for i in range(40)]
    assert r.decisions(sample="a")["chosen"].to_pylist() == [2] + [1] * 39
