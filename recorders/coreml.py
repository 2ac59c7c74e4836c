"""CoreML recorder: wraps ``MLModel.predict`` (stateful models too), recording inputs, states,
outputs and exposed intermediates under the capture policy, deciding logits outputs; and
:func:`expose_intermediates`, which edits an ML program's spec so chosen op outputs become
model outputs (works on Linux). The only module of steptrace that imports coremltools.

    path, names = expose_intermediates("model.mlpackage", ["*layers_0*", "logits*"], "exposed.mlpackage")
    with CoreMLRecorder("cand.trace", path, logits="logits") as rec:   # on a Mac
        state = rec.make_state()                                       # stateful models
        for t in range(max_steps):              # each predict() opens the next step
            rec.predict({"token": np.array([[tok]], np.int32)}, state=state)
            tok = rec.token                     # the decided token (teacher forcing: the reference's)

Names are MIL value names (model inputs, outputs, exposed op outputs); ``source`` is the
producing op (``"linear (linear_0)"``); ``order`` is inputs, states before the call
(``<state>:in``), then outputs in program order, then states after the call (``<state>``).

**Bool and small-integer outputs.** The Core ML runtime only outputs fp16, fp32, fp64 and int32
arrays. :func:`expose_intermediates` appends a ``cast`` to int32 after each exposed bool, int8,
uint8, int16 or uint16 value (output ``<name>__steptrace_int32``); the recorder casts it back and
records it under the original name and dtype. Other types (int64, lists, states) are skipped and
listed in ``Exposure.skipped`` and the trace's tags.

**Off macOS** Core ML cannot run a model: :meth:`CoreMLRecorder.predict` and
:meth:`CoreMLRecorder.make_state` raise :class:`CoreMLUnavailableError` — never an empty result.
Conversion, exposure and metadata work everywhere.
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import coremltools as ct
import numpy as np
from coremltools.proto import FeatureTypes_pb2, MIL_pb2


from .errors import CoreMLUnavailableError, RecorderUsageError
from .policy import PolicyLike
from .session import DEFAULT_POLICY, Exposure, RunRecorder, logits_heads

__all__ = ["CoreMLRecorder", "CoreMLUnavailableError", "expose_intermediates", "predict_unavailable_reason"]

_DT = MIL_pb2.DataType
_OUTPUT_TYPES = {_DT.FLOAT16: FeatureTypes_pb2.ArrayFeatureType.FLOAT16,
                 _DT.FLOAT32: FeatureTypes_pb2.ArrayFeatureType.FLOAT32,
                 _DT.FLOAT64: FeatureTypes_pb2.ArrayFeatureType.DOUBLE,
                 _DT.INT32: FeatureTypes_pb2.ArrayFeatureType.INT32}
_CAST_TYPES = {_DT.BOOL: "bool", _DT.INT8: "int8", _DT.UINT8: "uint8", _DT.INT16: "int16", _DT.UINT16: "uint16"}
_CAST_SUFFIX = "__steptrace_int32"
_META_EXPOSED, _META_CASTS, _META_SKIPPED = "steptrace.exposed", "steptrace.casts", "steptrace.exposure_skipped"
_SPEC_IOS16 = 7  # fp16 model outputs need specification version 7 (iOS 16 / macOS 13)


def predict_unavailable_reason() -> str | None:
    """Return why Core ML prediction cannot run here, or None where it may (macOS).

    Returns:
        A message a user can act on, or None on macOS.
    """
    if sys.platform == "darwin":
        return None
    return (f"CoreML prediction needs macOS; this machine is {platform.system() or sys.platform} — record on a Mac, "
            "or import a JSONL trace (trace import jsonl)")


def _op_name(op: MIL_pb2.Operation) -> str:
    values = op.attributes["name"].immediateValue.tensor.strings.values if "name" in op.attributes else ()
    return values[0] if values else (op.outputs[0].name if op.outputs else op.type)


def _str_value(text: str) -> MIL_pb2.Value:
    v = MIL_pb2.Value()
    v.type.tensorType.dataType = _DT.STRING
    v.immediateValue.tensor.strings.values.append(text)
    return v


def _cast_ops(var: MIL_pb2.NamedValueType) -> list[MIL_pb2.Operation]:
    """A ``const`` dtype and a ``cast(x=var, dtype="int32")`` whose output is ``<var>__steptrace_int32``."""
    const = MIL_pb2.Operation(type="const")
    c = const.outputs.add()
    c.name = f"{var.name}__steptrace_dtype"
    c.type.tensorType.dataType = _DT.STRING
    const.attributes["val"].CopyFrom(_str_value("int32"))
    const.attributes["name"].CopyFrom(_str_value(c.name))
    cast = MIL_pb2.Operation(type="cast")
    cast.inputs["x"].arguments.add().name = var.name
    cast.inputs["dtype"].arguments.add().name = c.name
    out = cast.outputs.add()
    out.name = var.name + _CAST_SUFFIX
    out.type.CopyFrom(var.type)
    out.type.tensorType.dataType = _DT.INT32
    cast.attributes["name"].CopyFrom(_str_value(out.name))
    return [const, cast]


def _load(model: ct.models.MLModel | str | os.PathLike[str], **kwargs: Any) -> ct.models.MLModel:
    if isinstance(model, ct.models.MLModel):
        return model
    path = Path(model)
    if not path.exists():
        raise RecorderUsageError(f"no CoreML model at {path} (.mlpackage or .mlmodel)")
    return ct.models.MLModel(str(path), skip_model_load=predict_unavailable_reason() is not None, **kwargs)


def _main_block(spec: Any, function_name: str | None) -> tuple[Any, Any]:
    """The ML program's main block and the description holding its outputs."""
    if spec.WhichOneof("Type") != "mlProgram":
        raise RecorderUsageError(f"this is a {spec.WhichOneof('Type')} model; exposing intermediates needs an ML program "
                                 "(convert with convert_to='mlprogram')")
    name = function_name or spec.description.defaultFunctionName or "main"
    func = spec.mlProgram.functions.get(name)
    if func is None:
        raise RecorderUsageError(f"the model has no function {name!r}; it has {', '.join(spec.mlProgram.functions)}")
    desc = next((f for f in spec.description.functions if f.name == name), spec.description)
    return func.block_specializations[func.opset], desc


