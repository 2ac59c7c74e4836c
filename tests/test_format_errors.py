"""Bad input never crashes silently: truncated, empty, random, foreign and future files (SPEC.md §2, §5)."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from steptrace.tracefmt import (
    TraceCorruptError,
    TraceExistsError,
    TraceFormatError,
    TraceNotFoundError,
    TraceReader,
    TraceUsageError,
    TraceVersionError,
    TraceWriter,
    UnsupportedDtypeError,
    ValuesNotRecordedError,
)
from steptrace.tracefmt.validate import validate

from damage import forget_checksums


def _good(path):
    with TraceWriter(path) as w:
        for step in range(20):
            w.add_logits("s", step, np.linspace(0, 1, 16, dtype=np.float32) * step)
            w.add_tensor("s", step, "x", np.arange(100, dtype=np.float32) + step)
    return path


def _file(path, kind):
    (f,) = (path / "parts").glob(f"*.{kind}.arrow")
    return f


def _damage_truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _damage_zero(f):
    f.write_bytes(b"")


def _damage_random(f):
    f.write_bytes(np.random.default_rng(0).bytes(f.stat().st_size))


def _damage_magic(f):
    data = bytearray(f.read_bytes())
    data[:6] = b"PAR1\0\0"
    f.write_bytes(bytes(data))


DAMAGE = {"truncated": _damage_truncate, "zero-byte": _damage_zero, "random": _damage_random,
          "wrong-magic": _damage_magic}


@pytest.mark.parametrize("kind", ["decisions", "tensors", "values"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_data_file_is_a_format_error_and_exit_2(tmp_path, trace_cli, kind, damage):
    path = _good(tmp_path / "t.trace")
    DAMAGE[damage](_file(path, kind))
    with pytest.raises(TraceFormatError) as exc:
        r = TraceReader(path)
        r.decisions()
        r.tensors()
        r.tensor("s", 3, "x")
    assert str(exc.value)
    res = trace_cli("validate", "--deep", str(path))
    assert res.returncode == 2
    assert "error" in res.stderr and "Traceback" not in res.stderr


def test_row_count_disagreeing_with_closed_status_is_corrupt(tmp_path):
    path = _good(tmp_path / "t.trace")
    (status,) = (path / "parts").glob("*.json")
    doc = json.loads(status.read_text())
    doc["counts"]["decisions"] += 1
    status.write_text(json.dumps(doc))
    with pytest.raises(TraceCorruptError, match="closed with 21"):
        TraceReader(path).decisions()


def test_future_major_version_is_refused_with_upgrade_hint(tmp_path, trace_cli):
    path = _good(tmp_path / "t.trace")
    manifest = path / "steptrace.json"
    doc = json.loads(manifest.read_text())
    doc["version"] = "2.0"
    manifest.write_text(json.dumps(doc))
    with pytest.raises(TraceVersionError, match="Upgrade steptrace"):
        TraceReader(path)
    res = trace_cli("validate", str(path))
    assert res.returncode == 2 and "newer" not in res.stdout and "format 2.0" in res.stderr


def test_future_minor_version_and_unknown_keys_are_read(tmp_path):
    path = _good(tmp_path / "t.trace")
    manifest = path / "steptrace.json"
    doc = json.loads(manifest.read_text())
    doc["version"] = "1.7"
    doc["new_key_from_the_future"] = {"x": 1}
    manifest.write_text(json.dumps(doc))
    r = TraceReader(path)
    assert r.metadata.extra["new_key_from_the_future"] == {"x": 1}
    assert r.decisions().num_rows == 20


def test_unknown_columns_are_ignored_and_missing_optional_columns_are_null(tmp_path):
    path = tmp_path / "t.trace"
    with TraceWriter(path) as w:
        w.add_decision("s", 0, chosen=1, topk_ids=[1, 2], topk_logits=[3.0, 1.0])
    f = _file(path, "decisions")
    t = pa.ipc.open_file(f).read_all()
    meta = t.schema.metadata
    t = t.select(["sample", "step", "head", "chosen", "argmax", "forced", "topk_ids", "topk_logits", "margin"])
    t = t.append_column("from_the_future", pa.array([42])).replace_schema_metadata(meta)
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, t.schema) as wr:
        wr.write_table(t)
    with pytest.raises(TraceCorruptError, match="holds .* bytes but its part was closed with"):
        TraceReader(path).decisions()  # the file was rewritten after close
    forget_checksums(path)  # as another writer of format 1.0 would have left it
    d = TraceReader(path).decisions()
    assert "from_the_future" not in d.column_names
    assert d["logsumexp"].to_pylist() == [None]
    assert d["margin"].to_pylist() == [2.0]


def test_foreign_arrow_file_in_parts_is_refused(tmp_path):
    path = _good(tmp_path / "t.trace")
    f = _file(path, "tensors")
    t = pa.table({"a": [1, 2, 3]})
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, t.schema) as wr:
        wr.write_table(t)
    forget_checksums(path)
    with pytest.raises(TraceFormatError, match="not a steptrace tensors file"):
        TraceReader(path).tensors()


@pytest.mark.parametrize(
    "setup, error",
    [
        (lambda p: None, TraceNotFoundError),
        (lambda p: p.write_bytes(b""), TraceFormatError),
        (lambda p: p.mkdir(), TraceFormatError),
        (lambda p: (p.mkdir(), (p / "steptrace.json").write_text("{not json")), TraceFormatError),
        (lambda p: (p.mkdir(), (p / "steptrace.json").write_text('{"format": "other"}')), TraceFormatError),
        (lambda p: (p.mkdir(), (p / "steptrace.json").write_bytes(os.urandom(64))), TraceFormatError),
    ],
    ids=["missing", "zero-byte-file", "empty-dir", "bad-json", "foreign-manifest", "random-manifest"],
)
def test_not_a_trace(tmp_path, trace_cli, setup, error):
    p = tmp_path / "x"
    setup(p)
    with pytest.raises(error):
        TraceReader(p)
    for cmd in ("validate", "info"):
        res = trace_cli(cmd, str(p))
        assert res.returncode == 2 and res.stderr.startswith("error:") and "Traceback" not in res.stderr


def test_damaged_value_payload_is_caught_by_digest_or_size(tmp_path):
    path = tmp_path / "t.trace"
    with TraceWriter(path, encoding="raw") as w:
        w.add_tensor("s", 0, "x", np.arange(1000, dtype=np.float32))
    f = _file(path, "values")
    data = bytearray(f.read_bytes())
    i = data.find(np.arange(1000, dtype=np.float32)[500:504].tobytes())
    data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(TraceCorruptError, match="has changed since its part was closed"):
        TraceReader(path).tensor("s", 0, "x")
    assert not validate(path).ok
    forget_checksums(path)  # behind the checksum, the digest still catches it
    with pytest.raises(TraceCorruptError, match="digest"):
        TraceReader(path).tensor("s", 0, "x")
    assert not validate(path, deep=True).ok


def test_zstd_bomb_is_bounded(tmp_path):
    """A payload that inflates beyond what its shape allows is refused before inflating."""
    import zstandard

    path = tmp_path / "t.trace"
    with TraceWriter(path) as w:
        w.add_tensor("s", 0, "x", np.zeros(4, np.float32))
    f = _file(path, "values")
    t = pa.ipc.open_file(f).read_all()
    bomb = zstandard.ZstdCompressor().compress(bytes(1 << 26))
    t = pa.table({"encoding": ["zstd"], "data": pa.array([bomb], pa.large_binary())},
                 schema=t.schema)
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, t.schema) as wr:
        wr.write_table(t)
    forget_checksums(path)
    with pytest.raises(TraceCorruptError, match="declares 67108864 bytes"):
        TraceReader(path).tensor("s", 0, "x")


def test_writer_errors_are_actionable(tmp_path):
    path = _good(tmp_path / "t.trace")
    with pytest.raises(TraceExistsError, match="mode='append'"):
        TraceWriter(path)
    with TraceWriter(tmp_path / "u.trace") as w:
        with pytest.raises(UnsupportedDtypeError, match="complex"):
            w.add_tensor("s", 0, "c", np.zeros(3, np.complex64))
        with pytest.raises(TraceUsageError, match="step"):
            w.add_tensor("s", -1, "c", np.zeros(3))
        with pytest.raises(TraceUsageError, match="top"):
            w.add_decision("s", 0, chosen=1, topk_ids=[1], topk_logits=[0.5])
        w.add_tensor("s", 0, "stats_only", np.zeros(3), values=False)
    with pytest.raises(ValuesNotRecordedError, match="statistics only"):
        TraceReader(tmp_path / "u.trace").tensor("s", 0, "stats_only")
    with pytest.raises(TraceNotFoundError, match="trace info"):
        TraceReader(tmp_path / "u.trace").tensor("s", 0, "nope")
    not_trace = tmp_path / "precious"
    not_trace.mkdir()
    (not_trace / "data.txt").write_text("keep me")
    with pytest.raises(TraceExistsError, match="refusing to delete"):
        TraceWriter(not_trace, mode="overwrite")
    assert (not_trace / "data.txt").exists()
