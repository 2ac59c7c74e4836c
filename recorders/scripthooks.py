"""What ``trace record`` installs in a running script: global torch module hooks and patched
ONNX Runtime sessions that turn module calls and session runs into steps, tensors and decisions.
Imports no ML framework: :mod:`steptrace.recorders.torch` and :mod:`steptrace.recorders.onnxruntime` are imported
by :mod:`steptrace.recorders.script` once the script itself imports torch or onnxruntime. The torch
half is :mod:`~recorders.scriptmodules`, the ONNX Runtime half :mod:`~recorders.scriptsessions`.

Names. Every recorded name is ``ROOT.path``, whatever the order of calls. A torch module is
named when it is first called: the outermost module of a call (a *root*) is named by its class
(``Encoder``; ``Encoder#1`` for the second root of that class to be called, ``#2`` the third)
and its whole tree by that label and its ``named_modules()`` path (``Encoder.layers.0``). An
ONNX session's values are prefixed by its model file's stem (``decoder.logits``; ``decoder#1``
for a second session of a same-named file). Tuple outputs are recorded as ``name.0``,
``name.1``, dict outputs as ``name.key``. A glob (``modules``, ``logits``, ``sample_per``)
matches a name when it matches the full name or the part after the root's label
(``head`` and ``GRULM.head`` both select ``GRULM.head``; ``Encoder.*`` only the encoder's).
A module first called on its own keeps the root label of that call when a larger module
containing it is called later.

Steps. Tensors recorded with no step open open the next step of the current sample. Samples:
with ``sample_per`` globs, each call of a matching module (or run of a matching session) ends
the current sample and starts the next one, whose id is ``ids[n]`` (``sample_ids``) or ``n``
for the *n*-th call (0-based), so two runs of one corpus get the same ids in the same order;
calls before the first one (warm-up) are not recorded, and are counted in a note. Without
``sample_per``: the ``STEPTRACE_SAMPLE`` environment variable when the script sets it, else the
default sample.
A call of a module, or a run of a session, whose output matches a ``logits`` glob records a
decision on its last position (``t[0, ..., 0, -1, :]``; the first row of a batch) and ends the
step once the outermost module call returns (another logits call before that also ends it).

Scores. ``scores="logits"`` (the default) decides the vector as it is and notes when its rows
look like probabilities (every value in [0, 1], summing to 1); ``"prob"`` decides ``log(p)``
(log-probabilities: the same argmax, margins in nats; ``p = 0`` is -inf) and ``"logprob"``
decides the vector as it is (log-probabilities are logits up to a constant).

Teacher forcing. With a reference, the logits returned to the script are replaced by a copy
whose decided vector is -inf except at the reference's token (which keeps its own logit), so
the script's own argmax or sampling takes the reference's token; the trace records
``forced=true`` and the run's own argmax. Probabilities (``scores="prob"``) are returned as 1 at
the reference's token and 0 elsewhere. The script's control flow is otherwise unchanged.
"""

from __future__ import annotations

import os
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from steptrace.tracefmt import TraceMetadata, WriteSummary
from steptrace.tracefmt.errors import TraceError, UnsupportedDtypeError

from .capture import Recorder, Reference
from .decisions import is_torch_tensor
from .errors import RecorderUsageError
from .hostrecorder import HostRecorder
from .outputs import decided_index, peak_numpy
from .policy import CapturePolicy
from .scores import SCORES, log_probabilities, looks_like_probabilities
from .scriptmodules import ModuleHooks, _Mod
from .scriptnames import any_match
from .scriptsessions import SessionHooks, _Session

__all__ = ["SAMPLE_ENV", "SCORES", "WRITERS", "SampleIdsExhaustedError", "ScriptRecorder"]

#: The environment variable a script sets to name the sample of the steps that follow.
SAMPLE_ENV = "STEPTRACE_SAMPLE"
#: Where the trace writer's background work runs (``ScriptRecorder(writer=...)``, ``--writer``).
WRITERS = ("auto", "thread", "process")
_MODES = ("stats", "full")