def expose_intermediates(
    model: ct.models.MLModel | str | os.PathLike[str],
    patterns: str | Sequence[str],
    out_path: str | os.PathLike[str],
    *,
    function_name: str | None = None,
) -> Exposure:
    """Make the outputs of matching ops model outputs by editing the ML program's spec; save it.

    Patterns are :func:`fnmatch.fnmatchcase` globs over op output names and op names (``"*"``
    exposes every computed value; constants are never exposed). Bool and small-integer values
    get a cast to int32 (see the module docs); values of other types are skipped. Inputs,
    states, weights and metadata are kept as they are; the spec version is raised to 7 when an
    fp16 value becomes an output. The saved model's user-defined metadata lists the exposed names
    (``steptrace.exposed``) and the casts (``steptrace.casts``).

    Args:
        model: an ``MLModel`` (ML program) or the path of an ``.mlpackage``.
        patterns: one glob or several.
        out_path: where to save the edited ``.mlpackage``.
        function_name: the program's function (default: the model's default, ``main``).

    Returns:
        An :class:`Exposure` (``path, names = expose_intermediates(...)``; ``skipped`` too).

    Raises:
        RecorderUsageError: no model, not an ML program, or patterns that match nothing.
    """
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    if not pats or not all(isinstance(p, str) and p for p in pats):
        raise RecorderUsageError(f"patterns must be non-empty glob strings, got {patterns!r}")
    ml = _load(model)
    spec = ct.proto.Model_pb2.Model()
    spec.CopyFrom(ml.get_spec())
    block, desc = _main_block(spec, function_name)
    outputs = set(block.outputs)
    names: list[str] = []
    skipped: dict[str, str] = {}
    casts: dict[str, list[str]] = {}
    ops: list[MIL_pb2.Operation] = []
    for op in block.operations:
        ops.append(op)
        if op.type == "const" or op.type.startswith("constexpr_"):
            continue
        by_op = any(fnmatch.fnmatchcase(_op_name(op), p) for p in pats)
        for var in op.outputs:
            if not (by_op or any(fnmatch.fnmatchcase(var.name, p) for p in pats)):
                continue
            kind = var.type.WhichOneof("type")
            dt = var.type.tensorType.dataType if kind == "tensorType" else None
            if var.name in outputs:
                names.append(var.name)
            elif dt in _OUTPUT_TYPES:
                block.outputs.append(var.name)
                _describe(desc.output.add(), var.name, var.type.tensorType, _OUTPUT_TYPES[dt])
                names.append(var.name)
                if dt == _DT.FLOAT16:
                    spec.specificationVersion = max(spec.specificationVersion, _SPEC_IOS16)
            elif dt in _CAST_TYPES:
                new = _cast_ops(var)
                ops.extend(new)
                cast_name = new[1].outputs[0].name
                block.outputs.append(cast_name)
                _describe(desc.output.add(), cast_name, new[1].outputs[0].type.tensorType, _OUTPUT_TYPES[_DT.INT32])
                casts[cast_name] = [var.name, _CAST_TYPES[dt]]
                names.append(var.name)
            else:
                what = _DT.Name(dt) if dt is not None else kind
                skipped[var.name] = f"{op.type} output of type {what} cannot be a Core ML model output"
    if not names and not skipped:
        sample = [v.name for op in block.operations if op.type != "const" for v in op.outputs][:6]
        raise RecorderUsageError(f"pattern(s) {', '.join(map(repr, pats))} match no op output or op name; values are "
                                 f"named like {', '.join(sample) or '(empty program)'}")
    del block.operations[:]
    block.operations.extend(ops)
    meta = spec.description.metadata.userDefined
    meta[_META_EXPOSED], meta[_META_CASTS], meta[_META_SKIPPED] = json.dumps(names), json.dumps(casts), json.dumps(skipped)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    ct.models.MLModel(spec, weights_dir=ml.weights_dir, skip_model_load=True).save(str(out))
    return Exposure(str(out), names, skipped)


