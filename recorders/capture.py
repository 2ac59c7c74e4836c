"""The framework-agnostic core every recorder builds on (torch, ONNX Runtime, CoreML, HF).

A :class:`Recorder` owns one :class:`steptrace.tracefmt.TraceWriter` and keeps the bookkeeping SPEC.md
needs: the open step ``(sample, index)``, call indices and execution order within it, one
decision per head and step. On top of that it applies

- a :class:`~recorders.policy.CapturePolicy` (per-name globs -> ``stats`` / ``full`` / ``none``),
- a :class:`~recorders.ring.Budget` (values of ``full`` tensors only around triggers),
- a :class:`~recorders.reference.Reference` (teacher forcing: the reference's tokens;
  transplant: the reference's tensors).

A framework recorder converts its tensors to host data in :meth:`Recorder.to_host` (a numpy
array, or a :class:`~recorders.hostcopy.HostCopy` still in flight from a device) and calls
:meth:`Recorder.record` and :meth:`Recorder.decide`. Steps (:class:`~recorders.steps.StepBook`)
are explicit (``with rec.step(sample=..., index=...)``) or automatic
(:meth:`Recorder.begin_step` at each call of a step module or session; a record made with no
open step opens the next one). The decision methods (:meth:`Recorder.decide`,
:meth:`Recorder.record_decision`, ...) are those of :class:`~recorders.decider.Decider`.

This module is the recorders' public core: everything a framework recorder needs is importable
from here.

Threads: the caller's thread only copies arrays and queues them; statistics, digests,
compression and disk I/O run on the writer's thread. Device copies (:class:`HostCopy`) are
finished on a recorder thread that waits for the copy, digests it and hands it to the writer.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from steptrace.tracefmt import TraceMetadata, TraceWriter, WriteSummary
from steptrace.tracefmt.errors import TraceWriteError

from .decider import Decider
from .errors import RecorderUsageError
from .hostcopy import Finisher, HostCopy, has_nonfinite
from .policy import CapturePolicy, PolicyLike
from .reference import Reference, RefTensor
from .ring import Budget, HeldRow, Ring
from .steps import Step, StepBook, StepKey

if TYPE_CHECKING:
    from steptrace.tracefmt import TraceReader

__all__ = [
    "Budget",
    "CapturePolicy",
    "HostCopy",
    "Recorder",
    "RefTensor",
    "Reference",
    "StepBook",
    "StepKey",
    "Trigger",
    "has_nonfinite",
]


_R = TypeVar("_R", bound="Recorder")


class Trigger(NamedTuple):
    """A budget trigger that fired: where, and why."""

    sample: str
    step: int
    reason: str


def _metadata(metadata: TraceMetadata | Mapping[str, Any] | None, defaults: Mapping[str, Any],
              watched: Mapping[str, int] | None, tags: Mapping[str, str]) -> TraceMetadata:
    if isinstance(metadata, TraceMetadata):
        meta = dataclasses.replace(metadata, tags=dict(metadata.tags), watched=dict(metadata.watched),
                                   extra=dict(metadata.extra))
    else:
        meta = TraceMetadata.coerce(dict(metadata) if metadata is not None else None)
    for key, value in defaults.items():
        if getattr(meta, key) is None:
            setattr(meta, key, value)
    meta.watched.update(watched or {})
    for key, value in tags.items():
        meta.tags.setdefault(key, value)
    meta.check()
    return meta


class Recorder(Decider, StepBook):
    """Records steps, decisions and tensors of one run into a trace; owns its TraceWriter.

    Use it as a context manager, or call :meth:`close`.

    Args:
        trace: the trace directory to write.
        policy: which tensors to record (a :class:`CapturePolicy` or anything it accepts).
        budget: hold ``"full"`` tensors in a ring and keep their values only around triggers;
            None keeps the values of every ``"full"`` tensor.
        reference: a reference trace (path, :class:`steptrace.tracefmt.TraceReader` or
            :class:`Reference`) for teacher forcing and transplant.
        teacher_forcing: with a reference, :meth:`decide` returns the reference's token (and
            records ``forced=true``) for every head but the ``open_loop`` ones. Set False to use
            the reference for transplant only.
        sample: the sample id of steps that do not name one.
        k: top-k candidates kept per decision.
        watched: watched tokens ``{"eos": 3}``, added to the metadata.
        metadata: run metadata (:class:`steptrace.tracefmt.TraceMetadata` or a dict of its fields).
        defaults: metadata fields to fill where ``metadata`` leaves them None (framework
            recorders pass ``runtime``, ``runtime_version``, ``device``, ``precision``).
        tags: tags added to the metadata's where it has none of that name (framework
            recorders describe their set-up; the recorder adds ``steptrace.capture``,
            ``steptrace.budget``, ``steptrace.reference``, ``steptrace.teacher_forcing``).
        vocab: token pieces (sequence indexed by id, or mapping); also fills ``piece``.
        mode: ``"create"``, ``"append"`` or ``"overwrite"`` (as :class:`steptrace.tracefmt.TraceWriter`).
        writer_options: further :class:`steptrace.tracefmt.TraceWriter` options (``flush_steps``,
            ``queue_bytes``, ``encoding``, ``zstd_level``, ``fsync``, ``process`` for a writer
            process, ...).
        open_loop: heads whose chosen ids are not fed back into the model (CTC frames, VAD
            chunks, per-position outputs), added to the metadata's ``open_loop`` (SPEC.md §2).
            The manifest is written when the recorder opens, so declare them here; a head
            decided with :meth:`decide_positions` must be one of them (or ``fed_back=True``).
            Teacher forcing never forces an open-loop head.

    Raises:
        RecorderUsageError: a bad policy, budget or option.
        TraceExistsError: a trace exists at ``trace`` and ``mode="create"``.
        TraceNotFoundError: the reference trace does not exist.
    """

    def __init__(
        self,
        trace: str | os.PathLike[str],
        *,
        policy: PolicyLike = None,
        budget: Budget | None = None,
        reference: str | os.PathLike[str] | TraceReader | Reference | None = None,
        teacher_forcing: bool = True,
        sample: str = "0",
        k: int = 8,
        watched: Mapping[str, int] | None = None,
        metadata: TraceMetadata | Mapping[str, Any] | None = None,
        defaults: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        vocab: Sequence[str] | Mapping[int, str] | None = None,
        mode: str = "create",
        writer_options: Mapping[str, Any] | None = None,
        open_loop: Iterable[str] | None = None,
    ) -> None:
        open_loop = [open_loop] if isinstance(open_loop, str) else list(open_loop or ())
        if not all(isinstance(h, str) and h for h in open_loop):
            raise RecorderUsageError(f"open_loop must list head names (e.g. ['frame']), got {open_loop!r}")
        if budget is not None and not isinstance(budget, Budget):
            raise RecorderUsageError(f"budget must be a recorders.Budget, not {type(budget).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise RecorderUsageError(f"k={k!r}: keep at least the top 2 candidates (SPEC.md §3.1)")
        super().__init__(sample)
        self.policy = CapturePolicy.coerce(policy)
        self.k = k
        self._own_reference = reference is not None and not isinstance(reference, Reference)
        self.reference = Reference(reference) if self._own_reference else reference
        self.teacher_forcing = bool(teacher_forcing and self.reference is not None)
        tags = {**dict(tags or {}), "steptrace.capture": str(self.policy)}
        if budget is not None:
            tags["steptrace.budget"] = str(budget)
        if self.reference is not None:
            tags["steptrace.reference"] = self.reference.path
            tags["steptrace.teacher_forcing"] = str(self.teacher_forcing).lower()
        self.metadata = _metadata(metadata, dict(defaults or {}), watched, tags)
        # a new list: the caller's metadata keeps its own
        self.metadata.open_loop = list(dict.fromkeys([*self.metadata.open_loop, *open_loop]))
        self._pieces = dict(enumerate(vocab)) if isinstance(vocab, Sequence) else dict(vocab or {})
        self.writer = TraceWriter(trace, metadata=self.metadata, vocab=vocab, mode=mode, **dict(writer_options or {}))
        # rows travel to the writer's thread in batches: each wake-up of that thread costs the
        # model's thread a GIL hand-off (TraceWriter.hold)
        self.writer.lane.hold()
        self.triggers: list[Trigger] = []
        self._watched_ids = list(self.metadata.watched.values())
        self._logits_modes: dict[str, str] = {}
        self._lock = threading.Lock()
        self._ring = Ring(budget, self._emit) if budget is not None else None
        self._unchecked: deque[tuple[int, str, int, str, HostCopy]] = deque()
        self._finisher: Finisher | None = None
        self._closed = False
        self._summary: WriteSummary | None = None

    @property
    def budget(self) -> Budget | None:
        """The budget of ``"full"`` tensors, or None."""
        return None if self._ring is None else self._ring.budget

    def _on_begin(self, step: Step) -> None:
        if self._ring is not None:
            self._poll_nonfinite(wait=False)
            self._ring.begin(step.seq)
            if step.key.index in self._ring.budget.at_steps:
                self._fire(step.seq, *step.key, "chosen step")

    # ------------------------------------------------------------------ tensors
    def to_host(self, value: Any, dtype: str | None) -> tuple[np.ndarray | HostCopy, str | None]:
        """Turn a framework tensor into host data the recorder may keep (frameworks override).

        The base implementation views anything numpy accepts as an array (no copy: :meth:`record`
        hands it to the writer, which copies it into a recycled buffer before returning, and a
        budget's ring copies what it holds) and passes :class:`HostCopy` objects through.

        Args:
            value: the tensor.
            dtype: a SPEC.md dtype name overriding the array's (``"bfloat16"`` for uint16 bits).

        Returns:
            ``(data, dtype)``: a numpy array valid until :meth:`record` returns (a view where
            possible), or a HostCopy; and the SPEC.md dtype name to record (None: the array's own).
        """
        if isinstance(value, HostCopy):
            return value, value.dtype
        return np.asarray(value), dtype

    def record(
        self,
        name: str,
        value: Any,
        *,
        call: int | None = None,
        source: str | None = None,
        mode: str | None = None,
        dtype: str | None = None,
    ) -> None:
        """Record one tensor at the open step, under the policy (or ``mode``) and the budget.

        Args:
            name: tensor name (module path, ``module.0`` for a tuple element, ONNX value name).
            value: the tensor (whatever :meth:`to_host` accepts).
            call: its call index; counted per name within the step when None.
            source: what produced it (module class, ONNX op type, CoreML op).
            mode: ``"stats"``, ``"full"`` or ``"none"`` instead of the policy's mode for ``name``.
            dtype: SPEC.md dtype overriding the value's.

        Raises:
            RecorderUsageError: a bad mode, or the recorder is closed.
            UnsupportedDtypeError: the tensor's dtype is not one SPEC.md defines.
            TraceWriteError: the writer failed earlier.
        """
        mode = self.policy.mode(name) if mode is None else mode
        if mode == "none":
            return
        if mode not in ("stats", "full"):
            raise RecorderUsageError(f"capture mode {mode!r} is unknown; use stats, full or none")
        self._check()
        st = self._current()
        if call is None:
            call = st.count(name)
        data, dt = self.to_host(value, dtype)
        row = HeldRow(st.key.sample, st.key.index, name, call, st.order, source, dt, data)
        st.order += 1
        ring = self._ring
        if ring is not None and ring.budget.nonfinite:
            if isinstance(data, np.ndarray):
                if has_nonfinite(data, dtype=dt):
                    self._fire(st.seq, st.key.sample, st.key.index, f"NaN/Inf in {name}")
            else:
                self._unchecked.append((st.seq, st.key.sample, st.key.index, name, data))
        if mode == "full" and ring is not None:
            if isinstance(data, np.ndarray):  # held past this call: own a copy (to_host may view)
                row.data = data.copy()
            ring.hold(row)
        else:
            self._emit(row, mode == "full")

    def _emit(self, row: HeldRow, values: bool) -> None:
        if isinstance(row.data, np.ndarray):
            with self._lock:
                self.writer.add_tensor(row.sample, row.step, row.name, row.data, values=values, source=row.source,
                                       call=row.call, order=row.order, dtype=row.dtype)
        else:
            if self._finisher is None:
                self._finisher = Finisher(self.writer, self._lock)
            self._finisher.put(row, values)

    # ------------------------------------------------------------------ triggers
    def trigger(self, reason: str = "manual") -> None:
        """Fire the budget's trigger at the open step: keep values of the held steps around it.

        Args:
            reason: why (kept in :attr:`triggers`).

        Raises:
            RecorderUsageError: the recorder has no budget.
        """
        if self._ring is None:
            raise RecorderUsageError("trigger() needs budgeted capture: pass budget=Budget(...) to the recorder")
        st = self._current()
        self._fire(st.seq, *st.key, reason)

    def _fire(self, seq: int, sample: str, step: int, reason: str) -> None:
        self._ring.fire(seq)  # type: ignore[union-attr]
        self.triggers.append(Trigger(sample, step, reason))

    def _poll_nonfinite(self, *, wait: bool) -> None:
        while self._unchecked:
            seq, sample, step, name, copy = self._unchecked[0]
            if not wait and not copy.done():
                return
            self._unchecked.popleft()
            if copy.nonfinite():
                self._fire(seq, sample, step, f"NaN/Inf in {name}")

    # ------------------------------------------------------------------ reference
    def reference_tensor(self, name: str, *, call: int) -> RefTensor:
        """Return the reference's values of ``name`` at the open step and ``call`` (transplant).

        Raises:
            RecorderUsageError: the recorder has no reference.
            ReferenceNotFoundError: the reference lacks that tensor or its values.
        """
        if self.reference is None:
            raise RecorderUsageError("transplant needs a reference trace: pass reference=PATH to the recorder")
        key = self._current().key
        return self.reference.tensor(key.sample, key.index, name, call=call)

    # ------------------------------------------------------------------ lifecycle
    def _finish_deferred(self) -> None:
        """Finish the records a framework's hooks left for later (:class:`TorchRecorder` keeps
        small outputs' bookkeeping for the end of the step). Called before anything else is
        recorded, when a step ends, and at close, so execution order and call indices hold."""

    def end_step(self) -> None:
        """Close the open step, if any (later records open the next step automatically)."""
        if not self._closed:
            self._finish_deferred()
        super().end_step()

    def _check(self) -> None:
        if self._closed:
            raise RecorderUsageError("this recorder is closed")
        self._finish_deferred()
        if self._finisher is not None and self._finisher.error is not None:
            raise TraceWriteError(f"recording a device tensor failed: {self._finisher.error}") from self._finisher.error

    def close(self) -> WriteSummary:
        """Write the held rows, finish device copies, close the writer; idempotent.

        Rows still held by a budget are written with values where a trigger covered their step
        and as statistics only elsewhere.

        Returns:
            The writer's :class:`steptrace.tracefmt.WriteSummary`.

        Raises:
            TraceWriteError: writing failed (what was flushed before stays readable).
        """
        if self._summary is not None:
            return self._summary
        closing, self._closed = not self._closed, True
        try:
            if closing:
                self._finish_deferred()
            self._step = None
            if self._ring is not None:
                self._poll_nonfinite(wait=True)
                self._ring.drain()
        finally:
            if self._finisher is not None:
                self._finisher.stop()
            summary = self.writer.close()
            if self._own_reference:
                self.reference.close()  # type: ignore[union-attr]
        if self._finisher is not None and self._finisher.error is not None:
            raise TraceWriteError(f"recording a device tensor failed: {self._finisher.error}") from self._finisher.error
        self._summary = summary
        return summary

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
