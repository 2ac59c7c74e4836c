"""Benchmark of the differ (issues 3 and 14). One run prints three figures:

1. diff of N decision steps (default 1 M: 1,000 samples x 1,000 steps, k = 8), target < 2 s;
2. tensor-comparison throughput of ``steptrace.differ.compare_values`` (max/mean abs, max rel, cosine,
   SQNR, tolerance count) against ``np.abs(a - b).max()`` on the same in-memory arrays at 64 K,
   256 K and 1 M elements (more without ``--quick``), target >= 0.5x, for both implementations
   in the same rounds (the numpy path and the compiled kernel, numba, where installed): the ratio
   per round of timings made in alternation, its median and range over ``--rounds`` rounds,
   PASS/MISS, and the load average before and after; then the kernel's one-off cost in fresh
   processes (import numba, load or compile it: cold with an empty cache, then cached) and how
   many elements a comparison needs before the kernel pays for it;
3. peak memory of a full diff (values compared) of two traces with GB of tensor values, in a
   fresh process: the differ reads one tensor at a time, so its anonymous memory stays bounded
   while the traces' mapped pages (page cache) come and go.

The decision traces are written with ``TraceWriter.add_decisions`` (whole columns per call). The
decision figure diffs 1 M steps twice: against a candidate with identical logits except that one
sample in ten flips its top-2 mid-way (the issue's workload), and against one whose every logit
carries float noise (no row is bit-identical, so nothing is skipped). Times are the best of
``--repeat`` runs after a warm-up, wall clock and CPU; the machine is shared, so look at the spread.

    python bench/bench_diff.py [--quick] [--steps 1000000] [--gb 1.0] [--repeat 3] [--rounds 7]
                               [--out /tmp/bench_diff] [--skip decisions|tensors|kernel-load|memory]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import timeit
from pathlib import Path

import numpy as np
import pyarrow as pa

from steptrace.differ import compare_values, diff
from steptrace.differ.policy import default_tensor_tolerance
from steptrace.tracefmt import TraceWriter

#: Decision rows per ``add_decisions`` call.
WRITE_BATCH = 1 << 17


def decisions_table(samples: int, steps: int, *, flip_every: int = 0, noise: float = 0.0, seed: int = 0) -> pa.Table:
    """Columns of ``samples`` x ``steps`` decisions (k = 8, fixed per step across samples); every
    ``flip_every``-th sample swaps its top-2 ids at the middle step; ``noise`` perturbs every
    logit (relative, like two runtimes' float noise) without reordering the top-k."""
    rng = np.random.default_rng(seed)
    logits = np.sort(rng.standard_normal((steps, 8)).astype(np.float32) * 3, axis=1)[:, ::-1].copy()
    ids = np.argsort(rng.random((steps, 8)), axis=1).astype(np.int32)
    n = samples * steps
    all_ids = np.tile(ids, (samples, 1))
    if flip_every:
        rows = np.arange(0, samples, flip_every) * steps + steps // 2
        all_ids[rows, :2] = all_ids[rows, 1::-1]
    all_logits = np.tile(logits, (samples, 1))
    if noise:
        jitter = np.random.default_rng(seed + 1).standard_normal(all_logits.shape).astype(np.float32)
        all_logits = np.sort(all_logits * (1 + np.float32(noise) * jitter), axis=1)[:, ::-1].copy()
    width = len(str(max(samples - 1, 0)))
    names = np.array([f"u{s:0{max(width, 5)}d}" for s in range(samples)])
    offsets = pa.array(np.arange(0, 8 * n + 1, 8, dtype=np.int32))
    return pa.table({
        "sample": pa.DictionaryArray.from_arrays(pa.array(np.repeat(np.arange(samples, dtype=np.int32), steps)),
                                                 pa.array(names)),
        "step": pa.array(np.tile(np.arange(steps, dtype=np.int32), samples)),
        "chosen": pa.array(all_ids[:, 0]),
        "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(all_ids.reshape(-1))),
        "topk_logits": pa.ListArray.from_arrays(offsets, pa.array(all_logits.reshape(-1))),
    })


def write_decisions(path: Path, samples: int, steps: int, *, flip_every: int = 0, noise: float = 0.0,
                    seed: int = 0) -> float:
    """Write a decisions-only trace with the bulk API; return the seconds it took."""
    t0 = time.perf_counter()
    table = decisions_table(samples, steps, flip_every=flip_every, noise=noise, seed=seed)
    with TraceWriter(path, metadata={"precision": "fp32"}, mode="overwrite") as w:
        for lo in range(0, table.num_rows, WRITE_BATCH):
            w.add_decisions(table.slice(lo, WRITE_BATCH))
    return time.perf_counter() - t0


def _timed_diffs(a: Path, b: Path, repeat: int) -> tuple[list[tuple[float, float]], object]:
    """Diff ``repeat`` times after one warm-up (page cache, allocator); (wall, CPU) seconds each."""
    r = diff(a, [b])
    runs = []
    for _ in range(repeat):
        w, c = time.perf_counter(), time.process_time()
        r = diff(a, [b])
        runs.append((time.perf_counter() - w, time.process_time() - c))
    return runs, r


def bench_decisions(out: Path, n: int, repeat: int) -> None:
    samples = 1000 if n >= 1000 else 1
    steps = n // samples
    a, b, c = out / "dec_a.trace", out / "dec_b.trace", out / "dec_c.trace"
    wa = write_decisions(a, samples, steps)
    write_decisions(b, samples, steps, flip_every=10)
    write_decisions(c, samples, steps, flip_every=10, noise=1e-6)
    print(f"decisions: {samples * steps:,} steps ({samples} samples x {steps}, k = 8), best of {repeat} "
          f"(target < 2 s)  [writing one trace with add_decisions took {wa:.1f} s]")
    for label, cand in (("identical logits, 1 in 10 samples flips mid-way", b),
                        ("every logit perturbed (1e-6 relative), same flips", c)):
        runs, r = _timed_diffs(a, cand, repeat)
        wall, cpu = min(runs)
        w = r.worst
        print(f"  {label}: diff {wall:.2f} s wall, {cpu:.2f} s CPU ({samples * steps / wall / 1e6:.2f} M steps/s; "
              f"runs {', '.join(f'{x:.2f}' for x, _ in runs)} s); verdict {r.verdict}, "
              f"{w.samples['divergent'] + w.samples['flip']} samples part, identical sequences "
              f"{w.sequences['identical']}/{samples}")


def _rounds(fns: list, reps: int, rounds: int, samples: int) -> list[list[float]]:
    """Seconds per call of each function in each of ``rounds`` rounds: the best of ``samples``
    short timings (``reps`` calls each), the functions timed in alternation so that load changes
    on a shared machine hit all of them alike. Returns ``[round][function]``."""
    out = []
    for _ in range(rounds):
        best = [float("inf")] * len(fns)
        for _ in range(samples):
            for i, f in enumerate(fns):
                best[i] = min(best[i], timeit.timeit(f, number=reps) / reps)
        out.append(best)
    return out


#: Target of the in-cache tensor comparison against ``np.abs(a - b).max()`` on the same arrays.
TENSOR_TARGET = 0.5


def _spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}x (range {min(xs):.2f}-{max(xs):.2f})"


