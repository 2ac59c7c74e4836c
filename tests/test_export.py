"""Parquet export and the tensor scan behind both exports."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from steptrace.tracefmt import TraceCorruptError, TraceExistsError, TraceReader, TraceWriter
from steptrace.tracefmt.export import TENSOR_COLUMNS, TensorScan, export_parquet

from damage import forget_checksums

BF16_BITS = np.array([0x3F80, 0x7FC1, 0x8000, 0xFF80], np.uint16)


def make_trace(path: Path, *, vocab: list[str] | None = ("a", "b", "c")) -> Path:  # type: ignore[assignment]
    with TraceWriter(path, metadata={"model": "m", "watched": {"eos": 2}, "tags": {"run": "1"}},
                     vocab=None if vocab is None else list(vocab)) as w:
        for step in range(3):
            w.add_logits("s0", step, np.array([0.5, step, -np.inf], np.float32), piece="x")
            w.add_tensor("s0", step, "h", np.arange(6, dtype=np.float32).reshape(2, 3) * step)
        w.add_decision("s1", 0, chosen=2, topk_ids=[1, 0], topk_logits=[1.0, 0.5], chosen_logit=0.1, chosen_rank=2)
        w.add_tensor("s1", 0, "nan", np.array([np.nan, -0.0, np.inf], np.float32))
        w.add_tensor("s1", 0, "bf", BF16_BITS, dtype="bfloat16")
        w.add_tensor("s1", 0, "mask", np.array([[True, False]]))
        w.add_tensor("s1", 0, "scalar", np.int64(-5))
        w.add_tensor("s1", 0, "empty", np.zeros((0, 3), np.float16))
        w.add_tensor("s1", 0, "stats", np.array([1.0, 3.0]), values=False)
    return path


def canonical_bytes(reader: TraceReader, row: dict) -> bytes | None:
    if not row["has_values"]:
        return None
    return reader.tensor(row["sample"], row["step"], row["name"], call=row["call"], raw_bits=True).tobytes()


def test_parquet_export_matches_the_trace(tmp_path: Path) -> None:
    trace = make_trace(tmp_path / "a.trace")
    written = export_parquet(trace, tmp_path / "pq")
    assert set(written) == {"decisions", "tensors", "vocab", "metadata"}
    r = TraceReader(trace)

    dec = pq.read_table(written["decisions"])
    assert dec.num_rows == 4 and dec.column_names == r.decisions().column_names
    assert dec.select(["sample", "step", "chosen", "topk_ids", "chosen_rank", "time"]).equals(
        r.decisions().select(["sample", "step", "chosen", "topk_ids", "chosen_rank", "time"]))
    assert pl.read_parquet(written["decisions"])["chosen_rank"].to_list() == [0, 0, 0, 2]

    ten = pq.read_table(written["tensors"])
    assert ten.column_names == [*TENSOR_COLUMNS, "data"]
    expected = r.tensors()
    assert ten.drop_columns(["data"]).equals(expected.drop_columns(["has_values"]))
    want = [canonical_bytes(r, row) for row in expected.to_pylist()]
    assert ten["data"].to_pylist() == want
    frame = pl.read_parquet(written["tensors"])
    assert frame["data"].to_list() == want and frame.height == 9
    got_bf = frame.filter(pl.col("name") == "bf")["data"][0]
    assert got_bf == BF16_BITS.tobytes()  # bfloat16 as its bit patterns, NaN payload kept
    assert frame.filter(pl.col("name") == "stats")["data"][0] is None
    assert frame.filter(pl.col("name") == "stats")["l2"][0] == pytest.approx(np.sqrt(10))
    assert np.frombuffer(frame.filter(pl.col("name") == "nan")["data"][0], "<f4").tobytes() == np.array(
        [np.nan, -0.0, np.inf], np.float32).tobytes()

    assert pl.read_parquet(written["vocab"]).to_dict(as_series=False) == {"id": [0, 1, 2], "piece": ["a", "b", "c"]}
    manifest = json.loads(Path(written["metadata"]).read_text())
    assert manifest["format"] == "steptrace" and manifest["model"] == "m" and manifest["vocab"] == "vocab.parquet"
    assert manifest["watched"] == {"eos": 2} and manifest["created"] == r.metadata.created

    steps = duckdb.sql(f"SELECT count(*) FROM '{written['tensors']}' WHERE name = 'h'").fetchall()
    assert steps == [(3,)]


def test_parquet_export_refuses_a_non_empty_folder(tmp_path: Path) -> None:
    make_trace(tmp_path / "a.trace")
    make_trace(tmp_path / "novocab.trace", vocab=None)
    out = tmp_path / "pq"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(TraceExistsError, match="not empty"):
        export_parquet(tmp_path / "a.trace", out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    export_parquet(tmp_path / "a.trace", out, overwrite=True)
    assert (out / "vocab.parquet").exists()
    written = export_parquet(TraceReader(tmp_path / "novocab.trace"), out, overwrite=True)
    assert "vocab" not in written and not (out / "vocab.parquet").exists()  # no stale vocabulary left
    assert sorted(p.name for p in out.iterdir()) == ["decisions.parquet", "keep.txt", "metadata.json",
                                                    "tensors.parquet"]
    assert json.loads((out / "metadata.json").read_text())["vocab"] is None
    (tmp_path / "file").write_text("x")
    with pytest.raises(TraceExistsError, match="is a file"):
        export_parquet(tmp_path / "a.trace", tmp_path / "file")


def test_empty_trace_exports_empty_tables(tmp_path: Path) -> None:
    TraceWriter(tmp_path / "e.trace").close()
    written = export_parquet(tmp_path / "e.trace", tmp_path / "new" / "pq")
    assert pq.read_table(written["decisions"]).num_rows == 0
    assert pl.read_parquet(written["tensors"]).columns == [*TENSOR_COLUMNS, "data"]


def test_tensor_scan_batches_are_bounded(tmp_path: Path) -> None:
    with TraceWriter(tmp_path / "a.trace") as w:
        for i in range(10):
            w.add_tensor("s", i, "x", np.full(1000 if i == 4 else 10, i, np.float64), values=i != 7)
    scan = TensorScan(TraceReader(tmp_path / "a.trace"))
    assert scan.num_rows == 10
    batches = list(scan.batches(max_rows=3, max_bytes=200))
    sizes = [rows.num_rows for rows, _ in batches]
    assert sum(sizes) == 10 and max(sizes) <= 3
    for rows, data in batches:  # a batch closes once its bytes reach the limit
        assert len(data) == rows.num_rows
        assert sum(d.nbytes for d in data[:-1] if d is not None) < 200
    rows = pa.concat_tables([r for r, _ in batches])
    assert rows["step"].to_pylist() == list(range(10))
    data = [d for _, ds in batches for d in ds]
    assert data[7] is None and bytes(data[4]) == np.full(1000, 4, np.float64).tobytes()


def test_export_of_a_trace_still_being_written(tmp_path: Path) -> None:
    w = TraceWriter(tmp_path / "a.trace")
    w.add_tensor("s", 0, "x", np.arange(4, dtype=np.int32))
    w.add_decision("s", 0, chosen=0, topk_ids=[0, 1], topk_logits=[1, 0])
    w.flush()
    try:
        written = export_parquet(tmp_path / "a.trace", tmp_path / "pq")
        assert pl.read_parquet(written["tensors"])["data"].to_list() == [np.arange(4, dtype="<i4").tobytes()]
        assert pq.read_table(written["decisions"]).num_rows == 1
    finally:
        w.close()


def test_damaged_values_are_refused(tmp_path: Path) -> None:
    pattern = bytes(range(1, 65))
    with TraceWriter(tmp_path / "a.trace", encoding="raw") as w:
        w.add_tensor("s", 0, "x", np.frombuffer(pattern, np.uint8))
    [values] = (tmp_path / "a.trace" / "parts").glob("*.values.arrow")
    raw = values.read_bytes()
    assert raw.count(pattern) == 1
    values.write_bytes(raw.replace(pattern, pattern[:-1] + b"\0"))
    with pytest.raises(TraceCorruptError, match="has changed since its part was closed"):
        export_parquet(tmp_path / "a.trace", tmp_path / "pq")
    forget_checksums(tmp_path / "a.trace")  # behind the checksum, the digest still catches it
    with pytest.raises(TraceCorruptError, match="do not match their digest"):
        export_parquet(tmp_path / "a.trace", tmp_path / "pq")
    assert not any((tmp_path / "pq").glob("*.parquet"))  # no partial files left behind