class SampleIdsExhaustedError(RecorderUsageError):
    """A ``sample_per`` module was called more often than there are sample ids."""


class _Writing:
    """A hook's writing section (``with hooks._writing():``): Ctrl-C is held until it ends;
    TraceErrors are kept in ``hooks.error``. One object per recorder, re-entered by nested
    sections (a class, not a generator: hooks enter it at every module call that records)."""

    __slots__ = ("_hooks",)

    def __init__(self, hooks: ScriptRecorder) -> None:
        self._hooks = hooks

    def __enter__(self) -> None:
        self._hooks.busy += 1

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        hooks = self._hooks
        if isinstance(exc, TraceError):
            hooks.error = exc
        hooks.busy -= 1
        if exc_type is None and hooks.interrupted and not hooks.busy:
            hooks.interrupted = False
            raise KeyboardInterrupt


class ScriptRecorder(ModuleHooks, SessionHooks):
    """Records a running script's torch module calls and ONNX Runtime runs into one trace.

    :mod:`steptrace.recorders.script` connects :meth:`torch_pre`/:meth:`torch_post` to global module
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
        sample_per: globs of modules (or ONNX model stems) each call of which starts a sample.
        sample_ids: the ids of those samples, in call order (None: ``"0"``, ``"1"``, ...).
        scores: what the ``logits`` outputs hold: ``"logits"``, ``"prob"`` or ``"logprob"``.
        k: top-k candidates per decision.
        mode: the writer's ``"create"`` or ``"overwrite"``.
        metadata: run metadata (``command``, ``model``, ``tags``, ...).
        progress: called with the number of steps decided after each step.
        all_positions: decide every position (``t[0, ..., 0, :, :]``, one step each) instead of
            the last.
        open_loop: heads not fed back (manifest ``open_loop``); None: ``["token"]`` with
            ``all_positions``, none otherwise.
        writer: ``"thread"`` or ``"process"``: the trace writer's background work in a thread of
            this process or in a process of its own (``TraceWriter(process=True)``); ``"auto"``:
            a process when ``modules`` are recorded (``tensors`` not ``"none"``) on a POSIX
            system, where the writer's Python work would otherwise hold the script's GIL once
            per recorded tensor, a thread otherwise (decisions only: nothing to start).

    Raises:
        RecorderUsageError: a bad option (an unknown ``scores``, ``sample_ids`` without
            ``sample_per``, repeated sample ids), or a reference (teacher forcing) with an
            open-loop ``token`` head: ids that are not fed back have nothing to force.
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
        sample_per: Sequence[str] = (),
        sample_ids: Sequence[str] | None = None,
        scores: str = "logits",
        k: int = 8,
        mode: str = "create",
        metadata: Mapping[str, Any] | None = None,
        progress: Callable[[int], None] | None = None,
        all_positions: bool = False,
        open_loop: Sequence[str] | None = None,
        writer: str = "auto",
    ) -> None:
        if scores not in SCORES:
            raise RecorderUsageError(f"scores {scores!r} is unknown; use one of {', '.join(SCORES)}")
        if sample_ids is not None and not sample_per:
            raise RecorderUsageError("sample ids need a module whose calls start the samples (--sample-per MODULE)")
        if sample_ids is not None and len(set(sample_ids)) != len(sample_ids):
            dup = sorted(x for x, n in Counter(sample_ids).items() if n > 1)
            raise RecorderUsageError(f"sample ids must be distinct; repeated: {', '.join(map(str, dup[:8]))}")
        self.sample_per = list(sample_per)
        self.sample_ids = None if sample_ids is None else [str(x) for x in sample_ids]
        self.scores = scores
        self.samples_started = 0
        self.skipped_before_samples: dict[str, int] = {}  # outermost calls before the first sample_per call
        self.all_positions = all_positions
        if writer not in WRITERS:
            raise RecorderUsageError(f"writer {writer!r} is unknown; use one of {', '.join(WRITERS)}")
        if writer == "auto":  # a writer process needs POSIX (TraceWriter(process=True))
            writer = "process" if modules and tensors != "none" and os.name == "posix" else "thread"
        #: ``"thread"`` or ``"process"`` (``"auto"`` resolved).
        self.writer = writer
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
        self.rec: HostRecorder | None = None
        self.steps = 0
        self.error: TraceError | None = None
        self.notes: list[str] = []
        self.names: list[str] = []  # names seen (modules, session values), for messages
        self.busy = 0  # > 0 while a hook writes: Ctrl-C waits for it (see recorders.script)
        self._section = _Writing(self)
        self.interrupted = False
        self.depth = 0  # module calls in progress (see recorders.torchcalls.install_module_calls)
        self.quiet: set[int] = set()  # ids of modules that need no hook inside another's call
        # ids of modules whose output is recorded and nothing more: their defer(output), for
        # the lean path of recorders.torchcalls.install_module_calls
        self.lean: dict[int, Callable[[Any], bool]] = {}
        self._defer: Callable[[str, str | None, bool], Callable[[Any], bool]] | None = None
        self._decided = False
        # the modules named so far, by id (a WeakKeyDictionary lookup is two Python calls per
        # module call); each module's weak reference forgets it, and its quiet mark, when it dies
        self._mods: dict[int, _Mod] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._sessions: weakref.WeakKeyDictionary[Any, _Session] = weakref.WeakKeyDictionary()
        self._labels: set[str] = set()
        self._roots = 0
        self._warned: set[str] = set()
        self._logits_hit: set[str] = set()
        self._recorded: set[str] = set()
        self._sample_hit: set[str] = set()
        self._current: str | None = None  # the sample started by the last sample_per call
        self.relative: dict[str, str] = {}  # full name -> name after the root's label

    # ------------------------------------------------------------------ bookkeeping
    def _note(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            self.notes.append(message)

    def _is_logits(self, name: str, rel: str = "") -> bool:
        return any_match(self.logits, name, rel)

    def _mode(self, name: str, rel: str) -> str:
        """The capture mode of a name: of its full name, else of the name after its root's label."""
        mode = self.policy.mode(name)
        return self.policy.mode(rel) if mode == "none" and rel else mode

    def _label(self, cls: str) -> str:
        label, n = cls, 1
        while label in self._labels:
            label, n = f"{cls}#{n}", n + 1
        self._labels.add(label)
        return label

    def _recorder(self, defaults: Callable[[], Mapping[str, Any]]) -> HostRecorder:
        if self.rec is None:
            meta = TraceMetadata.coerce(dict(self.metadata))
            self.rec = HostRecorder(self.trace, policy=self.policy, reference=self.reference, sample=self.sample,
                                     k=self.k, metadata=meta, defaults=dict(defaults()), mode=self.mode,
                                     open_loop=self.open_loop,
                                     writer_options={"process": True} if self.writer == "process" else None)
        return self.rec

    def _open_step(self, rec: Recorder) -> None:
        if rec.current_step is None:
            rec.begin_step(sample=self._current or os.environ.get(SAMPLE_ENV) or self.sample)

    def _before_first_sample(self, root: str | None) -> bool:
        """Whether a call comes before the first ``sample_per`` call (it is not recorded:
        warm-up calls would otherwise make a sample the other run lacks); outermost calls
        (``root``: the module or session label) are counted for a note."""
        if not self.sample_per or self._current is not None:
            return False
        if root is not None:
            self.skipped_before_samples[root] = self.skipped_before_samples.get(root, 0) + 1
        return True

    def _start_sample(self, name: str) -> None:
        """A ``sample_per`` module or session is called: end the current step; the next steps
        belong to the next sample.

        Raises:
            SampleIdsExhaustedError: more calls than ``sample_ids``.
        """
        n = self.samples_started
        if self.sample_ids is not None and n >= len(self.sample_ids):
            raise SampleIdsExhaustedError(
                f"{name} was called a {n + 1}th time but only {len(self.sample_ids)} sample id(s) were given; "
                "give one id per call (a line each in the --sample-from file)")
        if self._decided or (self.rec is not None and self.rec.current_step is not None):
            self._end_step()
        self._current = self.sample_ids[n] if self.sample_ids is not None else str(n)
        self.samples_started += 1
        self._sample_hit.add(name)

    def _end_step(self) -> None:
        if self.rec is not None:
            self.rec.end_step()
        if self._decided:
            self._decided = False
            self.steps += 1
            if self.progress is not None:
                self.progress(self.steps)

    def _writing(self) -> _Writing:
        """Mark a hook's writing section: Ctrl-C is held until it ends; TraceErrors are kept."""
        return self._section

    def _record(self, rec: HostRecorder, name: str, value: Any, call: int | None, source: str | None,
                mode: str) -> None:
        if call is None or mode not in _MODES or not rec.lane_row(name, value, call, source, mode == "full"):
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
            rows = t[(0,) * (len(shape) - 2)]
            if self.scores == "prob":
                rows = log_probabilities(rows)
            ids = rec.decide_positions(rows, fed_back=True)
            self.steps += len(ids) - 1  # _end_step counts one step
            token = ids[-1] if ids else -1
        else:
            row = t[decided_index(shape)]
            if self.scores == "prob":
                row = log_probabilities(row)
            elif self.scores == "logits" and name not in self._logits_hit and looks_like_probabilities(row):
                self._note(f"prob:{name}", f"{name} looks like probabilities (every value in [0, 1], summing to 1): "
                           "its margins and top-k are of probabilities, not logits; pass --scores prob to decide "
                           "log-probabilities")
            token = rec.decide(row)
        self._decided = True
        self._logits_hit.add(name)
        return token

    def _forced(self, t: Any, token: int) -> Any:
        """The decided output as the script receives it under teacher forcing: the reference's
        token peaks (its logit kept, -inf elsewhere; 1 and 0 for probabilities)."""
        index = decided_index(tuple(t.shape))
        if is_torch_tensor(t):
            from .torch import peak_at

            out = peak_at(t, index, token)
        else:
            out = peak_numpy(np.asarray(t), index, token)
        if self.scores == "prob":
            out[index] = 0.0
            out[index + (token,)] = 1.0
        return out

    def _seen(self, name: str, rel: str) -> None:
        self.names.append(name)
        self.relative[name] = rel

    # ------------------------------------------------------------------ closing
    def unmatched(self) -> tuple[list[str], list[str], list[str]]:
        """Return the ``logits`` globs that decided nothing, the ``modules`` globs that
        recorded nothing and the ``sample_per`` globs that started no sample."""
        def missed(globs: Sequence[str], hit: set[str]) -> list[str]:
            return [g for g in globs if not any(any_match([g], n, self.relative.get(n, "")) for n in hit)]

        recorded = self._recorded | ({"logits:token"} if self._logits_hit else set())  # the decided vector
        return (missed(self.logits, self._logits_hit), missed([g for g, _ in self.policy.rules], recorded),
                missed(self.sample_per, self._sample_hit))

    def close(self) -> WriteSummary:
        """Close the trace (creating an empty one if the script recorded nothing).

        Returns:
            The writer's :class:`steptrace.tracefmt.WriteSummary`.

        Raises:
            TraceWriteError: writing failed.
        """
        if self._decided:
            self._end_step()
        if self.skipped_before_samples:
            calls = ", ".join(f"{n:,} of {name}" for name, n in self.skipped_before_samples.items())
            self._note("before-samples", f"calls before the first --sample-per call were not recorded (they belong "
                       f"to no sample): {calls}")
        rec = self._recorder(dict)
        try:
            return rec.close()
        finally:
            if self.reference is not None:
                self.reference.close()

