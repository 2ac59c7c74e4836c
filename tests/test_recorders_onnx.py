"""OrtRecorder and expose_intermediates on real ONNX Runtime sessions of tiny torch models
exported with torch.onnx.export(dynamo=False): steps, topological order, decisions vs the numpy
reference, teacher forcing of a deliberately biased int8 quantize_dynamic copy, optimisation metadata, external
data, and clear errors."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper
from onnxruntime.quantization import QuantType, quantize_dynamic
from recorder_models import GRULM, TransformerLM, greedy

import steptrace.recorders.onnxruntime as ort_rec
from steptrace.recorders.errors import RecorderUsageError, ReferenceNotFoundError, StepOrderError
from steptrace.recorders.onnxruntime import OrtRecorder, expose_intermediates
from steptrace.recorders.torch import TorchRecorder
from steptrace.tracefmt import TraceReader, digest
from steptrace.tracefmt.decisions import decide as decide_reference
from steptrace.tracefmt.errors import TraceError

PROMPT = [1, 5, 9]
H = 32


def first_runner_up() -> int:
    """The token GRULM(0) ranks second at its first step (fed token 1), in fp32 torch."""
    with torch.no_grad():
        return int(GRULM(0).eval()(torch.tensor([1]))[0][0].argsort(descending=True)[1])


#: The bias that makes the candidate's first step pick :func:`first_runner_up`: GRULM(0)'s first
#: margin is 0.45 logits, so the biased token wins by about 1 logit, far beyond what int8 kernels move.
BIAS = 1.5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """gru.onnx (one token per run, hidden state in/out), tlm.onnx ([1, T] -> [1, T, V]),
    gru_int8.onnx (quantize_dynamic of gru.onnx) and gru_bias_int8.onnx (the int8 copy of a GRULM
    whose head adds BIAS to the first step's runner-up: a deliberate divergence)."""
    d = tmp_path_factory.mktemp("onnx")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(GRULM(0).eval(), (torch.tensor([1]), torch.zeros(1, 1, H)), str(d / "gru.onnx"),
                          dynamo=False, input_names=["token", "h"], output_names=["logits", "h_out"], opset_version=17)
        torch.onnx.export(GRULM(0, bias={first_runner_up(): BIAS}).eval(), (torch.tensor([1]), torch.zeros(1, 1, H)),
                          str(d / "gru_bias.onnx"), dynamo=False, input_names=["token", "h"],
                          output_names=["logits", "h_out"], opset_version=17)
        quantize_dynamic(str(d / "gru_bias.onnx"), str(d / "gru_bias_int8.onnx"), weight_type=QuantType.QInt8)
        torch.onnx.export(TransformerLM(0).eval(), (torch.tensor([PROMPT]),), str(d / "tlm.onnx"), dynamo=False,
                          input_names=["tokens"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"tokens": {1: "T"}, "logits": {1: "T"}})
        quantize_dynamic(str(d / "gru.onnx"), str(d / "gru_int8.onnx"), weight_type=QuantType.QInt8)
    return d


def gru_decode(rec: OrtRecorder, steps: int, *, tok: int = 1) -> tuple[list[int], list[np.ndarray]]:
    """Greedy GRU decode through the recorder; feeds rec.token (the reference's when forced)."""
    h = np.zeros((1, 1, H), np.float32)
    tokens, logits = [], []
    for _ in range(steps):
        lg, h = rec.run(["logits", "h_out"], {"token": np.array([tok]), "h": h})
        tok = rec.token
        tokens.append(tok)
        logits.append(lg[0])
    return tokens, logits


def session(path: Path, level: str = "ORT_DISABLE_ALL") -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def topo_index(path: Path) -> dict[str, int]:
    return {o: i for i, n in enumerate(onnx.load(str(path), load_external_data=False).graph.node) for o in n.output}


# ---------------------------------------------------------------------- steps, order, decisions
def test_every_run_is_a_step_with_inputs_then_outputs_in_topological_order(models, tmp_path):
    with OrtRecorder(tmp_path / "g.trace", models / "gru.onnx", logits="logits", optimization="disable") as rec:
        tokens, logits = gru_decode(rec, 6)
        last_h = rec.run(["h_out"], {"token": np.array([tokens[-1]]), "h": np.zeros((1, 1, H), np.float32)})[0]
    r = TraceReader(tmp_path / "g.trace")
    dec = r.decisions().slice(0, 6)
    assert dec["step"].to_pylist() == list(range(6)) and dec["chosen"].to_pylist() == tokens
    with torch.no_grad():  # the exported model decodes as the torch model does
        m, h, tok, ref = GRULM(0).eval(), None, 1, []
        for _ in range(6):
            lg, h = m(torch.tensor([tok]), h)
            tok = int(lg[0].argmax())
            ref.append(tok)
    assert tokens == ref
    for row, lg in zip(dec.to_pylist(), logits):  # decisions equal the numpy reference decide
        want = decide_reference(lg, k=8)
        assert row["topk_ids"] == want.topk_ids.tolist() and row["argmax"] == want.argmax
        assert np.array_equal(np.float32(row["topk_logits"]), want.topk_logits)
        assert np.float32(row["margin"]) == np.float32(want.margin)
        assert np.float32(row["logsumexp"]) == np.float32(want.logsumexp) and row["forced"] is False
    t = r.tensors(step=2).to_pylist()
    assert [(x["name"], x["order"], x["source"]) for x in t] == [
        ("token", 0, "graph input"), ("h", 1, "graph input"),
        ("h_out", 2, "/gru/GRU (GRU)"), ("logits", 3, "/head/Gemm (Gemm)"),  # GRU runs before the head
    ]
    assert t[3]["digest"] == digest(np.ascontiguousarray(logits[2][None]), "xxh3-128")
    step6 = r.tensors(step=6).to_pylist()  # run() asking for h_out only still records what the policy selects
    assert [x["name"] for x in step6] == ["token", "h", "h_out", "logits"]
    assert step6[2]["digest"] == digest(np.ascontiguousarray(last_h), "xxh3-128")
    assert r.decisions(columns=["step"])["step"].to_pylist()[-1] == 6


def test_exposed_intermediates_are_recorded_in_topological_order(models, tmp_path):
    path, names = expose_intermediates(models / "tlm.onnx", ["/blocks.0/attn/*", "/ln_f/*"], tmp_path / "x.onnx")
    idx = topo_index(Path(path))
    assert names and [idx[n] for n in names] == sorted(idx[n] for n in names)
    assert all(n.startswith(("/blocks.0/attn/", "/ln_f/")) for n in names)
    meta = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    assert json.loads(meta["steptrace.exposed"]) == names
    ln_f = "/ln_f/LayerNormalization_output_0"
    seen = []
    model = TransformerLM(0).eval()
    model.ln_f.register_forward_hook(lambda _m, _a, out: seen.append(out[0].numpy().copy()))
    want = greedy(model, PROMPT, 4)
    policy = {ln_f: "full", "logits:*": "full", "*": "stats"}
    with OrtRecorder(tmp_path / "t.trace", path, tensors=policy, logits="logits", optimization="disable") as rec:
        toks, last = list(PROMPT), []
        for _ in range(4):
            last.append(rec.run(["logits"], {"tokens": np.array([toks])})[0][0, -1])
            toks.append(rec.token)
    assert toks[len(PROMPT):] == want
    r = TraceReader(tmp_path / "t.trace")
    for step in range(4):
        rows = r.tensors(step=step).to_pylist()
        assert [x["name"] for x in rows] == ["tokens", *names, "logits", "logits:token"]
        assert [x["order"] for x in rows] == list(range(len(rows)))
        np.testing.assert_allclose(r.tensor("0", step, ln_f)[0], seen[step], atol=1e-5)  # ONNX value == torch module
        assert np.array_equal(r.tensor("0", step, "logits:token"), last[step])  # SPEC.md §3.4: the decided position
    assert r.decisions()["position"].to_pylist() == [2, 3, 4, 5]  # [1, T, V]: the row of T decided (the last)
    x = np.array([PROMPT + [4, 2]])  # at ORT_DISABLE_ALL exposing changes nothing: bit-identical logits
    assert np.array_equal(session(Path(path)).run(["logits"], {"tokens": x})[0],
                          session(models / "tlm.onnx").run(["logits"], {"tokens": x})[0])


def test_mark_all_by_node_name_and_values_without_types(models, tmp_path):
    _, names = expose_intermediates(models / "gru.onnx", "/gru/GRU", tmp_path / "n.onnx")  # a node name: all outputs
    assert names == ["/gru/GRU_output_0", "h_out"]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                               helper.make_node("Mystery", ["r"], ["m"], name="mystery", domain="steptrace.test"),
                               helper.make_node("Identity", ["m"], ["y"], name="out")], "g", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("steptrace.test", 1)])
    with pytest.warns(UserWarning, match=r"1 value\(s\) not exposed: m: no type could be inferred for this Mystery"):
        exp = expose_intermediates(proto, "*")
    assert exp.names == ["r", "y"] and list(exp.skipped) == ["m"]
    assert [o.name for o in proto.graph.output] == ["y"]  # the caller's proto is untouched
    saved = onnx.load(exp.path)
    assert [o.name for o in saved.graph.output] == ["y", "r"] and Path(exp.path).name == "model.exposed.onnx"
    with pytest.raises(RecorderUsageError, match=r"match no node output or node name; values are named like"):
        expose_intermediates(models / "gru.onnx", "/decoder/*", tmp_path / "none.onnx")


