"""Every position of a [.., T, V] output decided as its own step, on a real model with per-frame
outputs: the constructed CTC recognizer of tests/positions_models.py, exported to ONNX and recorded
through OrtRecorder(position="all") in fp32 and with a planted fault in one Conv's weights, through
TorchRecorder.decide_positions, through `trace record --all-positions`, and converted to CoreML.
Also the rules: open-loop heads in the manifest, never teacher-forced; one step per position with
the call's tensors at the first; streamed samples; clear errors."""

from __future__ import annotations

import importlib.util
import textwrap
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from positions_models import (BLANK, BUGGED, ONNX_CONV0, V, CTCModel, build_ctc_pair, build_vad_pair, export_onnx,
                              plant_bug, record_torch, utterances)

from steptrace.recorders import Recorder
from steptrace.recorders.errors import RecorderUsageError, StepOrderError
from steptrace.recorders.onnxruntime import OrtRecorder
from steptrace.recorders.torch import TorchRecorder
from steptrace.tracefmt import TraceMetadata, TraceReader
from steptrace.tracefmt.decisions import decide as decide_reference
from steptrace.tui.cli import EXIT_ERROR, main

FRAMES = 48
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def ctc(tmp_path_factory):
    """The fp32/planted-bug ONNX pair as the differ's tests get it, and the reference logits."""
    out = tmp_path_factory.mktemp("ctc")
    pair = build_ctc_pair(out, bug=True, samples=6, frames=FRAMES)
    sess = ort.InferenceSession(str(out / "ctc.onnx"), providers=["CPUExecutionProvider"])
    bad = ort.InferenceSession(str(out / "ctc_bug.onnx"), providers=["CPUExecutionProvider"])
    logits = {u.sample: sess.run(["logits"], {"features": u.features})[0][0] for u in pair.utts}
    bad_logits = {u.sample: bad.run(["logits"], {"features": u.features})[0][0] for u in pair.utts}
    return pair, logits, bad_logits


def by_sample(reader: TraceReader, table: str = "decisions") -> dict[str, list[dict]]:
    rows = (reader.decisions() if table == "decisions" else reader.tensors()).to_pylist()
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["sample"], []).append(r)
    return out


# ---------------------------------------------------------------------- the real model
def test_the_constructed_ctc_model_decides_meaningfully_and_the_bug_is_deliberate(ctc):
    pair, logits, bad_logits = ctc
    for u in pair.utts:
        lg, bad = logits[u.sample], bad_logits[u.sample]
        assert lg.shape == (FRAMES, V)
        assert (lg.argmax(1) == u.labels).mean() >= 0.9  # a recognizer, not noise
        assert set(u.tokens) & set(BUGGED)  # every utterance holds a class the fault breaks
        # the fault changes some frames of every sample by whole logits, not by a near tie
        ref_tok = lg.argmax(1)
        lost = bad.max(1) - bad[np.arange(FRAMES), ref_tok]
        assert (lost > 1.0).any() and (bad.argmax(1) != ref_tok).sum() >= 3


def test_ort_position_all_records_one_step_per_frame_with_the_run_at_step_0(ctc):
    pair, logits, _ = ctc
    r = TraceReader(pair.ref)
    assert r.metadata.open_loop == ["token"] and r.manifest["open_loop"] == ["token"]
    assert r.samples() == [u.sample for u in pair.utts]
    decisions, tensors = by_sample(r), by_sample(r, "tensors")
    for u in pair.utts:
        rows = decisions[u.sample]
        assert [x["step"] for x in rows] == list(range(FRAMES)) and [x["position"] for x in rows] == list(range(FRAMES))
        assert not any(x["forced"] for x in rows) and {x["head"] for x in rows} == {"token"}
        for t in (0, 7, FRAMES - 1):  # each frame's decision is the numpy reference decision of that row
            want = decide_reference(logits[u.sample][t], k=8, watched=[BLANK])
            assert rows[t]["chosen"] == want.argmax and rows[t]["topk_ids"] == want.topk_ids.tolist()
            assert np.float32(rows[t]["margin"]) == np.float32(want.margin)
            assert rows[t]["watched"][0]["id"] == BLANK and rows[t]["watched"][0]["rank"] == want.watched[0]["rank"]
        recorded = tensors[u.sample]  # the run's inputs, exposed intermediates and logits: all at step 0
        assert {x["step"] for x in recorded} == {0}
        names = [x["name"] for x in recorded]
        assert names[0] == "features" and names[-1] == "logits" and ONNX_CONV0 in names
        assert [x["order"] for x in recorded] == list(range(len(recorded)))


