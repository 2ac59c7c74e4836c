"""The writer's columnar path for small tensors (issue 14): statistics as columns
(:func:`tracefmt.stats.stats_columns`), rows kept as columns until the flush and the tensors
batch built column by column give byte for byte what the row path gave (one TensorStats and one
row tuple per tensor: tests/stats_legacy.py), NaN/Inf, empty and 0-d tensors, every dtype and
flushes in the middle of a batch of held rows included."""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from stats_legacy import legacy_compute_stats_many, legacy_tensors_batch

import steptrace.tracefmt.writer as writer_module
from steptrace.tracefmt import TraceWriter, writerloop
from steptrace.tracefmt.batches import tensors_batch
from steptrace.tracefmt.dtypes import DTYPES, canonical
from steptrace.tracefmt.pendingrows import finished_row
from steptrace.tracefmt.schema import PARTS_DIR
from steptrace.tracefmt.stats import SMALL_ELEMENTS, StatsColumns, TensorStats, compute_stats_many, stats_columns
from steptrace.tracefmt.writeitems import TensorColumns, TensorItem, TensorRow

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SHAPES = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=5)
SPECIAL = [0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 1e200, -3e300, 5e-324]


@st.composite
def canonical_arrays(draw) -> tuple[str, np.ndarray]:
    """(SPEC.md dtype, canonical array): every dtype, NaN/±Inf/huge values, empty and 0-d."""
    name = draw(st.sampled_from(sorted(DTYPES)))
    shape = draw(SHAPES)
    if name == "bfloat16":
        a = draw(hnp.arrays(np.uint16, shape))
    elif DTYPES[name][1] == "f":
        dt = np.dtype(DTYPES[name][0])
        with np.errstate(over="ignore"):
            elements = st.one_of(st.sampled_from(SPECIAL).map(dt.type), st.floats(width=dt.itemsize * 8))
            a = draw(hnp.arrays(dt, shape, elements=elements))
    else:
        a = draw(hnp.arrays(np.dtype(DTYPES[name][0] if name != "bool" else bool), shape))
    return name, canonical(a, name)


def _same_stats(got: list[TensorStats], want: list[TensorStats]) -> None:
    """Field for field the same values, floats bit for bit (repr tells -0.0 and NaN apart)."""
    assert [repr(s) for s in got] == [repr(s) for s in want]


@SETTINGS
@given(items=st.lists(canonical_arrays(), min_size=1, max_size=14))
def test_stats_columns_give_the_row_paths_statistics_bit_for_bit(items):
    arrays = [a for _, a in items]
    names = [n for n, _ in items]
    want = legacy_compute_stats_many(arrays, names)
    cols = stats_columns(arrays, names)
    _same_stats([cols.row(i) for i in range(len(cols))], want)
    _same_stats(compute_stats_many(arrays, names), want)
    _same_stats([StatsColumns.of_stats(want).row(i) for i in range(len(want))], want)
    # each tensor's statistics depend on its own elements only, whatever it is reduced with
    _same_stats(compute_stats_many(arrays[::-1], names[::-1])[::-1], want)


def test_stats_columns_reduce_in_groups_as_one_buffer_would():
    """Arrays spanning several of stats_columns' cache-sized groups, of one dtype and mixed."""
    rng = np.random.default_rng(3)
    sizes = [SMALL_ELEMENTS, 3, 20_000, 1, 0, 40_000, 7, 9_000] * 3
    for names in (["float16"] * len(sizes), [["float32", "float16", "bfloat16", "int8"][i % 4] for i in range(len(sizes))]):
        arrays = [canonical((rng.standard_normal(n) * 50).astype(np.float32), "float32").astype(DTYPES[nm][0])
                  if nm != "bfloat16" else rng.integers(0, 1 << 15, n).astype(np.uint16) for n, nm in zip(sizes, names)]
        _same_stats(compute_stats_many(arrays, names), legacy_compute_stats_many(arrays, names))


def _rows(items: list[tuple[str, np.ndarray]], refs: list[bool]) -> list[TensorRow]:
    stats = legacy_compute_stats_many([a for _, a in items], [n for n, _ in items])
    return [TensorRow("s" if i % 3 else "other", i // 4, f"m.{i}", i % 2, i, None if i % 5 == 0 else "Linear", name,
                      a.shape, stats[i], None if i % 7 == 3 else bytes(range(i % 200, i % 200 + 16)),
                      i if refs[i] else None)
            for i, (name, a) in enumerate(items)]


@SETTINGS
@given(items=st.lists(canonical_arrays(), min_size=1, max_size=12), data=st.data())
def test_tensors_batch_of_columns_is_the_row_paths_batch_byte_for_byte(items, data):
    rows = _rows(items, data.draw(st.lists(st.booleans(), min_size=len(items), max_size=len(items))))
    want = legacy_tensors_batch(rows).serialize().to_pybytes()
    assert tensors_batch(rows).serialize().to_pybytes() == want
    # the same rows in pieces: some kept as columns and taken in slices, some as rows
    cuts = sorted(data.draw(st.lists(st.integers(0, len(rows)), max_size=3)))
    bounds = [0, *cuts, len(rows)]
    parts = []
    for a, b in pairwise(bounds):
        whole = TensorColumns.of_rows(rows[max(a - 1, 0):b + 1])  # a larger piece, sliced
        parts.append(whole.take(a - max(a - 1, 0), a - max(a - 1, 0) + b - a))
    assert tensors_batch(TensorColumns.concat(parts)).serialize().to_pybytes() == want


