"""CoreMLRecorder and expose_intermediates on real coremltools conversions of small torch models.

What runs on Linux: conversion, exposure by editing the ML program's spec (checked by loading
the edited program back into MIL, which type-checks every op), bool outputs cast to int32,
metadata, and the clear error predict raises off macOS. Tests that need predict run on macOS
only and skip elsewhere with the reason.
"""

from __future__ import annotations

import json
import platform
import sys
import warnings

import numpy as np
import pytest
import torch

ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install coremltools)")

from coremltools.converters.mil.frontend.milproto.load import load as load_program
from coremltools.proto import FeatureTypes_pb2, MIL_pb2

from steptrace.recorders.coreml import CoreMLRecorder, CoreMLUnavailableError, expose_intermediates
from steptrace.recorders.errors import RecorderUsageError
from steptrace.tracefmt import TraceReader
from steptrace.tracefmt.decisions import decide as decide_reference
from steptrace.tracefmt.errors import TraceError, TraceUsageError

ON_MAC = sys.platform == "darwin"
NEEDS_MAC = pytest.mark.skipif(not ON_MAC, reason=f"CoreML predict needs macOS; this machine is {platform.system()}")
INT32 = FeatureTypes_pb2.ArrayFeatureType.INT32


class Gate(torch.nn.Module):
    """Linear -> ReLU -> a bool mask (y > 0.1) -> masked -> head: an ML program with a bool value."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 8)
        self.head = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.lin(x))
        return self.head(y * (y > 0.1).float())


class Accumulator(torch.nn.Module):
    """A stateful model: a buffer updated in place each call (Core ML state, iOS 18)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.register_buffer("acc", torch.zeros(1, 4))
        self.head = torch.nn.Linear(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.acc.add_(x)
        return self.head(self.acc)


def convert(model: torch.nn.Module, **kwargs):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model.eval(), torch.randn(1, 4))
        return ct.convert(traced, inputs=[ct.TensorType(name="x", shape=(1, 4), dtype=np.float16)],
                          outputs=[ct.TensorType(name="logits", dtype=np.float16)], convert_to="mlprogram", **kwargs)


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """gate.mlpackage (fp16), gate32.mlpackage (fp32 compute) and acc.mlpackage (stateful)."""
    d = tmp_path_factory.mktemp("coreml")
    convert(Gate(), minimum_deployment_target=ct.target.iOS16).save(str(d / "gate.mlpackage"))
    convert(Gate(), minimum_deployment_target=ct.target.iOS16,
            compute_precision=ct.precision.FLOAT32).save(str(d / "gate32.mlpackage"))
    convert(Accumulator(), minimum_deployment_target=ct.target.iOS18, states=[
        ct.StateType(wrapped_type=ct.TensorType(shape=(1, 4), dtype=np.float16), name="acc")]).save(str(d / "acc.mlpackage"))
    return d


def program(path):
    """The saved spec, and its main block re-loaded as a MIL program (which type-checks each op)."""
    ml = ct.models.MLModel(str(path), skip_model_load=True)
    spec = ml.get_spec()
    prog = load_program(model_spec=spec, specification_version=spec.specificationVersion, file_weights_dir=ml.weights_dir)
    return spec, prog.functions["main"]


def computed(spec) -> list[tuple[str, int]]:
    """(name, MIL dtype) of every non-constant op output of the main block, in program order."""
    f = spec.mlProgram.functions["main"]
    ops = f.block_specializations[f.opset].operations
    return [(v.name, v.type.tensorType.dataType) for op in ops if op.type != "const" for v in op.outputs]


# ---------------------------------------------------------------------- exposure (runs on Linux)
def test_exposure_adds_outputs_in_program_order_and_casts_bool_values(packages, tmp_path):
    orig, _ = program(packages / "gate.mlpackage")
    values = computed(orig)
    bools = [n for n, dt in values if dt == MIL_pb2.DataType.BOOL]
    assert bools, "the converted Gate program holds a bool value (its mask)"
    exp = expose_intermediates(packages / "gate.mlpackage", "*", tmp_path / "x.mlpackage")
    assert exp.names == [n for n, _ in values] and exp.skipped == {}
    spec, func = program(exp.path)  # loads: the edited program type-checks, casts included
    outs = {o.name: o.type.multiArrayType for o in spec.description.output}
    assert next(iter(outs)) == "logits" and spec.description.input == orig.description.input
    for name, dt in values:
        if dt == MIL_pb2.DataType.BOOL:
            assert name not in outs and outs[f"{name}__steptrace_int32"].dataType == INT32
        else:
            assert name in outs
    cast = next(op for op in func.operations if op.op_type == "cast" and op.outputs[0].name == f"{bools[0]}__steptrace_int32")
    assert cast.x.name == bools[0] and cast.outputs[0].dtype == ct.converters.mil.mil.types.int32
    assert [v.name for v in func.outputs] == ["logits", *[n if n not in bools else f"{n}__steptrace_int32"
                                                           for n, _ in values if n != "logits"]]
    meta = spec.description.metadata.userDefined
    assert json.loads(meta["steptrace.exposed"]) == exp.names
    assert json.loads(meta["steptrace.casts"]) == {f"{b}__steptrace_int32": [b, "bool"] for b in bools}
    path, names = expose_intermediates(ct.models.MLModel(str(packages / "gate.mlpackage"), skip_model_load=True),
                                       [bools[0]], tmp_path / "one.mlpackage")  # an MLModel, one glob
    assert names == bools[:1] and [o.name for o in program(path)[0].description.output] == [
        "logits", f"{bools[0]}__steptrace_int32"]


