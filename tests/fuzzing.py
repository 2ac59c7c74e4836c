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
import json
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path



ROOT = Path(__file__).resolve().parents[1]

from fuzzcases import COMMANDS, JSONL_KINDS, TRACE_KINDS, build_corpus, draw, npy_bomb, run_case, write_base  # noqa: F401
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
    write_base(good, encoding="zstd", compact=True, samples=["a"], vocab=True)
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
    npy_bomb(folder)
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