def test_user_statistics_keep_their_own_nulls_and_values():
    """Rows of add_tensor_stats carry whatever TensorStats the caller built: a column null on its
    own, NaN as a value, integers as floats; written as the row path wrote them."""
    odd = [TensorStats(4, None, 2.0, float("nan"), None, 3, None, 1, 2), TensorStats(0, 1, None, None, 0.5, None, 0.0, 0, 0)]
    rows = [TensorRow("s", 0, f"t{i}", 0, i, None, "float32", (4,), s, None, None) for i, s in enumerate(odd)]
    assert tensors_batch(rows).serialize().to_pybytes() == legacy_tensors_batch(rows).serialize().to_pybytes()


# ---------------------------------------------------------------------- whole writers
def _stream(seed: int) -> list[tuple]:
    """What a module-hooking recorder hands a writer over 24 steps: small outputs of every dtype
    (NaN/Inf, empty, 0-d), some with values, a few large ones, decisions from logits, and
    flushes in the middle of held rows."""
    rng = np.random.default_rng(seed)
    names = sorted(DTYPES)
    out: list[tuple] = []
    for step in range(24):
        for i in range(int(rng.integers(3, 40))):
            name = names[int(rng.integers(len(names)))]
            shape = [(), (0,), (3, 0), (7,), (4, 33), (2, 3, 5), (SMALL_ELEMENTS + 1,)][int(rng.integers(7))]
            x = rng.standard_normal(shape) * 10.0 ** int(rng.integers(-3, 4))
            if x.size and rng.random() < 0.2:
                x.flat[int(rng.integers(x.size))] = [np.nan, np.inf, -np.inf, 1e200][int(rng.integers(4))]
            with np.errstate(over="ignore", invalid="ignore"):
                if name == "bfloat16":
                    a = (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
                else:
                    a = x.astype(np.dtype(DTYPES[name][0] if name != "bool" else bool))
            out.append(("tensor", step, f"layers.{i}", name, a, bool(rng.random() < 0.15)))
        if rng.random() < 0.7:
            out.append(("logits", step, rng.standard_normal(50).astype(np.float32)))
        if rng.random() < 0.2:
            out.append(("flush",))
    return out


def _write(path, stream: list[tuple], **options) -> None:
    with TraceWriter(path, flush_ms=1e9, **options) as w:
        lane = w.lane
        lane.hold()
        order = 0
        for it in stream:
            if it[0] == "tensor":
                _, step, name, dtype, a, values = it
                if order % 3:  # the recorders' lane and the checked call alike
                    lane.tensor_row("s", step, name, 0, order, "Linear", dtype, a, values)
                else:
                    w.add_tensor("s", step, name, a, values=values, dtype=dtype, source="Linear", call=0, order=order)
                order += 1
            elif it[0] == "logits":
                w.add_logits("s", it[1], it[2], chosen=3, time_us=1_000_000)
            else:
                w.flush()


def _legacy_stats_of_small(items: list) -> None:
    """writerloop's batch step as the row path had it: a TensorStats per small item, in place."""
    small = [it for it in items if type(it) is TensorItem and it.stats is None and it.array.size <= SMALL_ELEMENTS]
    if len(small) >= 2:
        for it, s in zip(small, legacy_compute_stats_many([it.array for it in small], [it.dtype for it in small])):
            it.stats = s


def _files(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / PARTS_DIR).glob("*.arrow"))}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("flush_steps", [1, 3, 64])
@pytest.mark.parametrize("compact", [False, True])
def test_columnar_writer_files_are_the_row_paths_byte_for_byte(tmp_path, monkeypatch, seed, flush_steps, compact):
    monkeypatch.setattr(writer_module, "part_id", lambda: "host-1-abcdef")
    stream = _stream(seed)
    _write(tmp_path / "columns.trace", stream, flush_steps=flush_steps, compact=compact)
    with monkeypatch.context() as m:  # the row path: TensorStats and a row tuple per tensor
        m.setattr(writerloop, "_stats_of_small", _legacy_stats_of_small)
        m.setattr(writerloop, "pending_columns", lambda ten: [finished_row(r) for r in ten])
        m.setattr(writerloop, "tensors_batch", legacy_tensors_batch)
        _write(tmp_path / "rows.trace", stream, flush_steps=flush_steps, compact=compact)
    got, want = _files(tmp_path / "columns.trace"), _files(tmp_path / "rows.trace")
    assert sorted(got) == sorted(want) and len(got) == 3
    for name in want:
        assert got[name] == want[name], name
    if not compact:  # the flushes cut the batches where they were
        tensors = next(n for n in got if n.endswith(".tensors.arrow"))
        reader = pa.ipc.open_file(pa.py_buffer(got[tensors]))
        assert reader.num_record_batches > (1 if flush_steps == 64 else 8)
