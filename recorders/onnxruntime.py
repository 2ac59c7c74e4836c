"""ONNX Runtime recorder: every ``run()`` of an ``InferenceSession`` is a step (or part of one),
its inputs and outputs recorded under the capture policy, a logits output decided; and
:func:`expose_intermediates`, which marks node outputs as graph outputs (Polygraphy's "mark
all") so the recorder sees them. The only module of steptrace that imports onnxruntime or onnx.

    path, names = expose_intermediates("model.onnx", ["/blocks.*/attn/*", "/ln_f/*"])
    with OrtRecorder("cand.trace", path, tensors={"*": "stats"}, logits="logits",
                     optimization="disable") as rec:
        for t in range(max_steps):              # each run() opens the next step
            rec.run(None, {"tokens": np.array([tokens])})
            tokens.append(rec.token)            # the decided token (teacher forcing: the reference's)

Names are ONNX value names; ``source`` is the producing node (``"/ln_f/LayerNormalization
(LayerNormalization)"``, ``"graph input"``); ``order`` is inputs first, then outputs in the
graph's topological order, which is the differ's culprit order.

**Graph optimisation changes what you see.** ONNX Runtime rewrites the graph before running it:
``ORT_ENABLE_BASIC`` folds constants and removes redundant nodes, ``ORT_ENABLE_EXTENDED`` fuses
(Gelu/BiasGelu, LayerNorm, attention, MatMul+scale), ``ORT_ENABLE_ALL`` (the default) adds
layout rewrites. A value fused away does not exist at run time, so exposing it as a graph output
*blocks that fusion*: the exposed model runs other kernels than the one you ship (measured on a
tiny transformer at EXTENDED: BiasGelu no longer fused, logits moved by ~1e-6). For
parity work with exposed intermediates use ``ORT_DISABLE_ALL`` (``optimization="disable"``:
exposed and unexposed models then give bit-identical outputs), or ``ORT_ENABLE_EXTENDED`` when
speed matters (never ALL for fp16 recurrent models: an fp16 GRU segfaults there), and compare
runs recorded at the same level. The level, the providers and the ORT version are in every
trace's metadata (tags ``onnxruntime.graph_optimization_level``, ``onnxruntime.providers``,
``onnxruntime.version``); a session with exposed intermediates above ``ORT_DISABLE_ALL`` warns.
"""

from __future__ import annotations

import fnmatch
import json
import os
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError
from onnx.external_data_helper import load_external_data_for_model, uses_external_data
from onnxruntime.capi.onnxruntime_pybind11_state import InvalidArgument

from steptrace.tracefmt.errors import UnsupportedDtypeError

from .errors import RecorderUsageError
from .policy import PolicyLike
from .session import DEFAULT_POLICY, Exposure, RunRecorder, logits_heads

__all__ = ["Exposure", "OrtRecorder", "expose_intermediates"]

_PROTO_LIMIT = 2**31 - 2**26  # protobuf cannot serialise 2 GiB; keep a margin for the graph itself
_QUANT_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLinear",
              "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits"}
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}
_META_EXPOSED = "steptrace.exposed"
_META_SKIPPED = "steptrace.exposure_skipped"


def _topological(nodes: Sequence[onnx.NodeProto], inputs: set[str]) -> list[onnx.NodeProto]:
    """Nodes in a topological order, stable for graphs already sorted (as ONNX requires)."""
    produced = {o for n in nodes for o in n.output if o}
    ready = set(inputs)
    pending, out = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(not i or i in ready or i not in produced for i in n.input):
                out.append(n)
                ready.update(o for o in n.output if o)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle: keep the file's order for the rest
            out.extend(rest)
            break
        pending = rest
    return out


def _producers(graph: onnx.GraphProto) -> dict[str, tuple[int, str]]:
    """Value name -> (topological index, source) for every node output and graph input."""
    found = {i.name: (-1, "graph input") for i in graph.input}
    found.update({t.name: (-1, "initializer") for t in graph.initializer})
    for idx, n in enumerate(_topological(graph.node, set(found))):
        src = f"{n.name} ({n.op_type})" if n.name else n.op_type
        found.update({o: (idx, src) for o in n.output if o})
    return found


