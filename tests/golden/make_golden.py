"""Writes the golden v1 traces under tests/golden/. Run once; the outputs are committed and read
by tests/test_format_golden.py forever after. Do not regenerate them for a format change: add a
new golden trace for the new version instead, and keep these readable.

    python tests/golden/make_golden.py
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from steptrace.tracefmt import TraceWriter

HERE = Path(__file__).resolve().parent
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in microseconds


def basic(path: Path) -> None:
    meta = {
        "runtime": "golden", "runtime_version": "1", "model": "golden-tiny", "precision": "fp32", "device": "cpu",
        "command": ["make_golden.py"], "tags": {"purpose": "golden"}, "watched": {"eos": 3},
        "created": "2026-01-01T00:00:00.000000Z",
    }
    vocab = ["<pad>", "<s>", "</s>", "<eos>", "▁the", "▁cat", "▁sat", "."]
    with TraceWriter(path, metadata=meta, vocab=vocab, mode="overwrite", flush_steps=2) as w:
        for s, sample in enumerate(["utt-a", "utt-b"]):
            for step in range(4):
                logits = np.array([0.5 * ((i * 7 + step * 3 + s) % 8) - 1.0 for i in range(8)], np.float32)
                logits[3] = -np.inf if step == 0 else logits[3]
                w.add_logits(sample, step, logits, k=4, piece=vocab[int(np.argmax(logits))], frame=step, chunk=step // 2,
                             time_us=T0 + 1000 * (s * 4 + step))
                w.add_decision(sample, step, head="duration", chosen=step % 2, topk_ids=[step % 2, 1 - step % 2],
                               topk_logits=[1.5, 1.25], logsumexp=2.0, forced=step == 3, emission=0,
                               time_us=T0 + 1000 * (s * 4 + step) + 500)
                w.add_tensor(sample, step, "encoder.out", np.arange(12, dtype=np.float32).reshape(3, 4) * (step + 1) + s)
                w.add_tensor(sample, step, "decoder.state", np.arange(6, dtype=np.int64) - step, values=False)
            w.add_tensor(sample, 0, "special.f16", np.array([1.0, np.nan, np.inf, -np.inf, -0.0], np.float16))
            w.add_tensor(sample, 0, "special.bf16", np.array([0x3F80, 0xC000, 0x7FC1, 0xFF80], np.uint16), dtype="bfloat16")
            w.add_tensor(sample, 0, "special.scalar", np.array(7, np.int8))
            w.add_tensor(sample, 0, "special.empty", np.zeros((0, 3), np.float64))
            w.add_tensor(sample, 0, "special.bool", np.array([True, False, True]))
            w.add_tensor(sample, 1, "encoder.out", np.full((2,), s, np.float32))  # call 1 of encoder.out at step 1


WRITER = """
import sys, time
import numpy as np
from steptrace.tracefmt import TraceWriter
w = TraceWriter(sys.argv[1], mode="overwrite", flush_steps=1, flush_ms=10, metadata={"model": "golden-killed", "created": "2026-01-01T00:00:00.000000Z"})
for step in range(100):
    w.add_decision("killed", step, chosen=step % 5, topk_ids=[step % 5, 9], topk_logits=[2.0, 1.0], time_us=1767225600000000 + step)
    w.add_tensor("killed", step, "h", np.full(4, step, np.float32))
    if step == 9:
        w.flush(); print("ready", flush=True); time.sleep(60)
"""


def interrupted(path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # Make the status file host-independent: the writer's host is not this test machine.
    import json

    (status,) = (path / "parts").glob("*.json")
    doc = json.loads(status.read_text())
    doc["host"] = "golden-host"
    doc["pid"] = 1
    status.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    for name, fn in (("v1-basic", basic), ("v1-interrupted", interrupted)):
        out = HERE / name
        shutil.rmtree(out, ignore_errors=True)
        fn(out)
        print("wrote", out)