def test_the_planted_bug_shows_at_the_conv_at_step_0_of_every_sample_and_in_its_frames(ctc):
    pair, _, bad_logits = ctc
    ref, cand = TraceReader(pair.ref), TraceReader(pair.cand)
    assert cand.metadata.open_loop == ["token"] and pair.culprit == ONNX_CONV0
    dig = {(x["sample"], x["step"], x["name"]): x["digest"] for x in ref.tensors().to_pylist()}
    cdig = {(x["sample"], x["step"], x["name"]): x["digest"] for x in cand.tensors().to_pylist()}
    assert dig.keys() == cdig.keys()
    mean = {(x["sample"], x["name"]): x["mean"] for x in ref.tensors().to_pylist()}
    cmean = {(x["sample"], x["name"]): x["mean"] for x in cand.tensors().to_pylist()}
    ref_dec, cand_dec = by_sample(ref), by_sample(cand)
    for u in pair.utts:
        s = u.sample
        assert dig[(s, 0, "features")] == cdig[(s, 0, "features")]  # same input
        assert dig[(s, 0, ONNX_CONV0)] != cdig[(s, 0, ONNX_CONV0)]  # the fault's first output differs
        assert abs(mean[(s, ONNX_CONV0)] - cmean[(s, ONNX_CONV0)]) > 0.01  # in its statistics too
        a = [x["chosen"] for x in ref_dec[s]]
        b = [x["chosen"] for x in cand_dec[s]]
        assert len(a) == len(b) == FRAMES
        assert b == bad_logits[s].argmax(1).tolist()  # the candidate's own frames, none forced
        assert sum(x != y for x, y in zip(a, b)) >= 3
        # frames after a differing frame are still the candidate's own: nothing is fed back
        first = next(t for t, (x, y) in enumerate(zip(a, b)) if x != y)
        assert any(x == y for x, y in zip(a[first + 1:], b[first + 1:]))


