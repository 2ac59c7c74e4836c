"""What ``trace record`` installs in a running script: global torch module hooks and patched
ONNX Runtime sessions that turn module calls and session runs into steps, tensors and decisions.
Imports no ML framework: :mod:`recorders.torch` and :mod:`recorders.onnxruntime` are imported
by :mod:`recorders.script` once the script itself imports torch or onnxruntime.

Names. A torch module is named when it is first called: the outermost module of a call (a
*root*) names its whole tree with ``named_modules()`` paths, as :class:`~recorders.torch.TorchRecorder`
does; the root itself is named by its class (``GRULM``). Modules of later roots are prefixed
with that root's class (``Encoder.layers.0``; ``GRULM#1`` for a second root of a class). Tuple
outputs are recorded as ``name.0``, ``name.1``, dict outputs as ``name.key``. ONNX values keep
their graph names (the first session's; later sessions are prefixed with their model's stem).

Steps. Tensors recorded with no step open open the next step of the current sample (the
``STEPTRACE_SAMPLE`` environment variable when the script sets it, else the default sample).
A call of a module, or a run of a session, whose output matches a ``logits`` glob records a
decision on its last position (``t[0, ..., 0, -1, :]``; the first row of a batch) and ends the
step once the outermost module call returns (another logits call before that also ends it).

Teacher forcing. With a reference, the logits returned to the script are replaced by a copy
whose decided vector is -inf except at the reference's token (which keeps its own logit), so
the script's own argmax or sampling takes the reference's token; the trace records
``forced=true`` and the run's own argmax. The script's control flow is otherwise unchanged.
"""

from __future__ import annotations

import fnmatch
import os
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tracefmt import TraceMetadata, WriteSummary
from tracefmt.errors import TraceError, UnsupportedDtypeError

from .capture import HostCopy, Recorder, Reference
from .decisions import is_torch_tensor
from .errors import RecorderUsageError
from .outputs import decided_index, element_at, elements, peak_numpy, replace_element
from .policy import CapturePolicy

__all__ = ["SAMPLE_ENV", "ScriptRecorder"]

#: The environment variable a script sets to name the sample of the steps that follow.
SAMPLE_ENV = "STEPTRACE_SAMPLE"
_SELF = ()  # logits path: the module output itself (or its first tensor)


class _HostRecorder(Recorder):
    """A :class:`Recorder` that also takes torch tensors (through :mod:`recorders.torch`)."""

    def to_host(self, value: Any, dtype: str | None) -> tuple[np.ndarray | HostCopy, str | None]:
        if is_torch_tensor(value):
            from .torch import tensor_to_host

            return tensor_to_host(value)
        return super().to_host(value, dtype)


@dataclass
class _Mod:
    name: str
    source: str
    mode: str
    logits: tuple | bool | None  # element path, False (never), None (not known before its first output)


@dataclass
class _Session:
    prefix: str
    inputs: list[str]
    outputs: list[str]
    order: dict[str, tuple[int, str]]
    logits: str | None
    defaults: dict[str, Any] = field(default_factory=dict)


