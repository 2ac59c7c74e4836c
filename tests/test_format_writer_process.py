"""A writer whose background work runs in a process of its own (``TraceWriter(process=True)``):
the same trace as the thread's, byte for byte in every column; a small ring that makes the
caller wait; a killed recording process and a killed writer process; real torch recorders and
``trace record --writer process``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from steptrace.tracefmt import TraceReader, TraceWriter
from steptrace.tracefmt.errors import TraceUsageError, TraceWriteError
from steptrace.tracefmt.stats import compute_stats
from steptrace.tracefmt.validate import validate

SKIP_COLUMNS = {"part", "time"}  # the part id is new per writer; decision times are the clock's


def _tables(path):
    r = TraceReader(path)
    t = r.tensors().sort_by([("sample", "ascending"), ("step", "ascending"), ("order", "ascending")])
    d = r.decisions().sort_by([("sample", "ascending"), ("step", "ascending"), ("head", "ascending")])
    return r, t, d


def assert_same_trace(a, b) -> None:
    ra, ta, da = _tables(a)
    rb, tb, db = _tables(b)
    assert ta.num_rows == tb.num_rows and da.num_rows == db.num_rows
    for x, y in ((ta, tb), (da, db)):
        for c in x.column_names:
            if c not in SKIP_COLUMNS:
                assert repr(x.column(c).to_pylist()) == repr(y.column(c).to_pylist()), c  # NaN as "nan"
    for row in ta.filter(ta["has_values"]).to_pylist():
        va = ra.tensor(row["sample"], row["step"], row["name"], call=row["call"])
        vb = rb.tensor(row["sample"], row["step"], row["name"], call=row["call"])
        assert va.dtype == vb.dtype and va.shape == vb.shape and va.tobytes() == vb.tobytes()


def write_everything(w: TraceWriter) -> None:
    """Every kind of item a writer takes, held and not held."""
    rng = np.random.default_rng(0)
    for step in range(12):
        if step == 6:
            w.lane.hold()
        w.add_tensor("s", step, "f32", rng.standard_normal((3, 5)).astype(np.float32), source="Linear")
        w.add_tensor("s", step, "f16", rng.standard_normal(7).astype(np.float16), values=False)
        w.add_tensor("s", step, "bf16", rng.integers(0, 2**16, 4, dtype=np.uint16), dtype="bfloat16")
        w.add_tensor("s", step, "bool", np.array([True, False]), values=False)
        w.add_tensor("s", step, "i64", np.arange(6, dtype=np.int64).reshape(2, 3)[:, ::2])  # not contiguous
        w.add_tensor("s", step, "scalar", np.float64(step))
        w.add_tensor("s", step, "empty", np.zeros((0, 3), np.float32))
        w.add_tensor("s", step, "nan", np.array([np.nan, np.inf, 1.0], np.float32), values=False)
        x = rng.standard_normal(4096).astype(np.float32)
        w.add_tensor("s", step, "given", x, values=False, stats=compute_stats(x, "float32"))
        w.add_tensor_stats("s", step, "device", dtype="float32", shape=[2, 2], stats=compute_stats(x[:4], "float32"),
                           digest=bytes(range(16)), source="cuda")
        w.lane.tensor_row("s", step, "lane", 0, 100, None, "float32", x[:64], False)
        w.add_logits("s", step, rng.standard_normal(300).astype(np.float32), k=4, watched=[3], piece=f"p{step}")
        w.add_logits("s", step, rng.standard_normal(600).astype(np.float32)[::2], head="strided", k=3)  # a view
        nan_logits = rng.standard_normal(50).astype(np.float32)
        nan_logits[7] = np.nan
        w.add_logits("s", step, nan_logits, head="nan")  # decided on the caller's side: a decision row
        w.add_decision("s", step, head="dur", chosen=2, topk_ids=[2, 0], topk_logits=[1.5, -np.inf], frame=step)
    w.add_decisions({"sample": ["b", "b"], "step": [0, 1], "head": ["token", "token"], "chosen": [1, 2],
                     "topk_ids": [[1, 2], [2, 1]], "topk_logits": [[1.0, 0.5], [2.0, 1.0]]})
    w.add_tensor("s", 3, "big", rng.standard_normal((512, 512)).astype(np.float32))  # 1 MB: a job of its own


def test_the_writer_process_writes_what_the_thread_writes(tmp_path):
    for process in (False, True):
        with TraceWriter(tmp_path / f"{process}.trace", process=process, metadata={"model": "m"}) as w:
            write_everything(w)
            w.flush()
        assert w.close().tensors == 12 * 11 + 1
    assert_same_trace(tmp_path / "False.trace", tmp_path / "True.trace")
    assert validate(tmp_path / "True.trace", deep=True).ok


def test_a_small_ring_makes_the_caller_wait_and_loses_nothing(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(4000).astype(np.float32) for _ in range(200)]  # 16 KB each, 3.2 MB in all
    for process in (False, True):
        with TraceWriter(tmp_path / f"{process}.trace", process=process, ring_bytes=1 << 16 if process else None) as w:
            w.lane.hold()
            for i, a in enumerate(arrays):
                w.add_tensor("s", i // 10, f"t{i % 10}", a, values=i % 3 == 0)
    assert_same_trace(tmp_path / "False.trace", tmp_path / "True.trace")


def test_the_ring_starts_over_where_the_child_released_it(tmp_path, monkeypatch):
    """Past RECYCLE_BYTES the arrays go back to the ring's start once the child is done there,
    so a run that the child keeps up with uses the ring's first MBs over and over."""
    from steptrace.tracefmt import writerprocess

    monkeypatch.setattr(writerprocess, "RECYCLE_BYTES", 1 << 16)
    rng = np.random.default_rng(2)
    rows = [[rng.standard_normal(int(rng.integers(1, 700))).astype(np.float32) for _ in range(16)] for _ in range(60)]
    deepest = []
    for process in (False, True):
        with TraceWriter(tmp_path / f"{process}.trace", process=process, ring_bytes=1 << 22 if process else None) as w:
            w.lane.hold()
            for step, arrays in enumerate(rows):
                w.lane.tensor_rows([("s", step, f"t{i}", 0, i, None, "float32", a, i % 4 == 0)
                                    for i, a in enumerate(arrays)])
                if process:
                    deepest.append(w._worker.pos)
                    if step % 5 == 4:
                        w.flush()  # the child releases what it took
    assert_same_trace(tmp_path / "False.trace", tmp_path / "True.trace")
    # held rows keep their arrays until the flush after them: laps of 64 KiB + 5 steps, not of 4 MiB
    assert max(deepest) < 1 << 18 and w._worker.head > 1 << 22


