"""One trace's decisions as dense numpy columns (:class:`Side`), read by :func:`load_side` for
the decision comparison of :mod:`steptrace.differ.decisions` and the alignment."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steptrace.tracefmt import TraceReader

from .columns import codes, combined, dense_lists, numpy_col

#: The decision columns ``--align`` may name as alignment keys.
KEY_COLUMNS = ("frame", "chunk", "position", "emission")


class KeyColumns(Mapping[str, tuple[np.ndarray, np.ndarray]]):
    """The alignment key columns of a side (``frame``, ...) as ``(values, valid)``, converted from
    the Arrow table when first asked for (only ``--align`` by keys reads them)."""

    def __init__(self, table: pa.Table | None = None) -> None:
        self._table = table
        self._cols: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def __getitem__(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        if name not in self._cols:
            if self._table is None or name not in KEY_COLUMNS:
                raise KeyError(name)
            self._cols[name] = numpy_col(self._table[name], np.int64, 0)
        return self._cols[name]

    def __iter__(self) -> Iterator[str]:
        return iter(KEY_COLUMNS if self._table is not None else ())

    def __len__(self) -> int:
        return len(KEY_COLUMNS) if self._table is not None else 0


@dataclass
class Side:
    """One trace's decision rows as numpy columns (row order: sample, step, head).

    Attributes hold one entry per row; ``ids``/``logits`` are ``(rows, kmax)`` in the trace's
    dtypes (int32, float32: zero-copy from Arrow when k is constant) padded with -1 and NaN;
    ``watched`` maps a watched token id to ``(logit, rank, valid)`` arrays.
    """

    sample: np.ndarray
    step: np.ndarray
    head: np.ndarray
    chosen: np.ndarray
    argmax: np.ndarray
    forced: np.ndarray
    margin: np.ndarray
    lse: np.ndarray  # NaN where null
    ids: np.ndarray
    logits: np.ndarray
    k: np.ndarray
    chosen_logit: np.ndarray  # NaN where unknown
    chosen_rank: np.ndarray  # -1 where unknown
    keys: Mapping[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=KeyColumns)
    watched: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    piece: pa.Array | None = None

    @property
    def rows(self) -> int:
        """Number of decision rows."""
        return int(self.sample.size)


def load_side(reader: TraceReader, samples: list[str], heads: list[str], watched_ids: list[int],
              keep: list[str] | None = None) -> Side:
    """Read a trace's decisions into a :class:`Side`.

    Args:
        reader: the trace.
        samples: sorted universe of sample ids (codes index into it).
        heads: sorted universe of heads to keep (other heads are dropped).
        watched_ids: watched token ids to extract.
        keep: only these samples (None: all).
    """
    # chosen_logit / chosen_rank are derived here from the dense top-k (cheaper than the reader's)
    t = reader.decisions(sample=keep, derive=False)
    head_codes = codes(t["head"], heads)
    if (head_codes < 0).any():
        t = t.filter(pa.array(head_codes >= 0))
        head_codes = head_codes[head_codes >= 0]
    ids, k = dense_lists(t["topk_ids"], None, -1)
    logits, _ = dense_lists(t["topk_logits"], None, np.nan)
    lse, _ = numpy_col(t["logsumexp"], np.float64, np.nan)
    chosen = numpy_col(t["chosen"], np.int64, -1)[0]
    cl, cl_valid = numpy_col(t["chosen_logit"], np.float64, np.nan)
    cr, cr_valid = numpy_col(t["chosen_rank"], np.int64, -1)
    if t.num_rows and not (cl_valid.all() and cr_valid.all()):
        # SPEC.md 3.1: null chosen_logit / chosen_rank are topk_logits[i] and i where chosen = topk_ids[i]
        pos = _first_in_rows(ids, chosen, k)
        cl = np.where(cl_valid, cl, np.where(pos >= 0, logits[np.arange(pos.size), np.maximum(pos, 0)], np.nan))
        cr = np.where(cr_valid, cr, pos)
        cl_valid, cr_valid = cl_valid | (pos >= 0), cr_valid | (pos >= 0)
    side = Side(
        sample=codes(t["sample"], samples),
        step=numpy_col(t["step"], np.int64, 0)[0],
        head=head_codes,
        chosen=chosen,
        argmax=numpy_col(t["argmax"], np.int64, -1)[0],
        forced=numpy_col(t["forced"], bool, False)[0],
        margin=numpy_col(t["margin"], np.float64, np.nan)[0],
        lse=lse,
        ids=ids,
        logits=logits,
        k=k,
        chosen_logit=np.where(cl_valid, cl, np.nan),
        chosen_rank=np.where(cr_valid, cr, -1),
        piece=combined(t["piece"]),
        keys=KeyColumns(t.select(list(KEY_COLUMNS))),
    )
    if watched_ids and t.num_rows:
        w = combined(t["watched"])
        flat = pc.list_flatten(w)
        parents = pc.list_parent_indices(w).to_numpy()
        wid = flat.field("id").to_numpy(zero_copy_only=False)
        wl = flat.field("logit").fill_null(np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
        wr = flat.field("rank").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        for tok in watched_ids:
            m = wid == tok
            logit = np.full(t.num_rows, np.nan)
            rank = np.full(t.num_rows, -1, dtype=np.int64)
            valid = np.zeros(t.num_rows, dtype=bool)
            logit[parents[m]] = wl[m]
            rank[parents[m]] = wr[m]
            valid[parents[m]] = True
            side.watched[tok] = (logit, rank, valid)
    return side


def _first_in_rows(ids: np.ndarray, tok: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Per row of a row-major ``(rows, kmax)`` id array, the first position of ``tok`` among
    the row's ``k`` ids, -1 when absent."""
    tok = tok.astype(ids.dtype, copy=False)
    pos = np.where((ids[:, 0] == tok) & (k > 0), 0, -1) if ids.shape[1] else np.full(tok.size, -1)
    rest = np.flatnonzero(pos < 0)  # usually few: the chosen token is the argmax
    if rest.size and ids.shape[1] > 1:
        hit = ids[rest, 1:] == tok[rest, None]
        hit &= np.arange(1, ids.shape[1]) < k[rest, None]
        at = hit.argmax(axis=1)
        pos[rest] = np.where(hit[np.arange(rest.size), at], at + 1, -1)
    return pos
