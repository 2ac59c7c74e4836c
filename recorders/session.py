"""Shared base of the recorders for runtimes called once per step: an ONNX Runtime session's
``run()``, a CoreML model's ``predict()``. Imports no ML framework.

:class:`RunRecorder` adds to :class:`recorders.capture.Recorder`:

- run steps: each call opens the next step unless the caller holds an explicit step open
  (``with rec.step(...)``), in which case the call is part of that step (tensor names recorded
  twice in a step get call indices 0, 1, ...);
- logits heads: named outputs whose last (or chosen) position becomes a decision after each
  call; the tokens to use are in :attr:`RunRecorder.tokens` (teacher forcing: the reference's);
- ``position="all"``: every position of a ``[1, T, V]`` / ``[T, V]`` output is decided, one step
  per position (:meth:`recorders.capture.Recorder.decide_positions`), for outputs whose ids are
  not fed back (CTC frames, VAD chunks): those heads are open-loop unless ``open_loop`` says
  otherwise, and teacher forcing is refused (there is nothing to force).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from .capture import CapturePolicy, Recorder, StepKey
from .errors import RecorderUsageError

__all__ = ["DEFAULT_POLICY", "Exposure", "RunRecorder", "logits_heads", "select_position"]

#: Statistics and digest of every input, output and exposed value; no ``logits:<head>`` copy
#: (the logits output itself is recorded under its own name).
DEFAULT_POLICY = CapturePolicy([("logits:*", "none"), ("*", "stats")])


@dataclasses.dataclass(frozen=True)
class Exposure:
    """What an ``expose_intermediates`` function did; unpacks as ``path, names``.

    Attributes:
        path: the saved model.
        names: the exposed value names, in execution (topological) order.
        skipped: value name -> why it was not exposed (no inferable type, not a tensor, a
            dtype the runtime cannot output).
    """

    path: str
    names: list[str]
    skipped: dict[str, str]

    def __iter__(self) -> Iterator[Any]:
        yield self.path
        yield self.names


def logits_heads(logits: str | Mapping[str, str] | None) -> dict[str, str]:
    """Normalise the ``logits`` option of a run recorder to ``{head: output name}``.

    Args:
        logits: None (no decisions), an output name (the ``"token"`` head), or a mapping
            ``{"token": "logits", "duration": "dur_logits"}``.

    Returns:
        Head name -> output name.

    Raises:
        RecorderUsageError: a name or head that is not a non-empty string.
    """
    if logits is None:
        return {}
    heads = {"token": logits} if isinstance(logits, str) else dict(logits)
    for head, name in heads.items():
        if not (isinstance(head, str) and head and isinstance(name, str) and name):
            raise RecorderUsageError(f"logits must map head names to output names, got {head!r}: {name!r}")
    return heads


def select_position(value: np.ndarray, position: int, *, name: str) -> tuple[np.ndarray, int | None]:
    """Return the 1-d logits of one position of an output, and that position.

    Accepted shapes: ``[V]``, ``[1, V]`` and ``[1, T, V]`` (``position`` indexes T; -1 is the
    last position). A batch above 1 is refused: call :meth:`Recorder.decide` per row instead.

    Args:
        value: the output array.
        position: the sequence position of ``[1, T, V]`` outputs (negative counts from the end).
        name: the output's name, for messages.

    Returns:
        ``(logits, position)``: a 1-d array, and the resolved position (None without a T axis).

    Raises:
        RecorderUsageError: another shape, or ``position`` outside T.
    """
    arr = np.asarray(value)
    shape = tuple(arr.shape)
    if arr.ndim == 1:
        return arr, None
    if arr.ndim == 2 and shape[0] == 1:
        return arr[0], None
    if arr.ndim == 3 and shape[0] == 1:
        t = shape[1]
        if not -t <= position < t:
            raise RecorderUsageError(f"position {position} is outside the {t} positions of logits output {name!r}")
        pos = position % t
        return arr[0, pos], pos
    raise RecorderUsageError(
        f"logits output {name!r} has shape {list(shape)}; automatic decisions take [V], [1, V] or [1, T, V]. "
        "For batches, leave logits=None and call rec.decide(row, head=...) per row inside `with rec.step():`"
    )


class RunRecorder(Recorder):
    """A :class:`recorders.capture.Recorder` whose runtime is called once per step.

    Args:
        trace: the trace directory to write.
        logits: outputs that become decisions (see :func:`logits_heads`).
        position: which sequence position of ``[1, T, V]`` logits is decided (-1: the last);
            the decision's ``position`` key records the row of T decided. ``"all"``: every
            position of ``[1, T, V]`` or ``[T, V]`` outputs, one step per position (position 0
            at the call's step, where its tensors are recorded; see
            :meth:`recorders.capture.Recorder.decide_positions`); the ``position`` key counts
            on over a sample's calls (a streamed sample's second call starts at the first's T).
        open_loop: heads whose ids are not fed back (SPEC.md §2). None: every head when
            ``position="all"``, none otherwise; a list (``[]`` too) says exactly which.
        **options: :class:`recorders.capture.Recorder` options.

    Attributes:
        heads: head -> logits output name.
        position: as given.
        tokens: head -> token decided by the last call (the one to feed next; with
            ``position="all"``, the last position's).
        decided: head -> every token the last call decided (one per position with
            ``position="all"``, else one).

    Raises:
        RecorderUsageError: a malformed ``logits`` or ``position``, a bad core option, or
            teacher forcing (a reference with ``teacher_forcing`` left True) where every head
            is open-loop or ``position="all"``: ids that are not fed back have nothing to force
            (pass ``teacher_forcing=False`` to keep the reference for other uses).
    """

    def __init__(
        self,
        trace: str | os.PathLike[str],
        *,
        logits: str | Mapping[str, str] | None = None,
        position: int | str = -1,
        open_loop: Iterable[str] | None = None,
        **options: Any,
    ) -> None:
        heads = logits_heads(logits)
        every = position == "all"
        if not every and (isinstance(position, bool) or not isinstance(position, int)):
            raise RecorderUsageError(f"position must be an integer (-1: the last position) or 'all', got {position!r}")
        if open_loop is None:
            open_loop = list(heads) if every else []
        open_loop = [open_loop] if isinstance(open_loop, str) else list(open_loop)
        meta = options.get("metadata")
        declared = set(open_loop) | set(getattr(meta, "open_loop", None) or
                                        (meta.get("open_loop") if isinstance(meta, Mapping) else None) or ())
        if (options.get("reference") is not None and options.get("teacher_forcing", True) and heads
                and (every or all(h in declared for h in heads))):
            why = ("position='all' decides ids that the call does not feed back" if every
                   else f"every head ({', '.join(heads)}) is open-loop")
            raise RecorderUsageError(f"teacher forcing has nothing to force here: {why}. Record without reference=, "
                                     "or pass teacher_forcing=False to keep the reference for other uses")
        super().__init__(trace, open_loop=open_loop, **options)
        self.heads = heads
        self.position = position
        self.tokens: dict[str, int] = {}
        self.decided: dict[str, list[int]] = {}
        self._run_key: StepKey | None = None
        self._positions: dict[str, int] = {}  # sample -> positions decided so far (position="all")

    @property
    def token(self) -> int | None:
        """The token the last call decided for the vocabulary head (or the only head): the one
        to feed next (the reference's under teacher forcing); None before any decision."""
        head = self.metadata.vocab_head if self.metadata.vocab_head in self.tokens else next(iter(self.tokens), None)
        return None if head is None else self.tokens[head]

    def _begin_run(self) -> StepKey:
        """Open the step of one runtime call: the caller's explicit step if one is open, else
        the next step (which stays open until the next call, so ``decide()`` may follow)."""
        key = self.current_step
        if key is None or key == self._run_key:
            key = self._run_key = self.begin_step()
        return key

    def _decide_outputs(self, outputs: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Record the decision of every logits head from ``outputs`` at the open step.

        ``[1, T, V]`` outputs also write the decided row of T as the decision's ``position``;
        with ``position="all"`` every row is decided, one step each.

        Args:
            outputs: output name -> array; must hold every head's output.

        Returns:
            Head -> token to use next (also kept in :attr:`tokens`).
        """
        if self.position == "all":
            if not self.heads:
                return {}
            # heads the caller kept out of open_loop were declared fed back
            sample = self._current().key.sample
            offset = self._positions.get(sample, 0)  # a sample's positions count on over its calls
            self.decided = self.decide_positions({h: outputs[n] for h, n in self.heads.items()}, fed_back=True,
                                                 offset=offset)
            self._positions[sample] = offset + len(next(iter(self.decided.values())))
            self.tokens = {h: ids[-1] for h, ids in self.decided.items() if ids}
            return self.tokens
        tokens = {}
        for head, name in self.heads.items():
            vec, pos = select_position(outputs[name], self.position, name=name)
            tokens[head] = self.decide(vec, head=head, position=pos)
        self.tokens = tokens
        self.decided = {h: [t] for h, t in tokens.items()}
        return tokens
