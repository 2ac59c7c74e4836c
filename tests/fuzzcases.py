"""The fuzzer's cases: the corpus of base traces, the mutations, and running one case.

Each case is drawn from one integer seed (:func:`draw`); :func:`run_case` applies its mutation
to a copy of a base and runs its command. ``tests/fuzzing.py`` describes the whole fuzzer and
runs long campaigns in worker processes.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steptrace.tracefmt import TraceError, TraceReader, TraceWriter


BASES = ("writer", "multi", "interrupted", "jsonl")
TRACE_KINDS = ("manifest", "part_json", "decisions", "tensors", "values", "vocab")
JSONL_KINDS = ("jsonl", "jsonl_zst", "npy")
COMMANDS = ("info", "info_json", "validate", "validate_deep", "diff", "export_jsonl", "export_parquet", "reader",
            "view")
BYTE_MUTATIONS = ("flip", "flip_head", "flip_tail", "field32", "field64", "insert", "delete", "truncate")
JSON_MUTATIONS = ("wrong_type", "deep", "huge_int", "drop_key", "not_json")
HUGE32 = (0x7FFFFFFF, 0xFFFFFFFF, 0x80000000, 0x40000000)
HUGE64 = (0x7FFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, 0x8000000000000000, 1 << 40, 1 << 33)


# ---------------------------------------------------------------------- the corpus
def _logits(rng: np.random.Generator, n: int = 32) -> np.ndarray:
    return rng.standard_normal(n).astype(np.float32) * 3


def write_base(path: Path, *, encoding: str, compact: bool, samples: list[str], vocab: bool, mode: str = "create",
           seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with TraceWriter(path, encoding=encoding, compact=compact, mode=mode, flush_steps=4,
                     metadata={"model": "fuzz", "watched": {"eos": 3}},
                     vocab=[f"p{i}" for i in range(32)] if vocab else None) as w:
        for s in samples:
            for step in range(10):
                w.add_logits(s, step, _logits(rng))
                w.add_logits(s, step, rng.standard_normal(4).astype(np.float32), head="duration")
                w.add_tensor(s, step, "enc.out", rng.standard_normal((4, 8)).astype(np.float32))
                w.add_tensor(s, step, "dec.h", rng.standard_normal(16).astype(np.float16))


def _jsonl_source(folder: Path) -> Path:
    rng = np.random.default_rng(7)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "t0.npy", rng.standard_normal((3, 4)).astype(np.float32))
    lines = [{"kind": "meta", "model": "jl", "watched": {"eos": 2}, "vocab": {str(i): f"w{i}" for i in range(16)}}]
    for step in range(8):
        lines.append({"kind": "decision", "sample": "j", "step": step, "logits": _logits(rng, 16).tolist()})
        lines.append({"kind": "decision", "sample": "k", "step": step, "topk_ids": [4, 1, 9],
                      "topk_logits": [3.0, 2.0, 1.0], "time": "2024-05-01T12:00:00Z"})
        a = rng.standard_normal(5).astype(np.float32)
        import base64

        lines.append({"kind": "tensor", "sample": "j", "step": step, "name": "x", "dtype": "float32", "shape": [5],
                      "data_b64": base64.b64encode(a.tobytes()).decode()})
        lines.append({"kind": "tensor", "sample": "k", "step": step, "name": "n", "npy": "t0.npy"})
        lines.append({"kind": "tensor", "sample": "k", "step": step, "name": "s", "dtype": "float32", "shape": [2],
                      "stats": {"min": 0.0, "max": 1.0, "mean": 0.5, "std": 0.5, "abs_max": 1.0, "l2": 1.0}})
    src = folder / "in.jsonl"
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    import zstandard

    (folder / "in.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(src.read_bytes()))
    return src


def build_corpus(root: Path) -> Path:
    """Write the base traces and JSONL files the cases mutate; returns ``root``."""
    from steptrace.tracefmt import import_jsonl

    root.mkdir(parents=True, exist_ok=True)
    if (root / "done").exists():
        return root
    write_base(root / "writer.trace", encoding="zstd", compact=True, samples=["a", "b"], vocab=True)
    write_base(root / "multi.trace", encoding="raw", compact=False, samples=["a"], vocab=False, seed=1)
    write_base(root / "multi.trace", encoding="zstd-shuffle", compact=True, samples=["c"], vocab=False, mode="append",
           seed=2)
    live = TraceWriter(root / "live.trace", flush_steps=2, vocab=[f"q{i}" for i in range(32)])
    rng = np.random.default_rng(3)
    for step in range(9):
        live.add_logits("a", step, _logits(rng))
        live.add_tensor("a", step, "x", rng.standard_normal(8).astype(np.float32))
    live.flush()
    shutil.copytree(root / "live.trace", root / "interrupted.trace")
    live.close()
    src = _jsonl_source(root / "jsonl_src")
    import_jsonl(src, root / "jsonl.trace")
    (root / "done").write_text("ok")
    return root


# ---------------------------------------------------------------------- mutations
def _mutate_bytes(data: bytes, how: str, rng: random.Random) -> bytes:
    b = bytearray(data)
    n = len(b)
    if n == 0:
        return b"\x00"
    if how in ("flip", "flip_head", "flip_tail"):
        for _ in range(rng.randint(1, 4)):
            if how == "flip":
                i = rng.randrange(n)
            elif how == "flip_head":
                i = rng.randrange(min(n, 512))
            else:
                i = n - 1 - rng.randrange(min(n, 512))
            b[i] ^= rng.randint(1, 255)
    elif how in ("field32", "field64"):
        w = 4 if how == "field32" else 8
        if n < w:
            return bytes(b) + b"\xff"
        i = rng.randrange(0, n - w + 1) & ~(w - 1 if rng.random() < 0.8 else 0)
        v = rng.choice(HUGE32 if w == 4 else HUGE64)
        new = v.to_bytes(w, "little")
        if b[i : i + w] == new:
            new = bytes(x ^ 0xFF for x in new)
        b[i : i + w] = new
    elif how == "insert":
        i = rng.randrange(n + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif how == "delete":
        i = rng.randrange(n)
        del b[i : i + rng.randint(1, 64)]
    elif how == "truncate":
        del b[rng.randrange(n) :]
    return bytes(b)


def _paths(doc: object, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:8]):
            out += _paths(v, prefix + (i,))
    return out


def _mutate_json(text: str, how: str, rng: random.Random) -> str:
    try:
        doc = json.loads(text)
    except ValueError:
        return text + "}"
    if how == "not_json":
        return text[: rng.randrange(max(len(text), 1))] + rng.choice(["{", "\x00\xff", "]]", "NaN"])
    paths = [p for p in _paths(doc) if p]
    if not paths:
        return "[" * 5000 + "]" * 5000
    path = rng.choice(paths)
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    key = path[-1]
    marker = "\u0000HUGE\u0000"
    if how == "wrong_type":
        parent[key] = rng.choice([1e30, -1, "x" * 10, [1, 2], {"a": 1}, None, True, 10**30, 3.5])
    elif how == "deep":
        parent[key] = marker
    elif how == "huge_int":
        parent[key] = marker + "INT"
    elif how == "drop_key" and isinstance(parent, dict):
        del parent[key]
    out = json.dumps(doc)
    out = out.replace(json.dumps(marker + "INT"), "9" * 5000)
    return out.replace(json.dumps(marker), "[" * 5000 + "]" * 5000)


_HOSTILE_LINES = [
    '{"kind": "meta", "vocab": {"2147483647": "x"}}',
    '{"kind": "meta", "vocab": {"-3": "x"}}',
    '{"kind": "decision", "sample": "s", "step": 0, "logits": ' + "[" * 100_000 + "]" * 100_000 + "}",
    '{"kind": "decision", "sample": "s", "step": ' + "9" * 5000 + ', "logits": [1, 2]}',
    '{"kind": "decision", "sample": "\\ud800", "step": 0, "logits": [1, 2]}',
    '{"kind": "tensor", "sample": "s", "step": 0, "name": "x", "npy": "a\\u0000b.npy"}',
    '{"kind": "tensor", "sample": "s", "step": 0, "name": "x", "dtype": "float32", "shape": '
    + json.dumps([1] * 100_001) + ', "stats": {}}',
    '{"kind": "decision", "sample": "s", "step": 0, "topk_ids": [5, 5, 7], "topk_logits": [1, 3, 2]}',
    '{"kind": "decision", "sample": "j", "step": 0, "topk_ids": [1, 2], "topk_logits": [2, 1]}',
    '{"kind": "tensor", "sample": "s", "step": 0, "name": "x", "npy": "bomb.npy"}',
]


def npy_bomb(folder: Path) -> None:
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (1000000, 1000000), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    (folder / "bomb.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()
                                      + b"\0" * 16)


@dataclass
class Case:
    """One drawn case and what happened."""

    seed: int
    base: str
    kind: str
    mutation: str
    command: str
    file: str = ""
    outcome: str = ""  # "ok", "traceback", "silent"
    code: int | None = None
    changed_closed: bool = False  # bytes of a closed part's data file changed (a checksum must see it)
    detected: bool | None = None  # validate refused the mutated trace
    error: str = ""
    seconds: float = 0.0


def draw(seed: int) -> Case:
    """Return the case of ``seed`` (what to mutate and which command to run)."""
    rng = random.Random(seed)
    if rng.random() < 0.2:
        kind = rng.choice(JSONL_KINDS)
        return Case(seed, "jsonl_src", kind, rng.choice(("line", "hostile") + BYTE_MUTATIONS[:5]), "import")
    base = rng.choice(BASES)
    kinds = [k for k in TRACE_KINDS if not (k == "vocab" and base == "multi")]
    kind = rng.choice(kinds)
    mutation = rng.choice(JSON_MUTATIONS if kind in ("manifest", "part_json") else BYTE_MUTATIONS)
    return Case(seed, base, kind, mutation, rng.choice(COMMANDS))


def _pick_file(trace: Path, kind: str, rng: random.Random) -> Path | None:
    if kind == "manifest":
        return trace / "steptrace.json"
    if kind == "part_json":
        files = sorted((trace / "parts").glob("*.json"))
    elif kind == "vocab":
        files = sorted(trace.glob("vocab-*.arrow"))
    else:
        files = sorted((trace / "parts").glob(f"*.{kind}.arrow"))
    return rng.choice(files) if files else None


def _closed(trace: Path, data_file: Path) -> bool:
    part = data_file.name.split(".")[0] if data_file.parent.name == "parts" else data_file.stem[len("vocab-"):]
    status = trace / "parts" / f"{part}.json"
    try:
        return json.loads(status.read_text()).get("status") == "closed"
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------- running
def _cli(argv: list[str]) -> int:
    from steptrace.tui.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            return main(argv)
        except SystemExit as exc:  # argparse
            return int(exc.code or 0)


def _python_reader(trace: Path) -> int:
    try:
        with TraceReader(trace) as r:
            r.decisions()
            r.vocab
            t = r.tensors()
            for row in t.filter(t["has_values"]).slice(0, 6).to_pylist():
                r.tensor(row["sample"], row["step"], row["name"], call=row["call"])
            list(r.iter_steps())
    except TraceError:
        return 2
    return 0


def _viewer(trace: Path) -> int:
    from steptrace.tui.viewer.data import ViewModel

    try:
        m = ViewModel([trace])
        m.open()
        for s in m.samples()[:2]:
            rm = m.rowmap(s.sample if hasattr(s, "sample") else s)
            m.fetch(rm, 0, 20)
            m.detail(rm, 0)
            m.series(rm, buckets=16)
    except TraceError:
        return 2
    return 0


def run_command(command: str, trace: Path, base: Path, work: Path) -> int:
    """Run one reading command on ``trace``; returns its exit code (2 for a TraceError)."""
    if command == "info":
        return _cli(["info", str(trace)])
    if command == "info_json":
        code = _cli(["info", str(trace), "--json"])
        return code
    if command == "validate":
        return _cli(["validate", str(trace)])
    if command == "validate_deep":
        return _cli(["validate", "--deep", str(trace)])
    if command == "diff":
        return _cli(["diff", str(base), str(trace), "--json", str(work / "r.json"), "--jobs", "1"])
    if command == "export_jsonl":
        return _cli(["export", str(trace), "--format", "jsonl", "-o", str(work / "out.jsonl")])
    if command == "export_parquet":
        return _cli(["export", str(trace), "--format", "parquet", "-o", str(work / "pq")])
    if command == "reader":
        return _python_reader(trace)
    if command == "view":
        return _viewer(trace)
    raise ValueError(command)


def run_case(seed: int, corpus: Path, work: Path) -> Case:
    """Draw, prepare and run the case of ``seed`` in the empty folder ``work``."""
    case = draw(seed)
    rng = random.Random(seed * 7919 + 1)
    t0 = time.perf_counter()
    try:
        if case.base == "jsonl_src":
            _run_import(case, corpus, work, rng)
        else:
            _run_trace(case, corpus, work, rng)
    except Exception as exc:  # the point of the fuzzer: anything but a TraceError is a bug
        case.outcome = "traceback"
        case.error = "".join(traceback.format_exception(exc, limit=-4))[-1500:]
    case.seconds = time.perf_counter() - t0
    return case


def _run_trace(case: Case, corpus: Path, work: Path, rng: random.Random) -> None:
    base = corpus / f"{case.base}.trace"
    trace = work / "t.trace"
    shutil.copytree(base, trace)
    f = _pick_file(trace, case.kind, rng)
    if f is None:
        case.outcome, case.code = "ok", None
        return
    case.file = str(f.relative_to(trace))
    before = f.read_bytes()
    if case.kind in ("manifest", "part_json"):
        after = _mutate_json(before.decode("utf-8", "replace"), case.mutation, rng).encode("utf-8", "surrogatepass")
    else:
        after = _mutate_bytes(before, case.mutation, rng)
    f.write_bytes(after)
    case.changed_closed = after != before and case.kind not in ("manifest", "part_json") and _closed(trace, f)
    case.code = run_command(case.command, trace, base, work)
    if case.code not in (0, 1, 2):
        case.outcome, case.error = "traceback", f"exit code {case.code}"
        return
    if case.changed_closed:
        v = case.code if case.command == "validate" else _cli(["validate", str(trace)])
        case.detected = v == 2
        if not case.detected:
            case.outcome = "silent"
            return
    case.outcome = "ok"


def _run_import(case: Case, corpus: Path, work: Path, rng: random.Random) -> None:
    src_dir = work / "src"
    shutil.copytree(corpus / "jsonl_src", src_dir)
    npy_bomb(src_dir)
    names = {"jsonl": "in.jsonl", "jsonl_zst": "in.jsonl.zst", "npy": "t0.npy"}
    target = src_dir / names[case.kind]
    case.file = target.name
    data = target.read_bytes()
    if case.mutation == "hostile" or (case.mutation == "line" and case.kind != "jsonl"):
        lines = (src_dir / "in.jsonl").read_text().splitlines()
        lines.insert(rng.randrange(1, len(lines) + 1), rng.choice(_HOSTILE_LINES))
        (src_dir / "in.jsonl").write_text("\n".join(lines) + "\n")
        target = src_dir / "in.jsonl"
    elif case.mutation == "line":
        lines = data.decode().splitlines()
        i = rng.randrange(len(lines))
        lines[i] = _mutate_json(lines[i], rng.choice(JSON_MUTATIONS), rng)
        target.write_text("\n".join(lines) + "\n")
    else:
        target.write_bytes(_mutate_bytes(data, case.mutation, rng))
    src = src_dir / ("in.jsonl.zst" if case.kind == "jsonl_zst" and case.mutation not in ("line", "hostile")
                     else "in.jsonl")
    case.code = _cli(["import", "jsonl", str(src), str(work / "imported.trace")])
    if case.code not in (0, 1, 2):
        case.outcome, case.error = "traceback", f"exit code {case.code}"
        return
    if case.code == 0:  # what was imported must read back
        code = _cli(["validate", "--deep", str(work / "imported.trace")])
        if code not in (0, 2):
            case.outcome, case.error = "traceback", f"validate of the import: exit code {code}"
            return
    case.outcome = "ok"
