#!/usr/bin/env python3
"""CPU per tensor row of a writer fed many small tensors, the way a recorder hooking every module
feeds it (``writer.lane.hold()`` then ``lane.tensor_row`` per output; issue 14, "bulk rows").

    python bench/bench_rows.py [--workload kv|mlp|kv16|all] [--steps 400] [--repeats 7]

Workloads (shapes ``(1, d)``, as a batch-1 model's outputs, statistics only):

    kv      45 float32 outputs of 1-4 KB per step (the KV-cache decode loop of bench_record.py);
    mlp     64 float32 outputs of 0.5 KB per step (``trace record --modules '*'`` of its MLP);
    kv16    kv in float16.

Reported per row, median (best) of the repeats: ``process`` (process CPU from opening the writer
to ``close()`` returning, compaction included), ``caller`` (the calling thread's CPU in the
``tensor_row`` loop: what the model's thread pays) and ``writer`` (the writer thread's own CPU,
``time.thread_time`` inside it: the Python that holds the GIL the model's thread waits for).
CPU times, not wall times: a shared machine inflates them less. Run it under two checkouts
(``PYTHONPATH``) to compare them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
from steptrace.tracefmt import TraceWriter, writerloop

WORKLOADS = {
    "kv": ([256] * 30 + [1024] * 10 + [512] * 5, np.float32),
    "mlp": ([128] * 64, np.float32),
    "kv16": ([256] * 30 + [1024] * 10 + [512] * 5, np.float16),
}
_writer_cpu: list[float] = []
_run = writerloop.Worker.run


def _timed_run(self: writerloop.Worker) -> None:
    t0 = time.thread_time()
    try:
        _run(self)
    finally:
        _writer_cpu.append(time.thread_time() - t0)


writerloop.Worker.run = _timed_run  # type: ignore[method-assign]


def once(workload: str, steps: int, out: str) -> tuple[float, float, float]:
    """One run: (process, caller, writer) CPU microseconds per row."""
    sizes, dt = WORKLOADS[workload]
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal((1, n)).astype(dt) for n in sizes]
    names = [f"layers.{i}.out" for i in range(len(arrays))]
    dtype = np.dtype(dt).name
    p0 = time.process_time()
    w = TraceWriter(out, mode="overwrite")
    lane = w.lane
    lane.hold()
    t0 = time.thread_time()
    for step in range(steps):
        for i, (name, a) in enumerate(zip(names, arrays)):
            lane.tensor_row("s", step, name, 0, i, "Linear", dtype, a, False)
    caller = time.thread_time() - t0
    w.close()
    rows = steps * len(arrays)
    return (time.process_time() - p0) / rows * 1e6, caller / rows * 1e6, _writer_cpu[-1] / rows * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    print(f"load {os.getloadavg()[0]:.2f}; us of CPU per row, median (best) of {args.repeats}")
    with tempfile.TemporaryDirectory() as d:
        for workload in WORKLOADS if args.workload == "all" else (args.workload,):
            runs = [once(workload, args.steps, os.path.join(d, "t.trace")) for _ in range(args.repeats)]
            cols = list(zip(*runs))
            shown = "  ".join(f"{label} {statistics.median(c):6.2f} ({min(c):5.2f})"
                              for label, c in zip(("process", "caller", "writer"), cols))
            print(f"{workload:<5} {shown}")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
