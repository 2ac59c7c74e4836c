"""Every position of one output decided as its own step: CTC frames, VAD chunks, per-position
encoder or duration heads (:meth:`recorders.capture.Recorder.decide_positions`).

A ``[T, V]`` output computed by one call becomes T consecutive steps of the sample: position 0
at the open step (where the call's tensors were recorded), position t at the step t later, each
decision with ``position`` = offset + t; the last position's step is then ended. The heads
decided this way are declared open-loop in the manifest (SPEC.md §2 ``open_loop``): their ids
are not fed back, so a differing frame does not make the frames after it incomparable. Teacher
forcing does not apply to them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .decisions import decide_rows
from .errors import RecorderUsageError, StepOrderError

if TYPE_CHECKING:
    from .capture import Recorder

__all__ = ["decide_positions", "position_rows"]


def position_rows(head: str, logits: Any) -> Any:
    """Return the ``[T, V]`` rows of ``[T, V]`` or ``[1, T, V]`` logits (numpy or torch, not copied).

    Args:
        head: the head, for messages.
        logits: the output (numpy array, torch tensor, or nested lists).

    Returns:
        A 2-d array or tensor: one row per position.

    Raises:
        RecorderUsageError: another shape (a batch above 1, or no position axis).
    """
    shape = tuple(logits.shape) if hasattr(logits, "shape") else np.shape(logits)
    if len(shape) == 3 and shape[0] == 1:
        return logits[0] if hasattr(logits, "shape") else np.asarray(logits)[0]
    if len(shape) == 2:
        return logits if hasattr(logits, "shape") else np.asarray(logits)
    raise RecorderUsageError(
        f"logits of head {head!r} have shape {list(shape)}; deciding every position takes [T, V] or [1, T, V] "
        "(for a batch, call decide_positions once per row)")


def decide_positions(
    rec: Recorder,
    logits: Any,
    *,
    head: str = "token",
    watched: Iterable[int] | None = None,
    fed_back: bool = False,
    offset: int = 0,
) -> Any:
    """Decide every position of ``logits`` with ``rec``, one step per position.

    This is :meth:`recorders.capture.Recorder.decide_positions` (see there for the arguments).

    Returns:
        The ids decided, one per position (a dict head -> ids when ``logits`` is a mapping).

    Raises:
        RecorderUsageError: a head neither open-loop nor ``fed_back``, a bad shape or offset,
            or heads with different T.
        StepOrderError: a head was already decided at the open step.
        TraceUsageError: malformed logits or ids.
    """
    by_head = dict(logits) if isinstance(logits, Mapping) else {head: logits}
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise RecorderUsageError(f"offset must be a non-negative integer, got {offset!r}")
    undeclared = [h for h in by_head if h not in rec.metadata.open_loop]
    if undeclared and not fed_back:
        raise RecorderUsageError(
            f"head(s) {', '.join(map(repr, undeclared))} are decided at every position but not declared open-loop; "
            f"the manifest is written when the recorder opens, so declare them there (open_loop={undeclared!r}), "
            "or pass fed_back=True if these ids are fed back into the model")
    rows = {h: position_rows(h, v) for h, v in by_head.items()}
    lengths = {h: int(r.shape[0]) for h, r in rows.items()}
    if len(set(lengths.values())) > 1:
        raise RecorderUsageError(f"heads decided over the same positions need the same T, got {lengths}")
    rec._check()
    st = rec._current()
    for h in rows:
        if h in st.heads:
            raise StepOrderError(rec._twice(st, h))
    decided = {}
    for h, r in rows.items():
        w = watched if watched is not None else rec._watched_ids if h == rec.metadata.vocab_head else ()
        decided[h] = decide_rows(r, k=rec.k, watched=w) if lengths[h] else []
    out: dict[str, list[int]] = {h: [] for h in rows}
    for t in range(next(iter(lengths.values()), 0)):
        if t:
            rec.begin_step()  # the sample's next step
        for h, ds in decided.items():
            rec.record_decision(ds[t], head=h, position=int(offset) + t)
            if rec._logits_mode(h) != "none":
                rec.record(f"logits:{h}", rows[h][t], source="decision")
            out[h].append(ds[t].chosen)
    rec.end_step()  # what is recorded next belongs to the step after the last position
    return out if isinstance(logits, Mapping) else out[head]