def _load(model: str | os.PathLike[str] | onnx.ModelProto, *, weights: bool) -> onnx.ModelProto:
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise RecorderUsageError(f"no ONNX model at {path}")
    try:
        return onnx.load(str(path), load_external_data=weights)
    except (OSError, DecodeError) as exc:
        raise RecorderUsageError(f"{path} cannot be loaded as an ONNX model: {exc}") from exc


def _infer_types(full: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """Value name -> inferred ValueInfo, inferring on the graph with its large weights set aside
    (types need dims and data_type only; a model past 2 GB cannot be serialised for inference)."""
    held = [(t, t.raw_data) for t in full.graph.initializer if len(t.raw_data) > 1024]
    for t, _ in held:
        t.ClearField("raw_data")
    try:
        inferred = onnx.shape_inference.infer_shapes(full, strict_mode=False).graph
    except onnx.shape_inference.InferenceError as exc:
        warnings.warn(f"ONNX shape inference failed ({exc}); only values with declared types can be exposed",
                      stacklevel=3)
        inferred = full.graph
    finally:
        for t, raw in held:
            t.raw_data = raw
    return {v.name: v for v in (*full.graph.value_info, *inferred.value_info, *inferred.output)}


def expose_intermediates(
    model: str | os.PathLike[str] | onnx.ModelProto,
    patterns: str | Sequence[str],
    out_path: str | os.PathLike[str] | None = None,
    *,
    external_data: bool | None = None,
    constants: bool = False,
) -> Exposure:
    """Add the outputs of matching nodes as graph outputs, so a session returns them.

    Patterns are :func:`fnmatch.fnmatchcase` globs matched against value names and node names
    (a node name selects all its outputs); ``"*"`` marks every node output. Types come from ONNX
    shape inference; values without an inferable tensor type are skipped, listed in the
    result's ``skipped`` and in a warning. The saved model records the exposed names in its
    ``metadata_props`` (``steptrace.exposed``). Only the top-level graph is searched (not the
    bodies of If/Loop/Scan). Constants are not exposed unless ``constants=True``: outputs of
    ``Constant`` nodes and of nodes whose every input is an initializer or such a constant
    (``Identity``/``Cast``/``DequantizeLinear`` of a weight, shape arithmetic on constants);
    they are the same at every run. They are listed in ``skipped`` without a warning.

    Args:
        model: an ONNX file (its external data next to it) or a ModelProto holding its weights.
        patterns: one glob or several.
        out_path: where to save; default ``<stem>.exposed.onnx`` next to ``model`` (a fresh
            temporary directory for a ModelProto).
        external_data: save the weights as ``<out name>.data`` next to it. None: when the
            input used external data or the model exceeds protobuf's 2 GB limit.
        constants: expose constant values too.

    Returns:
        An :class:`Exposure`; ``path, names = expose_intermediates(...)``.

    Raises:
        RecorderUsageError: no model, a pattern that matches nothing (or only constants), or a
            ModelProto whose weights are external and not loaded.
    """
    pats = [patterns] if isinstance(patterns, str) else list(patterns)
    if not pats or not all(isinstance(p, str) and p for p in pats):
        raise RecorderUsageError(f"patterns must be non-empty glob strings, got {patterns!r}")
    if isinstance(model, onnx.ModelProto):
        if any(uses_external_data(t) for t in model.graph.initializer):
            raise RecorderUsageError("this ModelProto references external data it does not hold; pass the model's "
                                     "path or load it with onnx.load(path, load_external_data=True)")
        full = onnx.ModelProto()
        full.CopyFrom(model)  # the caller's proto stays as it was
        was_external = False
    else:
        full = _load(model, weights=False)
        was_external = any(uses_external_data(t) for t in full.graph.initializer)
        if was_external:
            try:
                load_external_data_for_model(full, str(Path(model).parent))
            except (OSError, onnx.checker.ValidationError) as exc:
                raise RecorderUsageError(f"the external data of {model} cannot be read ({exc}); keep the model's "
                                         ".data file next to it, under the name the model refers to") from exc
    g = full.graph
    types = _infer_types(full)
    outputs = {o.name for o in g.output}
    names, skipped, seen = [], {}, set()
    fixed = set() if constants else _constant_values(g)
    for node in _topological(g.node, {i.name for i in g.input} | {t.name for t in g.initializer}):
        by_node = any(fnmatch.fnmatchcase(node.name, p) for p in pats) if node.name else False
        for value in node.output:
            if not value or value in seen or not (by_node or any(fnmatch.fnmatchcase(value, p) for p in pats)):
                continue
            seen.add(value)
            if value in outputs:
                names.append(value)
                continue
            if value in fixed:
                what = ("a Constant node's output" if node.op_type == "Constant"
                        else f"{node.op_type} of initializers or constants")
                skipped[value] = f"constant: {what} (constants=True exposes it)"
                continue
            vi = types.get(value)
            kind = vi.type.WhichOneof("value") if vi is not None else None
            if kind != "tensor_type" or vi.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED:
                skipped[value] = (f"{node.op_type} output is a {kind}, not a tensor" if kind and kind != "tensor_type"
                                  else f"no type could be inferred for this {node.op_type} output")
                continue
            g.output.append(vi)
            names.append(value)
    if not names and not skipped:
        sample = [o for n in g.node[:8] for o in n.output if o]
        raise RecorderUsageError(f"pattern(s) {', '.join(map(repr, pats))} match no node output or node name; "
                                 f"values are named like {', '.join(sample[:6]) or '(empty graph)'}")
    if not names and all(k in fixed for k in skipped):
        raise RecorderUsageError(f"pattern(s) {', '.join(map(repr, pats))} match only constants ({len(skipped)}: "
                                 f"{', '.join(list(skipped)[:6])}); pass constants=True to expose them")
    unusual = {k: v for k, v in skipped.items() if k not in fixed}
    if unusual:
        warnings.warn(f"{len(unusual)} value(s) not exposed: " +
                      "; ".join(f"{k}: {v}" for k, v in list(unusual.items())[:10]), stacklevel=2)
    props = {p.key: p for p in full.metadata_props}
    for key, val in ((_META_EXPOSED, json.dumps(names)), (_META_SKIPPED, json.dumps(skipped))):
        entry = props[key] if key in props else full.metadata_props.add()
        entry.key, entry.value = key, val
    if out_path is None:
        base = (Path(tempfile.mkdtemp(prefix="steptrace-onnx-")) / "model.onnx" if isinstance(model, onnx.ModelProto)
                else Path(model))
        out_path = base.with_name(f"{base.stem}.exposed.onnx")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = sum(t.ByteSize() for t in g.initializer) + sum(n.ByteSize() for n in g.node)
    if external_data is None:
        external_data = was_external or size > _PROTO_LIMIT
    if external_data:
        onnx.save_model(full, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{out.name}.data", size_threshold=1024)
    else:
        onnx.save_model(full, str(out))
    return Exposure(str(out), names, skipped)


def _constant_values(graph: onnx.GraphProto) -> set[str]:
    """Names of the values a graph computes from constants alone: ``Constant`` node outputs and
    outputs of deterministic nodes (with at least one input and no subgraph) whose every input
    is an initializer (not overridable as a graph input) or one of these values."""
    known = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    found: set[str] = set()
    for node in _topological(graph.node, {i.name for i in graph.input} | known):
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            constant = True
        elif not ins or node.op_type in _RANDOM or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                       for a in node.attribute):
            constant = False
        else:
            constant = all(i in known or i in found for i in ins)
        if constant:
            found.update(o for o in node.output if o)
    return found


_RANDOM = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"})


def _check_recordable(name: str, value: np.ndarray) -> None:
    if value.dtype.kind in "OUSVc":
        raise UnsupportedDtypeError(f"ONNX value {name!r} is a {value.dtype} tensor, which steptrace cannot record; "
                                    f"leave it out of the capture policy (e.g. {{{name!r}: 'none', '*': 'stats'}})")


class OrtRecorder(RunRecorder):
    """Records an ONNX Runtime session's inputs, outputs and decisions, one step per ``run()``.

    Call :meth:`run` as you would ``InferenceSession.run``. Outside an explicit step each call
    opens the next step (which stays open, so a manual :meth:`decide` may follow); inside
    ``with rec.step(...)`` calls are part of that step. After each run the ``logits`` outputs are
    decided (position ``position`` of ``[1, T, V]`` outputs) and :attr:`token` /
    :attr:`tokens` hold the tokens to feed next (the reference's under teacher forcing).

    Args:
        trace: the trace directory to write.
        session: an ``onnxruntime.InferenceSession``, or a model path to open one.
        tensors: capture policy over ONNX value names (inputs, outputs, exposed
            intermediates) and ``logits:<head>`` (the decided position's 1-d logits); default
            :data:`recorders.session.DEFAULT_POLICY`: statistics of every value, no
            ``logits:<head>`` copy.
        logits: output name of the ``token`` head, or ``{head: output name}``; None: no
            automatic decisions.
        position: the decided position of ``[1, T, V]`` logits (-1: the last), or ``"all"``:
            every position of ``[1, T, V]`` / ``[T, V]`` logits, one step each (see
            :class:`recorders.session.RunRecorder`); those heads are open-loop unless
            ``open_loop=`` says otherwise, and teacher forcing is refused.
        model: the session's model (path or ModelProto) for names, topological order and
            sources; default: the path the session was opened from.
        providers: execution providers when ``session`` is a path (default CPU).
        session_options: ``onnxruntime.SessionOptions`` when ``session`` is a path.
        optimization: graph optimisation level when ``session`` is a path: ``"disable"``,
            ``"basic"``, ``"extended"``, ``"layout"`` or ``"all"`` (see the module docs).
        **options: :class:`recorders.capture.Recorder` options (``reference``,
            ``teacher_forcing``, ``budget``, ``sample``, ``k``, ``watched``, ``metadata``,
            ``vocab``, ``mode``, ``writer_options``, ``open_loop``).

    Raises:
        RecorderUsageError: a logits name that is not an output of the session, an unknown
            optimisation level, or ``optimization`` given with a ready session.
        TraceExistsError: a trace exists at ``trace`` and ``mode="create"``.
    """

    def __init__(
        self,
        trace: str | os.PathLike[str],
        session: ort.InferenceSession | str | os.PathLike[str],
        *,
        tensors: PolicyLike = None,
        logits: str | Mapping[str, str] | None = None,
        position: int | str = -1,
        model: str | os.PathLike[str] | onnx.ModelProto | None = None,
        providers: Sequence[str] | None = None,
        session_options: ort.SessionOptions | None = None,
        optimization: str | None = None,
        **options: Any,
    ) -> None:
        if not isinstance(session, ort.InferenceSession):
            so = session_options or ort.SessionOptions()
            if optimization is not None:
                if optimization not in _LEVELS:
                    raise RecorderUsageError(f"optimization={optimization!r}: use one of {', '.join(_LEVELS)}")
                so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[optimization])
            model = session if model is None else model
            session = ort.InferenceSession(str(session), so, providers=list(providers or ["CPUExecutionProvider"]))
        elif optimization is not None or session_options is not None or providers is not None:
            raise RecorderUsageError("optimization, session_options and providers apply when OrtRecorder opens the "
                                     "session from a path; this session is already open with its own")
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        bad = {h: n for h, n in logits_heads(logits).items() if n not in self.output_names}
        if bad:
            raise RecorderUsageError(f"logits output(s) {bad} are not outputs of the session; its outputs are "
                                     f"{', '.join(self.output_names)}")
        if model is None:
            model = getattr(session, "_model_path", None) or None
        raw = getattr(session, "_model_bytes", None) if model is None else None
        proto = _load(model, weights=False) if model is not None else onnx.load_from_string(raw) if raw else None
        self._producers = _producers(proto.graph) if proto is not None else {}
        props = {p.key: p.value for p in proto.metadata_props} if proto is not None else {}
        level = session.get_session_options().graph_optimization_level.name
        exposed = json.loads(props.get(_META_EXPOSED, "[]"))
        tags = {"onnxruntime.graph_optimization_level": level, "onnxruntime.providers": ",".join(session.get_providers()),
                "onnxruntime.version": ort.__version__, "onnxruntime.exposed": str(len(exposed)),
                "onnxruntime.topology": "known" if proto is not None else "unknown (pass model=PATH)"}
        if props.get(_META_SKIPPED, "{}") != "{}":
            tags["onnxruntime.exposure_skipped"] = props[_META_SKIPPED]
        tags.update(options.pop("tags", None) or {})
        provider = session.get_providers()[0]
        defaults = {"runtime": "onnxruntime", "runtime_version": ort.__version__,
                    "device": provider.removesuffix("ExecutionProvider").lower(),
                    "model": str(model) if isinstance(model, (str, os.PathLike)) else None,
                    "precision": _precision(proto) if proto is not None else None}
        defaults.update(options.pop("defaults", None) or {})
        if exposed and level != "ORT_DISABLE_ALL":
            warnings.warn(f"this session has {len(exposed)} exposed intermediates and runs at {level}: exposed values "
                          "block node fusions, so it runs other kernels than the unexposed model; record parity runs at "
                          "ORT_DISABLE_ALL (optimization='disable')", stacklevel=2)
        policy = DEFAULT_POLICY if tensors is None else tensors
        super().__init__(trace, policy=policy, logits=logits, position=position, defaults=defaults, tags=tags, **options)
        self._order = {n: self._producers.get(n, (len(self._producers), None)) for n in self.output_names}

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Any],
        run_options: ort.RunOptions | None = None,
    ) -> list[np.ndarray]:
        """Run the session and record the step: inputs, outputs in topological order, decisions.

        Args:
            output_names: the outputs to return (None: all), as ``InferenceSession.run``.
            input_feed: input name -> array.
            run_options: ``onnxruntime.RunOptions``.

        Returns:
            The requested outputs, in the order asked for.

        Raises:
            RecorderUsageError: an unknown output name, a missing or unknown input, or inputs
                the session refuses (wrong dtype or rank; the message lists what it expects).
            StepOrderError: a logits head was already decided in the open explicit step.
            ReferenceNotFoundError: teacher forcing past the reference's last step.
        """
        wanted = list(self.output_names if output_names is None else output_names)
        unknown = [n for n in wanted if n not in self.output_names]
        if unknown:
            raise RecorderUsageError(f"output(s) {', '.join(map(repr, unknown))} are not outputs of the session; it has "
                                     f"{', '.join(self.output_names)} (expose intermediates with expose_intermediates())")
        missing = [n for n in self.input_names if n not in input_feed]
        extra = [n for n in input_feed if n not in self.input_names]
        if missing or extra:
            raise RecorderUsageError(f"input feed: missing {missing or 'none'}, unknown {extra or 'none'}; the session "
                                     f"takes {self._signature()}")
        fetch = [n for n in self.output_names if n in wanted or n in self.heads.values() or self.policy.mode(n) != "none"]
        try:
            values = self.session.run(fetch, dict(input_feed), run_options)
        except InvalidArgument as exc:
            given = ", ".join(f"{k}: {np.asarray(v).dtype}{list(np.shape(v))}" for k, v in input_feed.items())
            raise RecorderUsageError(f"ONNX Runtime refused the inputs ({exc}); given {given}; the session takes "
                                     f"{self._signature()}") from exc
        out = dict(zip(fetch, values))
        self._begin_run()
        for name in self.input_names:
            if self.policy.mode(name) != "none":
                value = np.asarray(input_feed[name])
                _check_recordable(name, value)
                self.record(name, value, source="graph input")
        for name in sorted(fetch, key=lambda n: self._order[n][0]):
            if self.policy.mode(name) != "none":
                _check_recordable(name, out[name])
                self.record(name, out[name], source=self._order[name][1])
        self._decide_outputs(out)
        return [out[n] for n in wanted]

    def _signature(self) -> str:
        return ", ".join(f"{i.name}: {i.type}{i.shape}" for i in self.session.get_inputs())


