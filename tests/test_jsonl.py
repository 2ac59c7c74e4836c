"""JSONL interchange (SPEC.md §6): import, export, round trips, payload files, bad lines."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import tempfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from steptrace.tracefmt import (
    JsonlError,
    TraceExistsError,
    TraceNotFoundError,
    TraceReader,
    TraceUsageError,
    TraceWriteError,
    TraceWriter,
)
from steptrace.tracefmt.jsonl import ImportSummary, export_jsonl, import_jsonl
from steptrace.tracefmt.payload import digest

NAN = math.nan
# Bit patterns that matter: quiet NaN with payload, signalling NaN, -0.0, ±Inf, subnormal.
F32_BITS = np.array([0x3F800000, 0x7FC00001, 0x7F800001, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001], np.uint32)
BF16_BITS = np.array([0x3F80, 0x7FC1, 0x8000, 0x7F80, 0xFF80, 0x0001], np.uint16)


def write_jsonl(path: Path, lines: list, *, compress: bool = False) -> Path:
    """Write dicts (as JSON) and strings (verbatim) one per line."""
    text = "".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(text) if compress else text)
    return path


def decision(sample: str = "s", step: int = 0, **kw) -> dict:
    return {"kind": "decision", "sample": sample, "step": step, **kw}


def tensor(name: str = "x", dtype: str = "float32", shape: list | None = None, **kw) -> dict:
    return {"kind": "tensor", "sample": "s", "step": 0, "name": name, "dtype": dtype,
            "shape": [2] if shape is None else shape, **kw}


def b64(arr: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode()


def make_trace(path: Path) -> Path:
    """A trace exercising every column and every kind of tensor row."""
    meta = {"model": "m", "runtime": "onnxruntime", "runtime_version": "1.17", "precision": "fp16",
            "device": "cpu", "command": ["run", "--x"], "tags": {"k": "v"}, "watched": {"eos": 3},
            "extra": {"custom": [1, 2]}}
    with TraceWriter(path, metadata=meta, vocab=["a", "b", "c", "d", "▁e"]) as w:
        w.add_logits("s0", 0, np.array([1.0, 2.0, 2.0, -np.inf, 0.5], np.float32), k=3)
        w.add_logits("s0", 1, np.array([np.nan, 0.25, -np.inf, 7.0, 0.1], np.float32), chosen=2, forced=True,
                     piece="c", frame=3, chunk=1, position=9, emission=0)
        w.add_decision("s0", 1, head="duration", chosen=1, topk_ids=[1, 0], topk_logits=[np.inf, np.inf],
                       logsumexp=np.inf, time_us=1_700_000_000_123_456)
        w.add_decision("s1", 0, chosen=4, topk_ids=[2, 0], topk_logits=[3.5, 3.5], chosen_logit=-1.5,
                       chosen_rank=4, watched=[{"id": 3, "logit": None, "rank": None}])
        w.add_tensor("s0", 0, "x", F32_BITS.view(np.float32).reshape(7, 1))
        w.add_tensor("s0", 0, "x", np.float32(-0.0))  # call 1, 0-d
        w.add_tensor("s0", 0, "half", np.array([[1.5, np.nan], [-np.inf, 65504]], np.float16))
        w.add_tensor("s0", 0, "bf", BF16_BITS, dtype="bfloat16")
        w.add_tensor("s0", 0, "mask", np.array([True, False, True]))
        w.add_tensor("s0", 1, "empty", np.zeros((0, 3), np.float32))
        w.add_tensor("s0", 1, "ids", np.array([-128, 0, 127], np.int8), source="Embedding")
        w.add_tensor("s0", 1, "big", np.array([2**64 - 1, 0], np.uint64))
        w.add_tensor("s1", 0, "stats_only", np.array([1.0, np.nan, np.inf, -2.0]), values=False)
        w.add_tensor("s1", 0, "stats_empty", np.zeros((0,), np.int32), values=False)
    return path


def same(x: object, y: object) -> bool:
    """Equality of decoded rows where NaN equals NaN (Arrow's equals() says NaN != NaN)."""
    if isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y):
        return True
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(same(u, v) for u, v in zip(x, y, strict=True))
    return type(x) is type(y) and x == y


def assert_same_table(a: pa.Table, b: pa.Table) -> None:
    assert a.schema == b.schema and a.num_rows == b.num_rows
    for name in a.column_names:
        assert same(a[name].to_pylist(), b[name].to_pylist()), name


def assert_same_trace(a: Path, b: Path) -> None:
    ra, rb = TraceReader(a), TraceReader(b)
    assert_same_table(ra.decisions(derive=False), rb.decisions(derive=False))
    assert_same_table(ra.decisions(), rb.decisions())
    ta, tb = ra.tensors(), rb.tensors()
    assert ta.equals(tb)  # stats (never NaN), digests, shapes, dtypes, call, order, has_values
    for row in ta.filter(ta["has_values"]).to_pylist():
        x = ra.tensor(row["sample"], row["step"], row["name"], call=row["call"], raw_bits=True)
        y = rb.tensor(row["sample"], row["step"], row["name"], call=row["call"], raw_bits=True)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), row["name"]
    assert ra.vocab == rb.vocab
    ma, mb = ra.metadata, rb.metadata
    for field in ("runtime", "runtime_version", "model", "precision", "device", "command", "tags", "watched",
                  "vocab_head", "created", "producer", "producer_version", "extra"):
        assert getattr(ma, field) == getattr(mb, field), field


