#!/usr/bin/env python3
"""Steady-state TraceWriter throughput on large tensors against zstd-1 in the same run.

    python bench/bench_write.py [--mb 192] [--repeats 3]

``bench_format.py --quick`` writes 14 MB corpora, where opening, closing and compacting a trace
cost as much as the tensors; this bench writes ``--mb`` MB of activation-like tensors (normal
values, 2 MB each, 8 distinct arrays cycled) through one ``TraceWriter`` (``compact=False``:
close-time compaction rewrites only the small decisions/tensors files) with values (zstd-1, the
default encoding) and statistics only, and compresses the same tensors with zstd-1 in this
process. Runs of the three alternate; the best of ``--repeats`` is shown, wall-clock and
process CPU time.

With numba installed (the ``fast`` extra), the two writes run again with the compiled statistics
kernel (``STEPTRACE_KERNEL=numba``, loaded before the timings; under the default ``auto`` only a
writer process takes it, past 2^28 elements): the ``(kernel)`` rows.

Target: trace write with values >= 0.7x zstd-1 compress, float32 and float16. The
writer computes each tensor's statistics, digest and payload in one job on a pool of job
threads (one per CPU) while the caller copies the next tensors, so with free cores the write
runs near (or above) one thread of zstd; on a machine whose other cores are busy it runs at
what its CPU time allows: the "cpu" ratio (zstd's CPU seconds / the write's) is the wall ratio
with one free core, and says how much of the gap is work rather than waiting.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import zstandard
from steptrace.tracefmt import TraceWriter, statspolicy
from steptrace.tracefmt.stats import compute_stats

try:
    import numba  # noqa: F401  (the fast extra: the compiled statistics kernel)
    KERNEL = True
except ImportError:
    KERNEL = False


def kernel(on: bool) -> None:
    """Reduce statistics with the compiled kernel (``STEPTRACE_KERNEL=numba``) or with numpy."""
    os.environ[statspolicy.KERNEL_ENV] = "numba" if on else "numpy"
    statspolicy.reset()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=192, help="MB of tensor bytes per write")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"TraceWriter steady state vs zstd-1, best of {args.repeats}; load {os.getloadavg()[0]:.2f} "
          f"{os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}")
    for dt in ("float32", "float16"):
        arrays = [rng.standard_normal((2 << 20) // np.dtype(dt).itemsize).astype(dt) for _ in range(8)]
        n = max(1, (args.mb << 20) // arrays[0].nbytes)
        total = n * arrays[0].nbytes
        z = zstandard.ZstdCompressor(level=1)
        best = {"values": float("inf"), "stats": float("inf"), "zstd": float("inf")}
        if KERNEL:
            best.update({"values kernel": float("inf"), "stats kernel": float("inf")})
            kernel(True)
            compute_stats(arrays[0], dt)  # numba's load and the kernel's compilation: untimed
        cpu = dict(best)
        for _ in range(args.repeats):
            for mode in best:
                kernel(mode.endswith("kernel"))
                d = tempfile.mkdtemp(prefix="bench_write-")
                t0, c0 = time.perf_counter(), time.process_time()
                if mode == "zstd":
                    for i in range(n):
                        z.compress(arrays[i % 8])
                else:
                    with TraceWriter(os.path.join(d, "t.trace"), compact=False) as w:
                        for i in range(n):
                            w.add_tensor("s", i // 8, f"t{i % 8}", arrays[i % 8], values=mode.startswith("values"))
                best[mode] = min(best[mode], time.perf_counter() - t0)
                cpu[mode] = min(cpu[mode], time.process_time() - c0)
                shutil.rmtree(d)
        for suffix in ("", " kernel") if KERNEL else ("",):
            ratio = best["zstd"] / best["values" + suffix]
            print(f"  {dt}{' (kernel)' if suffix else ''}: {total / 1e6:.0f} MB; trace write values "
                  f"{total / best['values' + suffix] / 1e6:.0f} MB/s, stats only {total / best['stats' + suffix] / 1e6:.0f} "
                  f"MB/s, zstd-1 {total / best['zstd'] / 1e6:.0f} MB/s; values / zstd-1 = {ratio:.2f}x "
                  f"(target >= 0.70: {'PASS' if ratio >= 0.7 else 'MISS'}); cpu {cpu['zstd'] / cpu['values' + suffix]:.2f}x")
    print(f"load after {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
