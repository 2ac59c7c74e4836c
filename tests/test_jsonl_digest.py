"""Digests through JSONL (SPEC.md §4.5, §6): an import labels its part with the file's digest
algorithm, checks a digest beside values with that digest's own algorithm, never stores a
digest under another algorithm's name; an export names every digest's algorithm; the differ
compares digests of one algorithm only, so SHA-256 imports are bit-exact with native (XXH3)
traces through their values, never through their digests."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import xxhash

from steptrace.differ import diff
from steptrace.tracefmt import JsonlError, TraceReader, TraceWriter
from steptrace.tracefmt.jsonl import export_jsonl, import_jsonl
from steptrace.tracefmt.payload import SHA256_128, XXH3_128

LOGITS = [0.0, 2.0, 1.0]


def _x(step: int) -> np.ndarray:
    return np.arange(64, dtype=np.float32) + step


def _stats(a: np.ndarray) -> dict:
    f = a.astype(np.float64)
    return {"min": f.min(), "max": f.max(), "mean": f.mean(), "std": f.std(), "abs_max": np.abs(f).max(),
            "l2": float(np.sqrt((f * f).sum())), "nan_count": 0, "inf_count": 0}


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(a.tobytes()).digest()[:16].hex()


def xxh(a: np.ndarray) -> str:
    return xxhash.xxh3_128_digest(a.tobytes()).hex()


def _native(path: Path, *, values: bool) -> Path:
    """A trace written by the writer (XXH3 digests): tensor x at steps 0-2, one decision each."""
    with TraceWriter(path) as w:
        for step in range(3):
            w.add_logits("s", step, np.array(LOGITS, np.float32))
            w.add_tensor("s", step, "x", _x(step), values=values)
    return path


def _jsonl(path: Path, *, values: bool, meta: dict | None = None, dig=sha) -> Path:
    """The same run as a JSONL producer following SPEC.md §6 writes it."""
    lines = [] if meta is None else [{"kind": "meta", **meta}]
    for step in range(3):
        lines.append({"kind": "decision", "sample": "s", "step": step, "logits": LOGITS})
        t = {"kind": "tensor", "sample": "s", "step": step, "name": "x", "dtype": "float32", "shape": [64],
             "digest": dig(_x(step))}
        if values:
            t["data_b64"] = base64.b64encode(_x(step).tobytes()).decode()
        else:
            t["stats"] = _stats(_x(step))
        lines.append(t)
    path.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    return path


def _digests(path: Path) -> list[bytes]:
    return TraceReader(path).tensors(name="x")["digest"].to_pylist()


@pytest.mark.parametrize("values", [True, False])
def test_bare_digests_are_sha256_and_the_part_says_so(tmp_path, values):
    summary = import_jsonl(_jsonl(tmp_path / "in.jsonl", values=values), tmp_path / "t.trace")
    assert summary.digest == SHA256_128 and summary.digests_dropped == 0
    r = TraceReader(tmp_path / "t.trace")
    assert [p.digest for p in r.parts] == [SHA256_128]
    assert _digests(tmp_path / "t.trace") == [bytes.fromhex(sha(_x(s))) for s in range(3)]
    if values:
        np.testing.assert_array_equal(r.tensor("s", 1, "x"), _x(1))  # verified against its SHA-256 digest


def test_a_sha256_import_is_bit_exact_with_a_native_trace_through_values_only(tmp_path):
    native = _native(tmp_path / "n.trace", values=True)
    import_jsonl(_jsonl(tmp_path / "in.jsonl", values=True), tmp_path / "j.trace")
    t = diff(native, [tmp_path / "j.trace"]).worst.tensors
    assert t["bitexact"] == t["compared"] == 3
    assert t["by_basis"].get("values") == 3 and not t["by_basis"].get("digest")


def test_a_sha256_statistics_only_import_is_never_called_bit_exact_by_digest(tmp_path):
    native = _native(tmp_path / "n.trace", values=False)
    import_jsonl(_jsonl(tmp_path / "in.jsonl", values=False), tmp_path / "j.trace")
    report = diff(native, [tmp_path / "j.trace"])
    t = report.worst.tensors
    assert t["bitexact"] == 0 and t["beyond"] == 0 and t["by_basis"].get("stats") == 3
    assert report.verdict == "equivalent"


def test_a_file_naming_xxh3_imports_into_an_xxh3_part_bit_exact_by_digest(tmp_path):
    native = _native(tmp_path / "n.trace", values=False)
    src = _jsonl(tmp_path / "in.jsonl", values=False, meta={"digest": XXH3_128}, dig=xxh)
    summary = import_jsonl(src, tmp_path / "j.trace")
    assert summary.digest == XXH3_128
    r = TraceReader(tmp_path / "j.trace")
    assert [p.digest for p in r.parts] == [XXH3_128] and "digest" not in r.metadata.extra
    assert _digests(tmp_path / "j.trace") == _digests(native)
    t = diff(native, [tmp_path / "j.trace"]).worst.tensors
    assert t["bitexact"] == t["compared"] == 3 and t["by_basis"].get("digest") == 3


def test_a_digest_naming_another_algorithm_is_checked_with_it_or_left_out(tmp_path):
    a = _x(0)
    lines = [
        {"kind": "meta", "digest": XXH3_128},
        # beside values: checked with SHA-256, the part's XXH3 digest computed from the values
        {"kind": "tensor", "sample": "s", "step": 0, "name": "v", "dtype": "float32", "shape": [64],
         "data_b64": base64.b64encode(a.tobytes()).decode(), "digest": f"{SHA256_128}:{sha(a)}"},
        # statistics only, SHA-256: cannot be stored in an XXH3 part
        {"kind": "tensor", "sample": "s", "step": 0, "name": "s", "dtype": "float32", "shape": [64],
         "stats": _stats(a), "digest": f"{SHA256_128}:{sha(a)}"},
        # statistics only, XXH3 named explicitly: stored
        {"kind": "tensor", "sample": "s", "step": 0, "name": "k", "dtype": "float32", "shape": [64],
         "stats": _stats(a), "digest": f"{XXH3_128}:{xxh(a)}"},
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    summary = import_jsonl(src, tmp_path / "t.trace")
    assert summary.digests_dropped == 1
    assert "1 statistics-only digest not of the file's xxh3-128 left out" in str(summary)
    rows = {t["name"]: t["digest"] for t in TraceReader(tmp_path / "t.trace").tensors().to_pylist()}
    assert rows == {"v": bytes.fromhex(xxh(a)), "s": None, "k": bytes.fromhex(xxh(a))}
    lines[1]["digest"] = f"{SHA256_128}:{xxh(a)}"  # an XXH3 digest claimed to be SHA-256
    src.write_text("".join(json.dumps(ln) + "\n" for ln in lines))
    with pytest.raises(JsonlError, match=r"in.jsonl:2: digest does not match the values \(sha256-128"):
        import_jsonl(src, tmp_path / "u.trace")


@pytest.mark.parametrize(("line", "match"), [
    ({"kind": "meta", "digest": "md5"}, r"in.jsonl:1: meta digest names digest algorithm \"md5\""),
    ({"kind": "meta", "digest": 3}, "in.jsonl:1: meta digest names digest algorithm 3"),
    ({"kind": "tensor", "sample": "s", "step": 0, "name": "x", "dtype": "float32", "shape": [1],
      "stats": {}, "digest": "crc32:" + "0" * 32}, r"in.jsonl:1: digest names digest algorithm \"crc32\""),
    ({"kind": "tensor", "sample": "s", "step": 0, "name": "x", "dtype": "float32", "shape": [1],
      "stats": {}, "digest": "xxh3-128:" + "0" * 31}, "digest must be 32 hex digits"),
])
def test_unknown_algorithms_are_refused_with_the_line(tmp_path, line, match):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps(line) + "\n")
    with pytest.raises(JsonlError, match=match):
        import_jsonl(src, tmp_path / "t.trace")


@pytest.mark.parametrize("algorithm", [XXH3_128, SHA256_128])
@pytest.mark.parametrize("values", [True, False])
def test_round_trip_keeps_the_algorithm_and_every_digest(tmp_path, algorithm, values):
    with TraceWriter(tmp_path / "a.trace", digest=algorithm) as w:
        for step in range(3):
            w.add_logits("s", step, np.array(LOGITS, np.float32))
            w.add_tensor("s", step, "x", _x(step), values=values)
    export_jsonl(tmp_path / "a.trace", tmp_path / "a.jsonl")
    lines = [json.loads(ln) for ln in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert lines[0]["digest"] == algorithm
    assert all(ln["digest"].startswith(f"{algorithm}:") for ln in lines if ln["kind"] == "tensor")
    summary = import_jsonl(tmp_path / "a.jsonl", tmp_path / "b.trace")
    assert (summary.digest, summary.digests_dropped) == (algorithm, 0)
    assert [p.digest for p in TraceReader(tmp_path / "b.trace").parts] == [algorithm]
    assert _digests(tmp_path / "b.trace") == _digests(tmp_path / "a.trace")
    t = diff(tmp_path / "a.trace", [tmp_path / "b.trace"]).worst.tensors
    assert t["bitexact"] == t["compared"] == 3 and t["by_basis"].get("digest") == 3


def test_a_mixed_algorithm_trace_exports_with_the_majority_and_imports_without_mislabelling(tmp_path):
    """A trace whose parts use both algorithms (a 1.0 part beside a 1.1 one): the export names
    the algorithm of most rows; the import keeps the values of every row and the statistics-only
    digests of that algorithm, and counts the others it left out."""
    path = tmp_path / "a.trace"
    with TraceWriter(path, digest=SHA256_128, mode="append") as w:
        w.add_logits("old", 0, np.array(LOGITS, np.float32))
        w.add_tensor("old", 0, "x", _x(0), values=False)
        w.add_tensor("old", 0, "y", _x(1))
    with TraceWriter(path, mode="append") as w:
        for step in range(3):
            w.add_logits("new", step, np.array(LOGITS, np.float32))
            w.add_tensor("new", step, "x", _x(step), values=False)
    export_jsonl(path, tmp_path / "a.jsonl")
    assert json.loads((tmp_path / "a.jsonl").read_text().splitlines()[0])["digest"] == XXH3_128
    summary = import_jsonl(tmp_path / "a.jsonl", tmp_path / "b.trace")
    assert summary.digests_dropped == 1
    r = TraceReader(tmp_path / "b.trace")
    rows = {(t["sample"], t["name"], t["step"]): t["digest"] for t in r.tensors().to_pylist()}
    assert rows[("old", "x", 0)] is None  # its SHA-256 digest is not stored as an XXH3 one
    assert rows[("old", "y", 0)] == bytes.fromhex(xxh(_x(1)))  # recomputed from the values
    assert rows[("new", "x", 2)] == bytes.fromhex(xxh(_x(2)))
    np.testing.assert_array_equal(r.tensor("old", 0, "y"), _x(1))