def _kernel_ready() -> str | None:
    """None when the compiled kernel can run here, else why not."""
    from steptrace.differ import kernelpolicy

    if not kernelpolicy.numba_installed():
        return "numba is not installed (pip install 'steptrace[fast]')"
    try:
        import steptrace.differ.kernel  # noqa: F401
    except ImportError as e:
        return f"numba does not import: {e}"
    return None


def bench_tensors(quick: bool, rounds: int) -> list[tuple[int, float, float]]:
    """In-cache tensor comparison: ``steptrace.differ.compare_values`` with the numpy path
    (``kernel=False``) and with the compiled kernel (``kernel=True``) against ``np.abs(a - b).max()``
    on the same arrays, all timed in alternation in each round; the ratio (baseline time / differ
    time) is taken per round and its median judged. Besides the plain call (bit-exactness known,
    as from digests): ``sumsq known`` is the differ's own call (sum a^2, sum b^2 from the traces'
    ``l2`` statistics), ``bytes`` leaves bit-exactness to be found (bitexact=None), ``2 threads``
    splits tensors of ``PARALLEL_MIN`` elements or more. TARGET: >= 0.5x at every size.

    The baseline allocates two temporaries per call, so its speed moves with the allocator's state
    (whether they come back from the heap or as fresh pages): compare the differ's GB/s across
    versions as well as the ratio. Returns ``(elements, numpy seconds, kernel seconds)`` per
    float32 size (kernel seconds NaN when it cannot run)."""
    rng = np.random.default_rng(0)
    load = os.getloadavg()
    why_not = _kernel_ready()
    paths = [("numpy", False)] + ([("kernel", True)] if why_not is None else [])
    sizes = (1 << 16, 1 << 18, 1 << 20) if quick else (1 << 16, 1 << 18, 1 << 20, 1 << 22, 1 << 24)
    print(f"tensor values: differ.compare_values (numpy path and compiled kernel) vs np.abs(a - b).max() (same "
          f"arrays, interleaved; {rounds} rounds, each the best of 15 timings; ratio = median over rounds (range); "
          f"load {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}); target >= {TENSOR_TARGET}x")
    if why_not:
        print(f"  compiled kernel not measured: {why_not}")
    misses: dict[str, list[int]] = {name: [] for name, _ in paths}
    per_size = []
    for dtype in (np.float32, np.float16):
        tol = default_tensor_tolerance(np.dtype(dtype).name)
        for n in sizes:
            a = rng.standard_normal(n).astype(dtype)
            b = (a + rng.standard_normal(n).astype(dtype) * dtype(1e-3)).astype(dtype)
            sumsq = (float(np.dot(a.astype(np.float64), a.astype(np.float64))),
                     float(np.dot(b.astype(np.float64), b.astype(np.float64))))
            fns = [lambda a=a, b=b: np.abs(a - b).max()]
            for _, k in paths:
                fns += [
                    lambda a=a, b=b, tol=tol, k=k: compare_values(a, b, tol, bitexact=False, kernel=k),
                    lambda a=a, b=b, tol=tol, s=sumsq, k=k: compare_values(a, b, tol, bitexact=False, sumsq=s, kernel=k),
                    lambda a=a, b=b, tol=tol, k=k: compare_values(a, b, tol, kernel=k),
                    lambda a=a, b=b, tol=tol, k=k: compare_values(a, b, tol, bitexact=False, threads=2, kernel=k),
                ]
            for f in fns:  # warm-up (the kernel's first call loads or compiles it)
                f()
            res = _rounds(fns, max(1, (1 << 18) // n), rounds, 15)
            gb = 2 * a.nbytes / 1e9
            t_np = statistics.median(r[0] for r in res)
            times = {}
            for p, (name, _) in enumerate(paths):
                col = 1 + 4 * p
                ratio = [[r[0] / r[col + k] for r in res] for k in range(4)]
                t_cv = statistics.median(r[col] for r in res)
                times[name] = t_cv
                verdict = "PASS" if statistics.median(ratio[0]) >= TENSOR_TARGET else "MISS"
                if dtype == np.float32 and verdict == "MISS":
                    misses[name].append(n)
                print(f"  {np.dtype(dtype).name:8} {n:>10,} elems {name:6}: numpy {gb / t_np:6.2f} GB/s, "
                      f"differ {gb / t_cv:6.2f} GB/s, {_spread(ratio[0])} {verdict}; sumsq known "
                      f"{_spread(ratio[1])}, bytes {_spread(ratio[2])}, 2 threads {_spread(ratio[3])}")
            if dtype == np.float32:
                per_size.append((n, times["numpy"], times.get("kernel", float("nan"))))
    load = os.getloadavg()
    for name, _ in paths:
        missed = "met at every size" if not misses[name] else "MISSED at " + ", ".join(f"{n:,}" for n in misses[name])
        print(f"  float32 target, {name}: {missed}")
    print(f"  (load after {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})")
    return per_size


#: Run in a fresh interpreter: import the kernel (numba) and make its first float32 call.
_KERNEL_CHILD = """
import json, time
import numpy as np
from steptrace.differ import TensorTolerance, compare_values
t0 = time.perf_counter()
import numba
t1 = time.perf_counter()
import steptrace.differ.kernel
t2 = time.perf_counter()
a = np.ones(1 << 16, np.float32)
compare_values(a, a + np.float32(1), TensorTolerance(), kernel=True)
t3 = time.perf_counter()
print(json.dumps({"numba": t1 - t0, "kernel": t2 - t1, "first": t3 - t2}))
"""


def bench_kernel_load(out: Path, per_size: list[tuple[int, float, float]]) -> None:
    """The compiled kernel's one-off costs in fresh processes: ``import numba``, importing
    ``steptrace.differ.kernel``, and its first float32 call, once with an empty cache (it
    compiles and writes the cache: the first use after an install) and twice with the cache
    (every later process); then how many float32 elements a comparison must fold before the
    kernel's saving per element (from the in-cache figures) pays for the cached load."""
    why_not = _kernel_ready()
    if why_not:
        print(f"kernel load: not measured: {why_not}")
        return
    cache = out / "numba_cache"
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache)}
    runs = []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-c", _KERNEL_CHILD], capture_output=True, text=True, check=True,
                              env=env)
        runs.append(json.loads(proc.stdout))
    load = os.getloadavg()

    def fmt(r: dict) -> str:
        return (f"import numba {r['numba']:.2f} s + kernel module {r['kernel']:.2f} s + first call "
                f"{r['first']:.2f} s = {sum(r.values()):.2f} s")

    print(f"kernel load (fresh processes, NUMBA_CACHE_DIR empty at first; load {load[0]:.2f} {load[1]:.2f} "
          f"{load[2]:.2f}):\n  cold (compiles, writes the cache): {fmt(runs[0])}\n  cached: {fmt(runs[1])}\n"
          f"  cached: {fmt(runs[2])}")
    cached = min(sum(r.values()) for r in runs[1:])
    for n, t_np, t_k in per_size:
        saved = (t_np - t_k) / n
        pays = f"{cached / saved / 1e6:,.0f} M elements" if saved > 0 else "never (the kernel is not faster)"
        print(f"  at {n:>10,}-element tensors: saves {saved * 1e9:.2f} ns per element; the cached load pays "
              f"after {pays}")
    from steptrace.differ.kernelpolicy import KERNEL_MIN_ELEMENTS

    print(f"  (STEPTRACE_KERNEL=auto takes the kernel from {KERNEL_MIN_ELEMENTS:,} elements)")


