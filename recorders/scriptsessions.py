"""The ONNX Runtime half of :class:`recorders.scripthooks.ScriptRecorder`: each
``InferenceSession.run`` of a recorded script is routed through :meth:`SessionHooks.ort_run`
(by :func:`recorders.onnxruntime.patch_sessions`), which records inputs and outputs under
``STEM.value`` names, decides the logits output and ends the step. onnxruntime itself is not
imported here.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .scriptnames import any_match

__all__ = ["SessionHooks"]


@dataclass
class _Session:
    prefix: str
    inputs: list[str]
    outputs: list[str]
    order: dict[str, tuple[int, str]]
    logits: str | None
    defaults: dict[str, Any] = field(default_factory=dict)
    starts_sample: bool = False


class SessionHooks:
    """Mixin of :class:`~recorders.scripthooks.ScriptRecorder` for ONNX Runtime sessions; uses
    its bookkeeping (labels, globs, samples, steps, the writing section)."""

    def _session(self, session: Any) -> _Session:
        info = self._sessions.get(session)
        if info is None:
            from .onnxruntime import session_defaults, session_topology

            defaults = session_defaults(session)
            stem = os.path.splitext(os.path.basename(defaults.get("model") or "session"))[0]
            label = self._label(stem)
            prefix = f"{label}."
            inputs = [i.name for i in session.get_inputs()]
            outputs = [o.name for o in session.get_outputs()]
            order = session_topology(session)
            logits = next((o for o in outputs if self._is_logits(prefix + o, o)), None)
            info = _Session(prefix, inputs, outputs, order, logits, defaults,
                            starts_sample=any_match(self.sample_per, label, ""))
            self._sessions[session] = info
            self._seen(label, "")
            for value in dict.fromkeys([*inputs, *sorted(order, key=lambda v: order[v][0]), *outputs]):
                self._seen(prefix + value, value)
        return info

    def _value_mode(self, info: _Session, name: str) -> str:
        return self._mode(info.prefix + name, name)

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
        if info.starts_sample:
            with self._writing():
                self._start_sample(info.prefix[:-1])
        if self._before_first_sample(info.prefix[:-1]):
            return run(list(info.outputs if output_names is None else output_names))
        wanted = list(info.outputs if output_names is None else output_names)
        extra = [n for n in info.outputs if n not in wanted
                 and (n == info.logits or self._value_mode(info, n) != "none")]
        fetch = wanted + extra
        out = dict(zip(fetch, run(fetch)))
        recorded = [n for n in info.inputs if self._value_mode(info, n) != "none"]
        outs = sorted((n for n in out if self._value_mode(info, n) != "none"),
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
                    self._record(rec, info.prefix + name, arr, None, source, self._value_mode(info, name))
                if info.logits is not None:
                    arr = np.asarray(out[info.logits])
                    token = self._decide(rec, info.prefix + info.logits, arr)
                    if rec.teacher_forcing:
                        out[info.logits] = self._forced(arr, token)
        if self.depth == 0 and self._decided:
            self._end_step()
        return [out[n] for n in wanted]