def test_the_ring_starts_over_only_when_the_child_is_nearly_done_with_the_lap():
    """Going back to the ring's start while the child is far behind would make every array of
    the new lap wait for its old-lap bytes (a ring of the lap's size): it goes forward then."""
    from types import SimpleNamespace

    from steptrace.tracefmt.writerprocess import WriterProcess

    size, pos = 256 << 20, 20 << 20
    lap = 3 * size  # the head coordinate of this lap's start
    for backlog, restarts in ((0, True), (pos // 4, True), (pos // 4 + (1 << 18) + 64, False), (pos - 4096, False)):
        ring = SimpleNamespace(head=lap + pos + (1 << 20), pos=pos + (1 << 20), size=size, limit=lap + pos,
                               sent=lap + pos, released=np.array([lap + pos - backlog], np.int64))
        assert WriterProcess._start_over(ring, 4096) == (0 if restarts else pos + (1 << 20)), backlog
        if restarts:  # the last MB placed is held, not sent: not the child's backlog
            assert ring.head == lap + size and ring.limit == lap + pos - backlog + size


def test_an_array_larger_than_the_ring_is_a_clear_error(tmp_path):
    with TraceWriter(tmp_path / "t.trace", process=True, ring_bytes=1 << 16) as w:
        with pytest.raises(TraceWriteError, match="ring_bytes"):
            w.add_tensor("s", 0, "huge", np.zeros(1 << 15, np.float32))
        w.add_tensor("s", 0, "fits", np.zeros(16, np.float32))
    assert TraceReader(tmp_path / "t.trace").tensors().column("name").to_pylist() == ["fits"]


def test_bad_ring_sizes_are_usage_errors(tmp_path):
    with pytest.raises(TraceUsageError, match="64 KiB"):
        TraceWriter(tmp_path / "t.trace", process=True, ring_bytes=1000)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrays=st.lists(st.tuples(st.sampled_from(["float32", "float16", "int8", "uint16", "int64", "bool"]),
                                 st.lists(st.integers(0, 6), min_size=0, max_size=3), st.booleans()),
                       min_size=1, max_size=12))
def test_round_trip_of_random_arrays_through_the_ring(tmp_path_factory, arrays):
    tmp = tmp_path_factory.mktemp("ring")
    rng = np.random.default_rng(len(arrays))
    made = [((rng.standard_normal(shape) * 50).astype(dt), values) for dt, shape, values in arrays]
    with TraceWriter(tmp / "t.trace", process=True, ring_bytes=1 << 16) as w:
        for i, (a, values) in enumerate(made):
            w.add_tensor("s", i % 3, f"t{i}", a, values=values)
    r = TraceReader(tmp / "t.trace")
    rows = {row["name"]: row for row in r.tensors().to_pylist()}
    for i, (a, values) in enumerate(made):
        row = rows[f"t{i}"]
        assert row["shape"] == list(a.shape)
        assert row["numel"] == a.size
        if values:
            back = r.tensor("s", i % 3, f"t{i}")
            assert back.dtype == a.dtype and back.tobytes() == a.tobytes()


KILLED = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from steptrace.tracefmt import TraceWriter
    w = TraceWriter(sys.argv[1], process=True, flush_steps=1000)
    for step in range(40):
        w.add_tensor("s", step, "x", np.full(8, step, np.float32))
        w.add_logits("s", step, np.arange(10, dtype=np.float32) + step)
    w.flush()
    for step in range(40, 50):
        w.add_tensor("s", step, "x", np.full(8, step, np.float32))
    print("sent", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_a_killed_recording_process_leaves_every_row_it_sent_readable(tmp_path):
    path = tmp_path / "killed.trace"
    proc = subprocess.run([sys.executable, "-c", KILLED, str(path)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert proc.stdout.strip() == "sent"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # the writer process writes what it was given, then exits
        report = validate(path, deep=True)
        if report.ok and TraceReader(path).tensors().num_rows == 50:
            break
        time.sleep(0.2)
    report = validate(path, deep=True)
    assert report.ok, report.problems
    assert not report.complete  # the part stays open: the recording did not close it
    r = TraceReader(path)
    assert r.tensors().column("step").to_pylist() == list(range(50))  # unflushed rows too: they were sent
    assert r.decisions().num_rows == 40


def test_a_killed_writer_process_fails_the_next_call(tmp_path):
    w = TraceWriter(tmp_path / "t.trace", process=True)
    w.add_tensor("s", 0, "x", np.zeros(4, np.float32))
    w.flush()
    w._worker._proc.kill()
    w._worker._proc.wait()
    with pytest.raises(TraceWriteError, match="writer process"):
        for step in range(1, 100):  # the first send after the kill finds the pipe closed
            w.add_tensor("s", step, "x", np.zeros(4, np.float32))
        w.flush()
    with pytest.raises(TraceWriteError, match="writer process"):
        w.close()
    assert TraceReader(tmp_path / "t.trace").tensors().num_rows >= 1  # what was flushed stays readable


def test_torch_recorder_with_a_writer_process_matches_the_thread(tmp_path):
    torch = pytest.importorskip("torch", reason="the torch recorder needs torch (the torch extra)")
    from recorder_models import TransformerLM
    from steptrace.recorders.torch import TorchRecorder

    model = TransformerLM(seed=0, d=32, layers=2, heads=4, vocab=64, context=40).eval()
    for process in (False, True):
        # a 64 KiB ring: the hooks' copies into it run out of room, fall back to clones and wait
        opts = {"process": True, "ring_bytes": 1 << 16} if process else None
        with TorchRecorder(tmp_path / f"{process}.trace", model, modules={"blocks.0*": "full", "*": "stats"},
                           writer_options=opts) as rec:
            cache: list = []
            tok = [1] * 6
            with torch.no_grad():
                for t in range(30):
                    with rec.step(index=t):
                        tok = [rec.decide(model(torch.tensor([tok]), cache)[0, -1])]
    assert_same_trace(tmp_path / "False.trace", tmp_path / "True.trace")


def test_trace_record_with_a_writer_process(tmp_path, trace_cli):
    pytest.importorskip("torch", reason="trace record of a torch script needs torch (the torch extra)")
    script = tmp_path / "loop.py"
    script.write_text(textwrap.dedent("""
        import torch
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(32, 16), torch.nn.Linear(16, 16), torch.nn.GELU(),
                                    torch.nn.Linear(16, 32)).eval()
        tok = torch.tensor([1])
        with torch.no_grad():
            for _ in range(20):
                tok = model(tok)[0].argmax().view(1)
    """))
    for writer in ("thread", "process"):
        out = trace_cli("record", "-o", str(tmp_path / f"{writer}.trace"), "--writer", writer, "--modules", "*",
                        "--logits", "3", str(script))
        assert out.returncode == 0, out.stderr
    assert_same_trace(tmp_path / "thread.trace", tmp_path / "process.trace")


def test_trace_records_writer_is_a_process_when_it_records_modules(tmp_path, monkeypatch):
    from steptrace.recorders.scripthooks import WRITERS, ScriptRecorder
    from steptrace.tui.cli import build_parser

    def writer(**kw):
        return ScriptRecorder(tmp_path / "t.trace", **kw).writer

    assert writer(modules=["*"], logits=["head"]) == "process"  # the default: auto
    assert writer(logits=["head"]) == "thread"  # decisions only: nothing to start
    assert writer(modules=["*"], tensors="none") == "thread"
    assert writer(modules=["*"], writer="thread") == "thread"
    assert writer(logits=["head"], writer="process") == "process"
    assert not (tmp_path / "t.trace").exists()  # nothing is started or written before the first record
    with pytest.raises(TraceUsageError, match="auto, thread, process"):
        writer(writer="fork")
    monkeypatch.setattr(os, "name", "nt")  # no writer process there: auto takes the thread
    assert writer(modules=["*"]) == "thread"
    monkeypatch.undo()
    args = build_parser("record").parse_args(["record", "-o", "x.trace", "s.py"])
    assert args.writer == "auto"
    with pytest.raises(SystemExit):
        build_parser("record").parse_args(["record", "--writer", "fork", "-o", "x.trace", "s.py"])
    assert set(WRITERS) == {"auto", "thread", "process"}  # the CLI's choices (kept light: no import there)


def test_a_writer_process_runs_the_steptrace_of_its_parent(tmp_path):
    """A steptrace found through ``sys.path`` alone (a checkout put there by a launcher): the
    child is given the same directory, so both sides speak the same wire format."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (tmp_path / "pp").mkdir()
    (tmp_path / "pp" / "steptrace").symlink_to(root)
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path / "pp")!r})
        import numpy as np
        import steptrace
        from steptrace.tracefmt import TraceWriter
        from steptrace.tracefmt.writerprocess import _child_code
        assert steptrace.__file__.startswith({str(tmp_path / "pp")!r}), steptrace.__file__
        print(_child_code())
        with TraceWriter({str(tmp_path / "t.trace")!r}, process=True) as w:
            w.add_tensor("s", 0, "x", np.arange(6, dtype=np.float32))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert repr(str(tmp_path / "pp")) in out.stdout
    assert validate(tmp_path / "t.trace").ok
    assert TraceReader(tmp_path / "t.trace").tensors().num_rows == 1
