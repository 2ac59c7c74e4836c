"""Crash safety and several writers: real processes, real SIGKILL (SPEC.md §5)."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from steptrace.tracefmt import TraceReader
from steptrace.tracefmt.validate import validate

WRITER = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    from steptrace.tracefmt import TraceWriter
    path, sample, steps, kill_after = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    rng = np.random.default_rng(abs(hash(sample)) % 2**32)
    w = TraceWriter(path, mode="append", flush_steps=4, flush_ms=50, metadata={"model": "crash-test"})
    for step in range(steps):
        logits = rng.standard_normal(50).astype(np.float32)
        w.add_logits(sample, step, logits)
        w.add_tensor(sample, step, "layer.out", np.full((3, 4), step, np.float32))
        w.add_tensor(sample, step, "layer.state", np.arange(6, dtype=np.int64) + step, values=False)
        if step + 1 == kill_after:
            w.flush()
            print(f"flushed {step + 1}", flush=True)
            time.sleep(60)  # the parent kills us here
    w.close()
    print("closed", flush=True)
    """
)


def _start(path, sample: str, steps: int, kill_after: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), sample, str(steps), str(kill_after)],
        stdout=subprocess.PIPE,
        text=True,
    )


def test_sigkill_mid_recording_reads_back_every_flushed_step(tmp_path):
    path = tmp_path / "killed.trace"
    proc = _start(path, "utt1", steps=1000, kill_after=37)
    line = proc.stdout.readline().strip()
    assert line == "flushed 37"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    report = validate(path, deep=True)
    assert report.ok, report.problems
    assert not report.complete
    assert any("incomplete" in w and "stopped before closing" in w for w in report.warnings)

    reader = TraceReader(path)
    assert not reader.complete
    d = reader.decisions()
    assert d["step"].to_pylist() == list(range(37))
    for step in (0, 17, 36):
        np.testing.assert_array_equal(reader.tensor("utt1", step, "layer.out"), np.full((3, 4), step, np.float32))
    stats = reader.tensors(name="layer.state")
    assert stats.num_rows == 37
    assert stats["max"].to_pylist() == [float(s + 5) for s in range(37)]


def test_killed_trace_validates_with_exit_0_and_says_incomplete(tmp_path, trace_cli):
    path = tmp_path / "killed.trace"
    proc = _start(path, "utt1", steps=1000, kill_after=5)
    assert proc.stdout.readline().strip() == "flushed 5"
    proc.kill()
    proc.wait(timeout=30)
    res = trace_cli("validate", str(path))
    assert res.returncode == 0, res.stderr
    assert "INCOMPLETE" in res.stdout
    assert "incomplete" in res.stderr and "Traceback" not in res.stderr
    strict = trace_cli("validate", "--strict", str(path))
    assert strict.returncode == 2
    info = trace_cli("info", str(path))
    assert info.returncode == 0 and "INCOMPLETE" in info.stdout


def test_two_processes_write_one_trace_concurrently(tmp_path):
    path = tmp_path / "shared.trace"
    procs = [_start(path, f"worker{i}", steps=200, kill_after=-1) for i in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0 and out.strip() == "closed"
    reader = TraceReader(path)
    assert reader.complete
    assert len(reader.parts) == 2
    assert reader.samples() == ["worker0", "worker1"]
    d = reader.decisions()
    assert d.num_rows == 400
    for s in ("worker0", "worker1"):
        assert reader.decisions(sample=s)["step"].to_pylist() == list(range(200))
    np.testing.assert_array_equal(reader.tensor("worker1", 199, "layer.out"), np.full((3, 4), 199, np.float32))
    assert validate(path, deep=True).ok


@pytest.mark.parametrize("kill_after", [1])
def test_kill_right_after_first_flush(tmp_path, kill_after):
    path = tmp_path / "early.trace"
    proc = _start(path, "u", steps=10, kill_after=kill_after)
    assert proc.stdout.readline().strip() == f"flushed {kill_after}"
    proc.kill()
    proc.wait(timeout=30)
    reader = TraceReader(path)
    assert reader.decisions().num_rows == kill_after