def test_benign_pair_and_torch_reference_decide_the_same_frames(tmp_path, ctc):
    pair, logits, _ = ctc
    benign = build_ctc_pair(tmp_path / "benign", bug=False, samples=3, frames=FRAMES)
    a, b = by_sample(TraceReader(benign.ref)), by_sample(TraceReader(benign.cand))
    assert TraceReader(benign.cand).manifest["tags"]["onnxruntime.graph_optimization_level"] == "ORT_ENABLE_ALL"
    for s in a:
        assert [x["step"] for x in b[s]] == list(range(FRAMES))
        np.testing.assert_allclose([x["margin"] for x in a[s]], [x["margin"] for x in b[s]], atol=1e-4)
    torch_trace = record_torch(CTCModel().eval(), tmp_path / "torch.trace", pair.utts)
    r = TraceReader(torch_trace)
    assert r.metadata.open_loop == ["token"] and r.metadata.runtime == "torch"
    dec, tensors = by_sample(r), by_sample(r, "tensors")
    for u in pair.utts:
        rows = dec[u.sample]
        assert [x["step"] for x in rows] == list(range(FRAMES)) and [x["position"] for x in rows] == list(range(FRAMES))
        lg = logits[u.sample]
        top2 = np.sort(lg, 1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > 1e-3  # frames whose argmax no fp32 rounding can change
        assert np.array_equal(np.array([x["chosen"] for x in rows])[clear], lg.argmax(1)[clear])
        np.testing.assert_allclose([x["margin"] for x in rows], top2[:, 1] - top2[:, 0], atol=1e-4)
        assert [(x["step"], x["name"]) for x in tensors[u.sample]] == [
            (0, "encoder.0"), (0, "encoder.1"), (0, "encoder.2"), (0, "encoder.3"), (0, "head")]


# ---------------------------------------------------------------------- the rules
def _logits(t: int, v: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((t, v)).astype(np.float32)


def test_decide_positions_steps_positions_heads_and_what_stays_open(tmp_path):
    a, b = _logits(4), _logits(4, 3, seed=1)
    meta = TraceMetadata(open_loop=["vad"])
    with Recorder(tmp_path / "r.trace", policy={"enc": "stats", "logits:*": "full"}, open_loop=["frame", "dur"],
                  metadata=meta) as rec:
        with rec.step(sample="s", index=3):
            rec.record("enc", np.ones(2, np.float32))
            assert rec.decide_positions(a[None], head="frame") == a.argmax(1).tolist()  # [1, T, V]
        assert rec.current_step is None  # the last position's step is ended: the next record opens step 7
        rec.record("enc", np.zeros(2, np.float32))
        assert rec.current_step == ("s", 7)
        rec.set_sample("t")
        got = rec.decide_positions({"frame": a, "dur": b}, offset=10)  # two heads over the same frames
        assert got == {"frame": a.argmax(1).tolist(), "dur": b.argmax(1).tolist()}
        rec.set_sample("u")
        assert rec.decide_positions(np.zeros((0, 5), np.float32), head="frame") == []
        with pytest.raises(RecorderUsageError, match=r"'token' are decided at every position but not declared "
                                                     r"open-loop.*open_loop=\['token'\].*fed_back=True"):
            rec.decide_positions(a)
        assert rec.decide_positions(a, head="token", fed_back=True) == a.argmax(1).tolist()
        with pytest.raises(RecorderUsageError, match=r"need the same T, got \{'frame': 4, 'dur': 3\}"):
            rec.decide_positions({"frame": a, "dur": b[:3]})
        with pytest.raises(RecorderUsageError, match=r"shape \[2, 4, 5\]; deciding every position takes"):
            rec.decide_positions(np.stack([a, a]), head="frame")
        with pytest.raises(RecorderUsageError, match="offset must be a non-negative integer"):
            rec.decide_positions(a, head="frame", offset=-1)
        rec.set_sample("v")
        rec.decide(a[0], head="frame")
        with pytest.raises(StepOrderError, match="already decided"):
            rec.decide_positions(a, head="frame")
    assert meta.open_loop == ["vad"]  # the caller's metadata is not changed
    r = TraceReader(tmp_path / "r.trace")
    assert r.metadata.open_loop == ["vad", "frame", "dur"]
    d = r.decisions(columns=["sample", "step", "head", "position", "chosen", "forced"]).to_pylist()
    s = [(x["step"], x["head"], x["position"]) for x in d if x["sample"] == "s"]
    assert s == [(3, "frame", 0), (4, "frame", 1), (5, "frame", 2), (6, "frame", 3)]
    t = sorted((x["step"], x["head"], x["position"]) for x in d if x["sample"] == "t")
    assert t == sorted([(i, h, 10 + i) for i in range(4) for h in ("frame", "dur")])
    assert not any(x["forced"] for x in d)
    assert [(x["sample"], x["step"]) for x in r.tensors().to_pylist() if x["name"] == "enc"] == [("s", 3), ("s", 7)]
    logit_rows = [x for x in r.tensors().to_pylist() if x["name"] == "logits:frame" and x["sample"] == "s"]
    assert [x["step"] for x in logit_rows] == [3, 4, 5, 6]  # logits:<head> of each position at its own step
    np.testing.assert_array_equal(r.tensor("s", 5, "logits:frame"), a[2])


def test_open_loop_heads_are_never_teacher_forced(tmp_path):
    a = _logits(3)
    with Recorder(tmp_path / "ref.trace", open_loop=["frame"]) as rec:
        for t in range(3):
            with rec.step(index=t):
                rec.decide(a[t], head="token")
                rec.decide(a[t], head="frame")
    flipped = -a  # the candidate decides every frame and token differently
    with Recorder(tmp_path / "cand.trace", reference=tmp_path / "ref.trace", open_loop=["frame"]) as rec:
        for t in range(3):
            with rec.step(index=t):
                assert rec.decide(flipped[t], head="token") == int(a[t].argmax())  # forced: the reference's
                assert rec.decide(flipped[t], head="frame") == int(flipped[t].argmax())  # open-loop: its own
        with rec.step(index=3):  # decide_positions never forces, even past the reference's last step
            assert rec.decide_positions(flipped, head="frame") == flipped.argmax(1).tolist()
    d = TraceReader(tmp_path / "cand.trace").decisions(columns=["step", "head", "forced"]).to_pylist()
    assert {(x["head"], x["forced"]) for x in d} == {("token", True), ("frame", False)}


def test_run_recorders_position_all_defaults_refusals_and_streamed_samples(tmp_path, ctc):
    pair, logits, _ = ctc
    onnx_path = tmp_path / "m.onnx"
    export_onnx(CTCModel().eval(), onnx_path)
    u = pair.utts[0]
    with pytest.raises(RecorderUsageError, match=r"teacher forcing has nothing to force here: position='all'.*"
                                                 r"teacher_forcing=False"):
        OrtRecorder(tmp_path / "tf.trace", onnx_path, logits="logits", position="all", reference=pair.ref)
    with pytest.raises(RecorderUsageError, match=r"every head \(token\) is open-loop"):
        OrtRecorder(tmp_path / "tf2.trace", onnx_path, logits="logits", open_loop=["token"], reference=pair.ref)
    assert not (tmp_path / "tf.trace").exists() and not (tmp_path / "tf2.trace").exists()  # refused before writing
    with pytest.raises(RecorderUsageError, match="or 'all'"):
        OrtRecorder(tmp_path / "p.trace", onnx_path, logits="logits", position="every")
    # a sample streamed in two calls: steps and positions count on, each call's tensors at its first step
    with OrtRecorder(tmp_path / "s.trace", onnx_path, logits="logits", position="all", optimization="disable",
                     reference=pair.ref, teacher_forcing=False) as rec:
        rec.set_sample(u.sample)
        rec.run(["logits"], {"features": u.features[:, :, :20]})
        assert rec.decided["token"] == logits_of(onnx_path, u.features[:, :, :20]).argmax(1).tolist()
        rec.run(["logits"], {"features": u.features[:, :, 20:]})
        assert rec.token == rec.decided["token"][-1] and len(rec.decided["token"]) == FRAMES - 20
    r = TraceReader(tmp_path / "s.trace")
    d = r.decisions(columns=["step", "position"]).to_pylist()
    assert [x["step"] for x in d] == list(range(FRAMES)) and [x["position"] for x in d] == list(range(FRAMES))
    assert sorted({x["step"] for x in r.tensors().to_pylist()}) == [0, 20]
    assert r.metadata.open_loop == ["token"] and r.manifest["tags"]["steptrace.teacher_forcing"] == "false"
    # said otherwise: position="all" with open_loop=[] leaves the manifest without open-loop heads
    with OrtRecorder(tmp_path / "c.trace", onnx_path, logits="logits", position="all", open_loop=[]) as rec:
        rec.run(None, {"features": u.features})
    r = TraceReader(tmp_path / "c.trace")
    assert r.metadata.open_loop == [] and "open_loop" not in r.manifest and r.decisions().num_rows == FRAMES


def logits_of(onnx_path: Path, features: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"features": features})[0][0]


def test_torch_recorder_decide_positions_with_module_steps(tmp_path):
    model = CTCModel().eval()
    utts = utterances(2, seed=3, frames=16)
    with pytest.raises(RecorderUsageError, match="not declared open-loop"):
        with TorchRecorder(tmp_path / "x.trace", model) as rec, torch.no_grad():
            rec.decide_positions(model(torch.from_numpy(utts[0].features)))
    with TorchRecorder(tmp_path / "t.trace", model, modules={"encoder.0": "full"}, step_module="",
                       open_loop=["token"]) as rec, torch.no_grad():
        for u in utts:  # step_module="": each model call opens the next step; positions follow it
            out = model(torch.from_numpy(u.features))
            assert rec.decide_positions(out, offset=0) == out[0].argmax(1).tolist()
    r = TraceReader(tmp_path / "t.trace")
    steps = r.decisions(columns=["step"])["step"].to_pylist()
    assert steps == list(range(32))
    assert [x["step"] for x in r.tensors().to_pylist()] == [0, 16]  # each call's encoder at its first step
    with torch.no_grad():
        np.testing.assert_array_equal(r.tensor("0", 16, "encoder.0"),
                                      model.encoder[0](torch.from_numpy(utts[1].features)).numpy())


# ---------------------------------------------------------------------- trace record --all-positions
CTC_SCRIPT = textwrap.dedent('''
    """A plain CTC greedy decoder over a few utterances: it knows nothing of steptrace."""
    import os
    import sys

    import torch

    sys.path.insert(0, sys.argv[1])
    from positions_models import CTCModel, utterances

    model = CTCModel().eval()
    with torch.no_grad():
        for u in utterances(2, seed=5, frames=12):
            os.environ["STEPTRACE_SAMPLE"] = u.sample
            frames = model(torch.from_numpy(u.features))[0].argmax(1).tolist()
            print(u.sample, frames, flush=True)
''')


def test_trace_record_all_positions(tmp_path, capsys):
    script = tmp_path / "ctc_decode.py"
    script.write_text(CTC_SCRIPT)
    out = tmp_path / "rec.trace"
    assert main(["record", "-o", str(out), "--logits", "CTCModel", "--modules", "encoder.*", "--all-positions",
                 str(script), str(TESTS)]) == 0
    cap = capsys.readouterr()
    printed = {line.split(" ", 1)[0]: eval_list(line.split(" ", 1)[1]) for line in cap.out.splitlines()}
    assert "recorded 24 steps (24 decisions" in cap.err  # one step per position of the 2 x 12 frames
    r = TraceReader(out)
    assert r.metadata.open_loop == ["token"] and "--all-positions" in r.metadata.command
    for sample, frames in printed.items():
        d = r.decisions(sample=sample, columns=["step", "position", "chosen"]).to_pylist()
        assert [x["step"] for x in d] == list(range(12)) and [x["position"] for x in d] == list(range(12))
        assert [x["chosen"] for x in d] == frames
        assert {x["step"] for x in r.tensors().to_pylist() if x["sample"] == sample} == {0}
    out2 = tmp_path / "rec2.trace"
    assert main(["record", "-o", str(out2), "--logits", "CTCModel", "--all-positions", "--open-loop=",
                 str(script), str(TESTS)]) == 0
    assert TraceReader(out2).metadata.open_loop == []  # said otherwise
    capsys.readouterr()
    assert main(["record", "-o", str(tmp_path / "t.trace"), "--logits", "CTCModel", "--all-positions",
                 "--teacher", str(out), str(script), str(TESTS)]) == EXIT_ERROR
    assert "--teacher has nothing to force" in capsys.readouterr().err


def eval_list(text: str) -> list[int]:
    """Parse the script's printed ``[1, 2, 3]`` (ints only; no eval)."""
    return [int(x) for x in text.strip().strip("[]").split(",") if x.strip()]


# ---------------------------------------------------------------------- CoreML
def test_coreml_recorder_position_all(tmp_path):
    ct = pytest.importorskip("coremltools", reason="the CoreML recorder needs coremltools")
    from steptrace.recorders.coreml import CoreMLRecorder, CoreMLUnavailableError, predict_unavailable_reason

    model = CTCModel().eval()
    u = utterances(1, seed=2, frames=16)[0]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, torch.from_numpy(u.features))
        ml = ct.convert(traced, inputs=[ct.TensorType(name="features", shape=u.features.shape)],
                        outputs=[ct.TensorType(name="logits")], convert_to="mlprogram",
                        compute_precision=ct.precision.FLOAT32)
    path = tmp_path / "ctc.mlpackage"
    ml.save(str(path))
    with CoreMLRecorder(tmp_path / "c.trace", path, logits="logits", position="all") as rec:
        if predict_unavailable_reason() is not None:
            with pytest.raises(CoreMLUnavailableError, match="CoreML prediction needs macOS"):
                rec.predict({"features": u.features})
        else:
            rec.predict({"features": u.features})
            assert len(rec.decided["token"]) == 16
    r = TraceReader(tmp_path / "c.trace")
    assert r.metadata.open_loop == ["token"]
    if predict_unavailable_reason() is None:
        assert r.decisions(columns=["step"])["step"].to_pylist() == list(range(16))
    else:
        assert r.decisions().num_rows == 0 and r.manifest["tags"]["coreml.predict"].startswith("CoreML prediction")


