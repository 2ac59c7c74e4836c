"""Damaged and hostile input is refused at the door (SPEC.md 1.1): checksums, bounds, types,
uniqueness, the same message everywhere, and no traceback from the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import zstandard

from steptrace.tracefmt import (
    JsonlError,
    TraceCorruptError,
    TraceExistsError,
    TraceFormatError,
    TraceReader,
    TraceUsageError,
    TraceWriter,
    import_jsonl,
)
from steptrace.tracefmt.checksum import file_checksum
from steptrace.tracefmt.validate import validate
from steptrace.tui.cli import main

from damage import forget_checksums

ROOT = Path(__file__).resolve().parents[1]


def _trace(path: Path, *, samples=("s",), steps=6, vocab=True, mode="create") -> Path:
    rng = np.random.default_rng(0)
    with TraceWriter(path, vocab=[f"p{i}" for i in range(16)] if vocab else None, mode=mode) as w:
        for s in samples:
            for step in range(steps):
                w.add_logits(s, step, rng.standard_normal(16).astype(np.float32))
                w.add_tensor(s, step, "x", rng.standard_normal(32).astype(np.float32))
    return path


def _status(path: Path) -> tuple[Path, dict]:
    (f,) = (path / "parts").glob("*.json")
    return f, json.loads(f.read_text())


# ---------------------------------------------------------------------- checksums
def test_close_records_size_and_checksum_of_every_file(tmp_path):
    path = _trace(tmp_path / "t.trace")
    f, doc = _status(path)
    assert json.loads((path / "steptrace.json").read_text())["version"] == "1.2"
    part = doc["part"]
    for kind in ("decisions", "tensors", "values"):
        data = path / "parts" / f"{part}.{kind}.arrow"
        assert doc["checksums"][kind] == file_checksum(data)
        assert doc["bytes"][kind] == data.stat().st_size
    assert doc["checksums"]["vocab"] == file_checksum(path / f"vocab-{part}.arrow")
    assert validate(path, deep=True).ok


@pytest.mark.parametrize("kind", ["decisions", "tensors", "values", "vocab"])
def test_any_changed_byte_is_caught_by_its_checksum(tmp_path, kind):
    path = _trace(tmp_path / "t.trace")
    (f,) = path.glob(f"vocab-*.arrow") if kind == "vocab" else (path / "parts").glob(f"*.{kind}.arrow")
    data = bytearray(f.read_bytes())
    for i in np.random.default_rng(1).choice(len(data), 8, replace=False).tolist():
        changed = bytearray(data)
        changed[i] ^= 0x01
        f.write_bytes(bytes(changed))
        report = validate(path)
        assert not report.ok and f.name in report.problems[0] and "changed since its part was closed" in \
            report.problems[0], i
        assert main(["validate", str(path)]) == 2
    f.write_bytes(bytes(data))
    assert validate(path).ok


def test_truncated_values_file_fails_info_and_diff_on_open(tmp_path):
    path = _trace(tmp_path / "t.trace")
    good = _trace(tmp_path / "g.trace")
    (f,) = (path / "parts").glob("*.values.arrow")
    f.write_bytes(f.read_bytes()[:-100])
    assert main(["info", str(path)]) == 2
    assert main(["diff", str(good), str(path)]) == 2
    with pytest.raises(TraceCorruptError, match="holds .* bytes but its part was closed with"):
        TraceReader(path).tensor("s", 0, "x")


def test_interrupted_part_batches_are_validated_in_full(tmp_path):
    w = TraceWriter(tmp_path / "live.trace", flush_steps=1)
    for step in range(5):
        w.add_logits("s", step, np.arange(8, dtype=np.float32) + step)
    w.flush()
    import shutil

    shutil.copytree(tmp_path / "live.trace", tmp_path / "cut.trace")
    w.close()
    (f,) = (tmp_path / "cut.trace" / "parts").glob("*.decisions.arrow")
    data = bytearray(f.read_bytes())
    data[-40] ^= 0xFF  # inside the last batch's body
    f.write_bytes(bytes(data))
    r = TraceReader(tmp_path / "cut.trace")
    d = r.decisions()  # recovered: what validates is kept, the rest is dropped as a damaged tail
    assert d.num_rows <= 5 and not r.complete


# ---------------------------------------------------------------------- JSON bounds and types
@pytest.mark.parametrize("edit, match", [
    (lambda d: d.update(counts=3), "'counts' must be"),
    (lambda d: d.update(pid="12"), "'pid' must be"),
    (lambda d: d.update(pid=10**30), "'pid' must be"),
    (lambda d: d.update(metadata=[1]), "'metadata' must be"),
    (lambda d: d.update(checksums={"decisions": 5}), "'checksums' must be"),
])
def test_part_file_of_wrong_types_is_a_format_error(tmp_path, edit, match):
    path = _trace(tmp_path / "t.trace")
    f, doc = _status(path)
    edit(doc)
    f.write_text(json.dumps(doc))
    with pytest.raises(TraceFormatError, match=match):
        TraceReader(path)
    assert main(["info", str(path)]) == 2


@pytest.mark.parametrize("text, match", [
    ('{"format": "steptrace", "version": "1.1", "tags": ' + "[" * 5000 + "]" * 5000 + "}", "nested 5001 deep"),
    ('{"format": "steptrace", "version": "1.1", "vocab": 3}', "'vocab' must be"),
    ('{"format": "steptrace", "version": "1.1", "runtime": "x"}', "'runtime' must be"),
    ('{"format": "steptrace", "version": ' + "9" * 5000 + "}", "not valid JSON"),
])
def test_hostile_manifest_is_a_format_error(tmp_path, text, match):
    path = _trace(tmp_path / "t.trace")
    (path / "steptrace.json").write_text(text)
    with pytest.raises(TraceFormatError, match=match):
        TraceReader(path)


def test_unknown_json_files_in_parts_are_ignored(tmp_path):
    path = _trace(tmp_path / "t.trace")
    (path / "parts" / "README.json").write_bytes(b"\xff not json")
    (path / "parts" / "notes.json").write_text('{"who": "me"}')
    r = TraceReader(path)
    assert len(r.parts) == 1 and r.complete
    assert validate(path).ok


def test_vocab_with_hostile_ids_is_refused_without_allocating(tmp_path):
    path = _trace(tmp_path / "t.trace")
    (f,) = path.glob("vocab-*.arrow")
    for ids in ([0, 2147483647], [-3, 1], [1, 1]):
        t = pa.table({"id": pa.array(ids, pa.int32()), "piece": ["a", "b"]})
        with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, t.schema) as wr:
            wr.write_table(t)
        forget_checksums(path)
        with pytest.raises(TraceCorruptError, match="vocabulary"):
            TraceReader(path).vocab
        assert not validate(path).ok


# ---------------------------------------------------------------------- refused at the door
_NOT_BEST_FIRST = ("topk_logits are not best first at position 1 (1.0 then 3.0); list the top-k by decreasing "
                   "logit, NaN last (SPEC.md §3.2)")


def test_bad_topk_is_refused_everywhere_with_one_message(tmp_path):
    with TraceWriter(tmp_path / "w.trace") as w:
        with pytest.raises(TraceUsageError) as one:
            w.add_decision("s", 0, chosen=5, topk_ids=[5, 6, 7], topk_logits=[1, 3, 2])
        with pytest.raises(TraceUsageError) as many:
            w.add_decisions({"sample": ["s"], "step": [0], "chosen": [5], "topk_ids": [[5, 6, 7]],
                             "topk_logits": [[1.0, 3.0, 2.0]]})
        with pytest.raises(TraceUsageError, match="repeats an id"):
            w.add_decision("s", 0, chosen=5, topk_ids=[5, 5, 7], topk_logits=[3, 2, 1])
        with pytest.raises(TraceUsageError, match="margin"):
            w.add_decision("s", 0, chosen=5, topk_ids=[5, 6], topk_logits=[3, 2], margin=0.5)
    src = tmp_path / "in.jsonl"
    src.write_text('{"kind": "decision", "sample": "s", "step": 0, "topk_ids": [5, 6, 7], "topk_logits": [1, 3, 2]}\n')
    with pytest.raises(JsonlError) as imp:
        import_jsonl(src, tmp_path / "j.trace")
    expected = "decision (sample 's', step 0, head 'token'): " + _NOT_BEST_FIRST
    assert str(one.value).startswith(expected) and str(many.value).startswith(expected)
    assert imp.value.line == 1 and imp.value.reason.startswith(expected)
    # a trace that holds such a row anyway (written by another tool) is invalid
    path = tmp_path / "v.trace"
    with TraceWriter(path, compact=False) as w:
        w.add_decision("s", 0, chosen=5, topk_ids=[5, 6, 7], topk_logits=[3, 2, 1])
    (f,) = (path / "parts").glob("*.decisions.arrow")
    t = pa.ipc.open_file(str(f)).read_all()
    bad = t.set_column(t.schema.get_field_index("topk_logits"), "topk_logits",
                       pa.array([[1.0, 3.0, 2.0]], t.schema.field("topk_logits").type))
    bad = bad.set_column(bad.schema.get_field_index("margin"), "margin", pa.array([-2.0], pa.float32()))
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, bad.schema) as wr:
        wr.write_table(bad)
    forget_checksums(path)
    report = validate(path, deep=True)
    assert report.problems == [expected]


def test_duplicate_keys_are_refused_by_writer_importer_and_validate(tmp_path):
    with TraceWriter(tmp_path / "w.trace") as w:
        w.add_decision("s", 3, chosen=1, topk_ids=[1, 2], topk_logits=[2, 1])
        with pytest.raises(TraceUsageError, match=r"decision \(sample 's', step 3, head 'token'\): recorded more"):
            w.add_decision("s", 3, chosen=1, topk_ids=[1, 2], topk_logits=[2, 1])
        with pytest.raises(TraceUsageError, match="recorded more than once"):
            w.add_decisions({"sample": ["s", "s"], "step": [4, 3], "chosen": [1, 1], "topk_ids": [[1, 2]] * 2,
                             "topk_logits": [[2.0, 1.0]] * 2})
        w.add_decisions({"sample": ["s", "s"], "step": [4, 5], "chosen": [1, 1], "topk_ids": [[1, 2]] * 2,
                         "topk_logits": [[2.0, 1.0]] * 2})  # the refused batch kept nothing
    src = tmp_path / "in.jsonl"
    line = '{"kind": "decision", "sample": "s", "step": 0, "topk_ids": [1, 2], "topk_logits": [2, 1]}\n'
    src.write_text(line * 2)
    with pytest.raises(JsonlError, match="in.jsonl:2: decision .* recorded more than once"):
        import_jsonl(src, tmp_path / "j.trace")
    path = tmp_path / "two.trace"
    with TraceWriter(path) as w:
        w.add_decision("s", 0, chosen=1, topk_ids=[1, 2], topk_logits=[2, 1])
    with TraceWriter(path, mode="append") as w:
        w.add_decision("s", 0, chosen=1, topk_ids=[1, 2], topk_logits=[2, 1])
    parts = [p.id for p in TraceReader(path).parts]
    problems = " ".join(validate(path).problems)
    assert f"in parts {parts[0]} and {parts[1]}" in problems


def test_second_writer_of_a_part_name_is_refused_at_start(tmp_path, monkeypatch):
    import steptrace.tracefmt.writer as writer_module

    monkeypatch.setattr(writer_module, "part_id", lambda: "host-1-abcdef")
    first = TraceWriter(tmp_path / "t.trace", mode="append")
    first.add_decision("s", 0, chosen=1, topk_ids=[1, 2], topk_logits=[2, 1])
    with pytest.raises(TraceExistsError, match="part host-1-abcdef already exists"):
        TraceWriter(tmp_path / "t.trace", mode="append")
    first.close()
    assert validate(tmp_path / "t.trace").ok and TraceReader(tmp_path / "t.trace").decisions().num_rows == 1


# ---------------------------------------------------------------------- JSONL
def _jsonl(tmp_path: Path, lines: list[str]) -> Path:
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    return src


_GOOD = '{"kind": "decision", "sample": "s", "step": 0, "logits": [1, 2, 3]}'


@pytest.mark.parametrize("line, reason", [
    ('{"kind": "meta", "vocab": {"2147483647": "x"}}', "largest id 2147483647"),
    ('{"kind": "meta", "vocab": {"-3": "x"}}', "is not a token id"),
    ('{"kind": "decision", "sample": "s", "step": 0, "logits": ' + "[" * 100_000 + "]" * 100_000 + "}",
     "nested 100001 deep"),
    ('{"kind": "decision", "sample": "s", "step": ' + "9" * 5000 + "}", "not valid JSON"),
    ('{"kind": "decision", "sample": "\\ud800", "step": 1, "logits": [1, 2]}', "lone surrogate"),
    ('{"kind": "tensor", "sample": "s", "step": 1, "name": "x", "npy": "a\\u0000b.npy"}', "NUL"),
    ('{"kind": "tensor", "sample": "s", "step": 1, "name": "x", "dtype": "float32", "shape": '
     + json.dumps([1] * 100_001) + ', "stats": {}}', "at most 32"),
    ('{"kind": "tensor", "sample": "s", "step": 1, "name": "x", "npy": "bomb.npy"}', "declares shape"),
])
def test_hostile_jsonl_lines_fail_with_their_line_number(tmp_path, line, reason):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    (tmp_path / "bomb.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
                                        + b"\0" * 16)
    lines = [line, _GOOD] if '"meta"' in line else [_GOOD, line]
    with pytest.raises(JsonlError) as err:
        import_jsonl(_jsonl(tmp_path, lines), tmp_path / "out.trace")
    assert err.value.line == (1 if '"meta"' in line else 2) and reason in err.value.reason, err.value.reason
    assert len(str(err.value)) < 2000
    assert not (tmp_path / "out.trace").exists()


def test_npy_lines_need_no_dtype_or_shape(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(6, dtype=np.int16).reshape(2, 3))
    src = _jsonl(tmp_path, [_GOOD, '{"kind": "tensor", "sample": "s", "step": 0, "name": "a", "npy": "a.npy"}'])
    import_jsonl(src, tmp_path / "t.trace")
    a = TraceReader(tmp_path / "t.trace").tensor("s", 0, "a")
    assert a.dtype == np.int16 and a.tolist() == [[0, 1, 2], [3, 4, 5]]
    bad = _jsonl(tmp_path, [_GOOD, '{"kind": "tensor", "sample": "s", "step": 0, "name": "a", "npy": "a.npy", '
                                   '"dtype": "float32"}'])
    with pytest.raises(JsonlError, match="holds int16 values but the line says dtype float32"):
        import_jsonl(bad, tmp_path / "u.trace")


_BOMB = """
import resource, sys, zstandard
from pathlib import Path
from steptrace.tracefmt import JsonlError, import_jsonl
folder = Path(sys.argv[1])
cctx = zstandard.ZstdCompressor(level=3)
with open(folder / "bomb.jsonl.zst", "wb") as f, cctx.stream_writer(f) as w:
    chunk = b"a" * (1 << 24)
    for _ in range(64):  # one 1 GiB line
        w.write(chunk)
