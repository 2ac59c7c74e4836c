"""The decision half of :class:`steptrace.tracefmt.TraceWriter`'s checked public API:
``add_decision``, ``add_decisions``, ``add_decided`` and ``add_logits`` (SPEC.md §3).

:class:`DecisionMethods` is a base class of ``TraceWriter`` and uses its state (the queue, the
decision keys seen, the open check); the tensor methods, ``flush`` and ``close`` are in
:mod:`steptrace.tracefmt.writer`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from .checks import I32_MAX, DecisionKeys, check_decision_columns, check_decision_row, check_key, opt_i32
from .decisionrows import checked_batch, checked_row
from .decisions import Decision, decide, first_max
from .errors import TraceUsageError
from .writeitems import NOW, DecisionBatchItem, DecisionItem, LogitsItem, _Now, row_keys, row_of_decision

if TYPE_CHECKING:
    from .lane import RecorderLane
    from .metadata import TraceMetadata
    from .outbox import Outbox


class DecisionMethods:
    """The ``add_*`` methods that record decisions, mixed into :class:`steptrace.tracefmt.TraceWriter`
    (whose state they use)."""

    metadata: TraceMetadata
    lane: RecorderLane
    _outbox: Outbox
    _keys: DecisionKeys
    _check_open: Callable[[], None]
    _failed_or_closed: Callable[[], bool]
    add_tensor: Callable[..., None]

    def add_decision(
        self,
        sample: str,
        step: int,
        *,
        chosen: int,
        topk_ids: Sequence[int] | np.ndarray,
        topk_logits: Sequence[float] | np.ndarray,
        head: str = "token",
        argmax: int | None = None,
        margin: float | None = None,
        logsumexp: float | None = None,
        forced: bool = False,
        chosen_logit: float | None = None,
        chosen_rank: int | None = None,
        watched: Iterable[Mapping[str, Any]] | None = None,
        piece: str | None = None,
        frame: int | None = None,
        chunk: int | None = None,
        position: int | None = None,
        emission: int | None = None,
        time_us: int | None | _Now = NOW,
    ) -> None:
        """Record one decision (SPEC.md §3.2).

        Args:
            sample: sample id (utterance, prompt, sequence of a batch).
            step: decode step, 0-based.
            chosen: the token the run used next.
            topk_ids: the k best ids, best first (k >= 2).
            topk_logits: their logits.
            head: decision head (``token``, ``duration``, ...).
            argmax: defaults to ``topk_ids[0]``.
            margin: defaults to ``topk_logits[0] - topk_logits[1]``.
            logsumexp: over the full logits, when known.
            forced: the choice was imposed (teacher forcing), not the run's own.
            chosen_logit: logit of ``chosen``; needed when ``chosen`` is not in ``topk_ids``.
            chosen_rank: 0-based rank of ``chosen`` in the full logits; likewise.
            watched: ``[{"id": 3, "logit": 13.4, "rank": 1}, ...]``.
            piece: decoded text of ``chosen``.
            frame, chunk, position, emission: alignment keys.
            time_us: wall-clock microseconds since the epoch; defaults to now; None records no time.

        Raises:
            TraceUsageError: malformed arguments (the message names the argument).
            TraceWriteError: the background writer failed earlier.
        """
        self._check_open()
        row = checked_row(
            sample, step, chosen=chosen, topk_ids=topk_ids, topk_logits=topk_logits, head=head, argmax=argmax,
            margin=margin, logsumexp=logsumexp, chosen_logit=chosen_logit, chosen_rank=chosen_rank, watched=watched,
            forced=forced, piece=piece, frame=frame, chunk=chunk, position=position, emission=emission,
            time_us=time_us,
        )
        check_decision_row(row.sample, row.step, row.head, row.topk_ids, row.topk_logits, row.margin, row.argmax)
        self._keys.add(row.sample, row.step, row.head)
        self._outbox.put(DecisionItem(row))

    def add_decisions(self, table: pa.Table | pa.RecordBatch | Mapping[str, Any]) -> int:
        """Record many decisions at once: a table (or dict of columns) with SPEC.md §3.1 columns.

        Required columns: ``sample``, ``step``, ``chosen``, ``topk_ids``, ``topk_logits``. Missing
        optional ones default as in :meth:`add_decision` (``head`` "token", ``argmax`` top-1,
        ``margin`` top-1 minus top-2, ``forced`` false, ``time`` now, the rest null); unknown
        columns are refused.

        Args:
            table: the rows.

        Returns:
            The number of rows queued.

        Raises:
            TraceUsageError: a column is missing, unknown, of the wrong type, or breaks SPEC.md
                (k < 2, lists of different lengths, negative steps, empty sample ids).
        """
        self._check_open()
        batch = checked_batch(table)
        check_decision_columns(batch.column("sample"), batch.column("step"), batch.column("head"),
                               batch.column("topk_ids"), batch.column("topk_logits"), batch.column("margin"),
                               batch.column("argmax"))
        self._keys.add_many(batch.column("sample"), batch.column("step"), batch.column("head"))
        self._outbox.put(DecisionBatchItem(batch))
        return batch.num_rows

    def add_decided(self, sample: str, step: int, decision: Decision, *, head: str = "token", **keys: Any) -> None:
        """Record a :class:`tracefmt.decisions.Decision` (derived from logits here or by a recorder).

        ``chosen_logit`` and ``chosen_rank`` are written only when ``chosen`` is outside the top-k
        (SPEC.md §3.1 lets readers derive them otherwise).

        Args:
            sample, step, head: as for :meth:`add_decision`.
            decision: the derived decision.
            **keys: forced, piece, frame, chunk, position, emission, time_us.
        """
        d = decision
        ids, logits = d.topk_ids, d.topk_logits
        if (type(ids) is np.ndarray and type(logits) is np.ndarray and ids.dtype == np.int32
                and logits.dtype == np.float32 and ids.ndim == 1 and ids.shape == logits.shape and ids.size >= 2
                and type(d.chosen) is int and type(d.argmax) is int and type(d.margin) is float
                and type(d.logsumexp) is float and type(d.chosen_logit) is float and type(d.chosen_rank) is int
                and all(type(w.get("id")) is int and type(w.get("logit")) is float and type(w.get("rank")) is int
                        for w in d.watched)
                and type(head) is str and head):
            # A Decision from tracefmt.decisions.decide (the recorders' case): its fields have
            # the row's types already, so the row is built without add_decision's checks.
            self.lane.decided(sample, step, d, head=head, **keys)
            return
        in_top = bool((np.asarray(d.topk_ids) == d.chosen).any())
        self.add_decision(
            sample, step, head=head, chosen=d.chosen, argmax=d.argmax, topk_ids=d.topk_ids,
            topk_logits=d.topk_logits, margin=d.margin, logsumexp=d.logsumexp,
            chosen_logit=None if in_top else d.chosen_logit, chosen_rank=None if in_top else d.chosen_rank,
            watched=d.watched or None, **keys,
        )

    def add_logits(
        self,
        sample: str,
        step: int,
        logits: np.ndarray,
        *,
        head: str = "token",
        k: int = 8,
        chosen: int | None = None,
        watched: Iterable[int] | None = None,
        keep_logits: bool = False,
        **keys: Any,
    ) -> int:
        """Record a decision derived from a full logits vector (host numpy).

        The caller's thread checks the arguments, finds the chosen token (the argmax, unless
        given) and copies the logits; the top-k, margin, logsumexp and ranks are derived on the
        writer's thread (logits holding NaN are decided here, as their order needs a full sort).

        Args:
            sample, step, head: as for :meth:`add_decision`.
            logits: 1-d logits of the position decided.
            k: top candidates kept.
            chosen: the token used; defaults to the argmax.
            watched: ids to watch; defaults to the metadata's watched tokens for the vocabulary
                head (``metadata.vocab_head``, normally ``token``) and none for other heads.
            keep_logits: also store the full logits as tensor ``logits:{head}`` (SPEC.md §3.4).
            **keys: forced, piece, frame, chunk, position, emission, time_us.

        Returns:
            The chosen token id.

        Raises:
            TraceUsageError: malformed logits, ``k < 2``, an id outside the logits, or a bad
                keyword.
            TraceWriteError: the background writer failed earlier.
        """
        if self._failed_or_closed():
            self._check_open()
        if type(sample) is not str or type(step) is not int or not sample or not 0 <= step <= I32_MAX:
            sample, step = check_key(sample, step)
        if type(head) is not str or not head:
            raise TraceUsageError(f"head must be a non-empty string, got {head!r}")
        x = logits if type(logits) is np.ndarray else np.asarray(logits)
        if watched is None:
            watched = list(self.metadata.watched.values()) if head == self.metadata.vocab_head else []
        if type(k) is not int or k < 2:
            raise TraceUsageError(f"k={k!r}: SPEC.md needs at least the top 2 candidates")
        keys_row = row_keys(keys)
        if chosen is None:
            chosen = first_max(x) if x.ndim == 1 else None
        if chosen is None or x.ndim != 1 or x.size < 2 or x.dtype.kind not in "fiub":
            d = decide(x, k=k, chosen=chosen, watched=watched)  # raises on malformed logits
            self._outbox.put(DecisionItem(row_of_decision(sample, step, head, d, keys_row)))
            chosen = d.chosen
        else:
            ids = [t if type(t) is int else opt_i32("token id", t) for t in (chosen, *watched)]
            v = x.size
            for t in ids:
                if t is None or not 0 <= t < v:
                    raise TraceUsageError(f"token id {t} is outside the logits (vocabulary of {v})")
            # a writer process copies the logits into its ring as they are put: no copy here
            copy = x if self._outbox.copies_on_put else x.copy()
            self._outbox.put(LogitsItem(sample, step, head, copy, k, ids[0], ids[1:], keys_row), copy.nbytes)
        if keep_logits:
            self.add_tensor(sample, step, f"logits:{head}", x, source="decision")
        return int(chosen)