def _precision(proto: onnx.ModelProto) -> str:
    """fp32 / fp16 / bf16 / int8 from the graph's ops and initializer types."""
    if any(n.op_type in _QUANT_OPS for n in proto.graph.node):
        return "int8"
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
             onnx.TensorProto.DOUBLE: "fp64"}
    counts: dict[int, int] = {}
    for t in proto.graph.initializer:
        if t.data_type in names:
            counts[t.data_type] = counts.get(t.data_type, 0) + int(np.prod(t.dims, dtype=np.int64))
    return names[max(counts, key=counts.__getitem__)] if counts else "fp32"


# ---------------------------------------------------------------------------------------------
# quantize_dynamic_copy: the int8 copy `trace demo` compares with fp32 (tui/commands/demo.py).
# ---------------------------------------------------------------------------------------------
def quantize_dynamic_copy(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> Path:
    """Write an int8 copy of an ONNX model with ``onnxruntime.quantization.quantize_dynamic``.

    MatMul/Gemm weights become int8 (one scale per tensor); activations are quantized to uint8
    at run time by the inserted ``DynamicQuantizeLinear`` nodes. Value names of the nodes that
    stay (Add, LayerNormalization, ...) are kept, so the copy's intermediates can be exposed and
    compared with the original's under the same names.

    Args:
        src: the fp32 ``.onnx`` file.
        dst: where to write the int8 copy (its folder is created).

    Returns:
        ``dst`` as a Path.

    Raises:
        RecorderUsageError: ``src`` is not a file, or the ``onnx`` package (which
            ``onnxruntime.quantization`` imports) is missing.
    """
    import logging

    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:  # onnxruntime.quantization imports the onnx package
        raise RecorderUsageError("the demo's int8 run needs the onnx package: pip install 'steptrace[onnx]'") from exc
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise RecorderUsageError(f"no ONNX model at {src}")
    dst.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic advises pre-processing on the root logger
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False)
    finally:
        root.setLevel(level)
    return dst
