"""A seed-driven mutation fuzzer over every file kind of a trace and every reading command.

Each case is drawn from one integer seed: a base (a TraceWriter trace with a vocabulary, a
two-part raw-encoded trace, an interrupted trace, a JSONL-imported trace, or the JSONL source
itself), a file of one kind in it, a mutation (byte flips, flips in the first or last bytes
where Arrow keeps its headers and footer, a 32/64-bit field set to a huge value, inserted or
deleted bytes, truncation, a JSON value of the wrong type, deep nesting, hostile JSONL lines),
and a command (``info``, ``info --json``, ``validate``, ``validate --deep``, ``diff``,
``export`` to JSONL and Parquet, ``import``, the Python reader and the viewer's data model).

A case passes when the command ends with exit code 0, 1 or 2 (TraceError for the Python calls)
and no other exception. A closed part's data file whose bytes changed must make ``validate``
fail (its checksum): a pass there is counted as a *silent* change.

In-process use (the test suite): :func:`build_corpus` once, then :func:`run_case` per seed.
Long runs isolate cases in worker processes so that a crash (a signal) is seen and counted::

    python tests/fuzzing.py --cases 3000 --workers 2 --out fuzz-report.json
    python tests/fuzzing.py --hostile     # peak memory of the CLI on each hostile input
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import resource
import shutil
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from steptrace.tracefmt import TraceError, TraceReader, TraceWriter  # noqa: E402

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


def _write(path: Path, *, encoding: str, compact: bool, samples: list[str], vocab: bool, mode: str = "create",
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
    _write(root / "writer.trace", encoding="zstd", compact=True, samples=["a", "b"], vocab=True)
    _write(root / "multi.trace", encoding="raw", compact=False, samples=["a"], vocab=False, seed=1)
    _write(root / "multi.trace", encoding="zstd-shuffle", compact=True, samples=["c"], vocab=False, mode="append",
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


def _npy_bomb(folder: Path) -> None:
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
    _npy_bomb(src_dir)
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


# ---------------------------------------------------------------------- long runs
def _worker(args: argparse.Namespace) -> int:
    """Run seeds ``args.start`` .. ``args.stop`` in this process, one JSON line per case."""
    limit = args.memory_limit << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    corpus = Path(args.corpus)
    for seed in range(args.start, args.stop):
        print(json.dumps({"start": seed}), flush=True)
        work = Path(args.tmp) / f"case-{seed}"
        work.mkdir(parents=True)
        case = run_case(seed, corpus, work)
        shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(asdict(case)), flush=True)
    return 0


@dataclass
class Summary:
    """The figures of a long run."""

    cases: int = 0
    tracebacks: int = 0
    signals: int = 0
    silent: int = 0
    changed_closed: int = 0
    detected: int = 0
    peak_rss_mb: float = 0.0
    seconds: float = 0.0
    by_command: dict[str, int] = field(default_factory=dict)
    failures: list[dict] = field(default_factory=list)


def long_run(cases: int, workers: int, out: Path, *, seed0: int = 0, chunk: int = 100,
             memory_mb: int = 6144) -> Summary:
    """Run ``cases`` seeds from ``seed0`` in worker processes of ``chunk`` cases each.

    A worker killed by a signal is counted (with the seed it was running) and the run goes on
    with the next seed. Peak memory is the largest resident size any worker reached.
    """
    import tempfile

    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="steptrace-fuzz-"))
    corpus = build_corpus(tmp / "corpus")
    summary = Summary()
    pending = [(s, min(s + chunk, seed0 + cases)) for s in range(seed0, seed0 + cases, chunk)]
    running: list[tuple[subprocess.Popen, int, int]] = []

    def start(lo: int, hi: int) -> None:
        cmd = [sys.executable, __file__, "--worker", "--start", str(lo), "--stop", str(hi), "--corpus", str(corpus),
               "--tmp", str(tmp / f"w{lo}"), "--memory-limit", str(memory_mb)]
        running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                         cwd=ROOT), lo, hi))

    while pending or running:
        while pending and len(running) < workers:
            start(*pending.pop(0))
        proc, lo, hi = running.pop(0)
        last = lo
        done = set()
        for line in proc.stdout:
            rec = json.loads(line)
            if "start" in rec:
                last = rec["start"]
                continue
            done.add(rec["seed"])
            summary.cases += 1
            summary.by_command[rec["command"]] = summary.by_command.get(rec["command"], 0) + 1
            summary.changed_closed += rec["changed_closed"]
            summary.detected += bool(rec["detected"])
            if rec["outcome"] == "traceback":
                summary.tracebacks += 1
                summary.failures.append(rec)
            elif rec["outcome"] == "silent":
                summary.silent += 1
                summary.failures.append(rec)
        proc.wait()
        if proc.returncode != 0:
            summary.cases += 1
            if proc.returncode < 0:
                summary.signals += 1
            summary.failures.append({"seed": last, "outcome": f"worker exit {proc.returncode}", **asdict(draw(last))})
            if last + 1 < hi:
                pending.insert(0, (last + 1, hi))
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        summary.peak_rss_mb = max(summary.peak_rss_mb, ru.ru_maxrss / 1024)
        out.write_text(json.dumps(asdict(summary), indent=1))
    summary.seconds = time.perf_counter() - t0
    out.write_text(json.dumps(asdict(summary), indent=1))
    shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _hostile_inputs(folder: Path) -> list[tuple[str, list[str], Path]]:
    """Write the hostile inputs the format's promises must stop; returns (label, argv, input)."""
    import pyarrow as pa
    import zstandard

    out = []
    good = folder / "good.trace"
    _write(good, encoding="zstd", compact=True, samples=["a"], vocab=True)
    out.append(("a good trace (baseline)", ["info", str(good)], good))
    vocab = folder / "vocab.trace"
    shutil.copytree(good, vocab)
    (f,) = vocab.glob("vocab-*.arrow")
    t = pa.table({"id": pa.array([0, 2**31 - 1], pa.int32()), "piece": ["a", "b"]})
    with pa.OSFile(str(f), "wb") as sink, pa.ipc.new_file(sink, t.schema) as w:
        w.write_table(t)
    for status in (vocab / "parts").glob("*.json"):
        doc = json.loads(status.read_text())
        doc.pop("checksums", None)
        doc.pop("bytes", None)
        status.write_text(json.dumps(doc))
    out.append(("vocab id 2**31-1 in a 1.0-style part (no checksum)", ["info", str(vocab)], vocab))
    jl = folder / "vocab.jsonl"
    jl.write_text('{"kind": "meta", "vocab": {"2147483647": "x"}}\n')
    out.append(("JSONL meta vocab {'2147483647': 'x'}", ["import", "jsonl", str(jl), str(folder / "o1")], jl))
    bomb = folder / "newlines.jsonl.zst"
    with open(bomb, "wb") as fh, zstandard.ZstdCompressor(level=19).stream_writer(fh) as w:
        for _ in range(8):
            w.write(b"\n" * (1 << 20))
        w.write(b"x" * (1 << 26))
    out.append(("zstd: 8 MiB of newlines, then a 64 MiB line of garbage", ["import", "jsonl", str(bomb),
                str(folder / "o2")], bomb))
    line = folder / "line.jsonl.zst"
    with open(line, "wb") as fh, zstandard.ZstdCompressor(level=19).stream_writer(fh) as w:
        for _ in range(48):
            w.write(b"a" * (1 << 26))  # one 3 GiB line
    out.append(("zstd: one 3 GiB line", ["import", "jsonl", str(line), str(folder / "o3")], line))
    _npy_bomb(folder)
    npy = folder / "npy.jsonl"
    npy.write_text('{"kind": "tensor", "sample": "s", "step": 0, "name": "x", "npy": "bomb.npy"}\n')
    out.append((".npy header of 10**12 float32 over 16 bytes", ["import", "jsonl", str(npy), str(folder / "o4")], npy))
    deep = folder / "deep.jsonl"
    deep.write_text('{"kind": "decision", "sample": "s", "step": 0, "logits": ' + "[" * 100_000 + "]" * 100_000
                    + "}\n")
    out.append(("JSONL line nested 100,000 deep", ["import", "jsonl", str(deep), str(folder / "o5")], deep))
    return out