class ScriptRecorder:
    """Records a running script's torch module calls and ONNX Runtime runs into one trace.

    :mod:`recorders.script` connects :meth:`torch_pre`/:meth:`torch_post` to global module
    hooks and :meth:`ort_run` to patched sessions; the trace is created at the first record
    (its ``runtime`` metadata is that of the framework recorded first).

    Args:
        trace: the trace directory to write.
        modules: globs of module names and ONNX value names to record.
        logits: globs of the module (or output element, ``GRULM.0``) or session output whose
            last position is decided at each call.
        tensors: capture mode of the ``modules`` matches: ``"stats"``, ``"full"`` or ``"none"``.
        reference: a reference trace for teacher forcing (see the module docs).
        sample: the sample id when the script does not set ``STEPTRACE_SAMPLE``.
        k: top-k candidates per decision.
        mode: the writer's ``"create"`` or ``"overwrite"``.
        metadata: run metadata (``command``, ``model``, ``tags``, ...).
        progress: called with the number of steps decided after each step.
        all_positions: decide every position (``t[0, ..., 0, :, :]``, one step each) instead of
            the last.
        open_loop: heads not fed back (manifest ``open_loop``); None: ``["token"]`` with
            ``all_positions``, none otherwise.

    Raises:
        RecorderUsageError: a bad option, or a reference (teacher forcing) with an open-loop
            ``token`` head: ids that are not fed back have nothing to force.
        TraceNotFoundError: the reference trace does not exist.
    """

    def __init__(
        self,
        trace: str | os.PathLike[str],
        *,
        modules: Sequence[str] = (),
        logits: Sequence[str] = (),
        tensors: str = "stats",
        reference: str | os.PathLike[str] | None = None,
        sample: str = "0",
        k: int = 8,
        mode: str = "create",
        metadata: Mapping[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
        all_positions: bool = False,
        open_loop: Sequence[str] | None = None,
    ) -> None:
        self.all_positions = all_positions
        self.open_loop = list(open_loop) if open_loop is not None else ["token"] if all_positions else []
        if reference is not None and (all_positions or "token" in self.open_loop):
            raise RecorderUsageError("--teacher has nothing to force: the decided head is open-loop (its ids are not "
                                     "fed back); record without --teacher")
        self.trace = trace
        self.policy = CapturePolicy({g: tensors for g in modules} if tensors != "none" else None)
        self.logits = list(logits)
        self.reference = Reference(reference) if reference is not None else None
        self.sample = sample
        self.k = k
        self.mode = mode
        self.metadata = dict(metadata or {})
        self.progress = progress
        self.rec: _HostRecorder | None = None
        self.steps = 0
        self.error: TraceError | None = None
        self.notes: list[str] = []
        self.names: list[str] = []  # names seen (modules, session values), for messages
        self.busy = 0  # > 0 while a hook writes: Ctrl-C waits for it (see recorders.script)
        self.interrupted = False
        self._depth = 0
        self._decided = False
        self._mods: weakref.WeakKeyDictionary[Any, _Mod] = weakref.WeakKeyDictionary()
        self._sessions: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()
        self._labels: set[str] = set()
        self._roots = 0
        self._warned: set[str] = set()
        self._logits_hit: set[str] = set()
        self._recorded: set[str] = set()

    # ------------------------------------------------------------------ bookkeeping
    def _note(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.notes.append(message)

    def _is_logits(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, g) for g in self.logits)

    def _label(self, cls: str) -> str:
        label, n = cls, 1
        while label in self._labels:
            label, n = f"{cls}#{n}", n + 1
        self._labels.add(label)
        return label

    def _recorder(self, defaults: Callable[[], Mapping[str, Any]]) -> _HostRecorder:
        if self.rec is None:
            meta = TraceMetadata.coerce(dict(self.metadata))
            self.rec = _HostRecorder(self.trace, policy=self.policy, reference=self.reference, sample=self.sample,
                                     k=self.k, metadata=meta, defaults=dict(defaults()), mode=self.mode,
                                     open_loop=self.open_loop)
        return self.rec

    def _open_step(self, rec: Recorder) -> None:
        if rec.current_step is None:
            rec.begin_step(sample=os.environ.get(SAMPLE_ENV) or self.sample)

    def _end_step(self) -> None:
        if self.rec is not None:
            self.rec.end_step()
        if self._decided:
            self._decided = False
            self.steps += 1
            if self.progress is not None:
                self.progress(self.steps)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Mark a hook's writing section: Ctrl-C is held until it ends; TraceErrors are kept."""
        self.busy += 1
        try:
            yield
        except TraceError as exc:
            self.error = exc
            raise
        finally:
            self.busy -= 1
        if self.interrupted and not self.busy:
            self.interrupted = False
            raise KeyboardInterrupt

    def _record(self, rec: Recorder, name: str, value: Any, call: int | None, source: str | None, mode: str) -> None:
        try:
            rec.record(name, value, call=call, source=source, mode=mode)
        except UnsupportedDtypeError as exc:
            self._note(f"dtype:{name}", f"{name} not recorded: {exc}")
            return
        self._recorded.add(name)

    def _decide(self, rec: Recorder, name: str, t: Any) -> int:
        shape = tuple(t.shape)
        if len(shape) >= 3 and shape[0] > 1:
            self._note(f"batch:{name}", f"logits {name} have shape {list(shape)}: `trace record` decides the first "
                       "row of the batch only; record batches with the API (recorders.hf, TorchRecorder.decide)")
        if self.all_positions and len(shape) >= 2:
            ids = rec.decide_positions(t[(0,) * (len(shape) - 2)], fed_back=True)
            self.steps += len(ids) - 1  # _end_step counts one step
            token = ids[-1] if ids else -1
        else:
            token = rec.decide(t[decided_index(shape)])
        self._decided = True
        self._logits_hit.add(name)
        return token

    # ------------------------------------------------------------------ torch
    def _name_tree(self, root: Any) -> None:
        label = self._label(type(root).__name__)
        prefix = "" if self._roots == 0 else f"{label}."
        self._roots += 1
        for path, mod in root.named_modules():
            if mod in self._mods:
                continue
            name = f"{prefix}{path}" if path else label
            logits = _SELF if self._is_logits(name) else None
            self._mods[mod] = _Mod(name, type(mod).__name__, self.policy.mode(name), logits)
            if len(self.names) < 64:
                self.names.append(name)

    def torch_pre(self, module: Any) -> None:
        """Before a module's forward: name it (and its tree) at its first call; count depth."""
        if module not in self._mods:
            self._name_tree(module)
        self._depth += 1

    def torch_post(self, module: Any, output: Any) -> Any:
        """After a module's forward: record its output, decide logits, end the step at the
        outermost return. Returns the output to use (teacher forcing) or None.

        Raises:
            TraceError: recording failed, or teacher forcing ran past the reference.
        """
        self._depth = max(self._depth - 1, 0)
        info = self._mods.get(module)
        result = None
        if info is not None and output is not None and (info.mode != "none" or info.logits is not False):
            with self._writing():
                result = self._torch_output(module, info, output)
        if self._depth == 0 and self._decided:
            self._end_step()
        return result

    def _logits_path(self, info: _Mod, output: Any) -> tuple | None:
        if info.logits is None:  # first output seen: does an element match a logits glob?
            hits = [p for n, p, _ in elements(info.name, output) if p and self._is_logits(n)]
            info.logits = hits[0] if hits else False
        if info.logits is False:
            return None
        if info.logits == _SELF and not is_torch_tensor(output):
            elems = list(elements(info.name, output))
            by_key = [p for _, p, _ in elems if p and p[-1] == "logits"]
            return by_key[0] if by_key else (elems[0][1] if elems else None)
        return info.logits  # type: ignore[return-value]

    def _torch_output(self, module: Any, info: _Mod, output: Any) -> Any:
        path = self._logits_path(info, output)
        if info.mode == "none" and path is None:
            return None
        from .torch import torch_defaults

        rec = self._recorder(lambda: torch_defaults(module))
        if path is not None and self._decided:
            self._end_step()  # a second logits call inside one outer call: the next step
        self._open_step(rec)
        call = rec.next_call(info.name)
        if info.mode != "none":
            for name, _, t in elements(info.name, output):
                self._record(rec, name, t, call, info.source, info.mode)
            self._recorded.add(info.name)
        if path is None:
            return None
        t = element_at(output, path)
        hit = info.name if info.logits == _SELF else ".".join([info.name, *map(str, path)])
        token = self._decide(rec, hit, t)
        if not rec.teacher_forcing:
            return None
        from .torch import peak_at

        return replace_element(output, path, peak_at(t, decided_index(tuple(t.shape)), token))

    # ------------------------------------------------------------------ ONNX Runtime
    def _session(self, session: Any) -> _Session:
        info = self._sessions.get(session)
        if info is None:
            from .onnxruntime import session_defaults, session_topology

            defaults = session_defaults(session)
            stem = os.path.splitext(os.path.basename(defaults.get("model") or "session"))[0]
            prefix = "" if not self._sessions else f"{self._label(stem)}."
            outputs = [o.name for o in session.get_outputs()]
            logits = next((o for o in outputs if self._is_logits(prefix + o)), None)
            info = _Session(prefix, [i.name for i in session.get_inputs()], outputs, session_topology(session),
                            logits, defaults)
            self._sessions[session] = info
            self.names.extend(prefix + o for o in outputs[:16])
        return info

    def ort_run(self, session: Any, output_names: Sequence[str] | None, feed: Mapping[str, Any],
                run: Callable[[list[str]], list[Any]]) -> list[Any]:
        """One ``InferenceSession.run``: run it (with the logits and recorded outputs added),
        record inputs and outputs, decide the logits output, end the step.

        Args:
            session: the session.
            output_names: the outputs the script asked for (None: all).
            feed: the script's input feed.
            run: runs the session for a list of output names.

        Returns:
            The outputs the script asked for (the logits forced under teacher forcing).

        Raises:
            TraceError: recording failed, or teacher forcing ran past the reference.
        """
        info = self._session(session)
        wanted = list(info.outputs if output_names is None else output_names)
        extra = [n for n in info.outputs if n not in wanted
                 and (n == info.logits or self.policy.mode(info.prefix + n) != "none")]
        fetch = wanted + extra
        out = dict(zip(fetch, run(fetch)))
        recorded = [n for n in info.inputs if self.policy.mode(info.prefix + n) != "none"]
        outs = sorted((n for n in out if self.policy.mode(info.prefix + n) != "none"),
                      key=lambda n: info.order.get(n, (len(info.order), ""))[0])
        if recorded or outs or info.logits is not None:
            with self._writing():
                rec = self._recorder(lambda: info.defaults)
                if info.logits is not None and self._decided:
                    self._end_step()
                self._open_step(rec)
                for name, value, source in ([(n, feed.get(n), "graph input") for n in recorded]
                                            + [(n, out[n], info.order.get(n, (0, None))[1]) for n in outs]):
                    arr = value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else value
                    arr = np.asarray(arr)
                    if arr.dtype.kind in "OUSVc":
                        self._note(f"dtype:{name}", f"{info.prefix}{name} not recorded: {arr.dtype} values")
                        continue
                    self._record(rec, info.prefix + name, arr, None, source, self.policy.mode(info.prefix + name))
                if info.logits is not None:
                    arr = np.asarray(out[info.logits])
                    token = self._decide(rec, info.prefix + info.logits, arr)
                    if rec.teacher_forcing:
                        out[info.logits] = peak_numpy(arr, decided_index(arr.shape), token)
        if self._depth == 0 and self._decided:
            self._end_step()
        return [out[n] for n in wanted]

    # ------------------------------------------------------------------ end
    def unmatched(self) -> tuple[list[str], list[str]]:
        """Return the ``logits`` globs that decided nothing and the ``modules`` globs that
        recorded nothing."""
        logits = [g for g in self.logits if not any(fnmatch.fnmatchcase(n, g) for n in self._logits_hit)]
        modules = [g for g, _ in self.policy.rules if not any(fnmatch.fnmatchcase(n, g) for n in self._recorded)]
        return logits, modules

    def close(self) -> WriteSummary:
        """Close the trace (creating an empty one if the script recorded nothing).

        Returns:
            The writer's :class:`tracefmt.WriteSummary`.

        Raises:
            TraceWriteError: writing failed.
        """
        if self._decided:
            self._end_step()
        rec = self._recorder(dict)
        try:
            return rec.close()
        finally:
            if self.reference is not None:
                self.reference.close()