# ------------------------------------------------------------------- end quantize_dynamic_copy


# =====================================================================================================
# Session patching for `trace record` (recorders/script.py). Appended section: the code above is
# unchanged. The only onnxruntime calls the script recorder makes.
# =====================================================================================================
def session_defaults(session: ort.InferenceSession) -> dict[str, str | None]:
    """Return the metadata defaults of a run of ``session`` (as :class:`OrtRecorder` fills them).

    Args:
        session: an open session.

    Returns:
        ``{"runtime": "onnxruntime", "runtime_version", "device", "model", "precision"}``.
    """
    path = getattr(session, "_model_path", None) or None
    precision = None
    if path is not None:
        try:
            precision = _precision(_load(path, weights=False))
        except RecorderUsageError:
            precision = None  # the file went away since the session was opened: precision unknown
    return {"runtime": "onnxruntime", "runtime_version": ort.__version__,
            "device": session.get_providers()[0].removesuffix("ExecutionProvider").lower(),
            "model": str(path) if path is not None else None, "precision": precision}


def session_topology(session: ort.InferenceSession) -> dict[str, tuple[int, str]]:
    """Value name -> (topological index, producing node) of the session's model; empty when the
    session was opened from bytes or its file cannot be read (order then follows the outputs).

    Args:
        session: an open session.

    Returns:
        The mapping (graph inputs and initializers at index -1).
    """
    path = getattr(session, "_model_path", None) or None
    if path is None:
        return {}
    try:
        return _producers(_load(path, weights=False).graph)
    except RecorderUsageError:
        return {}