# ---------------------------------------------------------------------- metadata
def test_optimisation_level_providers_and_version_in_metadata(models, tmp_path):
    with OrtRecorder(tmp_path / "a.trace", session(models / "gru.onnx", "ORT_ENABLE_EXTENDED"), logits="logits") as rec:
        gru_decode(rec, 1)
    with OrtRecorder(tmp_path / "b.trace", models / "gru_int8.onnx", optimization="disable") as rec:
        pass
    a, b = TraceReader(tmp_path / "a.trace").manifest, TraceReader(tmp_path / "b.trace").manifest
    assert a["tags"]["onnxruntime.graph_optimization_level"] == "ORT_ENABLE_EXTENDED"
    assert b["tags"]["onnxruntime.graph_optimization_level"] == "ORT_DISABLE_ALL"
    assert a["tags"]["onnxruntime.providers"] == "CPUExecutionProvider" and a["device"] == "cpu"
    assert a["runtime"] == {"name": "onnxruntime", "version": ort.__version__}
    assert (a["precision"], b["precision"]) == ("fp32", "int8")
    from_bytes = ort.InferenceSession((models / "gru.onnx").read_bytes(), providers=["CPUExecutionProvider"])
    with OrtRecorder(tmp_path / "d.trace", from_bytes, tensors={"h_out": "stats"}) as rec:
        rec.run(None, {"token": np.array([1]), "h": np.zeros((1, 1, H), np.float32)})
    d = TraceReader(tmp_path / "d.trace")  # a session built from bytes: topology from its bytes
    assert d.manifest["tags"]["onnxruntime.topology"] == "known"
    assert d.manifest["tags"]["onnxruntime.graph_optimization_level"] == "ORT_ENABLE_ALL"  # ORT's default
    assert d.tensors()["source"].to_pylist() == ["/gru/GRU (GRU)"]
    path, names = expose_intermediates(models / "gru.onnx", "*", tmp_path / "all.onnx")
    with pytest.warns(UserWarning, match=r"block node fusions.*ORT_DISABLE_ALL"):
        OrtRecorder(tmp_path / "c.trace", path, optimization="all").close()
    assert TraceReader(tmp_path / "c.trace").manifest["tags"]["onnxruntime.exposed"] == str(len(names))


