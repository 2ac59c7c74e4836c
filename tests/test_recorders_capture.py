"""The framework-agnostic recorder core: capture policy, steps, budgeted capture (ring buffer),
reference lookups, decisions written from numpy logits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steptrace.recorders.capture import Budget, CapturePolicy, Recorder, Reference, has_nonfinite
from steptrace.recorders.decisions import decide, decide_rows, write_decision
from steptrace.recorders.errors import RecorderUsageError, ReferenceNotFoundError, StepOrderError
from steptrace.tracefmt import TraceReader, TraceWriter
from steptrace.tracefmt.decisions import decide as decide_reference


def rows(table, *cols):
    return [tuple(r[c] for c in cols) for r in table.select(list(cols)).to_pylist()]


# ---------------------------------------------------------------------- policy
def test_policy_first_match_wins_and_forms():
    p = CapturePolicy({"encoder.layers.0.*": "full", "encoder.*": "stats", "encoder.layers.1.attn": "none"})
    assert p.mode("encoder.layers.0.attn") == "full"
    assert p.mode("encoder.layers.1.attn") == "stats"  # an earlier rule matched first
    assert p.mode("decoder.x") == "none"
    assert p("encoder.norm") == "stats"
    assert CapturePolicy(["dec*", ("enc*", "full")]).rules == (("dec*", "stats"), ("enc*", "full"))
    assert CapturePolicy("full").mode("anything.at.all") == "full"
    assert CapturePolicy(None).records_anything is False
    assert CapturePolicy({"a.*": "stats"}, default="full").mode("b") == "full"
    assert str(CapturePolicy({"a.*": "stats", "b": "full"})) == "a.*=stats,b=full"
    assert CapturePolicy({"enc.*": "stats", "dec.*": "full"}).unmatched(["enc.0", "head"]) == ["dec.*"]
    with pytest.raises(RecorderUsageError, match="'everything' for pattern 'x' is unknown"):
        CapturePolicy({"x": "everything"})


# ---------------------------------------------------------------------- steps and records
def test_explicit_and_automatic_steps_with_numpy(tmp_path):
    path = tmp_path / "np.trace"
    vocab = [f"p{i}" for i in range(10)]
    with Recorder(path, policy={"enc*": "stats", "logits:*": "full"}, watched={"eos": 2}, vocab=vocab) as rec:
        rec.record("enc.out", np.ones((2, 3), np.float32))  # no open step: opens step 0 of sample "0"
        assert rec.current_step == ("0", 0)
        assert rec.decide(np.arange(10, dtype=np.float32)) == 9
        rec.begin_step()
        rec.record("enc.out", np.zeros(3, np.float16))
        rec.record("enc.out", np.zeros(3, np.float16))
        rec.record("dec.out", np.zeros(3))  # policy: none
        rec.decide(np.arange(10)[::-1].astype(np.float32), chosen=4)
        with rec.step(sample="b", index=7) as key:
            assert key == ("b", 7)
            rec.decide(np.ones(10), head="duration")
        assert rec.current_step is None
    r = TraceReader(path)
    d = r.decisions()
    assert rows(d, "sample", "step", "head", "chosen", "argmax", "piece") == [
        ("0", 0, "token", 9, 9, "p9"), ("0", 1, "token", 4, 0, "p4"), ("b", 7, "duration", 0, 0, None)]
    assert d["watched"].to_pylist()[0] == [{"id": 2, "logit": 2.0, "rank": 7}]
    assert d["watched"].to_pylist()[2] is None  # watched tokens belong to the vocabulary head
    assert rows(d, "chosen_rank")[1] == (4,)
    assert rows(r.tensors(), "step", "name", "call", "order", "has_values") == [
        (0, "enc.out", 0, 0, False), (0, "logits:token", 0, 1, True),
        (1, "enc.out", 0, 0, False), (1, "enc.out", 1, 1, False), (1, "logits:token", 0, 2, True),
        (7, "logits:duration", 0, 0, True)]
    assert r.metadata.tags["steptrace.capture"] == "enc*=stats,logits:*=full"


def test_records_are_copies_and_step_misuse_is_refused(tmp_path):
    a = np.arange(4, dtype=np.int32)
    with Recorder(tmp_path / "c.trace", policy="full") as rec:
        with rec.step(index=0):
            rec.record("x", a)
            a[:] = 0  # the caller reuses its buffer at once
        with pytest.raises(StepOrderError, match="increasing order"):
            rec.begin_step(index=0)
        with pytest.raises(RecorderUsageError, match="non-empty string"):
            rec.set_sample("")
        with pytest.raises(RecorderUsageError, match="needs budgeted capture"):
            rec.trigger()
    assert TraceReader(tmp_path / "c.trace").tensor("0", 0, "x").tolist() == [0, 1, 2, 3]
    with pytest.raises(RecorderUsageError, match="closed"):
        rec.record("x", a)
    assert rec.close() is rec.close()


def test_has_nonfinite():
    assert not has_nonfinite(np.array([1e38, 3e38], np.float32))  # the float64 sum does not overflow
    assert has_nonfinite(np.array([1.0, np.nan], np.float16))
    assert not has_nonfinite(np.array([1e308, 1e308]))  # float64 sum overflows; the values are finite
    assert has_nonfinite(np.array([1e308, -np.inf]))
    assert has_nonfinite(np.array([0x7F80], np.uint16), dtype="bfloat16")  # +inf bits
    assert not has_nonfinite(np.array([0x7F7F], np.uint16), dtype="bfloat16")
    assert not has_nonfinite(np.array([2**62], np.int64))


# ---------------------------------------------------------------------- budgeted capture
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 4), st.integers(0, 3), st.lists(st.booleans(), min_size=1, max_size=14),
       st.sets(st.integers(0, 13), max_size=3))
def test_ring_writes_each_row_once_with_values_exactly_where_covered(tmp_path_factory, n, after, fires, at):
    path = tmp_path_factory.mktemp("ring") / "r.trace"
    budget = Budget(steps=n, after=after, at_steps=at, nonfinite=False)
    with Recorder(path, policy={"h.*": "full", "s": "stats"}, budget=budget) as rec:
        for t, fire in enumerate(fires):
            with rec.step(index=t):
                rec.record("h.a", np.full(2, t, np.float32))
                rec.record("s", np.full(2, t, np.float32))
                rec.record("h.a", np.full(2, -t, np.float32))
                if fire:
                    rec.trigger("test")
    fired = {t for t, f in enumerate(fires) if f} | {t for t in at if t < len(fires)}
    covered = {s for f in fired for s in range(f - n + 1, f + after + 1) if 0 <= s < len(fires)}
    t = TraceReader(path).tensors()
    keys = rows(t, "step", "name", "call")
    assert sorted(keys) == sorted((s, nm, c) for s in range(len(fires)) for nm, c in (("h.a", 0), ("s", 0), ("h.a", 1)))
    assert {s for s, nm, v in rows(t, "step", "name", "has_values") if v} == covered
    assert not any(v for nm, v in rows(t, "name", "has_values") if nm == "s")
    assert rows(t, "order") == [(o,) for _ in fires for o in (0, 1, 2)]


def test_nonfinite_and_margin_triggers_from_numpy(tmp_path):
    path = tmp_path / "trig.trace"
    budget = Budget(steps=2, margin_below=0.1, heads={"token"})
    with Recorder(path, policy={"x": "full"}, budget=budget) as rec:
        for t in range(9):
            with rec.step(index=t):
                rec.record("x", np.array([t, np.inf if t == 3 else 0.0], np.float32))
                logits = np.array([1.0, 1.05 if t == 6 else 0.0, -1.0])
                rec.decide(logits)
                rec.decide(np.array([1.0, 1.0]), head="duration")  # margin 0 on another head: ignored
    assert [(tr.step, tr.reason) for tr in rec.triggers] == [(3, "NaN/Inf in x"), (6, "margin 0.05 on head 'token'")]
    t = TraceReader(path).tensors()
    assert [s for s, v in rows(t, "step", "has_values") if v] == [2, 3, 5, 6]


# ---------------------------------------------------------------------- reference
def test_reference_tokens_tensors_and_clear_errors(tmp_path):
    path = tmp_path / "ref.trace"
    with TraceWriter(path) as w:
        for s in ("a", "b"):
            for t in (0, 1, 2, 4):
                w.add_logits(s, t, np.eye(6, dtype=np.float32)[t + (s == "b")])
        w.add_tensor("a", 1, "enc", np.arange(6, dtype=np.float32).reshape(2, 3))
        w.add_tensor("a", 1, "enc", np.ones(3, np.float32))
        w.add_tensor("a", 2, "enc", np.ones(3, np.float32), values=False)
    ref = Reference(path, samples={"cand": "b"})
    assert [ref.token("a", t) for t in (0, 1, 2, 4)] == [0, 1, 2, 4]
    assert ref.token("cand", 1) == 2 and ref.steps("a") == 5
    with pytest.raises(ReferenceNotFoundError, match=r"records steps 0\.\.4 with gaps"):
        ref.token("a", 3)
    with pytest.raises(ReferenceNotFoundError, match=r"at step 9: it records steps 0\.\.4"):
        ref.token("a", 9)
    with pytest.raises(ReferenceNotFoundError, match="no 'duration' decisions for sample 'a'"):
        ref.token("a", 0, head="duration")
    assert ref.tensor("a", 1, "enc").values.shape == (2, 3)
    assert ref.tensor("a", 1, "enc", call=1).dtype == "float32"
    with pytest.raises(ReferenceNotFoundError, match="as statistics only"):
        ref.tensor("a", 2, "enc")
    with pytest.raises(ReferenceNotFoundError, match="holds no tensor 'dec'"):
        ref.tensor("a", 1, "dec")


def test_teacher_forcing_with_numpy_logits(tmp_path):
    ref_path = tmp_path / "ref.trace"
    with Recorder(ref_path) as rec:
        for t in range(4):
            rec.begin_step()
            rec.decide(np.eye(5)[t])
    with Recorder(tmp_path / "c.trace", reference=ref_path) as rec:
        got = []
        for t in range(4):
            rec.begin_step()
            got.append(rec.decide(np.eye(5)[0]))
    assert got == [0, 1, 2, 3]
    d = TraceReader(tmp_path / "c.trace").decisions()
    assert rows(d, "chosen", "argmax", "forced", "chosen_rank") == [(t, 0, True, t) for t in range(4)]
    assert TraceReader(tmp_path / "c.trace").metadata.tags["steptrace.teacher_forcing"] == "true"


# ---------------------------------------------------------------------- decisions
def test_decide_numpy_delegates_and_write_decision_fills_chosen_outside_topk(tmp_path):
    x = np.array([0.5, 3.0, 3.0, np.nan, -np.inf, 1.0], np.float32)
    d = decide(x, k=2, chosen=5, watched=[3])
    ref = decide_reference(x, k=2, chosen=5, watched=[3])
    assert d.topk_ids.tolist() == ref.topk_ids.tolist() == [1, 2]
    assert d.chosen_rank == 2 and d.watched == [{"id": 3, "logit": d.watched[0]["logit"], "rank": 5}]
    assert [r.argmax for r in decide_rows(np.stack([x, -x]), k=3)] == [1, 4]
    with pytest.raises(Exception, match="1-d"):
        decide(np.zeros((2, 3)))
    with TraceWriter(tmp_path / "w.trace") as w:
        write_decision(w, "s", 0, d, forced=True)
        write_decision(w, "s", 1, decide(x, chosen=1))
    rows_ = TraceReader(tmp_path / "w.trace").decisions(derive=False).to_pylist()
    assert (rows_[0]["chosen_logit"], rows_[0]["chosen_rank"], rows_[0]["forced"]) == (1.0, 2, True)
    assert (rows_[1]["chosen_logit"], rows_[1]["chosen_rank"]) == (None, None)


def test_decisions_derived_on_the_writer_thread_equal_those_derived_at_once(tmp_path):
    """Without a budget, decide() finds only the token on the caller's thread (the writer
    derives the rest); with one (its margin trigger needs the margin now) it derives all at
    once. Both write the same rows, for numpy and CPU torch logits, NaN included."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    logits = [rng.standard_normal(50).astype(np.float32) for _ in range(12)]
    logits[4][7] = np.nan
    logits[5][:] = 0.0
    out = {}
    for name, budget in (("deferred", None), ("at_once", Budget(steps=2, margin_below=-1.0))):
        with Recorder(tmp_path / f"{name}.trace", budget=budget, watched={"eos": 3}, k=5,
                      vocab=[f"w{i}" for i in range(50)]) as rec:
            for t, x in enumerate(logits):
                with rec.step(index=t):
                    rec.decide(torch.from_numpy(x) if t % 2 else x, chosen=9 if t == 6 else None, frame=t)
        cols = ["step", "chosen", "argmax", "topk_ids", "topk_logits", "margin", "logsumexp", "chosen_logit",
                "chosen_rank", "watched", "piece", "frame"]
        out[name] = repr(TraceReader(tmp_path / f"{name}.trace").decisions(columns=cols).to_pylist())
    assert out["deferred"] == out["at_once"]
