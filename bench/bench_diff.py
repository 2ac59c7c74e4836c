"""Benchmark of the differ (issue 3). One run prints three figures:

1. diff of N decision steps (default 1 M: 1,000 samples x 1,000 steps, k = 8), target < 2 s;
2. tensor-comparison throughput of ``differ.compare_values`` (max/mean abs, max rel, cosine,
   SQNR, tolerance count) against ``np.abs(a - b).max()`` on the same in-memory arrays,
   target >= 0.5x;
3. peak memory of a full diff (values compared) of two traces with GB of tensor values, in a
   fresh process: the differ reads one tensor at a time, so memory stays bounded.

    python bench/bench_diff.py [--steps 1000000] [--gb 1.0] [--out /tmp/bench_diff]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
import timeit
from pathlib import Path

import numpy as np

from differ import DiffOptions, compare_values, diff
from differ.policy import default_tensor_tolerance
from tracefmt import TraceWriter


def write_decisions(path: Path, samples: int, steps: int, *, flip_every: int = 0, seed: int = 0) -> float:
    rng = np.random.default_rng(seed)
    logits = np.sort(rng.standard_normal((steps, 8)).astype(np.float32) * 3, axis=1)[:, ::-1].copy()
    ids = np.argsort(rng.random((steps, 8)), axis=1).astype(np.int32)
    t0 = time.perf_counter()
    with TraceWriter(path, metadata={"precision": "fp32"}, mode="overwrite") as w:
        for s in range(samples):
            name = f"u{s:05d}"
            for t in range(steps):
                i, lg = ids[t], logits[t]
                if flip_every and s % flip_every == 0 and t == steps // 2:
                    i = i[[1, 0, 2, 3, 4, 5, 6, 7]]
                w.add_decision(name, t, chosen=int(i[0]), topk_ids=i, topk_logits=lg)
    return time.perf_counter() - t0


def bench_decisions(out: Path, n: int) -> None:
    samples = 1000 if n >= 1000 else 1
    steps = n // samples
    a, b = out / "dec_a.trace", out / "dec_b.trace"
    wa = write_decisions(a, samples, steps)
    write_decisions(b, samples, steps, flip_every=10)
    diff(a, [b])  # warm the page cache once
    t0 = time.perf_counter()
    r = diff(a, [b])
    dt = time.perf_counter() - t0
    c = r.worst
    print(f"decisions: {samples * steps:,} steps ({samples} samples x {steps}), diff {dt:.2f} s "
          f"({samples * steps / dt / 1e6:.2f} M steps/s; target < 2 s); verdict {r.verdict}, "
          f"{c.samples['divergent'] + c.samples['flip']} samples part, identical sequences {c.sequences['identical']}/{samples}"
          f"  [writing one trace took {wa:.1f} s]")


def bench_tensors() -> None:
    rng = np.random.default_rng(0)
    print("tensor values: differ.compare_values vs np.abs(a - b).max() (same arrays, best of 7)")
    for dtype in (np.float32, np.float16):
        tol = default_tensor_tolerance(np.dtype(dtype).name)
        for n in (1 << 16, 1 << 20, 1 << 22, 1 << 24):
            a = rng.standard_normal(n).astype(dtype)
            b = (a + rng.standard_normal(n).astype(dtype) * dtype(1e-3)).astype(dtype)
            reps = max(1, (1 << 24) // n)
            t_np = min(timeit.repeat(lambda: np.abs(a - b).max(), number=reps, repeat=7)) / reps
            t_cv = min(timeit.repeat(lambda: compare_values(a, b, tol, bitexact=False), number=reps, repeat=7)) / reps
            t_c2 = min(timeit.repeat(lambda: compare_values(a, b, tol, bitexact=False, threads=2), number=reps, repeat=7)) / reps
            gb = 2 * a.nbytes / 1e9
            print(f"  {np.dtype(dtype).name:8} {n:>10,} elems: numpy {gb / t_np:6.2f} GB/s, differ {gb / t_cv:6.2f} GB/s "
                  f"({t_np / t_cv:.2f}x), 2 threads {gb / t_c2:6.2f} GB/s ({t_np / t_c2:.2f}x)")


def write_tensors(path: Path, gb: float, seed: int, noise: float) -> None:
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # 4 MB
    count = int(gb * 1e9 // base.nbytes)
    with TraceWriter(path, metadata={"precision": "fp32"}, mode="overwrite", encoding="raw") as w:
        for i in range(count):
            x = base + np.float32(i) if not noise else base + np.float32(i) + rng.standard_normal(base.size).astype(np.float32) * np.float32(noise)
            w.add_tensor("u", i // 8, f"layer{i % 8}", x)
        for s in range(count // 8 + 1):
            w.add_decision("u", s, chosen=1, topk_ids=[1, 2], topk_logits=[2.0, 1.0])


def bench_memory(out: Path, gb: float) -> None:
    a, b = out / "ten_a.trace", out / "ten_b.trace"
    write_tensors(a, gb, 1, 0.0)
    write_tensors(b, gb, 2, 1e-5)
    code = (
        "import json, resource, time; from differ import diff, DiffOptions;"
        f"t=time.perf_counter(); r=diff({str(a)!r}, [{str(b)!r}], DiffOptions(jobs=1));"
        "st={l.split(':')[0]: l.split()[1] for l in open('/proc/self/status') if l.startswith(('VmHWM', 'RssAnon'))};"
        "print(json.dumps({'seconds': time.perf_counter()-t, 'tensors': r.worst.tensors['by_basis'],"
        " 'verdict': r.verdict, 'hwm_kb': int(st['VmHWM']), 'anon_kb': int(st['RssAnon'])}))"
    )
    res = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    size = sum(f.stat().st_size for f in a.rglob("*")) / 1e9
    print(f"memory: two traces of {size:.2f} GB tensor values each, full diff in {res['seconds']:.1f} s "
          f"({2 * size / res['seconds']:.2f} GB/s); peak RSS {res['hwm_kb'] / 1e3:.0f} MB (mapped file pages "
          f"included), anonymous memory at end {res['anon_kb'] / 1e3:.0f} MB; tensors by basis {res['tensors']}, "
          f"verdict {res['verdict']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--gb", type=float, default=1.0, help="GB of tensor values per trace for the memory figure")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_diff"))
    ap.add_argument("--skip", action="append", default=[], choices=["decisions", "tensors", "memory"])
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if "tensors" not in args.skip:
            bench_tensors()
        if "decisions" not in args.skip:
            bench_decisions(args.out, args.steps)
        if "memory" not in args.skip:
            bench_memory(args.out, args.gb)
    finally:
        shutil.rmtree(args.out, ignore_errors=True)
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")


if __name__ == "__main__":
    main()