# ---------------------------------------------------------------------- round trips
@pytest.mark.parametrize("name", ["out.jsonl", "out.jsonl.zst"])
def test_round_trip_trace_jsonl_trace(tmp_path: Path, name: str) -> None:
    src = make_trace(tmp_path / "a.trace")
    out = tmp_path / name
    n = export_jsonl(src, out)
    assert n == 1 + 4 + 10
    raw = out.read_bytes()
    assert raw.startswith(b"\x28\xb5\x2f\xfd") == name.endswith(".zst")
    summary = import_jsonl(out, tmp_path / "b.trace")
    assert isinstance(summary, ImportSummary)
    assert (summary.lines, summary.decisions, summary.tensors, summary.samples) == (15, 4, 10, 2)
    assert "4 decisions" in str(summary) and "\n" not in str(summary)
    assert_same_trace(src, tmp_path / "b.trace")
    # Export of the import gives the same lines.
    export_jsonl(tmp_path / "b.trace", tmp_path / "again.jsonl")
    export_jsonl(src, tmp_path / "first.jsonl")
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "first.jsonl").read_text()


def test_export_lines_are_strict_json(tmp_path: Path) -> None:
    export_jsonl(make_trace(tmp_path / "a.trace"), tmp_path / "a.jsonl")

    def refuse(token: str) -> None:
        raise AssertionError(f"non-standard JSON constant {token}")

    lines = [json.loads(ln, parse_constant=refuse) for ln in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [ln["kind"] for ln in lines[:2]] == ["meta", "decision"]
    meta = lines[0]
    assert meta["vocab"] == ["a", "b", "c", "d", "▁e"] and meta["custom"] == [1, 2]
    d = {(ln["sample"], ln["step"], ln["head"]): ln for ln in lines if ln["kind"] == "decision"}
    assert d["s0", 0, "token"]["topk_logits"] == [2.0, 2.0, 1.0]
    assert d["s0", 1, "token"]["topk_logits"] == [7.0, 0.25, 0.1, "-inf", "nan"]  # shortest float32 decimals
    assert d["s0", 0, "token"]["watched"] == [{"id": 3, "logit": "-inf", "rank": 4}]
    assert d["s0", 1, "duration"]["margin"] == "nan" and d["s0", 1, "duration"]["logsumexp"] == "inf"
    assert d["s0", 1, "duration"]["time"] == "2023-11-14T22:13:20.123456Z"
    assert "chosen_rank" not in d["s0", 0, "token"]  # null columns are left out
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", ln["time"]) for ln in d.values())
    t = {ln["name"]: ln for ln in lines if ln["kind"] == "tensor" and ln["call"] == 0}
    assert t["stats_only"]["stats"]["nan_count"] == 1 and "data_b64" not in t["stats_only"]
    # digests name their part's algorithm, and the meta line the file's (SPEC.md §6)
    assert meta["digest"] == "xxh3-128"
    assert t["stats_only"]["digest"] == "xxh3-128:" + digest(np.array([1.0, np.nan, np.inf, -2.0]).tobytes(),
                                                             "xxh3-128").hex()
    assert t["bf"]["digest"] == "xxh3-128:" + digest(BF16_BITS.tobytes(), "xxh3-128").hex()
    assert base64.b64decode(t["bf"]["data_b64"]) == BF16_BITS.tobytes()
    assert t["ids"]["source"] == "Embedding" and "source" not in t["x"]


def test_float32_logits_survive_decimal_text(tmp_path: Path) -> None:
    bits = np.random.default_rng(7).integers(0, 2**32, 4000, dtype=np.uint64).astype(np.uint32)
    vals = bits.view(np.float32)
    vals = np.sort(vals[np.isfinite(vals)])[::-1].copy()  # best first
    vals[:4] = [np.finfo(np.float32).max, np.finfo(np.float32).max, 1e-45, -0.0]
    vals[4:] = np.sort(vals[4:])[::-1]
    with TraceWriter(tmp_path / "a.trace") as w:
        for i in range(0, vals.size - 1, 2):
            pair = np.sort(vals[i : i + 2])[::-1]
            w.add_decision("s", i, chosen=0, topk_ids=[0, 1], topk_logits=pair, time_us=0)
    export_jsonl(tmp_path / "a.trace", tmp_path / "a.jsonl")
    import_jsonl(tmp_path / "a.jsonl", tmp_path / "b.trace")
    a = TraceReader(tmp_path / "a.trace").decisions()
    b = TraceReader(tmp_path / "b.trace").decisions()
    for col in ("topk_logits", "margin"):
        x = np.asarray(a[col].combine_chunks().flatten() if col == "topk_logits" else a[col], np.float32)
        y = np.asarray(b[col].combine_chunks().flatten() if col == "topk_logits" else b[col], np.float32)
        assert np.array_equal(x.view(np.uint32), y.view(np.uint32))


# ---------------------------------------------------------------------- logits lines
def _ranked(x: np.ndarray, i: int) -> int:
    """Rank of id i by hand: count ids that come before it under SPEC.md §3.2."""
    before = 0
    for j, v in enumerate(x):
        if j == i:
            continue
        if np.isnan(x[i]):
            before += (not np.isnan(v)) or j < i
        elif not np.isnan(v):
            before += v > x[i] or (v == x[i] and j < i)
    return before


def test_logits_lines_derive_decisions(tmp_path: Path) -> None:
    lines = [
        {"kind": "meta", "watched": {"eos": 3, "nan_id": 4}},
        decision("a", 0, logits=[1.0, 3.0, 3.0, "-inf", None, 2.5, "-inf"], k=5),
        decision("a", 1, logits=[0.5, 2.0, 2.0, "-inf", -1.0], k=3, chosen=4),
        decision("a", 2, logits=["inf", "inf", 0, "nan", -7], k=2),
        decision("a", 3, logits=["-inf", "-inf", "-inf", "-inf", "-inf"]),
        decision("a", 4, head="duration", logits=[0.1, 0.9, 0.3]),  # watched ids are token ids: not here
    ]
    import_jsonl(write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "t.trace", k=4)
    d = {(r["step"], r["head"]): r for r in TraceReader(tmp_path / "t.trace").decisions().to_pylist()}

    r = d[0, "token"]  # ties by smaller id, -inf before NaN, NaN last; k=5 from the line
    x = np.array([1.0, 3.0, 3.0, -np.inf, np.nan, 2.5, -np.inf])
    assert r["topk_ids"] == [1, 2, 5, 0, 3] and r["argmax"] == 1 and r["chosen"] == 1
    assert r["topk_logits"] == [3.0, 3.0, 2.5, 1.0, -np.inf] and r["margin"] == 0.0
    assert math.isnan(r["logsumexp"])  # any NaN logit makes it NaN
    assert same(r["watched"], [{"id": 3, "logit": -np.inf, "rank": 4}, {"id": 4, "logit": NAN, "rank": 6}])
    assert [_ranked(x, 3), _ranked(x, 4), _ranked(x, 6)] == [4, 6, 5]

    r = d[1, "token"]  # chosen outside the top-k: its logit and rank are recorded
    x = np.array([0.5, 2.0, 2.0, -np.inf, -1.0])
    assert r["topk_ids"] == [1, 2, 0] and r["chosen"] == 4 and r["argmax"] == 1
    assert r["chosen_logit"] == -1.0 and r["chosen_rank"] == _ranked(x, 4) == 3
    finite = x[np.isfinite(x)]
    expected = np.float32(2.0 + np.log(np.exp(finite - 2.0).sum()))
    assert np.float32(r["logsumexp"]) == expected
    assert r["watched"][0] == {"id": 3, "logit": -np.inf, "rank": 4}

    r = d[2, "token"]  # two +inf: margin inf - inf is NaN; logsumexp NaN (a NaN logit)
    assert r["topk_ids"] == [0, 1] and r["topk_logits"] == [np.inf, np.inf] and math.isnan(r["margin"])
    r = d[3, "token"]  # every logit -inf: ties by id, margin NaN, logsumexp = max = -inf; k=4 from import_jsonl
    assert r["topk_ids"] == [0, 1, 2, 3] and math.isnan(r["margin"]) and r["logsumexp"] == -np.inf
    r = d[4, "duration"]
    assert r["topk_ids"] == [1, 2, 0] and r["watched"] is None
    assert np.float32(r["margin"]) == np.float32(np.float32(0.9) - np.float64(np.float32(0.3)))


def test_keep_logits_stores_full_logits(tmp_path: Path) -> None:
    lines = [decision("a", 0, logits=[0.5, 2.0, "-inf"]), decision("a", 1, logits=[0.1, 0.2], head="h")]
    s = import_jsonl(write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "t.trace", keep_logits=True)
    assert (s.decisions, s.tensors) == (2, 2)
    r = TraceReader(tmp_path / "t.trace")
    exact = r.tensor("a", 0, "logits:token")
    assert exact.dtype == np.float32 and exact.tolist() == [0.5, 2.0, -np.inf]
    precise = r.tensor("a", 1, "logits:h")  # 0.1 is not a float32: kept as float64
    assert precise.dtype == np.float64 and precise.tolist() == [0.1, 0.2]


def test_topk_lines_keep_every_field(tmp_path: Path) -> None:
    lines = [
        decision("a", 0, head="token", chosen=9, topk_ids=[4, 2, 7], topk_logits=[5.0, "nan", None],
                 logsumexp=6.5, chosen_logit=-3.0, chosen_rank=40, forced=True, piece="",
                 watched=[{"id": 3, "logit": "-inf", "rank": 99}, {"id": 8}], frame=1, chunk=2, position=3,
                 emission=4, time="2024-05-01T12:00:00.5+02:00"),
        decision("a", 1, topk_ids=[1, 0], topk_logits=[2, 2], time=1_714_557_600_000_001),
        decision("a", 2, topk_ids=[1, 0], topk_logits=[2, 1], time="2024-05-01T10:00:00", margin=123.0),
    ]
    import_jsonl(write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "t.trace")
    rows = TraceReader(tmp_path / "t.trace").decisions(derive=False).to_pylist()
    r = rows[0]
    assert (r["chosen"], r["argmax"], r["topk_ids"], r["forced"], r["piece"]) == (9, 4, [4, 2, 7], True, "")
    assert r["topk_logits"][0] == 5.0 and all(math.isnan(v) for v in r["topk_logits"][1:])
    assert (r["logsumexp"], r["chosen_logit"], r["chosen_rank"]) == (6.5, -3.0, 40)
    assert r["watched"] == [{"id": 3, "logit": -np.inf, "rank": 99}, {"id": 8, "logit": None, "rank": None}]
    assert (r["frame"], r["chunk"], r["position"], r["emission"]) == (1, 2, 3, 4)
    us = lambda t: int(t.timestamp() * 1_000_000)  # noqa: E731
    assert us(r["time"]) == 1_714_557_600_500_000  # 12:00:00.5+02:00 = 10:00:00.5Z
    assert us(rows[1]["time"]) == 1_714_557_600_000_001
    assert us(rows[2]["time"]) == 1_714_557_600_000_000  # naive ISO times are UTC
    assert rows[1]["chosen"] == 1 and rows[1]["margin"] == 0.0
    assert rows[2]["margin"] == 1.0  # margin is always derived (SPEC.md §3.2), never taken from the line


def test_times_beyond_iso_8601_stay_numbers(tmp_path: Path) -> None:
    times = [-62_135_596_800_000_001, 0, 253_402_300_800_000_000]  # before year 1, epoch, year 10000
    lines = [decision("a", i, topk_ids=[1, 0], topk_logits=[2, 1], time=t) for i, t in enumerate(times)]
    import_jsonl(write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "t.trace")
    export_jsonl(tmp_path / "t.trace", tmp_path / "out.jsonl")
    exported = [json.loads(ln)["time"] for ln in (tmp_path / "out.jsonl").read_text().splitlines()[1:]]
    assert exported == [times[0], "1970-01-01T00:00:00.000000Z", times[2]]
    import_jsonl(tmp_path / "out.jsonl", tmp_path / "u.trace")
    got = TraceReader(tmp_path / "u.trace").decisions()["time"].cast(pa.int64()).to_pylist()
    assert got == times


# ---------------------------------------------------------------------- payload files
def test_npy_payloads(tmp_path: Path) -> None:
    (tmp_path / "arrays").mkdir()
    arrays = {
        "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
        "big_endian": np.array([1.5, -np.inf, np.nan], dtype=">f4"),
        "mask": np.array([[True], [False]]),
        "scalar": np.array(7, dtype=np.int64),
        "empty": np.zeros((0, 3), np.float16),
        "bf": BF16_BITS,
    }
    lines = []
    for name, arr in arrays.items():
        np.save(tmp_path / "arrays" / f"{name}.npy", arr)
        dtype = "bfloat16" if name == "bf" else arr.dtype.name
        lines.append(tensor(name, dtype, list(arr.shape), npy=f"arrays/{name}.npy"))
    import_jsonl(write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "t.trace")
    r = TraceReader(tmp_path / "t.trace")
    for name, arr in arrays.items():
        got = r.tensor("s", 0, name, raw_bits=True)
        want = np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"))
        assert got.shape == arr.shape and got.tobytes() == want.tobytes(), name


def test_raw_payloads_with_offset(tmp_path: Path) -> None:
    a = np.array([[1.0, -0.0, np.nan], [np.inf, 2.5, 1e-42]], np.float32)
    b = np.arange(5, dtype=np.float32) - 2
    with open(tmp_path / "dump.f32", "wb") as f:
        a.astype("<f4").tofile(f)
        b.astype("<f4").tofile(f)
    np.array([-3, 300], np.int16).astype("<i2").tofile(tmp_path / "ids.i16")
    lines = [
        tensor("a", shape=[2, 3], raw="dump.f32"),
        tensor("b", shape=[5], raw="dump.f32", offset=a.nbytes),
        tensor("ids", "int16", [2], raw="ids.i16"),
        tensor("none", shape=[0], raw="dump.f32", offset=a.nbytes + b.nbytes),
    ]
    import_jsonl(write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "t.trace")
    r = TraceReader(tmp_path / "t.trace")
    assert r.tensor("s", 0, "a").tobytes() == a.tobytes()
    assert r.tensor("s", 0, "b").tolist() == b.tolist()
    assert r.tensor("s", 0, "ids").tolist() == [-3, 300]
    assert r.tensor("s", 0, "none").shape == (0,)


@pytest.mark.parametrize(
    ("path", "reason"),
    [
        ("../outside.f32", "'..'"),
        ("sub/../../outside.f32", "'..'"),
        ("ABSOLUTE", "absolute"),
        ("link.f32", "outside the JSONL file's folder"),
        ("sub", "not a regular file"),
        ("missing.f32", "not found"),
    ],
)
def test_payload_paths_stay_inside_the_folder(tmp_path: Path, path: str, reason: str) -> None:
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    outside = tmp_path / "outside.f32"
    np.zeros(2, np.float32).tofile(outside)
    (folder / "link.f32").symlink_to(outside)
    path = str(outside) if path == "ABSOLUTE" else path
    src = write_jsonl(folder / "in.jsonl", [tensor(raw=path)])
    with pytest.raises(JsonlError, match=re.escape(reason)) as err:
        import_jsonl(src, tmp_path / "t.trace")
    assert err.value.line == 1
    assert not (tmp_path / "t.trace").exists()


def test_symlink_inside_the_folder_is_allowed(tmp_path: Path) -> None:
    np.arange(2, dtype=np.float32).tofile(tmp_path / "real.f32")
    (tmp_path / "alias.f32").symlink_to(tmp_path / "real.f32")
    import_jsonl(write_jsonl(tmp_path / "in.jsonl", [tensor(raw="alias.f32")]), tmp_path / "t.trace")
    assert TraceReader(tmp_path / "t.trace").tensor("s", 0, "x").tolist() == [0.0, 1.0]


# ---------------------------------------------------------------------- bad lines
META = {"kind": "meta", "model": "m"}
GOOD = decision("s", 0, topk_ids=[1, 0], topk_logits=[2.0, 1.0])
BAD_LINES = [
    ("{\"kind\": \"decision\",", "not valid JSON"),
    ("[1, 2]", "JSON object"),
    ({"kind": ["decision"]}, "kind must be a string, got array"),
    ({"sample": "s"}, "missing key 'kind'"),
    ({"kind": 3}, "kind must be a string"),
    (decision(None, logits=[1, 2]), "sample must be a non-empty string"),
    ({"kind": "decision", "step": 0, "logits": [1, 2]}, "missing key 'sample'"),
    (decision(step=-1, logits=[1, 2]), "step = -1 is out of range"),
    (decision(step=1.5, logits=[1, 2]), "step must be an integer"),
    (decision(step=True, logits=[1, 2]), "step must be an integer, got boolean"),
    (decision(), "needs either logits or topk_ids"),
    (decision(logits=[1, 2], topk_ids=[0, 1]), "not both"),
    (decision(logits=[1, "big"]), "logits[1] must be a number"),
    (decision(logits=[True, 1]), "logits[0] must be a number, null"),
    (decision(logits={"a": 1}), "logits must be an array"),
    (decision(logits=[1.0]), "at least 2"),
    (decision(logits=[1, 2, 3], k=1), "k = 1"),
    (decision(logits=[1, 2, 3], chosen=3), "outside the logits"),
    (decision(topk_ids=[0, 1, 2], topk_logits=[3, 2]), "topk_ids has 3 entries but topk_logits has 2"),
    (decision(topk_ids=[0], topk_logits=[3]), "at least the top 2"),
    (decision(topk_ids=[0, 1], topk_logits=[1, 2]), "not best first at position 1"),
    (decision(topk_ids=[0, 1, 2], topk_logits=["nan", 1, 0]), "not best first at position 1 (NaN then 1.0)"),
    (decision(topk_ids=[0, 0], topk_logits=[2, 1]), "repeats an id"),
    (decision(topk_ids=[0, 1], topk_logits=[2, 1], argmax=1), "argmax 1 differs"),
    (decision(topk_ids=[0, -1], topk_logits=[2, 1]), "topk_ids[1] = -1 is out of range"),
    (decision(topk_ids=[0, 1], topk_logits=[2, 1], watched=[{"logit": 1}]), "missing key 'id'"),
    (decision(topk_ids=[0, 1], topk_logits=[2, 1], watched=[{"id": 1, "rank": 2**31}]), "watched[0].rank"),
    (decision(topk_ids=[0, 1], topk_logits=[2, 1], time="yesterday"), "ISO 8601"),
    (decision(topk_ids=[0, 1], topk_logits=[2, 1], time=1.5), "whole microseconds"),
    (decision(topk_ids=[0, 1], topk_logits=[2, 1], piece=5), "piece must be a string"),
    (decision(topk_ids=[0, 1], topk_logits=[2, 1], forced="yes"), "forced must be true or false"),
    (decision(topk_ids=[0, 1], topk_logits=[2, 1], frame=2**31), "frame = 2147483648 is out of range"),
    (decision(topk_ids=[0, 1], topk_logits=[2, 1], logsumexp="big"), "logsumexp must be a number"),
    (decision(head="", logits=[1, 2]), "head must be a non-empty string"),
    (META, "second meta line"),
    (tensor(dtype="complex64", data_b64=""), "dtype 'complex64' is not a steptrace dtype"),
    ({"kind": "tensor", "sample": "s", "step": 0, "name": "x", "dtype": "int8"}, "missing key 'shape'"),
    (tensor(shape=[2, -1], data_b64=""), "shape[1] = -1 is out of range"),
    (tensor(name="", data_b64=""), "name must be a non-empty string"),
    (tensor(data_b64="AAAAAA=="), "holds 4 bytes but dtype float32 and shape [2] need 8"),
    (tensor(data_b64="not base64!"), "not valid base64"),
    (tensor(data_b64=b64(np.zeros(2, np.float32)), npy="a.npy"), "only one of data_b64, npy or raw"),
    (tensor(), "needs one of data_b64, npy, raw"),
    (tensor(npy="nope.npy"), "'nope.npy' not found"),
    (tensor(npy="f64.npy"), "holds float64 values but the line says dtype float32"),
    (tensor(shape=[3], npy="f32.npy"), "has shape [2] but the line says [3]"),
    (tensor(dtype="bfloat16", npy="f64.npy"), "holds float64 values but the line says dtype bfloat16"),
    (tensor(npy="objects.npy"), "without pickled objects"),
    (tensor(npy="arch.npz"), ".npz archive"),
    (tensor(raw="short.raw"), "holds 4 bytes; dtype float32 and shape [2] need 8 bytes from offset 0"),
    (tensor(raw="f32.npy", offset=10**9), "past its end"),
    (tensor(data_b64=b64(np.zeros(2, np.float32)), offset=4), "offset is only used with raw"),
    (tensor(dtype="bool", data_b64=b64(np.array([0, 2], np.uint8))), "bytes other than 0x00 and 0x01"),
    (tensor(stats={}, digest="xyz"), "digest must be 32 hex digits"),
    (tensor(data_b64=b64(np.zeros(2, np.float32)), digest="0" * 32), "digest does not match the values"),
    (tensor(stats=[1, 2]), "stats must be an object"),
    (tensor(stats={"nan_count": 3}), "3 NaN and 0 Inf in a tensor of 2 elements"),
    (tensor(stats={"min": "low"}), "stats.min must be a number"),
    (tensor(stats={}, call=-1), "call = -1 is out of range"),
]


@pytest.fixture
def payload_folder(tmp_path: Path) -> Path:
    np.save(tmp_path / "f64.npy", np.zeros(2, np.float64))
    np.save(tmp_path / "f32.npy", np.zeros(2, np.float32))
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    np.savez(tmp_path / "arch.npz", x=np.zeros(2, np.float32))
    (tmp_path / "short.raw").write_bytes(b"\0" * 4)
    return tmp_path


@pytest.mark.parametrize(("line", "reason"), BAD_LINES, ids=[r for _, r in BAD_LINES])
def test_bad_line_is_reported_with_its_number(payload_folder: Path, line: object, reason: str) -> None:
    src = write_jsonl(payload_folder / "in.jsonl", [META, GOOD, "", "  ", line, GOOD])
    dst = payload_folder / "out.trace"
    with pytest.raises(JsonlError) as err:
        import_jsonl(src, dst)
    assert err.value.line == 5, err.value
    assert reason in err.value.reason
    assert str(err.value).startswith(f"{src}:5: ")
    assert not dst.exists()  # a failed import leaves nothing that looks like a trace


@pytest.mark.parametrize(
    ("lines", "line_no", "reason"),
    [
        ([GOOD, META], 2, "must come before every decision"),
        ([{"kind": "meta", "watched": {"eos": "3"}}], 1, "watched must map token names"),
        ([{"kind": "meta", "vocab": "vocab.arrow"}], 1, "meta vocab must be an array"),
        ([{"kind": "meta", "vocab": {"x": "a"}}], 1, "vocab key 'x' is not a token id"),
        ([{"kind": "meta", "vocab": ["a", 3]}], 1, "meta vocab[1] must be a string"),
        ([{"kind": "meta", "tags": {"a": 1}}], 1, "meta tags must be an object of strings"),
        ([{"kind": "meta", "model": 5}], 1, "meta model must be a string"),
        ([{"kind": "meta", "command": "run it"}], 1, "meta command must be an array of strings"),
    ],
)
def test_bad_meta_lines(tmp_path: Path, lines: list, line_no: int, reason: str) -> None:
    with pytest.raises(JsonlError, match=re.escape(reason)) as err:
        import_jsonl(write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "t.trace")
    assert err.value.line == line_no
    assert not (tmp_path / "t.trace").exists()


def test_invalid_utf8_and_damaged_zstd(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_bytes(json.dumps(GOOD).encode() + b"\n{\"kind\": \"x\xff\"}\n")
    with pytest.raises(JsonlError, match="not valid UTF-8") as err:
        import_jsonl(tmp_path / "bad.jsonl", tmp_path / "t.trace")
    assert err.value.line == 2
    text = "".join(json.dumps(decision("s", i, logits=[i, 0.5])) + "\n" for i in range(3000)).encode()
    data = zstandard.ZstdCompressor().compress(text)
    damaged = data[: len(data) // 2] + bytes(len(data) - len(data) // 2)
    for name, content, reason in [
        ("damaged.jsonl.zst", damaged, "zstd data is damaged"),
        ("truncated.jsonl.zst", data[: len(data) // 2], "the file is truncated"),
        ("cut.jsonl.zst", data[:-1], "the file is truncated"),  # the last byte only
    ]:
        (tmp_path / name).write_bytes(content)
        with pytest.raises(JsonlError, match=reason):
            import_jsonl(tmp_path / name, tmp_path / "t.trace")
        assert not (tmp_path / "t.trace").exists()


# ---------------------------------------------------------------------- clean-up after failure
def test_failed_append_keeps_the_existing_trace(tmp_path: Path) -> None:
    src = make_trace(tmp_path / "a.trace")
    before = sorted(p.name for p in (src / "parts").iterdir())
    bad = write_jsonl(tmp_path / "in.jsonl", [decision("new", 0, logits=[1, 2]), decision("new", 1, logits=[1])])
    with pytest.raises(JsonlError):
        import_jsonl(bad, src, mode="append")
    assert sorted(p.name for p in (src / "parts").iterdir()) == before
    assert TraceReader(src).samples() == ["s0", "s1"]
    with pytest.raises(TraceExistsError):
        import_jsonl(bad, src)  # mode="create" refuses before reading a line
    with pytest.raises(JsonlError):  # the bad meta line fails before the old trace is replaced
        import_jsonl(write_jsonl(tmp_path / "m.jsonl", [{"kind": "meta", "model": 1}, GOOD]), src, mode="overwrite")
    assert TraceReader(src).samples() == ["s0", "s1"]


def test_failed_import_into_empty_folder_removes_only_its_files(tmp_path: Path) -> None:
    dst = tmp_path / "t.trace"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    bad = write_jsonl(tmp_path / "in.jsonl", [{"kind": "meta", "vocab": ["a"]}, GOOD, decision("s", 1)])
    with pytest.raises(JsonlError):
        import_jsonl(bad, dst)
    assert sorted(p.name for p in dst.iterdir()) == ["notes.txt"]


def test_append_and_overwrite_modes(tmp_path: Path) -> None:
    good = write_jsonl(tmp_path / "a.jsonl", [GOOD])
    other = write_jsonl(tmp_path / "b.jsonl", [decision("t", 0, topk_ids=[0, 1], topk_logits=[1, 0])])
    import_jsonl(good, tmp_path / "x.trace")
    import_jsonl(other, tmp_path / "x.trace", mode="append")
    assert TraceReader(tmp_path / "x.trace").samples() == ["s", "t"]
    import_jsonl(other, tmp_path / "x.trace", mode="overwrite")
    assert TraceReader(tmp_path / "x.trace").samples() == ["t"]


# ---------------------------------------------------------------------- options, meta, misc
def test_zst_input_with_several_frames_and_progress(tmp_path: Path) -> None:
    frames = [zstandard.ZstdCompressor().compress((json.dumps(decision("s", i, logits=[i, 1.5])) + "\n").encode())
              for i in range(30)]
    src = tmp_path / "in.jsonl.zst"
    src.write_bytes(b"".join(frames))
    calls: list[tuple[int, int]] = []
    s = import_jsonl(src, tmp_path / "t.trace", progress=lambda n, b: calls.append((n, b)))
    assert s.decisions == 30 and s.lines == 30
    assert calls[-1] == (30, src.stat().st_size)
    assert TraceReader(tmp_path / "t.trace").decisions()["argmax"].to_pylist() == [1, 1] + [0] * 28


def test_meta_vocab_object_extra_keys_and_ignored_lines(tmp_path: Path) -> None:
    lines = [
        "",
        {"kind": "comment", "text": "unknown kinds are ignored"},
        {"kind": "meta", "vocab": {"0": "a", "5": "f"}, "runtime": {"name": "coreml", "version": "8"},
         "producer": {"name": "mycpp", "version": "2"}, "vocab_head": "tok", "custom": {"x": 1}},
        decision("s", 0, head="tok", logits=[1, 2, 3, 4, 5, 6]),
    ]
    import_jsonl(write_jsonl(tmp_path / "in.jsonl", lines), tmp_path / "t.trace")
    r = TraceReader(tmp_path / "t.trace")
    assert r.vocab == ["a", None, None, None, None, "f"]
    assert (r.metadata.runtime, r.metadata.runtime_version, r.metadata.producer) == ("coreml", "8", "mycpp")
    assert r.metadata.extra == {"custom": {"x": 1}} and r.metadata.vocab_head == "tok"
    export_jsonl(r, tmp_path / "out.jsonl")
    meta = json.loads((tmp_path / "out.jsonl").read_text().splitlines()[0])
    assert meta["vocab"] == {"0": "a", "5": "f"}
    import_jsonl(tmp_path / "out.jsonl", tmp_path / "u.trace")
    assert_same_trace(tmp_path / "t.trace", tmp_path / "u.trace")


def test_empty_file_gives_an_empty_trace(tmp_path: Path) -> None:
    s = import_jsonl(write_jsonl(tmp_path / "in.jsonl", []), tmp_path / "t.trace")
    assert (s.lines, s.decisions, s.samples) == (0, 0, 0)
    r = TraceReader(tmp_path / "t.trace")
    assert r.decisions().num_rows == 0 and r.metadata.command is None
    assert export_jsonl(r, tmp_path / "out.jsonl") == 1


def test_bad_options(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", [GOOD])
    with pytest.raises(TraceUsageError, match="k >= 2"):
        import_jsonl(src, tmp_path / "t.trace", k=1)
    with pytest.raises(TraceUsageError, match="mode"):
        import_jsonl(src, tmp_path / "t.trace", mode="replace")
    assert not (tmp_path / "t.trace").exists()


def test_export_progress_and_tensor_digest_check(tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    trace = make_trace(tmp_path / "a.trace")
    n = export_jsonl(trace, tmp_path / "a.jsonl", progress=lambda done, total: calls.append((done, total)))
    assert calls[-1] == (n, n)
    values = np.array([1, 2], np.float32)
    good = tensor(data_b64=b64(values), digest=digest(values.tobytes()).hex())
    import_jsonl(write_jsonl(tmp_path / "in.jsonl", [good]), tmp_path / "t.trace")
    assert TraceReader(tmp_path / "t.trace").tensor("s", 0, "x").tolist() == [1.0, 2.0]


# ---------------------------------------------------------------------- property test
DTYPE_NAMES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
               "uint64", "uint32", "uint16", "uint8", "bool"]
CONTAINERS = {"bfloat16": np.dtype("<u2"), "bool": np.dtype("?")}


@st.composite
def tensors(draw: st.DrawFn) -> tuple[str, tuple[int, ...], bytes]:
    dtype = draw(st.sampled_from(DTYPE_NAMES))
    shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
    n = math.prod(shape) * (CONTAINERS[dtype] if dtype in CONTAINERS else np.dtype(dtype)).itemsize
    if dtype == "bool":
        data = bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n)))
    else:
        data = draw(st.binary(min_size=n, max_size=n))  # any bit pattern: NaN payloads, -0.0, subnormals
    return dtype, shape, data


@settings(max_examples=60, deadline=None)
@given(st.lists(tensors(), min_size=1, max_size=4), st.booleans())
def test_tensor_round_trip_property(items: list[tuple[str, tuple[int, ...], bytes]], compress: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        lines = [tensor(f"t{i}", dtype, list(shape), data_b64=base64.b64encode(data).decode())
                 for i, (dtype, shape, data) in enumerate(items)]
        import_jsonl(write_jsonl(d / "in.jsonl", lines, compress=compress), d / "a.trace")
        r = TraceReader(d / "a.trace")
        for i, (_, shape, data) in enumerate(items):
            got = r.tensor("s", 0, f"t{i}", raw_bits=True)
            assert got.shape == shape and got.tobytes() == data
        out = d / ("out.jsonl.zst" if compress else "out.jsonl")
        assert export_jsonl(r, out) == 1 + len(items)
        import_jsonl(out, d / "b.trace")
        assert_same_trace(d / "a.trace", d / "b.trace")
        exported = [ln for ln in _read_lines(out) if ln["kind"] == "tensor"]
        assert sorted(ln["data_b64"] for ln in exported) == sorted(ln["data_b64"] for ln in lines)


def _read_lines(path: Path) -> list[dict]:
    raw = path.read_bytes()
    if path.name.endswith(".zst"):
        raw = zstandard.ZstdDecompressor().stream_reader(raw).read()
    return [json.loads(ln) for ln in raw.decode().splitlines()]


def test_json_nan_literals_and_bom_are_accepted(tmp_path: Path) -> None:
    text = "\ufeff" + json.dumps(decision("s", 0, logits=[float("nan"), 1.0, float("-inf")])) + "\n"
    (tmp_path / "in.jsonl").write_text(text, encoding="utf-8")
    import_jsonl(tmp_path / "in.jsonl", tmp_path / "t.trace")
    r = TraceReader(tmp_path / "t.trace").decisions().to_pylist()[0]
    assert r["topk_ids"][:2] == [1, 2] and os.path.isdir(tmp_path / "t.trace")


def test_named_pipe_input(tmp_path: Path) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    data = zstandard.ZstdCompressor().compress(
        "".join(json.dumps(decision("p", i, logits=[0, i])) + "\n" for i in range(100)).encode())

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(data)

    feeder = threading.Thread(target=feed)
    feeder.start()
    calls: list[tuple[int, int]] = []
    s = import_jsonl(fifo, tmp_path / "t.trace", progress=lambda n, b: calls.append((n, b)))
    feeder.join()
    assert s.decisions == 100 and calls[-1] == (100, len(data))


def test_io_failures_are_trace_errors(tmp_path: Path) -> None:
    make_trace(tmp_path / "a.trace")
    with pytest.raises(TraceWriteError, match="no-such-folder"):
        export_jsonl(tmp_path / "a.trace", tmp_path / "no-such-folder" / "out.jsonl")
    with pytest.raises(TraceNotFoundError):
        import_jsonl(tmp_path / "missing.jsonl", tmp_path / "t.trace")
    with pytest.raises(TraceUsageError, match="is a directory"):
        import_jsonl(tmp_path, tmp_path / "t.trace")


def test_export_refuses_to_overwrite_without_the_flag(tmp_path: Path) -> None:
    from steptrace.tracefmt.errors import TraceExistsError
    from steptrace.tui.cli import main

    src = make_trace(tmp_path / "a.trace")
    out = tmp_path / "a.jsonl"
    out.write_text("precious\n")
    with pytest.raises(TraceExistsError, match="exists; pass overwrite=True"):
        export_jsonl(src, out)
    assert out.read_text() == "precious\n"
    assert main(["export", str(src), "--format", "jsonl", "-o", str(out)]) == 2
    assert out.read_text() == "precious\n"
    assert main(["export", str(src), "--format", "jsonl", "-o", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith('{"kind":"meta"')
    with pytest.raises(TraceExistsError, match="is a folder"):
        export_jsonl(src, tmp_path, overwrite=True)
