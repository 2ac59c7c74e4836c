"""Closed trace parts are plain Arrow IPC files: Polars and DuckDB read them with no steptrace code (SPEC.md §7)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest

GOLDEN = Path(__file__).parent / "golden" / "v1-basic"


def test_polars_reads_parts_directly():
    pl = pytest.importorskip("polars", reason="polars is in the [test] extra")
    d = pl.read_ipc(next(GOLDEN.glob("parts/*.decisions.arrow")))
    tight = d.filter((pl.col("head") == "duration") & pl.col("forced")).select("sample", "step").sort("sample")
    assert tight.rows() == [("utt-a", 3), ("utt-b", 3)]
    t = pl.scan_ipc(next(GOLDEN.glob("parts/*.tensors.arrow")))
    bad = t.group_by("name").agg(pl.col("nan_count").sum()).filter(pl.col("nan_count") > 0).collect()
    assert sorted(bad["name"].to_list()) == ["special.bf16", "special.f16"]


def test_duckdb_queries_a_trace_through_arrow():
    duckdb = pytest.importorskip("duckdb", reason="duckdb is in the [test] extra")
    decisions = pa.ipc.open_file(next(GOLDEN.glob("parts/*.decisions.arrow"))).read_all()  # noqa: F841 (DuckDB scans it)
    rows = duckdb.sql(
        "SELECT sample, count(*) AS steps, min(topk_logits[1] - topk_logits[2]) AS tightest "
        "FROM decisions WHERE head = 'token' GROUP BY sample ORDER BY sample"
    ).fetchall()
    assert rows == [("utt-a", 4, 0.5), ("utt-b", 4, 0.5)]
    eos = duckdb.sql(
        "SELECT step, w.rank FROM (SELECT step, unnest(watched) AS w FROM decisions "
        "WHERE sample = 'utt-a' AND head = 'token') ORDER BY step"
    ).fetchall()
    assert eos == [(0, 7), (1, 7), (2, 4), (3, 1)]
