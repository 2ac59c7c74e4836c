"""ONNX Runtime recorder: every ``run()`` of an ``InferenceSession`` is a step (or part of one),
its inputs and outputs recorded under the capture policy, a logits output decided; and
:func:`expose_intermediates`, which marks node outputs as graph outputs (Polygraphy's "mark
all") so the recorder sees them. The only module that imports onnxruntime or onnx (the framework-free
work: :mod:`~recorders.onnxgraph`, :mod:`~recorders.ortsession`).

    path, names = expose_intermediates("model.onnx", ["/blocks.*/attn/*", "/ln_f/*"])
    with OrtRecorder("cand.trace", path, tensors={"*": "stats"}, logits="logits",
                     optimization="disable") as rec:
        for t in range(max_steps):              # each run() opens the next step
            rec.run(None, {"tokens": np.array([tokens])})
            tokens.append(rec.token)            # the decided token (teacher forcing: the reference's)

Names are ONNX value names; ``source`` is the producing node (``"/ln_f/LayerNormalization
(LayerNormalization)"``, ``"graph input"``); ``order`` is inputs first, then outputs in the
graph's topological order, which is the differ's culprit order.

**Graph optimisation changes what you see** (docs/recorders_onnx_coreml.md has the measurements):
ONNX Runtime folds and fuses nodes before running the graph, and exposing a value that a fusion
would remove blocks that fusion, so the exposed model runs other kernels than the one you ship.
Record parity runs with exposed intermediates at ``ORT_DISABLE_ALL`` (``optimization="disable"``:
exposed and unexposed models then give bit-identical outputs), or at ``ORT_ENABLE_EXTENDED`` when
speed matters (never ALL for fp16 recurrent models), and compare runs recorded at the same level.
The level, providers and ORT version are in every trace's tags (``onnxruntime.graph_optimization_level``,
``onnxruntime.providers``, ``onnxruntime.version``); exposed intermediates above ``ORT_DISABLE_ALL`` warn.
"""

from __future__ import annotations

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

from .errors import RecorderUsageError
from .onnxgraph import CUT_SUFFIX as CUT_SUFFIX
from .onnxgraph import META_EXPOSED, META_SKIPPED, cut_graph, producers, select_exposed, set_metadata
from .ortsession import OrtSessionRecorder, route_runs, run_defaults
from .policy import PolicyLike
from .session import Exposure

__all__ = ["Exposure", "OrtRecorder", "expose_intermediates"]

_PROTO_LIMIT = 2**31 - 2**26  # protobuf cannot serialise 2 GiB; keep a margin for the graph itself
_LEVELS = {"disable": "ORT_DISABLE_ALL", "basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED",
           "layout": "ORT_ENABLE_LAYOUT", "all": "ORT_ENABLE_ALL"}


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
    names, skipped, fixed = select_exposed(g, types, pats, constants=constants)
    unusual = {k: v for k, v in skipped.items() if k not in fixed}
    if unusual:
        warnings.warn(f"{len(unusual)} value(s) not exposed: " +
                      "; ".join(f"{k}: {v}" for k, v in list(unusual.items())[:10]), stacklevel=2)
    set_metadata(full, ((META_EXPOSED, json.dumps(names)), (META_SKIPPED, json.dumps(skipped))))
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


class OrtRecorder(OrtSessionRecorder):
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

    runtime_version = ort.__version__

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
        super().__init__(trace, session, tensors=tensors, logits=logits, position=position, model=model, **options)

    def _model_proto(self, model: str | os.PathLike[str] | onnx.ModelProto | None) -> onnx.ModelProto | None:
        raw = getattr(self.session, "_model_bytes", None) if model is None else None
        return _load(model, weights=False) if model is not None else onnx.load_from_string(raw) if raw else None

    def _run_session(self, fetch: list[str], feed: Mapping[str, Any], run_options: Any) -> list[Any]:
        try:
            return self.session.run(fetch, dict(feed), run_options)
        except InvalidArgument as exc:
            given = ", ".join(f"{k}: {np.asarray(v).dtype}{list(np.shape(v))}" for k, v in feed.items())
            raise RecorderUsageError(f"ONNX Runtime refused the inputs ({exc}); given {given}; the session takes "
                                     f"{self._signature()}") from exc


# ---------------------------------------------------------------------- the int8 copy of `trace demo`
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


# ---------------------------------------------------------------------- sessions of a recorded script
def _session_model(session: ort.InferenceSession) -> tuple[str | None, onnx.ModelProto | None]:
    """The path ``session`` was opened from and its model (None where unknown: from bytes, file gone)."""
    path = getattr(session, "_model_path", None) or None
    if path is None:
        return None, None
    try:
        return path, _load(path, weights=False)
    except RecorderUsageError:
        return path, None


def session_defaults(session: ort.InferenceSession) -> dict[str, str | None]:
    """Return the metadata defaults of a run of ``session`` (as :class:`OrtRecorder` fills them).

    Args:
        session: an open session.

    Returns:
        ``{"runtime": "onnxruntime", "runtime_version", "device", "model", "precision"}``.
    """
    path, proto = _session_model(session)
    return run_defaults(session, path, proto, ort.__version__)


def session_topology(session: ort.InferenceSession) -> dict[str, tuple[int, str]]:
    """Value name -> (topological index, producing node) of the session's model; empty when the
    session was opened from bytes or its file cannot be read (order then follows the outputs).

    Args:
        session: an open session.

    Returns:
        The mapping (graph inputs and initializers at index -1).
    """
    _, proto = _session_model(session)
    return producers(proto.graph) if proto is not None else {}


def patch_sessions(on_run: Any) -> Any:
    """Route ``run()`` of every ``InferenceSession`` created from now on through ``on_run``
    (:func:`recorders.ortsession.route_runs`, which gives the callback's contract).

    Args:
        on_run: the callback.

    Returns:
        A function that restores ``InferenceSession.__init__`` and ``run``.
    """
    return route_runs(ort.InferenceSession, on_run)


# ---------------------------------------------------------------------- graph cuts for transplant
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
    cut_graph(g, types, names)
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
