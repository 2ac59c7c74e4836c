"""Forward hooks on a model's named modules, and what they record: the capture and transplant
globs checked against the module names, one call index per module and step, small CPU outputs
copied in the hook and handed to the writer at the end of the step, tuple/list/dict outputs
named ``name.0`` / ``name.key``, outputs replaced by a reference's tensors (transplant).

:class:`ModuleRecorder` uses the modules and tensors through their own methods
(``named_modules``, ``register_forward_hook``, ``is_cpu``, ``clone``, ``numpy``, ...); its
framework subclass (:class:`~recorders.torch.TorchRecorder`) binds the framework's verbs as class
attributes: the tensor type, the dtypes of the CPU path, host data, decisions of its logits, and
tensors made from a reference's values (transplant).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
from steptrace.tracefmt import WriteSummary

from .capture import HostCopy, Recorder
from .decisions import Decision, LogitsKind, decide_with
from .errors import RecorderUsageError, TransplantMismatchError
from .policy import CapturePolicy, PolicyLike
from .steps import RepeatedRows

__all__ = ["ModuleRecorder"]


class ModuleRecorder(Recorder):
    """Records the outputs of a model's modules through forward hooks, step by step (the
    arguments and behaviour of :class:`~recorders.torch.TorchRecorder`).

    Args:
        trace: the trace directory to write.
        model: the root module.
        modules: capture policy over module names (``named_modules()`` paths).
        step_module: name of a module each call of which opens the next step.
        transplant: globs of module names whose outputs are replaced by the reference's.
        transplant_steps: the step indices at which ``transplant`` replaces outputs (None: every step).
        device_stats: reduce statistics on the tensor's device (None: for tensors not on the CPU).
        **options: :class:`recorders.capture.Recorder` options.

    Raises:
        RecorderUsageError: a module glob matches no module, ``step_module`` is not a module of
            the model, or ``transplant`` is given without a reference.
        TraceExistsError: a trace exists at ``trace`` and ``mode="create"``.
    """

    #: The framework's tensor class (outputs of other types are walked as containers or skipped).
    tensor_type: ClassVar[type]
    #: The dense layout (``torch.strided``): only such tensors take the CPU path.
    strided: ClassVar[Any]
    #: The CPU path's dtypes: framework dtype -> (SPEC.md name, dtype to view the bits as before
    #: ``.numpy()``, or None).
    lean: ClassVar[Mapping[Any, tuple[str, Any]]]
    #: CPU outputs up to this size are copied in the hook and handed to the writer at the end of
    #: the step (bigger ones go at once, into the writer's recycled buffers).
    small_bytes: ClassVar[int] = 64 << 10
    #: How the framework's logits become decisions (:class:`~recorders.decisions.LogitsKind`).
    logits_kind: ClassVar[LogitsKind]
    #: ``host_data(tensor, device_stats=...) -> (numpy view or HostCopy, SPEC.md dtype)``.
    host_data: ClassVar[Callable[..., tuple[np.ndarray | HostCopy, str]]]
    #: ``spec_dtype(tensor, name) -> SPEC.md dtype`` (raises UnsupportedDtypeError).
    spec_dtype: ClassVar[Callable[[Any, str], str]]
    #: ``from_reference(values, dtype, device) -> tensor``: a reference's values as a new tensor.
    from_reference: ClassVar[Callable[[np.ndarray, str, Any], Any]]

    def __init__(
        self,
        trace: str | os.PathLike[str],
        model: Any,
        *,
        modules: PolicyLike = None,
        step_module: str | None = None,
        transplant: Sequence[str] = (),
        transplant_steps: Container[int] | None = None,
        device_stats: bool | None = None,
        **options: Any,
    ) -> None:
        policy = CapturePolicy.coerce(modules)
        named = dict(model.named_modules())
        module_names = [n for n in named if n]
        missing = [g for g in policy.unmatched(module_names) if not g.startswith("logits:")]
        if missing:
            raise RecorderUsageError(
                f"module pattern(s) {', '.join(map(repr, missing))} match no module of {type(model).__name__}; "
                f"its modules are named like {', '.join(module_names[:6]) or '(none)'}"
            )
        transplant = [transplant] if isinstance(transplant, str) else list(transplant)
        if transplant and options.get("reference") is None:
            raise RecorderUsageError("transplant needs the reference trace to take tensors from: pass reference=PATH")
        bad = CapturePolicy(transplant).unmatched(module_names)
        if bad:
            raise RecorderUsageError(f"transplant pattern(s) {', '.join(map(repr, bad))} match no module")
        if step_module is not None and step_module not in named:
            raise RecorderUsageError(f"step_module {step_module!r} is not a module of {type(model).__name__}")
        tags = dict(options.pop("tags", None) or {})
        if transplant:
            tags["steptrace.transplant"] = ",".join(transplant)
        super().__init__(trace, policy=policy, tags=tags, **options)
        self.model = model
        self._device_stats = device_stats
        self._transplant_steps = transplant_steps
        # CPU tensors without a budget take the lean path (_record_cpu): the hooks run between
        # the model's own ops, with its caches cold, so every Python step there counts
        self._lean = self._ring is None and not device_stats
        # small CPU outputs of the open step: (step, name, source, values, numpy copy, SPEC.md
        # dtype), counted and handed to the writer by _finish_deferred in one loop
        self._pending: list[tuple] = []
        self._repeats = RepeatedRows()  # steps whose pending rows repeat the last ones'
        self._handles: list[Any] = []
        tp = CapturePolicy(transplant)
        for name, mod in named.items():
            mode, swap = policy.mode(name) if name else "none", bool(name) and tp.mode(name) != "none"
            if mode != "none" or swap:
                self._handles.append(mod.register_forward_hook(self._hook(name, type(mod).__name__, mode, swap)))
        if step_module is not None:
            self._handles.append(named[step_module].register_forward_pre_hook(lambda _m, _a: self._auto_step()))

    def _auto_step(self) -> None:
        self.begin_step()

    def _hook(self, name: str, source: str, mode: str, swap: bool) -> Any:
        if swap:
            def transplant_hook(_module: Any, _args: Any, output: Any) -> Any:
                self._finish_deferred()
                call = self.next_call(name)
                steps = self._transplant_steps
                if steps is not None and self._current().key.index not in steps:
                    if mode != "none":
                        self._record_output(name, call, output, source, mode)
                    return None
                output = self._transplant(name, call, output)
                if mode != "none":
                    self._record_output(name, call, output, f"{source} [transplanted]", mode)
                return output

            return transplant_hook
        values = mode == "full"
        tensor, strided, lean, small, u16 = self.tensor_type, self.strided, self.lean, self.small_bytes, np.uint16

        def hook(_module: Any, _args: Any, output: Any) -> None:
            st = self._step or self._current()
            if self._lean and type(output) is tensor and not self._closed:
                # The hook runs between the model's ops, with cold caches: it copies and
                # nothing more; _finish_deferred checks and counts at the end of the step.
                # A numpy copy, even with a writer process: copying each into its ring as it
                # came cost ~1.3 us more per output than a.copy() (clone() ~0.1-0.2 us more,
                # warm), and the step's copies go into the ring together. numpy() itself
                # refuses other devices and layouts (a torch attribute fewer to read each),
                # and tensors that require grad, copied detached.
                kind = lean.get(output.dtype)
                if kind is not None:
                    dt, bits = kind
                    try:
                        a = output.numpy() if bits is None else output.view(bits).numpy().view(u16)
                    except (TypeError, RuntimeError):
                        a = None
                        if output.requires_grad and output.is_cpu and output.layout == strided:
                            out = output.detach()
                            a = out.numpy() if bits is None else out.view(bits).numpy().view(u16)
                    if a is not None and a.nbytes <= small:
                        self._pending.append((st, name, source, values, a.copy(), dt))
                        return
                if output.is_cpu:
                    self._finish_deferred()
                    self._record_cpu(st, name, st.count(name), output, source, values)
                    return
            self._finish_deferred()
            self._record_output(name, self.next_call(name), output, source, mode)

        return hook

    def _finish_deferred(self) -> None:
        """Count and hand to the writer the small outputs the hooks copied (in hook order).

        A decode loop's steps repeat their rows: the same modules, outputs of the same dtypes
        and shapes, in the same order. When a step's first records are the rows of the step
        before, and were those of the step before that too, they go from a
        :class:`~tracefmt.lane.RowTemplate` of them: only the arrays (and the step) travel."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        st = pending[0][0]
        lane = self.writer.lane
        # the step's first records (of one step: the hooks' is always the open one): their
        # calls and orders follow from the rows alone
        first = not st.calls and pending[-1][0] is st
        if first:
            sig = [(name, source, values, dt, a.shape) for _, name, source, values, a, dt in pending]
            if self._repeats.repeat(lane, st, sig, [p[4] for p in pending]):
                return
        rows = []
        for st, name, source, values, a, dt in pending:
            order = st.order
            st.order = order + 1
            key = st.key
            rows.append((key.sample, key.index, name, st.count(name), order, source, dt, a, values))
        if first:
            self._repeats.saw(lane, rows[0][4], sig, rows, st.calls)
        lane.tensor_rows(rows)  # the copies are ours already

    def _record_cpu(self, st: Any, name: str, call: int, t: Any, source: str, values: bool) -> None:
        """Record a CPU tensor output: :meth:`Recorder.record`'s work in as few Python steps as
        possible (the writer copies the numpy view before returning)."""
        if t.dtype not in self.lean or self._closed or t.layout != self.strided:
            self.record(name, t, call=call, source=source, mode="full" if values else "stats")
            return
        self._row(st, name, call, t.detach() if t.requires_grad else t, source, values, copy=True)

    def _row(self, st: Any, name: str, call: int, t: Any, source: str, values: bool, *, copy: bool) -> None:
        """Hand the writer the row of CPU tensor ``t`` (a dtype of :attr:`lean`) at the next order."""
        dt, bits = self.lean[t.dtype]
        a = t.numpy() if bits is None else t.view(bits).numpy().view(np.uint16)
        order = st.order
        st.order = order + 1
        key = st.key
        self.writer.lane.tensor_row(key.sample, key.index, name, call, order, source, dt, a, values, copy=copy)

    def _record_output(self, name: str, call: int, out: Any, source: str, mode: str) -> None:
        if isinstance(out, self.tensor_type):
            self.record(name, out, call=call, source=source, mode=mode)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                self._record_output(f"{name}.{i}", call, o, source, mode)
        elif isinstance(out, Mapping):
            for key, o in out.items():
                self._record_output(f"{name}.{key}", call, o, source, mode)
        # anything else (None, ints, custom objects) holds no tensor to record

    def _transplant(self, name: str, call: int, out: Any) -> Any:
        if isinstance(out, self.tensor_type):
            return self._replacement(name, call, out)
        if isinstance(out, tuple) and hasattr(out, "_fields"):
            return type(out)(*(self._transplant(f"{name}.{i}", call, o) for i, o in enumerate(out)))
        if isinstance(out, (tuple, list)):
            return type(out)(self._transplant(f"{name}.{i}", call, o) for i, o in enumerate(out))
        if isinstance(out, dict):
            new = copy.copy(out)  # keeps the mapping's class (OrderedDict, Hugging Face ModelOutput)
            for key, o in out.items():
                new[key] = self._transplant(f"{name}.{key}", call, o)
            return new
        return out


    def to_host(self, value: Any, dtype: str | None) -> tuple[np.ndarray | HostCopy, str | None]:
        """View a CPU tensor as numpy (bfloat16 as uint16 bits; valid until the model reuses its
        memory, so callers copy before returning); wrap other devices' tensors
        (or every tensor, with ``device_stats=True``) in a :class:`~recorders.hostcopy.HostCopy`.

        Args:
            value: a tensor, or anything :meth:`Recorder.to_host` accepts.
            dtype: SPEC.md dtype override for non-tensors.

        Returns:
            ``(host data, SPEC.md dtype)``.

        Raises:
            UnsupportedDtypeError: complex, quantized, sparse or float8 tensors.
        """
        if not isinstance(value, self.tensor_type):
            return super().to_host(value, dtype)
        return self.host_data(value, device_stats=self._device_stats)

    def host_logits(self, logits: Any) -> np.ndarray | None:
        """A numpy view of CPU tensor logits, None for logits on a device (decided there by
        :meth:`decide_logits`); other logits as :meth:`Recorder.host_logits` takes them.

        Args:
            logits: the logits given to :meth:`decide`.
        """
        if isinstance(logits, self.tensor_type):
            return self.logits_kind.host(logits)
        return super().host_logits(logits)

    def decide_logits(self, logits: Any, *, chosen: int | None, watched: Any) -> Decision:
        """Decide tensor logits where they live (:attr:`logits_kind`); other logits as
        :meth:`Recorder.decide_logits` does.

        Args:
            logits: 1-d logits.
            chosen: the id used (None: the argmax).
            watched: ids to watch.

        Returns:
            The :class:`tracefmt.decisions.Decision`.

        Raises:
            TraceUsageError: malformed logits or ids.
        """
        if isinstance(logits, self.tensor_type):
            return decide_with(self.logits_kind, logits, k=self.k, chosen=chosen, watched=watched)
        return super().decide_logits(logits, chosen=chosen, watched=watched)

    def _replacement(self, name: str, call: int, t: Any) -> Any:
        ref = self.reference_tensor(name, call=call)
        dt = self.spec_dtype(t, name)
        if ref.dtype != dt or tuple(ref.values.shape) != tuple(t.shape):
            key = self.current_step
            raise TransplantMismatchError(
                f"transplant of {name!r} (call {call}) at sample {key.sample!r} step {key.index}: the reference "
                f"holds {ref.dtype}{list(ref.values.shape)} but this run produced {dt}{list(t.shape)}; transplant "
                "between runs with the same shapes and dtype (record the reference in the candidate's precision)"
            )
        return self.from_reference(ref.values, dt, t.device)

    def close(self) -> WriteSummary:
        """Remove the hooks, then close as :meth:`recorders.capture.Recorder.close` does.

        Returns:
            The writer's :class:`steptrace.tracefmt.WriteSummary`.
        """
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return super().close()