# ---------------------------------------------------------------------- teacher forcing
def test_teacher_forcing_keeps_an_int8_copy_aligned_with_a_torch_reference(models, tmp_path):
    steps = 16
    ref = tmp_path / "ref.trace"
    model = GRULM(0).eval()
    with TorchRecorder(ref, model) as rec, torch.no_grad():
        h, tok = None, 1
        for t in range(steps):
            with rec.step(index=t):
                lg, h = model(torch.tensor([tok]), h)
                tok = rec.decide(lg[0])
    ref_tokens = TraceReader(ref).decisions()["chosen"].to_pylist()
    alt = first_runner_up()
    with torch.no_grad():  # the planted bias decides the first step in fp32, by far more than int8 moves
        biased = GRULM(0, bias={alt: BIAS}).eval()(torch.tensor([1]))[0][0].sort(descending=True)
    assert int(biased.indices[0]) == alt != ref_tokens[0] and float(biased.values[0] - biased.values[1]) > 0.5
    with OrtRecorder(tmp_path / "free.trace", models / "gru_bias_int8.onnx", logits="logits") as rec:
        free, _ = gru_decode(rec, steps)
    assert free[0] == alt and free != ref_tokens  # the candidate diverges when free-running: forcing has work to do
    with OrtRecorder(tmp_path / "cand.trace", models / "gru_bias_int8.onnx", logits="logits", reference=ref,
                     tensors={"token": "full", "*": "stats"}) as rec:
        forced, _ = gru_decode(rec, steps)
        with pytest.raises(ReferenceNotFoundError):
            gru_decode(rec, 1)
    assert forced == ref_tokens
    r = TraceReader(tmp_path / "cand.trace")
    d = r.decisions().slice(0, steps)
    assert all(d["forced"].to_pylist()) and d["chosen"].to_pylist() == ref_tokens
    assert d["argmax"].to_pylist()[0] == alt  # its own argmax still disagrees where the bias decides
    fed = [int(r.tensor("0", t, "token")[0]) for t in range(1, 4)]
    assert fed == ref_tokens[:3]  # the run was fed the reference's tokens


