"""Benchmark of the viewer: time to first paint and peak memory opening a large trace.

For each size (default 100 k and 1 M steps) it builds, once, a one-sample trace with
tracefmt.TraceWriter — k = 8 decisions with pieces and a watched EOS, and tensors (two per
recorded step every ``--tensor-every`` steps, values on one of them every 100 steps) — then, in a
fresh process per size, opens ``trace view`` headless (Textual's test driver, 160x48) and measures:

- import time of the viewer (textual + steptrace.tui.app.main);
- time to first paint: from starting the app to the step table showing real rows (target < 1 s);
- time to jump to the last step (``G``) and to the middle (``g`` + step), rows shown;
- peak RSS of the process (``ru_maxrss``) after opening, jumping and paging around.

Memory should not grow with the number of steps: the viewer reads key columns batch by batch and
keeps a byte-bounded cache, so the 1 M / 100 k ratio of peak RSS should stay near 1.

    python bench/bench_view.py [--sizes 100000,1000000] [--out /tmp/bench_view]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VOCAB_SIZE = 1000
EOS = 2
CHUNK = 1 << 17


def build(path: Path, steps: int, *, tensor_every: int = 10) -> float:
    """Write a one-sample trace of ``steps`` steps (see the module docstring); return seconds."""
    from steptrace.tracefmt import TraceWriter

    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    vocab = [f"▁w{i}" for i in range(VOCAB_SIZE)]
    vocab[EOS] = "</s>"
    meta = {"runtime": "torch", "precision": "fp16", "model": "bench-lm", "watched": {"eos": EOS}}
    with TraceWriter(path, metadata=meta, vocab=vocab, mode="overwrite") as w:
        for lo in range(0, steps, CHUNK):
            n = min(CHUNK, steps - lo)
            ids = rng.integers(3, VOCAB_SIZE, (n, 8), dtype=np.int32)
            logits = np.sort(rng.standard_normal((n, 8)).astype(np.float32) * 2, axis=1)[:, ::-1] + np.float32(8)
            offsets = pa.array(np.arange(0, 8 * n + 1, 8, dtype=np.int32))
            eos_rank = rng.integers(1, 50, n, dtype=np.int32)
            watched = pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), pa.StructArray.from_arrays(
                [pa.array(np.full(n, EOS, np.int32)), pa.array(logits[:, 0] - eos_rank * np.float32(0.1)),
                 pa.array(eos_rank)], names=["id", "logit", "rank"]))
            w.add_decisions({
                "sample": pa.array(["bench"] * n),
                "step": pa.array(np.arange(lo, lo + n, dtype=np.int32)),
                "chosen": pa.array(ids[:, 0]),
                "topk_ids": pa.ListArray.from_arrays(offsets, pa.array(ids.reshape(-1))),
                "topk_logits": pa.ListArray.from_arrays(offsets, pa.array(np.ascontiguousarray(logits).reshape(-1))),
                "watched": watched,
            })
        x = rng.standard_normal(64).astype(np.float32)
        for step in range(0, steps, tensor_every):
            w.add_tensor("bench", step, "decoder.attn", x, values=step % 100 == 0, source="Attention")
            w.add_tensor("bench", step, "decoder.mlp", x[:16], values=False, source="MLP")
    return time.perf_counter() - t0


def _anonymous_mb() -> float:
    """Anonymous (heap) memory of this process now, in MB (file-backed mapped pages excluded)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Anonymous:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(trace: str) -> None:
    """Open ``trace`` headless; print one JSON line of timings and peak memory."""
    import asyncio

    t_imp = time.perf_counter()
    from steptrace.tui.app.main import ViewApp
    from steptrace.tui.app.widgets.steptable import StepTable

    t_imp = time.perf_counter() - t_imp

    async def run() -> dict[str, float]:
        t0 = time.perf_counter()
        app = ViewApp([trace])
        out: dict[str, float] = {}
        async with app.run_test(size=(160, 48)) as pilot:
            table = app.query_one(StepTable)

            async def wait_rows(since: float) -> float:
                while not table.painted_rows:
                    await pilot.pause(0.005)
                return time.perf_counter() - since

            out["first_paint_s"] = await wait_rows(t0)
            out["rows"] = table.row_count
            await app.workers.wait_for_complete()
            for name, step in (("jump_end_s", table.row_count - 1), ("goto_middle_s", table.row_count // 2)):
                table.painted_rows = False
                t1 = time.perf_counter()
                app.goto_step(step)
                out[name] = await wait_rows(t1)
            for _ in range(30):
                await pilot.press("pagedown")
            for frac in (0.1, 0.3, 0.7, 0.9):
                app.goto_step(int(table.row_count * frac))
                await pilot.pause(0.05)
            await app.workers.wait_for_complete()
            await pilot.pause(0.1)
            out["heap_mb"] = _anonymous_mb()
        return out

    res = asyncio.run(run())
    res["import_s"] = t_imp
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,300000,1000000", help="comma-separated step counts")
    ap.add_argument("--out", default="/tmp/bench_view", help="folder for the generated traces (kept)")
    ap.add_argument("--tensor-every", type=int, default=10, help="record tensors every N steps")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    for n in (int(s) for s in args.sizes.split(",")):
        path = out / f"view-{n}.trace"
        if not (path / "steptrace.json").exists():
            secs = build(path, n, tensor_every=args.tensor_every)
            print(f"built {path} ({n:,} steps) in {secs:.1f} s", flush=True)
        runs = []
        for _ in range(3):
            p = subprocess.run([sys.executable, __file__, "--child", str(path)], capture_output=True, text=True,
                               cwd=ROOT, check=False)
            if p.returncode != 0:
                sys.exit(f"child failed for {path}:\n{p.stderr}")
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
        best = {k: min(r[k] for r in runs) for k in runs[0]}
        results[n] = best
        print(f"{n:>9,} steps: first paint {best['first_paint_s'] * 1000:6.0f} ms (target < 1000 ms), "
              f"jump to end {best['jump_end_s'] * 1000:5.0f} ms, goto middle {best['goto_middle_s'] * 1000:5.0f} ms, "
              f"peak RSS {best['peak_rss_mb']:6.1f} MB (heap {best['heap_mb']:5.1f} MB), "
              f"viewer import {best['import_s'] * 1000:4.0f} ms "
              f"[best of 3 fresh processes]", flush=True)
    sizes = sorted(results)
    big = results[sizes[-1]]
    for n in sizes[:-1]:
        small = results[n]
        print(f"ratios {sizes[-1]:,} / {n:,} steps ({sizes[-1] / n:.1f}x more steps): "
              f"first paint {big['first_paint_s'] / small['first_paint_s']:.2f}x, "
              f"peak RSS {big['peak_rss_mb'] / small['peak_rss_mb']:.2f}x, heap {big['heap_mb'] / small['heap_mb']:.2f}x "
              f"(target: ~1x once batches and the 32 MB row cache are full)")


if __name__ == "__main__":
    main()
