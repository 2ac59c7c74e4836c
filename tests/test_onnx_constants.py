"""expose_intermediates(model, "*") leaves constants out by default: Constant node outputs and
values computed from initializers alone (Identity/DequantizeLinear of weights, shape arithmetic
on constants), on a real torch.onnx.export of a small transformer and on a QDQ-style graph; the
exposed values still run in ONNX Runtime and constants=True brings the constants back."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from recorder_models import TransformerLM

from steptrace.recorders.errors import RecorderUsageError
from steptrace.recorders.onnxruntime import expose_intermediates

PROMPT = [1, 5, 9]


@pytest.fixture(scope="module")
def tlm(tmp_path_factory):
    path = tmp_path_factory.mktemp("const") / "tlm.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(TransformerLM(0).eval(), (torch.tensor([PROMPT]),), str(path), dynamo=False,
                          input_names=["tokens"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"tokens": {1: "T"}, "logits": {1: "T"}})
    return path


def producers(path) -> dict[str, onnx.NodeProto]:
    return {o: n for n in onnx.load(str(path)).graph.node for o in n.output}


def test_star_skips_constant_nodes_and_initializer_copies(tlm, tmp_path):
    by_value = producers(tlm)
    inits = {t.name for t in onnx.load(str(tlm)).graph.initializer}
    constant_nodes = [v for v, n in by_value.items() if n.op_type == "Constant"]
    assert len(constant_nodes) > 20  # torch.onnx.export writes many
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constants are skipped quietly
        exp = expose_intermediates(tlm, "*", tmp_path / "x.onnx")
    assert not set(exp.names) & set(constant_nodes)
    weight_copies = [v for v, n in by_value.items() if n.op_type == "Identity" and set(n.input) <= inits]
    assert weight_copies and not set(exp.names) & set(weight_copies)
    assert set(constant_nodes) | set(weight_copies) <= set(exp.skipped)
    assert all(r.startswith("constant: ") for r in exp.skipped.values())
    assert any(by_value[v].op_type == "LayerNormalization" for v in exp.names)  # activations are still exposed
    sess = ort.InferenceSession(exp.path, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"tokens": np.array([PROMPT])})
    assert len(outs) == 1 + len(exp.names) - 1  # logits first, then every exposed value (logits included once)
    everything = expose_intermediates(tlm, "*", tmp_path / "all.onnx", constants=True)
    assert set(constant_nodes) <= set(everything.names) and len(everything.names) > len(exp.names)


def test_dequantized_weights_are_constants_but_dequantized_activations_are_not(tmp_path):
    w = numpy_helper.from_array(np.arange(6, dtype=np.int8).reshape(2, 3), "w_q")
    scale = numpy_helper.from_array(np.array(0.5, np.float32), "scale")
    zp = numpy_helper.from_array(np.array(0, np.int8), "zp")
    nodes = [
        helper.make_node("DequantizeLinear", ["w_q", "scale", "zp"], ["w"], name="dq_w"),
        helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["x_q"], name="q_x"),
        helper.make_node("DequantizeLinear", ["x_q", "scale", "zp"], ["x_dq"], name="dq_x"),
        helper.make_node("MatMul", ["x_dq", "w"], ["y"], name="mm"),
    ]
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w, scale, zp])
    path = tmp_path / "qdq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    exp = expose_intermediates(path, "*", tmp_path / "x.onnx")
    assert exp.names == ["x_q", "x_dq", "y"] and list(exp.skipped) == ["w"]
    with pytest.raises(RecorderUsageError, match=r"match only constants \(1: w\); pass constants=True"):
        expose_intermediates(path, "w", tmp_path / "w.onnx")
    assert expose_intermediates(path, "w", tmp_path / "w2.onnx", constants=True).names == ["w"]