def test_exposure_keeps_the_state_of_a_stateful_model(packages, tmp_path):
    path, names = expose_intermediates(packages / "acc.mlpackage", ["*"], tmp_path / "acc_x.mlpackage")
    spec, func = program(path)
    assert [s.name for s in spec.description.state] == ["acc"] and spec.specificationVersion >= 9
    assert names and set(names) <= {v.name for v in func.outputs}


def test_exposure_errors_are_clear(packages, tmp_path):
    with pytest.raises(RecorderUsageError, match="match no op output or op name; values are named like"):
        expose_intermediates(packages / "gate.mlpackage", "decoder_*", tmp_path / "n.mlpackage")
    with pytest.raises(RecorderUsageError, match="no CoreML model at"):
        expose_intermediates(tmp_path / "missing.mlpackage", "*", tmp_path / "m.mlpackage")
    nn = ct.models.MLModel(str(packages / "gate.mlpackage"), skip_model_load=True).get_spec()
    nn.ClearField("mlProgram")
    nn.neuralNetwork.SetInParent()
    with pytest.raises(RecorderUsageError, match="needs an ML program"):
        expose_intermediates(ct.models.MLModel(nn, skip_model_load=True), "*", tmp_path / "nn.mlpackage")


# ---------------------------------------------------------------------- metadata and predict off macOS
def test_metadata_records_compute_units_spec_version_and_precision(packages, tmp_path):
    with CoreMLRecorder(tmp_path / "a.trace", packages / "gate.mlpackage", compute_units=ct.ComputeUnit.CPU_ONLY,
                        logits="logits"):
        pass
    with CoreMLRecorder(tmp_path / "b.trace", packages / "gate32.mlpackage"):
        pass
    with CoreMLRecorder(tmp_path / "c.trace", packages / "acc.mlpackage"):
        pass
    a, b, c = (TraceReader(tmp_path / f"{x}.trace").manifest for x in "abc")
    assert a["runtime"] == {"name": "coreml", "version": ct.__version__} and a["device"] == "coreml:cpu_only"
    assert a["tags"]["coreml.compute_units"] == "CPU_ONLY" and b["tags"]["coreml.compute_units"] == "ALL"
    assert (a["tags"]["coreml.spec_version"], c["tags"]["coreml.spec_version"]) == ("7", "9")
    assert (a["precision"], b["precision"]) == ("fp16", "fp32")
    assert c["tags"]["coreml.states"] == "acc" and a["tags"]["coreml.model_type"] == "mlProgram"
    with pytest.raises(RecorderUsageError, match=r"logits output\(s\) \{'token': 'scores'\} are not outputs"):
        CoreMLRecorder(tmp_path / "d.trace", packages / "gate.mlpackage", logits="scores")


@pytest.mark.skipif(ON_MAC, reason="checks the refusal off macOS; on macOS predict runs")
def test_predict_off_macos_raises_a_clear_trace_error_not_an_empty_result(packages, tmp_path):
    path, _ = expose_intermediates(packages / "acc.mlpackage", "*", tmp_path / "acc_x.mlpackage")
    with CoreMLRecorder(tmp_path / "p.trace", path, logits="logits") as rec:
        with pytest.raises(CoreMLUnavailableError) as err:
            rec.predict({"x": np.ones((1, 4), np.float16)})
        with pytest.raises(CoreMLUnavailableError):
            rec.make_state()
    assert isinstance(err.value, TraceUsageError) and isinstance(err.value, TraceError)
    assert str(err.value) == (f"CoreML prediction needs macOS; this machine is {platform.system()} — record on a Mac, "
                              "or import a JSONL trace (trace import jsonl)")
    r = TraceReader(tmp_path / "p.trace")
    assert r.complete and r.decisions().num_rows == 0 and r.tensors().num_rows == 0
    assert r.manifest["tags"]["coreml.predict"] == str(err.value)


# ---------------------------------------------------------------------- predict (macOS only)
@NEEDS_MAC
def test_predict_records_inputs_intermediates_and_decisions(packages, tmp_path):
    path, names = expose_intermediates(packages / "gate.mlpackage", "*", tmp_path / "x.mlpackage")
    xs = [np.random.default_rng(i).standard_normal((1, 4)).astype(np.float16) for i in range(3)]
    with CoreMLRecorder(tmp_path / "m.trace", path, logits="logits", compute_units=ct.ComputeUnit.CPU_ONLY) as rec:
        outs = [rec.predict({"x": x}) for x in xs]
    r = TraceReader(tmp_path / "m.trace")
    dec = r.decisions().to_pylist()
    assert [d["step"] for d in dec] == [0, 1, 2]
    for d, out in zip(dec, outs):
        assert d["topk_ids"] == decide_reference(np.asarray(out["logits"])[0]).topk_ids.tolist()
    rows = r.tensors(step=0).to_pylist()
    assert [x["name"] for x in rows] == ["x", *names]
    mask = next(x for x in rows if x["source"] and x["source"].startswith("greater"))
    assert mask["dtype"] == "bool"  # cast to int32 for Core ML, recorded as the bool it was


@NEEDS_MAC
def test_stateful_predict_records_state_in_and_out(packages, tmp_path):
    with CoreMLRecorder(tmp_path / "s.trace", packages / "acc.mlpackage", logits="logits",
                        tensors={"*": "full", "logits:*": "none"}) as rec:
        state = rec.make_state()
        for _ in range(3):
            rec.predict({"x": np.ones((1, 4), np.float16)}, state=state)
    r = TraceReader(tmp_path / "s.trace")
    assert [x["name"] for x in r.tensors(step=2).to_pylist()] == ["x", "acc:in", "logits", "acc"]
    np.testing.assert_allclose(r.tensor("0", 2, "acc"), np.full((1, 4), 3.0))
