"""The viewer's lazy data layer (steptrace.tui.viewer.index, steptrace.tui.viewer.source, steptrace.tui.viewer.data) against
tracefmt.TraceReader: shuffled rows, several heads and samples, gaps, small batches, searches,
filters, plot series, tensor values, interrupted parts, the bounded batch cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import view_fixtures as vf

from steptrace.tracefmt import TraceReader, TraceWriter
from steptrace.tui.viewer.data import ViewModel
from steptrace.tui.viewer.index import BatchCache
from steptrace.tui.viewer.source import TraceSource


def _shuffled(path: Path, *, compact: bool, seed: int = 0) -> Path:
    """Three samples x two heads with step gaps, rows in random order (SPEC: no particular order)."""
    rng = np.random.default_rng(seed)
    rows = []
    for s, n in (("s-a", 700), ("s-b", 300), ("s-c", 5)):
        steps = np.flatnonzero(rng.random(n) > 0.1)  # about 10 % of the steps missing
        for head in ("token", "duration"):
            for st in steps.tolist():
                rows.append((s, st, head))
    order = rng.permutation(len(rows))
    rows = [rows[i] for i in order]
    n = len(rows)
    ids = np.argsort(rng.random((n, 30)), axis=1)[:, :4].astype(np.int32)  # 4 distinct ids per row
    logits = np.sort(rng.standard_normal((n, 4)).astype(np.float32), axis=1)[:, ::-1]
    off = pa.array(np.arange(0, 4 * n + 1, 4, dtype=np.int32))
    table = {
        "sample": pa.array([r[0] for r in rows]), "step": pa.array([r[1] for r in rows], pa.int32()),
        "head": pa.array([r[2] for r in rows]), "chosen": pa.array(ids[:, 0]),
        "topk_ids": pa.ListArray.from_arrays(off, pa.array(ids.reshape(-1))),
        "topk_logits": pa.ListArray.from_arrays(off, pa.array(np.ascontiguousarray(logits).reshape(-1))),
    }
    with TraceWriter(path, compact=compact, flush_steps=8) as w:
        for lo in range(0, n, 500):  # several flushes: several batches when not compacted
            w.add_decisions({k: v.slice(lo, 500) for k, v in table.items()})
            w.flush()
    return path


@pytest.mark.parametrize("compact", [True, False])
def test_runs_locate_every_row_of_shuffled_multi_head_trace(tmp_path, compact):
    path = _shuffled(tmp_path / "shuf.trace", compact=compact)
    src = TraceSource(path)
    src.open()
    reader = TraceReader(path)
    for sample in ("s-a", "s-b", "s-c"):
        for head in ("token", "duration"):
            want = reader.decisions(sample=sample, head=head, columns=["step", "argmax", "margin"])
            runs = src.index.runs(src.samples[sample], src.index.heads[head])
            assert len(runs) == want.num_rows
            rows = np.arange(len(runs))
            assert runs.steps(rows).tolist() == want["step"].to_pylist()
            got = src.decisions(runs, rows)
            assert [d.argmax for d in got] == want["argmax"].to_pylist()
            assert [d.head for d in got] == [head] * len(got)
            np.testing.assert_array_equal(src.values_at(runs, rows, "margin"), want["margin"].to_numpy())
            steps = want["step"].to_numpy()
            assert src.rows_of(runs, steps).tolist() == rows.tolist()
            missing = np.setdiff1d(np.arange(steps.max() + 2), steps)
            assert (src.rows_of(runs, missing) == -1).all()
    # the vocabulary head is shown, and every head is in the step detail
    assert {d.head for d in src.heads_at("s-a", int(reader.decisions(sample="s-a")["step"][0].as_py()))} == \
        {"token", "duration"}
    if compact:  # in-order writes compact to few runs; shuffled rows need many, still correct
        assert len(src.runs("s-a").step) > 10


def test_in_order_trace_is_one_run_per_batch(tmp_path):
    a, _ = vf.pair(tmp_path)
    src = TraceSource(a)
    src.open()
    runs = src.runs(vf.PAIR_SAMPLE)
    assert len(runs) == vf.STEPS and runs.step.size == 1 and runs.stride.tolist() == [1]


def test_pair_rows_match_reader_and_diff_alignment(tmp_path):
    a, b = vf.pair(tmp_path)
    m = ViewModel([a, b])
    m.open()
    rm = m.rowmap(vf.PAIR_SAMPLE)
    assert rm.kind == "steps" and rm.size == vf.STEPS
    rows = m.fetch(rm, 0, rm.size)
    for side, path in (("a", a), ("b", b)):
        want = TraceReader(path).decisions(sample=vf.PAIR_SAMPLE, columns=["argmax"])["argmax"].to_pylist()
        assert [getattr(r, side).argmax for r in rows] == want
    m.compute_diff()
    rm = m.rowmap(vf.PAIR_SAMPLE, m.sample_diff(vf.PAIR_SAMPLE))
    assert rm.kind == "diff"
    rows = m.fetch(rm, 0, rm.size)
    verdicts = [r.verdict for r in rows]
    assert verdicts[: vf.NOISE_STEP] == ["identical"] * vf.NOISE_STEP
    assert verdicts[vf.DRIFT_STEP] == "drift" and verdicts[vf.FLIP_STEP] == "flip"
    assert all(r.after for r in rows[vf.FLIP_STEP + 1:])
    assert m.mismatch_rows(rm).tolist() == [vf.FLIP_STEP]
    assert m.landmarks(vf.PAIR_SAMPLE) == (vf.FLIP_STEP, vf.DRIFT_STEP)
    detail = m.detail(rm, vf.FLIP_STEP)
    assert detail.epsilon == pytest.approx(0.015625)
    assert [(ln.name, ln.culprit) for ln in detail.tensors] == [("decoder.attn", False), ("decoder.mlp", True)]


def test_filters_searches_and_series_match_numpy(tmp_path):
    path = _shuffled(tmp_path / "s.trace", compact=False)
    m = ViewModel([path], low_margin=0.5)
    m.open()
    rm = m.rowmap("s-a")
    want = TraceReader(path).decisions(sample="s-a", head="token", columns=["step", "margin", "chosen"])
    margin, steps, chosen = (want[c].to_numpy() for c in ("margin", "step", "chosen"))
    low = m.low_rows(rm)
    assert low.tolist() == np.flatnonzero(margin < 0.5).tolist()
    f = m.filtered(rm, low, "low")
    assert f.size == low.size and f.steps(f.base(np.arange(f.size)))[0].tolist() == steps[margin < 0.5].tolist()
    hits = np.flatnonzero(chosen == 7)
    assert m.find(rm, -1, "7") == hits[0] and m.find(rm, int(hits[0]), "7") == hits[1]
    assert m.find(rm, rm.size, "7", forward=False) == hits[-1]
    assert m.find(rm, -1, "12345") is None
    s = m.series(rm, buckets=16)
    assert (s.lo, s.hi) == (steps.min(), steps.max())
    idx = np.clip((steps - s.lo) * 16 // (s.hi - s.lo + 1), 0, 15)
    expect = [margin[idx == i].min() for i in range(16)]
    np.testing.assert_allclose(s.a_margin, expect)


def test_tensor_records_and_values_match_reader(tmp_path):
    a, _ = vf.pair(tmp_path)
    src = TraceSource(a)
    src.open()
    reader = TraceReader(a)
    for step in (0, 1, 22, 47):
        got = src.tensors_at(vf.PAIR_SAMPLE, step)
        want = reader.tensors(sample=vf.PAIR_SAMPLE, step=step)
        assert [t.name for t in got] == want["name"].to_pylist()
        assert [t.has_values for t in got] == want["has_values"].to_pylist()
        for t in got:
            if t.has_values:
                np.testing.assert_array_equal(src.tensor_values(t), reader.tensor(vf.PAIR_SAMPLE, step, t.name))
    vals, bad = src.tensor_series(vf.PAIR_SAMPLE, 0, vf.STEPS - 1, 8)
    assert vals.shape == (8,) and not bad.any() and (vals > 0).all()


def test_interrupted_trace_is_read_with_a_notice(tmp_path):
    path = vf.interrupted(tmp_path)
    m = ViewModel([path])
    notes = m.open()
    assert len(notes) == 1 and "INCOMPLETE" in notes[0]
    assert m.rowmap(vf.PAIR_SAMPLE).size == 12


def test_batch_cache_is_bounded_in_bytes():
    cache = BatchCache(max_bytes=1 << 20)
    batch = pa.record_batch({"x": np.zeros(100_000, np.int64)})  # 800 kB
    for i in range(5):
        assert cache.load(("k", i), lambda: batch) is batch
    assert cache.bytes <= 1 << 20 and cache.get(("k", 4)) is batch and cache.get(("k", 0)) is None
