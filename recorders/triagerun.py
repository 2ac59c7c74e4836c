"""How ``trace triage`` re-runs a candidate: one :class:`Runner` per way of running it.

A runner records one teacher-forced re-run of the candidate into a fresh trace, with the named
tensors replaced by the reference's recorded values at the chosen steps (no names: a plain
re-run). Every runner records the tensors it can transplant with values (capture ``"full"``),
so local errors can be measured from its traces.

- :class:`TorchRun`: your own loop over a torch model, driven by ``run_fn(recorder)`` with a
  :class:`~recorders.torch.TorchRecorder` (forward-hook output replacement).
- :class:`OrtRun`: your own loop over an ONNX Runtime model, ``run_fn(recorder)`` with a
  :class:`~recorders.ortcut.TransplantOrtRecorder` (the graph is cut at the transplanted values).
- :class:`ScriptRun`: an unmodified script run as ``trace record`` runs it
  (:func:`recorders.script.run_script`), torch module outputs replaced in the module-call hooks.

None of this imports a framework at import time.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import tempfile
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import RecorderUsageError, RerunFailedError
from .outputs import element_at, elements, replace_element
from .reference import Reference
from .scripthooks import ScriptRecorder

__all__ = ["OrtRun", "Runner", "ScriptRun", "TorchRun", "TransplantScriptRecorder"]


class Runner(Protocol):
    """What :func:`recorders.triage.triage` needs to re-run a candidate.

    Attributes:
        runtime: the runtime's name, for the report (``torch``, ``onnxruntime``).
        label: what is re-run, for the report (a script, a model).
        excluded: tensor names never transplanted: the decided logits themselves.
    """

    runtime: str
    label: str
    excluded: Sequence[str]

    def rerun(self, trace: str, reference: Reference, transplant: Sequence[str], steps: Container[int] | None) -> None:
        """Record one teacher-forced re-run into ``trace``.

        Args:
            trace: a trace directory that does not exist yet.
            reference: the reference (tokens for teacher forcing, values to transplant).
            transplant: tensor names to replace by the reference's values.
            steps: the step indices where they are replaced (None: every step).

        Raises:
            RerunFailedError: the candidate failed.
            TraceError: recording or transplanting failed.
        """
        ...


def _is_excluded(name: str, globs: Sequence[str]) -> bool:
    import fnmatch

    # as `trace record` matches globs: the full name, or the name after its root's label
    names = [name] + ([name.split(".", 1)[1]] if "." in name else [])
    return any(fnmatch.fnmatchcase(n, g) or n.startswith(g + ".") for n in names for g in globs)


@dataclass
class TorchRun:
    """Re-runs of a torch model driven by your own decode loop.

    ``run_fn(rec)`` runs the candidate once with the :class:`~recorders.torch.TorchRecorder`
    it is given (``token = rec.decide(logits)`` at each step, as in any recording).

    Args:
        model: the candidate's root module.
        run_fn: runs the decode loop once.
        modules: globs of the module names to record (and so to search).
        logits: the module whose output is decided (never transplanted), if it is recorded.
        step_module: as :class:`TorchRecorder`'s ``step_module``.
        options: further :class:`TorchRecorder` options (``sample``, ``k``, ``watched``, ...).
    """

    model: Any
    run_fn: Callable[[Any], None]
    modules: Sequence[str] = ("*",)
    logits: str | None = None
    step_module: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    runtime: str = "torch"

    @property
    def label(self) -> str:
        """The model's class name."""
        return type(self.model).__name__

    @property
    def excluded(self) -> list[str]:
        """The decided module's outputs."""
        return [self.logits] if self.logits else []

    def _module_of(self, name: str, known: set[str]) -> str:
        while name not in known and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    def rerun(self, trace: str, reference: Reference, transplant: Sequence[str], steps: Container[int] | None) -> None:
        """See :meth:`Runner.rerun`."""
        from .torch import TorchRecorder

        known = {n for n, _ in self.model.named_modules() if n}
        mods = sorted({self._module_of(n, known) for n in transplant})
        with TorchRecorder(trace, self.model, modules={g: "full" for g in self.modules}, step_module=self.step_module,
                           transplant=mods, transplant_steps=steps, reference=reference, **self.options) as rec:
            self.run_fn(rec)


