"""The writer's tensor path: job threads computing statistics, digests and payloads, payloads
appended in value_ref order as they are ready, rows written after the values they reference
(SPEC.md §4.3-§4.5, §5.2, §5.4), and float16 statistics over many chunks."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from steptrace.tracefmt import TraceReader, TraceWriter, compute_stats, digest, writerloop
from steptrace.tracefmt.errors import TraceWriteError
from steptrace.tracefmt.payload import Encoder
from steptrace.tracefmt.schema import data_file
from steptrace.tracefmt.validate import validate


def _stream(rng: np.random.Generator) -> list[tuple[str, np.ndarray, bool]]:
    """Tensors of every size class the writer treats differently, interleaved: small and large,
    with and without values, float32/float16/int64."""
    out = []
    for i in range(40):
        n = [3, 1000, 40_000, 300_000][i % 4]  # small, small, > 64 KB (a job), > one stats chunk
        dt = [np.float32, np.float16, np.int64][i % 3]
        a = (rng.standard_normal(n) * 100).astype(dt)
        out.append((f"t{i}", a, i % 5 != 0))
    return out


@pytest.mark.parametrize("threads", [1, 3])
def test_interleaved_sizes_round_trip_with_any_number_of_job_threads(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(writerloop, "job_threads", lambda: threads)
    rng = np.random.default_rng(7)
    items = _stream(rng)
    path = tmp_path / "t.trace"
    with TraceWriter(path, flush_steps=3) as w:
        for step, (name, a, values) in enumerate(items):
            w.add_tensor("s", step // 4, name, a, values=values)
        summary = w.close()
    assert (summary.tensors, summary.values) == (40, 32)
    r = TraceReader(path)
    rows = {t["name"]: t for t in r.tensors().to_pylist()}
    part = r.parts[0].id
    with pa.memory_map(str(path / "parts" / data_file(part, "tensors"))) as f:
        file_rows = pa.ipc.open_file(f).read_all().to_pylist()
    refs = [t["value_ref"] for t in file_rows if t["value_ref"] is not None]
    assert refs == list(range(32))  # rows in the order added, value_refs in the same order
    assert [t["name"] for t in file_rows] == [name for name, _, _ in items]
    for step, (name, a, values) in enumerate(items):
        row = rows[name]
        assert row["digest"] == digest(a.tobytes(), "xxh3-128")
        st = compute_stats(a, a.dtype.name)
        assert (row["min"], row["max"], row["numel"]) == (st.min, st.max, st.numel)
        assert math.isclose(row["mean"], st.mean, rel_tol=1e-12, abs_tol=1e-12)
        assert row["has_values"] == values
        if values:
            assert r.tensor("s", step // 4, name).tobytes() == a.tobytes()
    # one value per record batch after the schema's empty batch (SPEC.md §5.4)
    with pa.memory_map(str(path / "parts" / data_file(part, "values"))) as f:
        assert pa.ipc.open_file(f).num_record_batches == 32 + 1


def test_a_failing_encoding_is_reported_and_no_value_is_written_after_it(tmp_path, monkeypatch):
    """The third payload fails (on one of two job threads): the writer reports it, the values file keeps the two before it
    and nothing after it (value_refs cannot shift), and the trace stays readable."""
    encode = Encoder.encode

    def failing(self, buf, itemsize):
        if np.frombuffer(buf, np.float32, count=1)[0] == 2.0:  # the tensor of step 2
            raise OSError("disk on fire")
        return encode(self, buf, itemsize)

    monkeypatch.setattr(Encoder, "encode", failing)
    monkeypatch.setattr(writerloop, "job_threads", lambda: 2)
    path = tmp_path / "t.trace"
    w = TraceWriter(path, flush_steps=1)
    big = np.arange(1 << 16, dtype=np.float32)
    for step in range(6):
        w.add_tensor("s", step, "x", big + step)
    with pytest.raises(TraceWriteError, match="disk on fire"):
        w.close()
    report = validate(path, deep=True)
    assert report.ok, report.problems
    assert not report.complete and report.values == 2
    r = TraceReader(path)
    steps = r.tensors()["step"].to_pylist()
    assert steps == sorted(steps) and len(steps) <= 2  # rows only after the values they reference
    for step in steps:
        np.testing.assert_array_equal(r.tensor("s", step, "x"), big + step)


def test_large_stats_only_tensors_get_their_stats_and_digest(tmp_path):
    a = np.linspace(-3, 5, 1 << 17, dtype=np.float32)  # 512 KB: a job of its own
    with TraceWriter(tmp_path / "t.trace") as w:
        w.add_tensor("s", 0, "x", a, values=False)
        w.add_tensor("s", 0, "y", a[:10], values=False)
    rows = {t["name"]: t for t in TraceReader(tmp_path / "t.trace").tensors().to_pylist()}
    assert (rows["x"]["min"], rows["x"]["max"], rows["x"]["has_values"]) == (-3.0, 5.0, False)
    assert rows["x"]["digest"] == digest(a.tobytes(), "xxh3-128")
    assert rows["y"]["max"] == float(a[9])


def _reference(x: np.ndarray) -> tuple:
    f = x.astype(np.float64)
    fin = f[np.isfinite(f)]
    return (int(np.isnan(f).sum()), int(np.isinf(f).sum()), fin.min(), fin.max(), fin.mean(), fin.std())


@pytest.mark.parametrize("special", [None, np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("where", [0, 300_000, 699_999])
def test_float16_statistics_over_many_chunks_with_a_special_in_one(special, where):
    """float16 chunks are widened without the ±inf/NaN pass and widened again only when the
    range shows one: a special value in any chunk (first, middle, last) is counted, never
    folded into min/max/mean; chunks without one are unaffected."""
    rng = np.random.default_rng(where)
    x = (rng.standard_normal(700_000) * 300).astype(np.float16)
    x[12345] = np.float16(65504.0)  # the largest float16 number: finite, near the threshold
    x[54321] = np.float16(-65504.0)
    if special is not None:
        x[where] = special
    got = compute_stats(x, "float16")
    nan, inf, lo, hi, mean, std = _reference(x)
    assert (got.nan_count, got.inf_count, got.min, got.max) == (nan, inf, lo, hi)
    assert math.isclose(got.mean, mean, rel_tol=1e-9, abs_tol=1e-9)
    assert math.isclose(got.std, std, rel_tol=1e-9)