# ---------------------------------------------------------------------- external data
def test_model_with_external_data_records_and_exposes(models, tmp_path, monkeypatch):
    ext = tmp_path / "ext"
    ext.mkdir()
    proto = onnx.load(str(models / "gru.onnx"))
    onnx.save_model(proto, str(ext / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="model.onnx.data", size_threshold=0)
    assert (ext / "model.onnx.data").stat().st_size > (ext / "model.onnx").stat().st_size
    path, names = expose_intermediates(ext / "model.onnx", ["/mid/*", "/act/*"])
    assert Path(path) == ext / "model.exposed.onnx" and (ext / "model.exposed.onnx.data").is_file()
    assert names == ["/mid/Gemm_output_0", "/act/Tanh_output_0"]
    with OrtRecorder(tmp_path / "e.trace", path, logits="logits", optimization="disable") as rec:
        tokens, _ = gru_decode(rec, 3)
    with OrtRecorder(tmp_path / "p.trace", models / "gru.onnx", logits="logits", optimization="disable") as rec:
        plain, _ = gru_decode(rec, 3)
    assert tokens == plain
    assert [x["name"] for x in TraceReader(tmp_path / "e.trace").tensors(step=0).to_pylist()] == [
        "token", "h", "h_out", "/mid/Gemm_output_0", "/act/Tanh_output_0", "logits"]
    monkeypatch.setattr(ort_rec, "_PROTO_LIMIT", 1000)  # as if past protobuf's 2 GB: saved with external data
    big, _ = expose_intermediates(models / "gru.onnx", "/act/*", tmp_path / "big" / "m.onnx")
    assert (tmp_path / "big" / "m.onnx.data").is_file()
    assert session(Path(big)).run(["/act/Tanh_output_0"], {"token": np.array([1]),
                                                             "h": np.zeros((1, 1, H), np.float32)})[0].shape == (1, H)
    (ext / "model.onnx.data").unlink()
    with pytest.raises(RecorderUsageError, match="external data"):
        expose_intermediates(ext / "model.onnx", "*")


# ---------------------------------------------------------------------- explicit steps and errors
def test_explicit_step_holds_several_runs_and_manual_decisions(models, tmp_path):
    feed = {"token": np.array([1]), "h": np.zeros((1, 1, H), np.float32)}
    with OrtRecorder(tmp_path / "s.trace", models / "gru.onnx", tensors={"h_out": "stats"}) as rec:
        with rec.step(sample="s", index=5):
            rec.run(None, feed)
            lg, _ = rec.run(None, feed)
            assert rec.decide(lg[0]) == int(lg[0].argmax())
        lg, _ = rec.run(None, feed)  # outside: the next step, left open for a manual decide
        rec.decide(lg[0], head="token")
        with pytest.raises(StepOrderError, match="already decided"):
            rec.decide(lg[0], head="token")
    t = TraceReader(tmp_path / "s.trace").tensors().to_pylist()
    assert [(x["step"], x["name"], x["call"]) for x in t] == [(5, "h_out", 0), (5, "h_out", 1), (6, "h_out", 0)]


def test_run_errors_are_clear(models, tmp_path):
    h = np.zeros((1, 1, H), np.float32)
    with OrtRecorder(tmp_path / "e.trace", models / "gru.onnx") as rec:
        with pytest.raises(RecorderUsageError, match=r"'nope' are not outputs of the session; it has logits, h_out"):
            rec.run(["nope"], {"token": np.array([1]), "h": h})
        with pytest.raises(RecorderUsageError, match=r"missing \['h'\], unknown none; the session takes token: "
                                                     r"tensor\(int64\)\[1\], h: tensor\(float\)"):
            rec.run(None, {"token": np.array([1])})
        with pytest.raises(RecorderUsageError, match=r"unknown \['hidden'\]"):
            rec.run(None, {"token": np.array([1]), "h": h, "hidden": h})
        with pytest.raises(RecorderUsageError, match=r"ONNX Runtime refused the inputs .*given token: int32\[1\]"):
            rec.run(None, {"token": np.array([1], np.int32), "h": h})
    assert TraceReader(tmp_path / "e.trace").tensors().num_rows == 0  # nothing recorded for refused runs
    with pytest.raises(RecorderUsageError, match=r"logits output\(s\) \{'token': 'scores'\} are not outputs"):
        OrtRecorder(tmp_path / "f.trace", models / "gru.onnx", logits="scores")
    with pytest.raises(RecorderUsageError, match="optimization='fast'"):
        OrtRecorder(tmp_path / "g.trace", models / "gru.onnx", optimization="fast")
    with pytest.raises(RecorderUsageError, match="already open"):
        OrtRecorder(tmp_path / "h.trace", session(models / "gru.onnx"), optimization="disable")
    with pytest.raises(RecorderUsageError, match="no ONNX model at"):
        OrtRecorder(tmp_path / "i.trace", session(models / "gru.onnx"), model=tmp_path / "missing.onnx")
    with OrtRecorder(tmp_path / "j.trace", models / "tlm.onnx", logits="logits", position=7) as rec, \
            pytest.raises(RecorderUsageError, match=r"position 7 is outside the 3 positions") as err:
        rec.run(None, {"tokens": np.array([PROMPT])})
    assert isinstance(err.value, TraceError)


def test_graph_bookkeeping_uses_the_onnx_ir_enum_values():
    """recorders.onnxgraph imports no onnx: the enum values it compares are onnx.proto's."""
    from steptrace.recorders import onnxgraph

    assert (onnxgraph.UNDEFINED, onnxgraph.FLOAT, onnxgraph.FLOAT16, onnxgraph.DOUBLE, onnxgraph.BFLOAT16) == (
        TensorProto.UNDEFINED, TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16)
    assert (onnxgraph.ATTR_GRAPH, onnxgraph.ATTR_GRAPHS) == (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