def write_tensors(path: Path, gb: float, seed: int, noise: float) -> None:
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(0).standard_normal(1 << 20).astype(np.float32)  # 4 MB
    count = int(gb * 1e9 // base.nbytes)
    with TraceWriter(path, metadata={"precision": "fp32"}, mode="overwrite", encoding="raw") as w:
        for i in range(count):
            x = base + np.float32(i) if not noise else base + np.float32(i) + rng.standard_normal(base.size).astype(np.float32) * np.float32(noise)
            w.add_tensor("u", i // 8, f"layer{i % 8}", x)
        steps = count // 8 + 1
        w.add_decisions({"sample": ["u"] * steps, "step": list(range(steps)), "chosen": [1] * steps,
                         "topk_ids": [[1, 2]] * steps, "topk_logits": [[2.0, 1.0]] * steps})


#: Run in a fresh interpreter: one full diff while a thread samples the process's resident memory
#: (anonymous = heap and numpy buffers; file = mapped trace pages, reclaimable page cache).
_MEMORY_CHILD = """
import json, sys, threading, time
from steptrace.differ import diff, DiffOptions
peak = {"RssAnon": 0, "RssFile": 0}
done = threading.Event()
def status():
    return {l.split(":")[0]: int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(("VmHWM", "RssAnon", "RssFile"))}
def sample():
    while not done.wait(0.005):
        st = status()
        for k in peak:
            peak[k] = max(peak[k], st[k])
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter()
r = diff(sys.argv[1], [sys.argv[2]], DiffOptions(jobs=1))
seconds = time.perf_counter() - t
done.set()
st = status()
print(json.dumps({"seconds": seconds, "tensors": r.worst.tensors["by_basis"], "verdict": r.verdict,
                  "hwm_kb": st["VmHWM"], "anon_peak_kb": max(peak["RssAnon"], st["RssAnon"]),
                  "file_peak_kb": max(peak["RssFile"], st["RssFile"]), "anon_end_kb": st["RssAnon"]}))
"""


def bench_memory(out: Path, gb: float) -> None:
    a, b = out / "ten_a.trace", out / "ten_b.trace"
    write_tensors(a, gb, 1, 0.0)
    write_tensors(b, gb, 2, 1e-5)
    proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(a), str(b)], capture_output=True, text=True, check=True)
    res = json.loads(proc.stdout)
    size = sum(f.stat().st_size for f in a.rglob("*")) / 1e9
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    print(f"memory: two traces of {size:.2f} GB tensor values each ({2 * size:.1f} GB read, RAM {ram:.0f} GB; "
          f"largest tensor 4 MB), full diff (values compared) in {res['seconds']:.1f} s "
          f"({2 * size / res['seconds']:.2f} GB/s); peak anonymous memory {res['anon_peak_kb'] / 1e3:.0f} MB "
          f"(sampled every 5 ms; {res['anon_end_kb'] / 1e3:.0f} MB at end), peak mapped trace pages "
          f"{res['file_peak_kb'] / 1e3:.0f} MB (page cache, reclaimable), peak RSS {res['hwm_kb'] / 1e3:.0f} MB "
          f"(both); tensors by basis {res['tensors']}, verdict {res['verdict']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=1_000_000)
    ap.add_argument("--gb", type=float, default=1.0, help="GB of tensor values per trace for the memory figure")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_diff"))
    ap.add_argument("--repeat", type=int, default=3, help="timed diffs per decisions figure (best is shown)")
    ap.add_argument("--rounds", type=int, default=7, help="rounds of the tensor figure (median and range shown)")
    ap.add_argument("--skip", action="append", default=[], choices=["decisions", "tensors", "kernel-load", "memory"])
    ap.add_argument("--quick", action="store_true",
                    help="a few minutes at most: 100k decision steps, tensors up to 1M elements, 0.2 GB memory figure")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.gb, args.repeat = min(args.steps, 100_000), min(args.gb, 0.2), min(args.repeat, 2)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        if "tensors" not in args.skip:
            per_size = bench_tensors(args.quick, args.rounds)
            if "kernel-load" not in args.skip:
                bench_kernel_load(args.out, per_size)
        if "decisions" not in args.skip:
            bench_decisions(args.out, args.steps, args.repeat)
        if "memory" not in args.skip:
            bench_memory(args.out, args.gb)
    finally:
        shutil.rmtree(args.out, ignore_errors=True)
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB")


if __name__ == "__main__":
    main()