size = (folder / "bomb.jsonl.zst").stat().st_size
try:
    import_jsonl(folder / "bomb.jsonl.zst", folder / "out.trace")
except JsonlError as exc:
    # this process's own peak: VmHWM where Linux has it (ru_maxrss also counts the peak of the
    # process that spawned this one, e.g. a test worker that compiled a numba kernel)
    status = Path("/proc/self/status")
    hwm = [ln.split()[1] for ln in status.read_text().splitlines() if ln.startswith("VmHWM:")] if status.exists() else []
    peak_mb = int(hwm[0]) // 1024 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    print(exc.line, "longer than" in exc.reason, size, peak_mb)
"""


def test_zstd_line_bomb_is_refused_with_bounded_memory(tmp_path):
    out = subprocess.run([sys.executable, "-c", _BOMB, str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                         timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    line, refused, size, peak_mb = out.stdout.split()
    assert line == "1" and refused == "True"
    assert int(size) < 1 << 20 and int(peak_mb) < 1024  # a 1 GiB line held in at most the 256 MiB cap + buffers


# ---------------------------------------------------------------------- the CLI
def test_cli_output_files_that_cannot_be_written_exit_2(tmp_path, capsys):
    path = _trace(tmp_path / "t.trace")
    bad = str(tmp_path / "no" / "such" / "dir" / "x")
    assert main(["diff", str(path), str(path), "--json", bad]) == 2
    assert main(["diff", str(path), str(path), "--save-mapping", bad]) == 2
    assert main(["export", str(path), "--format", "jsonl", "-o", bad]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 3


def test_info_json_is_standard_json_with_nan(tmp_path, capsys):
    path = tmp_path / "t.trace"
    with TraceWriter(path) as w:
        w.add_decision("s", 0, chosen=1, topk_ids=[1, 2], topk_logits=[float("nan"), float("nan")])
    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert info["heads"]["token"]["min_margin"] in ("nan", None)


def test_view_errors_go_through_the_one_exit_code_mapping(tmp_path, capsys):
    assert main(["view", str(tmp_path / "nothing.trace")]) == 2
    assert "error:" in capsys.readouterr().err