#: Runs the CLI and prints the process's own peak resident size (VmHWM, reset at exec) at exit.
_PEAK = ("import atexit, sys\n"
         "def peak():\n"
         "    sys.stderr.write(next(x for x in open('/proc/self/status') if x.startswith('VmHWM')))\n"
         "atexit.register(peak)\n"
         "from steptrace.tui.cli import main\n"
         "sys.exit(main(sys.argv[1:]))\n")


def hostile_memory() -> list[dict]:
    """Run each hostile input through the CLI in its own process; peak RSS and exit code of each."""
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="steptrace-hostile-") as tmp:
        for label, argv, path in _hostile_inputs(Path(tmp)):
            files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
            size = sum(f.stat().st_size for f in files)
            t0 = time.perf_counter()
            done = subprocess.run([sys.executable, "-c", _PEAK, *argv], cwd=ROOT, capture_output=True, text=True,
                                  timeout=600, check=False)
            lines = done.stderr.strip().splitlines()
            peak = next((int(x.split()[1]) / 1024 for x in lines if x.startswith("VmHWM:")), None)
            message = next((x for x in reversed(lines) if not x.startswith("VmHWM:")), "")
            rows.append({"input": label, "bytes": size, "exit": done.returncode, "peak_rss_mb": peak,
                         "seconds": round(time.perf_counter() - t0, 2), "message": message[:160]})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Command line: a long run (default) or one worker (``--worker``)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=3000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--out", default="fuzz-report.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--start", type=int)
    p.add_argument("--stop", type=int)
    p.add_argument("--corpus")
    p.add_argument("--tmp")
    p.add_argument("--memory-limit", type=int, default=6144, help="address-space limit of a worker, MiB")
    p.add_argument("--hostile", action="store_true", help="peak memory of the CLI on each hostile input, then exit")
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args)
    if args.hostile:
        for row in hostile_memory():
            print(json.dumps(row))
        return 0
    s = long_run(args.cases, args.workers, Path(args.out), seed0=args.seed0, memory_mb=args.memory_limit)
    print(f"{s.cases} cases in {s.seconds:.0f} s: {s.tracebacks} tracebacks, {s.signals} killed by a signal, "
          f"{s.silent} silent changes; {s.detected}/{s.changed_closed} changed closed files refused by validate; "
          f"peak RSS {s.peak_rss_mb:.0f} MB")
    return 0 if not (s.tracebacks or s.signals or s.silent) else 1


if __name__ == "__main__":
    sys.exit(main())
