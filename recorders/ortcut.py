"""ONNX Runtime transplant: an :class:`~recorders.onnxruntime.OrtRecorder` that, at chosen steps,
runs a copy of the model cut at the transplanted values and feeds the reference's recorded
values there. Imports no framework: the cut and the second session come from
:func:`recorders.onnxruntime.cut_model` and :func:`recorders.onnxruntime.session_like`.

Cutting: each transplanted value ``v`` becomes a graph input of the copy; the node that made it
writes ``v/steptrace.own`` instead, which nothing reads. Every consumer of ``v`` (and the graph
output ``v``, so the trace records what was fed) then sees the reference's value. At steps
without a transplant the original session runs, so the cut costs nothing there.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import RecorderUsageError, TransplantMismatchError
from .onnxruntime import OrtRecorder, cut_model, session_like

__all__ = ["TransplantOrtRecorder"]


class TransplantOrtRecorder(OrtRecorder):
    """An :class:`OrtRecorder` that replaces ONNX values by the reference's at chosen steps.

    Args:
        trace: the trace directory to write.
        model: the ONNX file to run (with the intermediates to record already exposed).
        transplant: value names to take from the reference (node outputs).
        transplant_steps: step indices where they are taken from it (None: every step).
        **options: :class:`OrtRecorder` options; ``reference`` is required.

    Raises:
        RecorderUsageError: no reference, or a value that cannot be cut at.
    """

    def __init__(
        self,
        trace: str | os.PathLike[str],
        model: str | os.PathLike[str],
        *,
        transplant: Sequence[str] = (),
        transplant_steps: Container[int] | None = None,
        **options: Any,
    ) -> None:
        if transplant and options.get("reference") is None:
            raise RecorderUsageError("transplant needs the reference trace to take values from: pass reference=PATH")
        super().__init__(trace, model, model=model, **options)
        self.transplant = list(transplant)
        self._steps = transplant_steps
        self._cut: Any = None
        self._opened: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if self.transplant:
            self._tmp = tempfile.TemporaryDirectory(prefix="steptrace-cut-")
            path = cut_model(model, self.transplant, Path(self._tmp.name) / "cut.onnx")
            self._cut = session_like(path, self.session)

    def run(
        self,
        output_names: Sequence[str] | None,
        input_feed: Mapping[str, Any],
        run_options: Any = None,
    ) -> list[np.ndarray]:
        """Run one step as :meth:`OrtRecorder.run`; at a transplant step the cut session runs
        with the reference's values of the transplanted names added to the feed.

        Raises:
            ReferenceNotFoundError: the reference lacks a transplanted value at this step.
            TransplantMismatchError: a reference value of another dtype or shape.
        """
        key = self._opened = self._begin_run()
        try:
            return self._run_at(key, output_names, input_feed, run_options)
        finally:
            self._opened = None

    def _begin_run(self) -> Any:
        """The step :meth:`run` opened, while it runs (OrtRecorder.run asks again)."""
        return self._opened if self._opened is not None else super()._begin_run()

    def _run_at(self, key: Any, output_names: Sequence[str] | None, input_feed: Mapping[str, Any],
                run_options: Any) -> list[np.ndarray]:
        if self._cut is None or (self._steps is not None and key.index not in self._steps):
            return super().run(output_names, input_feed, run_options)
        cut = self._cut
        feed: dict[str, np.ndarray] = {}
        want = {i.name: i for i in cut.get_inputs()}
        for name in self.transplant:
            ref = self.reference_tensor(name, call=0)
            if ref.dtype == "bfloat16":
                raise TransplantMismatchError(f"{name!r} is bfloat16 in the reference; ONNX Runtime takes no bfloat16 "
                                              "numpy input: transplant between float32/float16 runs")
            shape = want[name].shape
            if len(shape) != ref.values.ndim or any(isinstance(d, int) and d != s for d, s in zip(shape, ref.values.shape)):
                raise TransplantMismatchError(f"transplant of {name!r} at step {key.index}: the reference holds "
                                              f"{ref.dtype}{list(ref.values.shape)}, the model takes {shape}")
            feed[name] = np.ascontiguousarray(ref.values)
        plain = self.session
        self.session = _Fed(cut, feed)
        try:
            return super().run(output_names, input_feed, run_options)
        finally:
            self.session = plain

    def close(self) -> Any:
        """Close as :meth:`OrtRecorder.close` does and remove the cut model.

        Returns:
            The writer's :class:`steptrace.tracefmt.WriteSummary`.
        """
        try:
            return super().close()
        finally:
            self._cut = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None


class _Fed:
    """A session whose ``run`` adds fixed values (the transplanted ones) to every feed."""

    def __init__(self, session: Any, extra: Mapping[str, np.ndarray]) -> None:
        self._session = session
        self._extra = dict(extra)

    def run(self, names: Sequence[str], feed: Mapping[str, Any], run_options: Any = None) -> list[Any]:
        return self._session.run(names, {**feed, **self._extra}, run_options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)
