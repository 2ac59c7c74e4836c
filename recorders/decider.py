"""The decision half of :class:`~recorders.capture.Recorder`: one decision per head and step,
teacher forcing, the ``logits:<head>`` copy, and the budget triggers decisions fire (margin,
NaN/Inf logits).

:class:`Decider` is a mixin of :class:`~recorders.capture.Recorder`, which owns the state it
reads (the writer, the open step, the policy, the reference, the budget's ring) and the calls it
makes back (``record``, ``_fire``, ``_check``, ``_current``). Frameworks override
:meth:`Decider.host_logits` and :meth:`Decider.decide_logits` to decide their tensors where they
live.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

from steptrace.tracefmt import TraceMetadata, TraceWriter
from steptrace.tracefmt.decisions import first_max

from .decisions import Decision, decide, host_logits, write_decision
from .errors import StepOrderError
from .positions import decide_positions as _decide_positions
from .steps import Step

if TYPE_CHECKING:
    from .policy import CapturePolicy
    from .reference import Reference
    from .ring import Ring

__all__ = ["Decider"]


class Decider:
    """Decisions of a :class:`~recorders.capture.Recorder` (a mixin: the recorder holds the
    attributes below and the step bookkeeping of :class:`~recorders.steps.StepBook`)."""

    writer: TraceWriter
    metadata: TraceMetadata
    policy: CapturePolicy
    reference: Reference | None
    teacher_forcing: bool
    k: int
    _ring: Ring | None
    _lock: threading.Lock
    _pieces: dict[int, str]
    _watched_ids: list[int]
    _logits_modes: dict[str, str]

    def decide(
        self,
        logits: Any,
        *,
        head: str = "token",
        chosen: int | None = None,
        watched: Iterable[int] | None = None,
        **keys: Any,
    ) -> int:
        """Record the decision of ``head`` at the open step; return the token the run must use.

        With teacher forcing, that is the reference's token for this (sample, step, head): the
        row records it as ``chosen`` with ``forced=true`` and the run's own ``argmax``. Heads in
        the metadata's ``open_loop`` are never forced (their ids are not fed back, and forcing
        would record the reference's ids as this run's). The full
        logits are recorded too when the policy selects the name ``logits:<head>``.

        Args:
            logits: 1-d logits of the position decided (numpy array or framework tensor).
            head: decision head (``token``, ``duration``, ...).
            chosen: the token the run chose itself (sampling); defaults to the argmax.
                Ignored under teacher forcing.
            watched: ids to watch; defaults to the metadata's watched tokens for the vocabulary
                head and none for other heads.
            **keys: ``piece``, ``frame``, ``chunk``, ``position``, ``emission``, ``time_us``.

        Returns:
            The token id to feed the next step.

        Raises:
            StepOrderError: ``head`` was already decided at this step.
            ReferenceNotFoundError: teacher forcing past the reference's last step.
            TraceUsageError: malformed logits or ids.
        """
        self._check()
        st = self._current()
        if head in st.heads:
            raise StepOrderError(self._twice(st, head))
        forced = False
        if self.teacher_forcing and head not in self.metadata.open_loop:  # open-loop ids are never fed back
            chosen = self.reference.token(st.key.sample, st.key.index, head=head)  # type: ignore[union-attr]
            forced = True
        if watched is None:
            watched = self._watched_ids if head == self.metadata.vocab_head else ()
        host = None if self._ring is not None else self.host_logits(logits)
        if host is not None and host.ndim == 1:
            # Host logits and no budget to trigger: only the chosen token is found here; the
            # writer's thread derives the rest (top-k, logsumexp, ranks) from a copy.
            if chosen is None:
                chosen = first_max(host)
            if chosen is not None:
                if self._pieces and "piece" not in keys and head == self.metadata.vocab_head:
                    keys["piece"] = self._pieces.get(int(chosen))
                key = st.key
                chosen = self.writer.add_logits(key.sample, key.index, host, head=head, k=self.k, chosen=chosen,
                                                watched=watched, forced=forced, **keys)
                st.heads.add(head)
                if self._logits_mode(head) != "none":
                    self.record(f"logits:{head}", logits, source="decision")
                return chosen
        d = self.decide_logits(logits, chosen=chosen, watched=watched)
        self.record_decision(d, head=head, forced=forced, **keys)
        if self._logits_mode(head) != "none":
            self.record(f"logits:{head}", logits, source="decision")
        return d.chosen

    def decide_positions(
        self,
        logits: Any,
        *,
        head: str = "token",
        watched: Iterable[int] | None = None,
        fed_back: bool = False,
        offset: int = 0,
    ) -> Any:
        """Decide every position of a ``[T, V]`` (or ``[1, T, V]``) output, one step per position.

        Position 0 is decided at the open step (opening the next one if none is open), each
        later position at the next step of the same sample, so one call of a CTC encoder over
        T frames fills T consecutive steps. Tensors recorded before this call stay at the step
        they were recorded at (the first). The last position's step is then ended, so what is
        recorded next opens the step after it. Each decision records ``position = offset + t``.
        Decisions are derived in one vectorised pass (:func:`recorders.decisions.decide_rows`),
        on the logits' device for torch tensors.

        Several heads over the same positions (the same T): pass ``{head: logits}``; each
        position's step then holds one decision of each head.

        The ids are the run's own argmax (``forced=false``): teacher forcing does not apply,
        because ids decided over a whole output are not fed back into the call that made them.

        Args:
            logits: ``[T, V]`` or ``[1, T, V]`` logits (numpy array or torch tensor), or a
                mapping head -> such logits (every one with the same T).
            head: the decision head of a single ``logits``.
            watched: ids to watch; defaults to the metadata's watched tokens for the vocabulary
                head and none for other heads.
            fed_back: the head's ids are fed back into the model although every position is
                decided (declares the head closed-loop; otherwise it must be in ``open_loop``).
            offset: the ``position`` of row 0 (a streamed sample's earlier frames).

        Returns:
            The ids decided, one per position (a dict head -> ids for a mapping).

        Raises:
            RecorderUsageError: a head neither declared ``open_loop`` nor ``fed_back``; logits
                of another shape, or heads with different T.
            StepOrderError: a head was already decided at the open step.
            TraceUsageError: malformed logits or ids.
        """
        return _decide_positions(self, logits, head=head, watched=watched, fed_back=fed_back, offset=offset)

    def host_logits(self, logits: Any) -> np.ndarray | None:
        """Turn logits into host numpy (a view where possible), or None for logits decided on
        their device by :meth:`decide_logits` (frameworks override, as they override
        :meth:`to_host`).

        The base implementation goes through :func:`recorders.decisions.host_logits`.

        Args:
            logits: the logits given to :meth:`decide`.
        """
        return host_logits(logits)

    def decide_logits(self, logits: Any, *, chosen: int | None, watched: Iterable[int]) -> Decision:
        """Derive the decision of 1-d logits, where they live (frameworks override).

        The base implementation is :func:`recorders.decisions.decide` with the recorder's k.

        Args:
            logits: the logits given to :meth:`decide`.
            chosen: the id used (None: the argmax).
            watched: ids to watch.

        Returns:
            The :class:`tracefmt.decisions.Decision`.

        Raises:
            TraceUsageError: malformed logits or ids.
        """
        return decide(logits, k=self.k, chosen=chosen, watched=watched)

    def _logits_mode(self, head: str) -> str:
        """The policy's mode for ``logits:<head>`` (cached: asked at every decision)."""
        mode = self._logits_modes.get(head)
        if mode is None:
            mode = self._logits_modes[head] = self.policy.mode(f"logits:{head}")
        return mode

    def record_decision(self, decision: Decision, *, head: str = "token", forced: bool = False, **keys: Any) -> None:
        """Write a decision computed elsewhere (e.g. by :func:`recorders.decisions.decide_rows`).

        Args:
            decision: the decision.
            head: its head.
            forced: ``chosen`` was imposed by teacher forcing.
            **keys: as for :meth:`decide`; ``piece`` defaults to the vocabulary's piece.

        Raises:
            StepOrderError: ``head`` was already decided at this step.
        """
        self._check()
        st = self._current()
        if head in st.heads:
            raise StepOrderError(self._twice(st, head))
        st.heads.add(head)
        if "piece" not in keys and self._pieces and head == self.metadata.vocab_head:
            keys["piece"] = self._pieces.get(decision.chosen)
        with self._lock:
            write_decision(self.writer, st.key.sample, st.key.index, decision, head=head, forced=forced, **keys)
        ring = self._ring
        if ring is not None:
            lse = decision.logsumexp
            if ring.budget.margin_fires(head, decision.margin):
                self._fire(st.seq, *st.key, f"margin {decision.margin:.4g} on head {head!r}")
            elif ring.budget.nonfinite and (math.isnan(lse) or lse == math.inf):
                self._fire(st.seq, *st.key, f"NaN/Inf logits on head {head!r}")

    @staticmethod
    def _twice(st: Step, head: str) -> str:
        return (f"head {head!r} was already decided at sample {st.key.sample!r} step {st.key.index}; open one "
                "step per decode step (`with rec.step():`, begin_step(), or a step module)")