def patch_sessions(on_run: Any) -> Any:
    """Route ``run()`` of every ``InferenceSession`` created from now on through ``on_run``.

    ``on_run(session, output_names, input_feed, run)`` must return what ``run()`` returns;
    ``run(names)`` runs the session for the output ``names`` with the caller's feed and run
    options. Sessions created before the patch run as before; ``run_with_iobinding`` and
    ``run_with_ort_values`` are not routed.

    Args:
        on_run: the callback.

    Returns:
        A function that restores ``InferenceSession.__init__`` and ``run``.
    """
    import functools
    import weakref

    cls = ort.InferenceSession
    orig_init, orig_run = cls.__init__, cls.run
    created: weakref.WeakSet[Any] = weakref.WeakSet()

    @functools.wraps(orig_init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        orig_init(self, *args, **kwargs)
        created.add(self)

    @functools.wraps(orig_run)
    def run(self: Any, output_names: Any, input_feed: Any, run_options: Any = None) -> Any:
        if self not in created:
            return orig_run(self, output_names, input_feed, run_options)
        return on_run(self, output_names, input_feed, lambda names: orig_run(self, names, input_feed, run_options))

    cls.__init__, cls.run = __init__, run  # type: ignore[method-assign]

    def restore() -> None:
        cls.__init__, cls.run = orig_init, orig_run  # type: ignore[method-assign]

    return restore
# ---------------------------------------------------------------------- end session patching


# =====================================================================================================
# Graph cuts for transplant (recorders/ortcut.py, `trace triage`): the only onnx / onnxruntime calls
# the ONNX Runtime transplant makes.
# =====================================================================================================
CUT_SUFFIX = "/steptrace.own"


def cut_model(model: str | os.PathLike[str], names: Sequence[str], out_path: str | os.PathLike[str]) -> str:
    """Write a copy of ``model`` cut at ``names``: each value becomes a graph input that its
    consumers (and the graph output of that name, if any) read, so a session of the copy runs
    the rest of the graph on whatever value is fed for it. The producing node's output is
    renamed ``<name>/steptrace.own`` (computed, read by nobody).

    Args:
        model: the ONNX file (the exposed model the recorder runs; external data next to it).
        names: values to cut at (node outputs with an inferable tensor type).
        out_path: where to write the cut model (its weights go to ``<name>.data`` beside it).

    Returns:
        ``out_path`` as a string.

    Raises:
        RecorderUsageError: a name that is not a node output of the graph, or whose type
            cannot be inferred.
    """
    full = _load(model, weights=True)
    if any(uses_external_data(t) for t in full.graph.initializer):
        load_external_data_for_model(full, str(Path(model).parent))
    g = full.graph
    types = _infer_types(full)
    produced = {o: n for n in g.node for o in n.output if o}
    inputs = {i.name for i in g.input}
    for name in names:
        node = produced.get(name)
        if node is None:
            hint = "a graph input needs no cut: feed it" if name in inputs else "it is no node output of the graph"
            raise RecorderUsageError(f"cannot transplant ONNX value {name!r}: {hint}")
        vi = types.get(name)
        if vi is None or vi.type.WhichOneof("value") != "tensor_type":
            raise RecorderUsageError(f"cannot transplant ONNX value {name!r}: no tensor type can be inferred for it")
        node.output[list(node.output).index(name)] = name + CUT_SUFFIX
        new = g.input.add()
        new.CopyFrom(vi)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(full, str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{out.name}.data", size_threshold=1024)
    return str(out)


def session_like(path: str | os.PathLike[str], session: ort.InferenceSession) -> ort.InferenceSession:
    """Open ``path`` with the graph optimisation level and providers of ``session``.

    Args:
        path: an ONNX file.
        session: the session whose settings to copy.

    Returns:
        The new session.
    """
    so = ort.SessionOptions()
    so.graph_optimization_level = session.get_session_options().graph_optimization_level
    return ort.InferenceSession(str(path), so, providers=session.get_providers())


def run_unrouted(session: ort.InferenceSession, names: Sequence[str], feed: Mapping[str, Any]) -> list[Any]:
    """Run ``session`` with ONNX Runtime's own ``run``, past :func:`patch_sessions`' routing
    (a session the recorder opens itself while a script is recorded).

    Args:
        session: the session.
        names: outputs to fetch.
        feed: input name -> array.

    Returns:
        The outputs.
    """
    from onnxruntime.capi.onnxruntime_inference_collection import Session

    return Session.run(session, list(names), dict(feed))
# ---------------------------------------------------------------------- end graph cuts