def _describe(feature: Any, name: str, tensor: Any, array_type: int) -> None:
    feature.name = name
    feature.type.multiArrayType.dataType = array_type
    dims = [d.constant.size for d in tensor.dimensions if d.WhichOneof("dimension") == "constant"]
    if len(dims) == tensor.rank and tensor.rank > 0:
        feature.type.multiArrayType.shape.extend(dims)


def _program_facts(spec: Any) -> tuple[dict[str, tuple[int, str]], str | None, list[str]]:
    """(value -> (program index, source), precision, weight-compression op types) of a model."""
    order: dict[str, tuple[int, str]] = {}
    kind = spec.WhichOneof("Type")
    if kind == "neuralNetwork":
        for i, layer in enumerate(spec.neuralNetwork.layers):
            order.update({o: (i, f"{layer.WhichOneof('layer')} ({layer.name})") for o in layer.output})
        return order, None, []
    if kind != "mlProgram":
        return order, None, []
    block, _ = _main_block(spec, None)
    floats: set[int] = set()
    compressed: set[str] = set()
    for i, op in enumerate(block.operations):
        if op.type.startswith("constexpr_"):
            compressed.add(op.type)
        src = f"{op.type} ({_op_name(op)})"
        for var in op.outputs:
            order[var.name] = (i, src)
            if op.type not in ("const", "cast") and var.type.WhichOneof("type") == "tensorType":
                floats.add(var.type.tensorType.dataType)
    has16, has32 = _DT.FLOAT16 in floats, _DT.FLOAT32 in floats
    precision = "mixed" if has16 and has32 else "fp16" if has16 else "fp32" if has32 else None
    return order, precision, sorted(compressed)