@dataclass
class OrtRun:
    """Re-runs of an ONNX Runtime model driven by your own decode loop.

    ``run_fn(rec)`` runs the candidate once with the recorder it is given: call
    ``rec.run(None, feed)`` per step and feed ``rec.token`` back, as with an
    :class:`~recorders.onnxruntime.OrtRecorder`.

    Args:
        model: the ONNX file, with the intermediates to search exposed
            (:func:`recorders.onnxruntime.expose_intermediates`).
        run_fn: runs the decode loop once.
        logits: the logits output (or ``{head: output}``), as for :class:`OrtRecorder`.
        optimization: graph optimisation level (default ``"disable"``: exposed values then
            run the same kernels as the plain model).
        options: further :class:`OrtRecorder` options.
    """

    model: str | os.PathLike[str]
    run_fn: Callable[[Any], None]
    logits: str | dict[str, str] = "logits"
    optimization: str = "disable"
    options: dict[str, Any] = field(default_factory=dict)
    runtime: str = "onnxruntime"

    @property
    def label(self) -> str:
        """The model's path."""
        return str(self.model)

    @property
    def excluded(self) -> list[str]:
        """The logits outputs."""
        return [self.logits] if isinstance(self.logits, str) else list(self.logits.values())

    def rerun(self, trace: str, reference: Reference, transplant: Sequence[str], steps: Container[int] | None) -> None:
        """See :meth:`Runner.rerun`."""
        from .ortcut import TransplantOrtRecorder

        options = {"tensors": {"logits:*": "none", "*": "full"}, **self.options}
        with TransplantOrtRecorder(trace, self.model, transplant=transplant, transplant_steps=steps, reference=reference,
                                   logits=self.logits, optimization=self.optimization, **options) as rec:
            self.run_fn(rec)


class TransplantScriptRecorder(ScriptRecorder):
    """A :class:`~recorders.scripthooks.ScriptRecorder` that also replaces the outputs of named
    torch modules (or output elements, ``name.0``) and ONNX Runtime values by the reference's at
    chosen steps.

    The module's own output is recorded first (as ``trace record`` records it); the script
    then receives the reference's values in its place.

    Args:
        trace: the trace directory to write.
        transplant: tensor names to replace.
        transplant_steps: step indices where they are replaced (None: every step).
        **options: :class:`ScriptRecorder` options (``reference`` is required).
    """

    def __init__(self, trace: str | os.PathLike[str], *, transplant: Sequence[str] = (),
                 transplant_steps: Container[int] | None = None, **options: Any) -> None:
        super().__init__(trace, **options)
        self.transplant = set(transplant)
        self.transplant_steps = transplant_steps
        self._calls: dict[str, int] = {}
        self._calls_key: Any = None
        self._cuts: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    def ort_run(self, session: Any, output_names: Any, feed: Any, run: Callable[[list[str]], list[Any]]) -> list[Any]:
        """Record an ONNX Runtime run as :meth:`ScriptRecorder.ort_run`; at a transplant step a
        copy of the session's model cut at the transplanted values runs instead, fed the
        reference's values there (:func:`recorders.onnxruntime.cut_model`).

        Raises:
            TraceError: recording failed, the reference lacks a transplanted value, or the
                session's model file cannot be cut (opened from bytes).
        """
        info = self._session(session)
        swap = [n for n in self.transplant if n.startswith(info.prefix) and n[len(info.prefix):] in info.outputs]
        if not swap:
            return super().ort_run(session, output_names, feed, run)

        def run_cut(names: list[str]) -> list[Any]:
            if getattr(self, "sample_per", None) and getattr(self, "_current", None) is None:
                return run(names)  # before the first sample: not recorded, nothing to transplant
            with self._writing():
                rec = self._recorder(lambda: info.defaults)
                if info.logits is not None and self._decided:
                    self._end_step()
                self._open_step(rec)  # the step this run records at (ort_run finds it open)
                key = rec.current_step
                if self.transplant_steps is not None and key.index not in self.transplant_steps:
                    return run(names)
                cut = self._cut_session(session, [n[len(info.prefix):] for n in swap])
                extra = {n[len(info.prefix):]: np.ascontiguousarray(rec.reference_tensor(n, call=0).values)
                         for n in swap}
            from .onnxruntime import run_unrouted

            return run_unrouted(cut, names, {**feed, **extra})

        return super().ort_run(session, output_names, feed, run_cut)

    def _cut_session(self, session: Any, names: list[str]) -> Any:
        key = (id(session), tuple(names))
        cut = self._cuts.get(key)
        if cut is None:
            from .onnxruntime import cut_model, session_like

            path = getattr(session, "_model_path", None)
            if not path:
                raise RecorderUsageError("cannot transplant into an ONNX Runtime session opened from bytes: open it "
                                         "from a model file so triage can cut the graph")
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="steptrace-cut-")
            out = Path(self._tmp.name) / f"cut{len(self._cuts)}.onnx"
            cut = self._cuts[key] = session_like(cut_model(path, names, out), session)
        return cut

    def close(self) -> Any:
        """Close as :meth:`ScriptRecorder.close` does and remove the cut models.

        Returns:
            The writer's :class:`steptrace.tracefmt.WriteSummary`.
        """
        try:
            return super().close()
        finally:
            self._cuts.clear()
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None

    def _is_quiet(self, info: Any) -> bool:
        return super()._is_quiet(info) and not any(n == info.name or n.startswith(info.name + ".")
                                                   for n in self.transplant)

    def _is_lean(self, info: Any, rec: Any) -> bool:
        return super()._is_lean(info, rec) and not any(n == info.name or n.startswith(info.name + ".")
                                                       for n in self.transplant)

    def torch_post(self, module: Any, output: Any) -> Any:
        """Record as :meth:`ScriptRecorder.torch_post`, then return the output with the
        transplanted elements replaced (None when nothing is replaced).

        Raises:
            TraceError: recording failed, or the reference lacks a transplanted value.
        """
        result = super().torch_post(module, output)
        info = self._mods.get(id(module))
        rec = self.rec
        if not self.transplant or info is None or output is None or rec is None or rec.current_step is None:
            return result
        hits = [(n, p) for n, p, _ in elements(info.name, output) if n in self.transplant]
        if not hits:
            return result
        key = rec.current_step
        if key != self._calls_key:
            self._calls, self._calls_key = {}, key
        call = self._calls.get(info.name, 0)
        self._calls[info.name] = call + 1
        if self.transplant_steps is not None and key.index not in self.transplant_steps:
            return result
        from .torch import reference_to_tensor

        new = output if result is None else result
        with self._writing():
            for name, path in hits:
                like = element_at(output, path)
                ref = rec.reference_tensor(name, call=call)
                new = replace_element(new, path, reference_to_tensor(ref.values, ref.dtype, like.device).reshape(like.shape))
        return new


