"""Decision rows from a caller's arguments, checked against SPEC.md §3: one row
(:meth:`tracefmt.TraceWriter.add_decision`) or a whole table (:meth:`tracefmt.TraceWriter.add_decisions`)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from .checks import I32, check_key, opt_float, opt_i32
from .errors import TraceUsageError
from .schema import DECISIONS
from .writeitems import DecisionRow, decision_row, row_keys


def checked_row(
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
    chosen_logit: float | None = None,
    chosen_rank: int | None = None,
    watched: Iterable[Mapping[str, Any]] | None = None,
    **keys: Any,
) -> DecisionRow:
    """Check the arguments of :meth:`tracefmt.TraceWriter.add_decision` and build its row.

    Args:
        sample, step, chosen, topk_ids, topk_logits, head, argmax, margin, logsumexp,
            chosen_logit, chosen_rank, watched: as for :meth:`tracefmt.TraceWriter.add_decision`.
        **keys: forced, piece, frame, chunk, position, emission, time_us.

    Returns:
        The :class:`tracefmt.writeitems.DecisionRow`.

    Raises:
        TraceUsageError: malformed arguments (the message names the argument).
    """
    sample, step = check_key(sample, step)
    if not isinstance(head, str) or not head:
        raise TraceUsageError(f"head must be a non-empty string, got {head!r}")
    ids = np.asarray(topk_ids, dtype=np.int64)
    logits = np.asarray(topk_logits, dtype=np.float32)
    if ids.ndim != 1 or ids.shape != logits.shape or ids.size < 2:
        raise TraceUsageError(
            f"topk_ids and topk_logits must be 1-d of the same length >= 2, got {ids.shape} and {logits.shape}"
        )
    if ids.min() < I32.min or ids.max() > I32.max:
        raise TraceUsageError("token ids must fit in 32 bits")
    chosen_i = opt_i32("chosen", chosen)
    if chosen_i is None:
        raise TraceUsageError("chosen is required")
    if argmax is None:
        argmax = int(ids[0])
    if margin is None:
        margin = float(np.float32(float(logits[0]) - float(logits[1])))
    rows_watched = None
    if watched is not None:
        try:
            rows_watched = [
                {"id": opt_i32("watched id", w["id"]), "logit": opt_float("watched logit", w.get("logit")),
                 "rank": opt_i32("watched rank", w.get("rank"))}
                for w in watched
            ]
        except (KeyError, TypeError, AttributeError) as exc:
            raise TraceUsageError(f"watched must be a list of {{id, logit, rank}} dicts ({exc!r})") from None
        if any(w["id"] is None for w in rows_watched):
            raise TraceUsageError("watched ids must be integers")
    return decision_row(
        sample, step, head, chosen=chosen_i, argmax=opt_i32("argmax", argmax), topk_ids=ids.astype(np.int32),
        topk_logits=logits, margin=opt_float("margin", margin), logsumexp=opt_float("logsumexp", logsumexp),
        chosen_logit=opt_float("chosen_logit", chosen_logit), chosen_rank=opt_i32("chosen_rank", chosen_rank),
        watched=rows_watched, keys=row_keys(keys),
    )


def checked_batch(table: pa.Table | pa.RecordBatch | Mapping[str, Any]) -> pa.RecordBatch:
    """Check a table of decisions for :meth:`tracefmt.TraceWriter.add_decisions` and return
    it as one record batch of :data:`tracefmt.schema.DECISIONS`, defaults filled in.

    Args:
        table: the rows (a table, a record batch, or a dict of columns).

    Returns:
        The record batch.

    Raises:
        TraceUsageError: a column is missing, unknown, of the wrong type, or breaks SPEC.md.
    """
    import pyarrow.compute as pc  # here: the writer's other paths need none of it

    t = table if isinstance(table, (pa.Table, pa.RecordBatch)) else pa.table(dict(table))
    n = t.num_rows
    names = set(t.column_names)
    missing = {"sample", "step", "chosen", "topk_ids", "topk_logits"} - names
    unknown = names - set(DECISIONS.names)
    if missing or unknown:
        raise TraceUsageError(
            f"add_decisions: missing column(s) {sorted(missing)}, unknown column(s) {sorted(unknown)}; "
            f"columns are {', '.join(DECISIONS.names)}"
        )
    cols: dict[str, pa.Array] = {}
    try:
        for f in DECISIONS:
            if f.name in names:
                col = t.column(f.name)
                col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
                if pa.types.is_dictionary(col.type):
                    col = col.dictionary_decode()
                cols[f.name] = col.cast(f.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise TraceUsageError(f"add_decisions: a column has the wrong type ({exc})") from None
    k_ids = pc.list_value_length(cols["topk_ids"]).to_numpy(zero_copy_only=False)
    k_logits = pc.list_value_length(cols["topk_logits"]).to_numpy(zero_copy_only=False)
    if n and (k_ids.min() < 2 or (k_ids != k_logits).any()):
        raise TraceUsageError("add_decisions: topk_ids and topk_logits must have the same length >= 2 on every row")
    for name in ("sample", "step", "chosen", "topk_ids", "topk_logits"):
        if cols[name].null_count:
            raise TraceUsageError(f"add_decisions: column {name} holds nulls")
    if n and pc.min(cols["step"]).as_py() < 0:
        raise TraceUsageError("add_decisions: steps must be >= 0")
    if n and pc.min(pc.utf8_length(cols["sample"])).as_py() == 0:
        raise TraceUsageError("add_decisions: sample ids must be non-empty")
    if "head" not in cols:
        cols["head"] = pa.array(["token"] * n, pa.utf8())
    if "argmax" not in cols:
        cols["argmax"] = pc.list_element(cols["topk_ids"], 0)
    if "margin" not in cols:
        l0 = pc.list_element(cols["topk_logits"], 0).to_numpy(zero_copy_only=False).astype(np.float64)
        l1 = pc.list_element(cols["topk_logits"], 1).to_numpy(zero_copy_only=False).astype(np.float64)
        with np.errstate(invalid="ignore", over="ignore"):
            cols["margin"] = pa.array((l0 - l1).astype(np.float32))
    if "forced" not in cols:
        cols["forced"] = pa.array(np.zeros(n, dtype=bool))
    if "time" not in cols:
        cols["time"] = pa.array(np.full(n, time.time_ns() // 1000, dtype=np.int64)).cast(DECISIONS.field("time").type)
    arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in DECISIONS]
    return pa.RecordBatch.from_arrays(arrays, schema=DECISIONS)