class CoreMLRecorder(RunRecorder):
    """Records a CoreML model's predictions, one step per :meth:`predict`.

    Each call outside an explicit step opens the next step (inside ``with rec.step(...)`` it
    is part of that step); inputs, states and outputs are recorded under the policy, then the
    ``logits`` outputs are decided and :attr:`token` / :attr:`tokens` hold the tokens to feed
    next (the reference's under teacher forcing). Construction works on any OS (metadata: compute
    units, spec version, precision); prediction needs macOS.

    Args:
        trace: the trace directory to write.
        model: an ``MLModel`` or the path of an ``.mlpackage`` / ``.mlmodel``.
        tensors: capture policy over value names (inputs, outputs, exposed intermediates,
            ``<state>``, ``<state>:in``) and ``logits:<head>``; default
            :data:`recorders.session.DEFAULT_POLICY` (statistics of every value).
        logits: output name of the ``token`` head, or ``{head: output name}``.
        position: the decided position of ``[1, T, V]`` logits (-1: the last), or ``"all"``:
            every position of ``[1, T, V]`` / ``[T, V]`` logits, one step each (see
            :class:`recorders.session.RunRecorder`); those heads are open-loop unless
            ``open_loop=`` says otherwise, and teacher forcing is refused.
        compute_units: ``coremltools.ComputeUnit`` when ``model`` is a path (default ALL).
        **options: :class:`recorders.capture.Recorder` options.

    Raises:
        RecorderUsageError: no model there, a logits name that is not a model output, or
            ``compute_units`` with a loaded model.
        TraceExistsError: a trace exists at ``trace`` and ``mode="create"``.
    """

    def __init__(
        self,
        trace: str | os.PathLike[str],
        model: ct.models.MLModel | str | os.PathLike[str],
        *,
        tensors: PolicyLike = None,
        logits: str | Mapping[str, str] | None = None,
        position: int | str = -1,
        compute_units: ct.ComputeUnit | None = None,
        **options: Any,
    ) -> None:
        if isinstance(model, ct.models.MLModel) and compute_units is not None:
            raise RecorderUsageError("compute_units applies when CoreMLRecorder loads the model from a path; this "
                                     "MLModel was loaded with its own")
        ml = _load(model, compute_units=compute_units or ct.ComputeUnit.ALL)
        spec = ml.get_spec()
        desc = spec.description
        meta = dict(desc.metadata.userDefined)
        self.model = ml
        self.input_names = [f.name for f in desc.input]
        self.state_names = [f.name for f in desc.state]
        self._casts = {k: tuple(v) for k, v in json.loads(meta.get(_META_CASTS, "{}")).items()}
        self.output_names = [self._casts.get(f.name, (f.name,))[0] for f in desc.output]
        bad = {h: n for h, n in logits_heads(logits).items() if n not in self.output_names}
        if bad:
            raise RecorderUsageError(f"logits output(s) {bad} are not outputs of the model; its outputs are "
                                     f"{', '.join(self.output_names)}")
        self._order, precision, compressed = _program_facts(spec)
        units = ml.compute_unit.name
        reason = predict_unavailable_reason()
        exposed = json.loads(meta.get(_META_EXPOSED, "[]"))
        tags = {"coreml.compute_units": units, "coreml.spec_version": str(spec.specificationVersion),
                "coreml.model_type": spec.WhichOneof("Type") or "unknown", "coreml.version": ct.__version__,
                "coreml.states": ",".join(self.state_names), "coreml.exposed": str(len(exposed)),
                "coreml.predict": reason or "available", "coreml.weight_compression": ",".join(compressed)}
        if meta.get(_META_SKIPPED, "{}") != "{}":
            tags["coreml.exposure_skipped"] = meta[_META_SKIPPED]
        tags.update(options.pop("tags", None) or {})
        defaults = {"runtime": "coreml", "runtime_version": ct.__version__, "device": f"coreml:{units.lower()}",
                    "precision": precision, "model": str(model) if isinstance(model, (str, os.PathLike)) else None}
        defaults.update(options.pop("defaults", None) or {})
        policy = DEFAULT_POLICY if tensors is None else tensors
        super().__init__(trace, policy=policy, logits=logits, position=position, defaults=defaults, tags=tags, **options)

    def make_state(self) -> Any:
        """Return a fresh state for a stateful model (``MLModel.make_state()``).

        Returns:
            A ``coremltools.models.model.MLState``.

        Raises:
            CoreMLUnavailableError: not on macOS.
            RecorderUsageError: the model has no state.
        """
        self._require_runtime()
        if not self.state_names:
            raise RecorderUsageError("this model has no state; call predict() without state=")
        return self.model.make_state()

    def predict(self, data: Mapping[str, Any], *, state: Any = None) -> dict[str, Any]:
        """Predict and record the step: inputs, states in, outputs in program order, states out,
        decisions. Cast exposed values are returned and recorded under their original names and
        dtypes.

        Args:
            data: input name -> array.
            state: the ``MLState`` of a stateful model (updated in place by Core ML).

        Returns:
            Output name -> value.

        Raises:
            CoreMLUnavailableError: not on macOS, or the Core ML framework cannot be loaded.
            RecorderUsageError: missing or unknown inputs, or a state with a stateless model.
            ReferenceNotFoundError: teacher forcing past the reference's last step.
        """
        self._require_runtime()
        missing = [n for n in self.input_names if n not in data]
        extra = [n for n in data if n not in self.input_names]
        if missing or extra:
            raise RecorderUsageError(f"inputs: missing {missing or 'none'}, unknown {extra or 'none'}; the model takes "
                                     f"{', '.join(self.input_names)}")
        if state is not None and not self.state_names:
            raise RecorderUsageError("state= was given but this model has no state")
        before = self._read_states(state, ":in")
        try:
            raw = self.model.predict(dict(data), state=state) if state is not None else self.model.predict(dict(data))
        except Exception as exc:  # coremltools raises bare Exception when the framework is missing
            if "macOS" in str(exc) or "CoreML.framework" in str(exc):
                raise CoreMLUnavailableError(f"CoreML prediction cannot run here: {exc}") from exc
            raise
        out = {}
        for name, value in raw.items():
            orig, dtype = self._casts.get(name, (name, None))
            out[orig] = np.asarray(value).astype(dtype) if dtype is not None else value
        self._begin_run()
        for name in self.input_names:
            self._record(name, data[name], "model input")
        for name, value in before.items():
            self._record(name, value, "state before predict")
        ranked = sorted(out, key=lambda n: self._order.get(n, (len(self._order), ""))[0])
        for name in ranked:
            self._record(name, out[name], self._order.get(name, (0, None))[1])
        for name, value in self._read_states(state, "").items():
            self._record(name, value, "state after predict")
        self._decide_outputs({n: np.asarray(v) for n, v in out.items() if n in self.heads.values()})
        return out

    def _read_states(self, state: Any, suffix: str) -> dict[str, np.ndarray]:
        if state is None:
            return {}
        return {f"{n}{suffix}": np.array(state.read_state(n)) for n in self.state_names
                if self.policy.mode(f"{n}{suffix}") != "none"}

    def _record(self, name: str, value: Any, source: str | None) -> None:
        if self.policy.mode(name) != "none":
            self.record(name, np.asarray(value), source=source)

    def _require_runtime(self) -> None:
        reason = predict_unavailable_reason()
        if reason is not None:
            raise CoreMLUnavailableError(reason)