@dataclass
class ScriptRun:
    """Re-runs of an unmodified script, as ``trace record`` runs it.

    Args:
        target: the script's path (or module name with ``module=True``).
        args: its arguments.
        modules: globs of module names to record (``trace record --modules``).
        logits: globs of the decided module or element (``trace record --logits``).
        module: run ``target`` as ``python -m``.
        sample: the sample id unless the script sets ``STEPTRACE_SAMPLE``.
        k: top-k kept per decision.
        quiet: discard what the script prints to stdout (it runs once per trial).
    """

    target: str
    args: Sequence[str] = ()
    modules: Sequence[str] = ("*",)
    logits: Sequence[str] = ()
    module: bool = False
    sample: str = "0"
    k: int = 8
    quiet: bool = True
    runtime: str = "torch"

    @property
    def label(self) -> str:
        """The script as given on the command line."""
        return " ".join([*(["-m"] if self.module else []), self.target, *self.args])

    @property
    def excluded(self) -> list[str]:
        """The ``logits`` globs."""
        return list(self.logits)

    def record(self, trace: str, *, teacher: str | None = None) -> None:
        """Record the script once with values, without transplant (``--ref-script``).

        Args:
            trace: the trace directory to write.
            teacher: a reference trace to teacher-force on, if any.

        Raises:
            RerunFailedError: the script failed.
        """
        self._run(trace, teacher, ScriptRecorder)

    def rerun(self, trace: str, reference: Reference, transplant: Sequence[str], steps: Container[int] | None) -> None:
        """See :meth:`Runner.rerun`."""
        factory = functools.partial(TransplantScriptRecorder, transplant=transplant, transplant_steps=steps)
        self._run(trace, reference.path, factory)

    def _run(self, trace: str, teacher: str | None, factory: Callable[..., ScriptRecorder]) -> None:
        from .script import run_script

        # the writer's thread: re-runs are many and short, and a writer process's start (~0.15 s
        # each) would cost more than the GIL it spares them
        with contextlib.redirect_stdout(io.StringIO()) if self.quiet else contextlib.nullcontext():
            result = run_script(self.target, list(self.args), trace=trace, module=self.module,
                                modules=list(self.modules), logits=list(self.logits), tensors="full", teacher=teacher,
                                sample=self.sample, k=self.k, recorder=factory, writer="thread")
        if result.interrupted:
            raise KeyboardInterrupt
        if result.error is not None or result.status:
            detail = (result.traceback or str(result.error or "")).strip().splitlines()[-1:] or [""]
            raise RerunFailedError(f"the re-run of {self.label} failed (status {result.status or 1}): {detail[0]}; "
                                   "run it alone to see why (it must run unchanged under teacher forcing)")
        if result.steps == 0:
            raise RerunFailedError(f"the re-run of {self.label} decided nothing: --logits "
                                   f"{','.join(self.logits) or '(none)'} matched no module call; names seen: "
                                   f"{', '.join(result.names[:12]) or '(none)'}")


def is_excluded(name: str, globs: Sequence[str]) -> bool:
    """Return whether ``name`` is one of the decided outputs ``globs`` (or an element of one).

    Args:
        name: a tensor name.
        globs: fnmatch globs of decided module / output names.

    Returns:
        True when the name must not be transplanted.
    """
    return name.startswith("logits:") or _is_excluded(name, globs)