def test_planted_bug_builder_is_reproducible(tmp_path):
    a = build_ctc_pair(tmp_path / "a", bug=True, samples=2, frames=16)
    b = build_ctc_pair(tmp_path / "b", bug=True, samples=2, frames=16)
    da = TraceReader(a.cand).decisions(columns=["sample", "step", "chosen"]).to_pylist()
    db = TraceReader(b.cand).decisions(columns=["sample", "step", "chosen"]).to_pylist()
    assert da == db and a.culprit == b.culprit == ONNX_CONV0
    w, bad = CTCModel().encoder[0].weight, plant_bug(CTCModel()).encoder[0].weight
    assert torch.equal(bad.abs(), w.abs()) and int((bad != w).any(dim=(1, 2)).sum()) == len(BUGGED)  # signs only


# ---------------------------------------------------------------------- silero-vad: a whole file in one call
needs_silero = pytest.mark.skipif(importlib.util.find_spec("silero_vad") is None,
                                  reason="silero-vad is not installed (pip install silero-vad --no-deps): it ships "
                                         "the sequence VAD model recorded here")


@needs_silero
def test_silero_sequence_vad_one_step_per_chunk_and_a_planted_conv_fault(tmp_path):
    pair = build_vad_pair(tmp_path, bug=True, max_chunks=120)
    ref, cand = TraceReader(pair.ref), TraceReader(pair.cand)
    assert ref.metadata.open_loop == cand.metadata.open_loop == ["vad"] and ref.metadata.vocab_head == "vad"
    a = ref.decisions(columns=["step", "position", "head", "chosen", "forced"]).to_pylist()
    b = cand.decisions(columns=["step", "chosen", "topk_ids", "topk_logits"]).to_pylist()
    assert [x["step"] for x in a] == [x["position"] for x in a] == list(range(120))
    assert [x["chosen"] for x in a] == (pair.probs > 0.5).astype(int).tolist()  # speech where p > 0.5
    assert ref.piece(1) == "speech" and not any(x["forced"] for x in a)
    for r in (ref, cand):  # the one run's inputs, every intermediate and the outputs: at step 0
        assert {x["step"] for x in r.tensors().to_pylist()} == {0}
    dig = {x["name"]: x["digest"] for x in ref.tensors().to_pylist()}
    cdig = {x["name"]: x["digest"] for x in cand.tensors().to_pylist()}
    assert dig["input"] == cdig["input"] and dig[pair.culprit] != cdig[pair.culprit]
    assert pair.culprit == "/encoder.1/Conv_output_0"
    # the fault moves the speech logit by whole logits and changes some chunks, not all
    speech = lambda row: row["topk_logits"][row["topk_ids"].index(1)]  # noqa: E731
    p = np.clip(pair.probs.astype(np.float64), 1e-12, 1 - 1e-12)
    moved = np.abs(np.array([speech(x) for x in b]) - (np.log(p) - np.log1p(-p)))
    flipped = sum(x["chosen"] != y["chosen"] for x, y in zip(a, b))
    assert moved.max() > 1.0 and 3 <= flipped < 60


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: decide_positions on "
                                                            "device logits (one transfer for all T rows) is not run")
def test_decide_positions_on_cuda_logits_match_the_cpu(tmp_path):
    u = utterances(1, seed=4, frames=32)[0]
    paths = {dev: tmp_path / f"{dev}.trace" for dev in ("cpu", "cuda")}
    for dev, path in paths.items():
        m = CTCModel().eval().to(dev)
        with TorchRecorder(path, m, modules={"encoder.0": "stats"}, open_loop=["token"]) as rec, torch.no_grad():
            rec.decide_positions(m(torch.from_numpy(u.features).to(dev)))
    a, b = (TraceReader(p).decisions(columns=["step", "chosen", "topk_ids", "margin"]).to_pylist()
            for p in paths.values())
    assert [x["step"] for x in b] == list(range(32))
    # cuDNN may run the Convs in TF32 (10-bit mantissa): margins agree to ~1e-2 of the ~12-logit scale,
    # so the chosen ids are compared where the CPU's margin leaves no doubt
    assert all(x["chosen"] == y["chosen"] for x, y in zip(a, b) if x["margin"] > 0.1)
    np.testing.assert_allclose([x["margin"] for x in a], [x["margin"] for x in b], atol=0.05)
