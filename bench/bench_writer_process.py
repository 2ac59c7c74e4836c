#!/usr/bin/env python3
"""Would a writer in its own process free the model's thread? A measurement, not a recorder.

    python bench/bench_writer_process.py [--repeats 7] [--steps 256]

The KV-cache workload of ``bench_record.py`` (the transformer LM of tests/recorder_models.py,
d=256, 4 layers, 45 modules, one token per step, torch on one thread) decoded under

    none     no recorder;
    floor    forward hooks that only copy each output into recycled buffers (bench_record's floor);
    stats    ``TorchRecorder(modules="stats")``: statistics + digest of every output and the
             decision, computed by the writer's thread in this process (today's recorder);
    process  forward hooks that copy each output (and the logits) into a shared-memory ring and
             send one small descriptor list per step through a pipe to a child process, which
             owns a real ``TraceWriter`` and calls ``add_tensor(values=False)`` / ``add_logits``
             on views of the ring (so statistics, digests, batches and files all happen there),
             then hands the ring space back. The model's process pays the copy, the descriptors
             and the pipe, and never shares its GIL with the writer.

Configurations rotate at each repeat; ratios are against ``none`` of the same repeat; medians
are printed with the model thread's CPU time per step (``cpu ms``) and, for ``process``, the
child's CPU time per step. ``stats`` minus ``floor`` is what the recorder adds to the copy;
``process`` minus ``floor`` is what it would add with the writer out of the process. The
difference between the two is the GIL contention (and the shared core) that a separate
process removes. Both traces are read back and their tensor rows counted, so neither side can
drop work unseen.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import Floor  # noqa: E402  (the copy-only floor, the same hooks)
from recorder_models import TransformerLM  # noqa: E402

from steptrace.recorders.torch import TorchRecorder  # noqa: E402
from steptrace.tracefmt import TraceReader, TraceWriter  # noqa: E402

CONFIGS = ("none", "floor", "stats", "process")
ALIGN = 64
HEADER = 64  # the first bytes of the ring: the child's released byte count (int64)


def _writer_process(shm_name: str, size: int, out: str, conn) -> None:
    """The child: read descriptors, write every tensor and decision through a TraceWriter."""
    shm = shared_memory.SharedMemory(name=shm_name)
    released = np.ndarray((1,), np.int64, buffer=shm.buf, offset=0)
    names: list[str] = conn.recv()
    c0 = time.process_time()
    with TraceWriter(out, mode="overwrite") as w:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            step, items, end = msg
            for off, dtype, shape, idx in items:
                view = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf, offset=HEADER + off)
                if idx < 0:
                    w.add_logits("0", step, view)
                else:
                    w.add_tensor("0", step, names[idx], view, values=False)
            released[0] = end  # add_* copied what they keep: the space is free again
    conn.send(time.process_time() - c0)
    del released
    shm.close()


class RingHooks:
    """Model-side half of the ``process`` configuration: copy into the ring, send descriptors."""

    def __init__(self, model: torch.nn.Module, out: Path, ring_bytes: int = 64 << 20) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=HEADER + ring_bytes)
        self.size = ring_bytes
        self.released = np.ndarray((1,), np.int64, buffer=self.shm.buf, offset=0)
        self.released[0] = 0
        self.head = 0  # bytes produced so far (monotonic; the ring position is head % size)
        self.items: list[tuple] = []
        self.stall = 0.0
        self.conn, child = mp.Pipe()
        self.proc = mp.get_context("fork").Process(target=_writer_process,
                                                   args=(self.shm.name, ring_bytes, str(out), child))
        self.proc.start()
        named = [(n, m) for n, m in model.named_modules() if n]
        self.conn.send([n for n, _ in named])
        self._handles = [m.register_forward_hook(self._hook(i)) for i, (_, m) in enumerate(named)]

    def _put(self, a: np.ndarray, idx: int) -> None:
        n = -(-a.nbytes // ALIGN) * ALIGN
        pos = self.head % self.size
        if pos + n > self.size:  # wrap: the tail of the ring is skipped
            self.head += self.size - pos
            pos = 0
        if self.head + n - self.released[0] > self.size:
            t0 = time.perf_counter()
            while self.head + n - self.released[0] > self.size:
                time.sleep(0.0002)
            self.stall += time.perf_counter() - t0
        dst = np.ndarray(a.shape, a.dtype, buffer=self.shm.buf, offset=HEADER + pos)
        np.copyto(dst, a)
        self.items.append((pos, a.dtype.str, a.shape, idx))
        self.head += n

    def _hook(self, idx: int):
        def hook(_m, _a, out) -> None:
            if isinstance(out, torch.Tensor):
                self._put(out.numpy(), idx)
        return hook

    def end_step(self, step: int, logits: torch.Tensor) -> None:
        self._put(logits.numpy(), -1)
        self.conn.send((step, self.items, self.head))
        self.items = []

    def close(self) -> float:
        for h in self._handles:
            h.remove()
        self.conn.send(None)
        child_cpu = self.conn.recv()
        self.proc.join()
        del self.released
        self.shm.close()
        self.shm.unlink()
        return child_cpu


def decode(model, prompt: list[int], steps: int, config: str, out: Path) -> dict:
    """Decode ``steps`` tokens with the KV cache under ``config``; return the timings."""
    rec = TorchRecorder(out / "stats.trace", model, modules="stats", mode="overwrite") if config == "stats" else None
    floor = Floor(model) if config == "floor" else None
    ring = RingHooks(model, out / "process.trace") if config == "process" else None
    cache: list = []
    tokens = list(prompt)

    def step(t: int, x: list[int]) -> int:
        if rec is not None:
            with rec.step(index=t):
                return rec.decide(model(torch.tensor([x]), cache)[0, -1])
        logits = model(torch.tensor([x]), cache)[0, -1]
        tok = int(logits.argmax())
        if floor is not None:
            floor.end_step()
        if ring is not None:
            ring.end_step(t, logits)
        return tok

    with torch.no_grad():
        tokens.append(step(0, tokens))  # the prompt: untimed
        c0 = time.thread_time()
        t0 = time.perf_counter()
        for t in range(1, steps + 1):
            tokens.append(step(t, tokens[-1:]))
        loop = time.perf_counter() - t0
        cpu = time.thread_time() - c0
    res = {"ms": loop / steps * 1e3, "cpu_ms": cpu / steps * 1e3, "child_ms": 0.0, "stall": 0.0, "rows": 0}
    if rec is not None:
        rec.close()
        res["rows"] = TraceReader(out / "stats.trace").tensors().num_rows
    if floor is not None:
        floor.close()
    if ring is not None:
        res["child_ms"] = ring.close() / steps * 1e3
        res["stall"] = ring.stall
        res["rows"] = TraceReader(out / "process.trace").tensors().num_rows
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", type=int, default=256)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = TransformerLM(seed=0, d=256, layers=4, heads=4, vocab=4096, context=32 + args.steps + 2).eval()
    prompt = [int(i) for i in torch.randint(0, 4096, (32,), generator=torch.Generator().manual_seed(0))]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        for c in CONFIGS:
            decode(model, prompt, 8, c, out)
        runs: dict[str, list[dict]] = {c: [] for c in CONFIGS}
        load0 = os.getloadavg()[0]
        for r in range(args.repeats):
            for c in CONFIGS[r % len(CONFIGS):] + CONFIGS[: r % len(CONFIGS)]:
                runs[c].append(decode(model, prompt, args.steps, c, out))
    print(f"kv workload, {args.steps} steps, torch {torch.__version__} on 1 thread, {os.cpu_count()} CPUs, "
          f"median of {args.repeats} rotated repeats; load {load0:.1f} -> {os.getloadavg()[0]:.1f}")
    print(f"{'config':<8} {'ms/step':>8} {'overhead':>9} {'spread':>7} {'cpu ms':>7} {'child ms':>9} {'stall s':>8} {'rows':>7}")
    over = {}
    for c in CONFIGS:
        o = sorted(r["ms"] / b["ms"] - 1 for b, r in zip(runs["none"], runs[c]))
        over[c] = statistics.median(o)
        spread = (o[(3 * len(o)) // 4] - o[len(o) // 4]) / 2
        med = {k: statistics.median(r[k] for r in runs[c]) for k in runs[c][0]}
        print(f"{c:<8} {med['ms']:8.3f} {over[c]:9.1%} {spread:7.1%} {med['cpu_ms']:7.3f} {med['child_ms']:9.3f} "
              f"{med['stall']:8.3f} {int(med['rows']):7d}")
    print(f"added to the copy-only floor: in-process writer {over['stats'] - over['floor']:+.1%}, "
          f"writer process {over['process'] - over['floor']:+.1%} (target: floor + 15 points)")


if __name__ == "__main__":
    main()
