"""The recording of an open ONNX Runtime session's runs, over the session object (its input and
output names, providers, options and ``run``) and its model proto: the base of
:class:`~recorders.onnxruntime.OrtRecorder`, which opens sessions, loads protos and translates
ONNX Runtime's errors. Imports no framework.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import RecorderUsageError
from .onnxgraph import META_EXPOSED, META_SKIPPED, check_recordable, precision, producers
from .policy import PolicyLike
from .session import DEFAULT_POLICY, RunRecorder, logits_heads

__all__ = ["OrtSessionRecorder", "route_runs", "run_defaults"]


def run_defaults(session: Any, model: Any, proto: Any, version: str) -> dict[str, str | None]:
    """Return the metadata defaults of a run of ``session``.

    Args:
        session: an open ``InferenceSession``.
        model: the model's path (anything else: no ``model``).
        proto: its ``ModelProto``, or None when unknown (no ``precision``).
        version: the ONNX Runtime version.

    Returns:
        ``{"runtime": "onnxruntime", "runtime_version", "device", "model", "precision"}``.
    """
    return {"runtime": "onnxruntime", "runtime_version": version,
            "device": session.get_providers()[0].removesuffix("ExecutionProvider").lower(),
            "model": str(model) if isinstance(model, (str, os.PathLike)) else None,
            "precision": precision(proto.graph) if proto is not None else None}


class OrtSessionRecorder(RunRecorder):
    """Records the inputs, outputs and decisions of an open session, one step per :meth:`run`
    (the arguments and behaviour of :class:`~recorders.onnxruntime.OrtRecorder`, whose
    subclass supplies :meth:`_model_proto`, :meth:`_run_session` and :attr:`runtime_version`).

    Args:
        trace: the trace directory to write.
        session: the open ``InferenceSession``.
        tensors: capture policy (default :data:`recorders.session.DEFAULT_POLICY`).
        logits: output name of the ``token`` head, or ``{head: output name}``.
        position: the decided position of ``[1, T, V]`` logits, or ``"all"``.
        model: the session's model (path or ModelProto); None: the path it was opened from.
        **options: :class:`recorders.session.RunRecorder` options.

    Raises:
        RecorderUsageError: a logits name that is not an output of the session.
        TraceExistsError: a trace exists at ``trace`` and ``mode="create"``.
    """

    #: The runtime's version, for the metadata and tags.
    runtime_version: str = ""

    def __init__(
        self,
        trace: str | os.PathLike[str],
        session: Any,
        *,
        tensors: PolicyLike = None,
        logits: str | Mapping[str, str] | None = None,
        position: int | str = -1,
        model: Any = None,
        **options: Any,
    ) -> None:
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        bad = {h: n for h, n in logits_heads(logits).items() if n not in self.output_names}
        if bad:
            raise RecorderUsageError(f"logits output(s) {bad} are not outputs of the session; its outputs are "
                                     f"{', '.join(self.output_names)}")
        if model is None:
            model = getattr(session, "_model_path", None) or None
        proto = self._model_proto(model)
        self._producers = producers(proto.graph) if proto is not None else {}
        props = {p.key: p.value for p in proto.metadata_props} if proto is not None else {}
        level = session.get_session_options().graph_optimization_level.name
        exposed = json.loads(props.get(META_EXPOSED, "[]"))
        tags = {"onnxruntime.graph_optimization_level": level, "onnxruntime.providers": ",".join(session.get_providers()),
                "onnxruntime.version": self.runtime_version, "onnxruntime.exposed": str(len(exposed)),
                "onnxruntime.topology": "known" if proto is not None else "unknown (pass model=PATH)"}
        if props.get(META_SKIPPED, "{}") != "{}":
            tags["onnxruntime.exposure_skipped"] = props[META_SKIPPED]
        tags.update(options.pop("tags", None) or {})
        defaults = run_defaults(session, model, proto, self.runtime_version)
        defaults.update(options.pop("defaults", None) or {})
        if exposed and level != "ORT_DISABLE_ALL":
            warnings.warn(f"this session has {len(exposed)} exposed intermediates and runs at {level}: exposed values "
                          "block node fusions, so it runs other kernels than the unexposed model; record parity runs at "
                          "ORT_DISABLE_ALL (optimization='disable')", stacklevel=3)
        policy = DEFAULT_POLICY if tensors is None else tensors
        super().__init__(trace, policy=policy, logits=logits, position=position, defaults=defaults, tags=tags, **options)
        self._order = {n: self._producers.get(n, (len(self._producers), None)) for n in self.output_names}

    def _model_proto(self, model: Any) -> Any:
        """Return the ``ModelProto`` of ``model`` (a path, a ModelProto, or None: the session's
        own bytes, if any), or None when it is unknown (subclasses load it)."""
        return None

    def _run_session(self, fetch: list[str], feed: Mapping[str, Any], run_options: Any) -> list[Any]:
        """Run the session for ``fetch`` (subclasses translate the runtime's errors)."""
        return self.session.run(fetch, dict(feed), run_options)

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Any],
        run_options: Any = None,
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
        values = self._run_session(fetch, input_feed, run_options)
        out = dict(zip(fetch, values))
        self._begin_run()
        for name in self.input_names:
            if self.policy.mode(name) != "none":
                value = np.asarray(input_feed[name])
                check_recordable(name, value)
                self.record(name, value, source="graph input")
        for name in sorted(fetch, key=lambda n: self._order[n][0]):
            if self.policy.mode(name) != "none":
                check_recordable(name, out[name])
                self.record(name, out[name], source=self._order[name][1])
        self._decide_outputs(out)
        return [out[n] for n in wanted]

    def _signature(self) -> str:
        return ", ".join(f"{i.name}: {i.type}{i.shape}" for i in self.session.get_inputs())


def route_runs(cls: type, on_run: Any) -> Any:
    """Route ``run()`` of every instance of ``cls`` created from now on through ``on_run``.

    ``on_run(session, output_names, input_feed, run)`` must return what ``run()`` returns;
    ``run(names)`` runs the session for the output ``names`` with the caller's feed and run
    options. Sessions created before the patch run as before; ``run_with_iobinding`` and
    ``run_with_ort_values`` are not routed.

    Args:
        cls: the session class (``onnxruntime.InferenceSession``).
        on_run: the callback.

    Returns:
        A function that restores ``cls.__init__`` and ``cls.run``.
    """
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
