"""Checks shared by every door into a trace (writer, JSONL import, validate): arguments, decision
rows (SPEC.md §3), key uniqueness and vocabulary ids; each failure names what is wrong."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import TraceUsageError

I32 = np.iinfo(np.int32)
I64 = np.iinfo(np.int64)
# Plain ints: ``np.iinfo.min``/``max`` are properties computed at each access (~0.3 us each),
# and these checks run for every row a recorder writes.
_BOUNDS = {id(I32): (int(I32.min), int(I32.max), 32), id(I64): (int(I64.min), int(I64.max), 64)}
I32_MAX = int(I32.max)


def check_key(sample: Any, step: Any) -> tuple[str, int]:
    """Return (sample, step) checked: a non-empty string and an int32 step >= 0."""
    if not isinstance(sample, str) or not sample:
        raise TraceUsageError(f"sample must be a non-empty string, got {sample!r}")
    if not sample.isascii():
        check_text("sample", sample)
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= I32_MAX:
        raise TraceUsageError(f"step must be an integer in [0, 2**31), got {step!r}")
    return sample, int(step)


def opt_int(name: str, v: Any, limits: np.iinfo) -> int | None:
    """Return ``v`` as int (or None), checked against ``limits``."""
    if v is None:
        return None
    lo, hi, bits = _BOUNDS.get(id(limits)) or (int(limits.min), int(limits.max), limits.bits)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise TraceUsageError(f"{name} must be a {bits}-bit integer or None, got {v!r}")
    return int(v)


def opt_i32(name: str, v: Any) -> int | None:
    """Return ``v`` as a 32-bit int, or None."""
    return opt_int(name, v, I32)


def opt_float(name: str, v: Any) -> float | None:
    """Return ``v`` as float, or None."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TraceUsageError(f"{name} must be a number or None, got {v!r}")
    return float(v)


def opt_str(name: str, v: Any) -> str | None:
    """Return ``v`` checked to be a string, or None."""
    if v is not None and not isinstance(v, str):
        raise TraceUsageError(f"{name} must be a string or None, got {v!r}")
    return v if v is None or v.isascii() else check_text(name, v)


# ---------------------------------------------------------------------- decision rows (SPEC.md §3)
def decision_problem(sample: Any, step: Any, head: Any, reason: str) -> str:
    """Return the one message every door (writer, JSONL import, validate) gives for a bad decision."""
    from .jsonio import quote

    return f"decision (sample {quote(sample)}, step {step}, head {quote(head)}): {reason}"


def topk_problems(
    ids: np.ndarray, logits: np.ndarray, offsets: np.ndarray, margin: np.ndarray | None, argmax: np.ndarray | None
) -> tuple[np.ndarray, list[str]]:
    """Find decision rows whose top-k breaks SPEC.md §3.2 (vectorised over all rows).

    A top-k is best first (logits non-increasing, NaN after every number), its ids are distinct,
    ``argmax == topk_ids[0]`` and ``margin == float32(topk_logits[0] - topk_logits[1])`` (NaN
    matching NaN). Equal float32 logits may come in either id order: rounding to float32 can
    make two different runtime logits equal.

    Args:
        ids: all rows' top-k ids, concatenated (int64).
        logits: their logits, concatenated (float32).
        offsets: ``len(rows) + 1`` start offsets of each row in ``ids``; every row has k >= 2.
        margin: each row's recorded margin (float32), or None to skip that check.
        argmax: each row's argmax, or None to skip that check.

    Returns:
        (row numbers of bad rows, ascending; the reason for each).
    """
    n = offsets.size - 1
    reasons: dict[int, str] = {}
    if n <= 0:
        return np.zeros(0, np.int64), []
    row = np.repeat(np.arange(n), np.diff(offsets))
    same = row[1:] == row[:-1]
    a, b = logits[:-1].astype(np.float64), logits[1:].astype(np.float64)
    with np.errstate(invalid="ignore"):
        ok = (a >= b) | np.isnan(b)
    ok |= ~same
    bad_at = np.flatnonzero(~ok)
    rows_bad, first_bad = np.unique(row[1:][bad_at], return_index=True)
    for r, j in zip(rows_bad.tolist(), bad_at[first_bad].tolist()):
        reasons.setdefault(r, _order_reason(j + 1 - int(offsets[r]), a[j], b[j]))
    k = int(offsets[1] - offsets[0])
    if ids.size == n * k:  # every row has the same k: sort each row (fast for small k)
        srt = np.sort(ids.reshape(n, k), axis=1)
        same_id = srt[:, 1:] == srt[:, :-1]
        for r in np.flatnonzero(same_id.any(axis=1)).tolist():
            reasons.setdefault(r, _repeat_reason(int(srt[r, 1:][same_id[r]][0])))
    else:
        order = np.lexsort((ids, row))
        sid, srow = ids[order], row[order]
        dup = np.flatnonzero((sid[1:] == sid[:-1]) & (srow[1:] == srow[:-1]))
        rows_dup, first_dup = np.unique(srow[1:][dup], return_index=True)
        for r, j in zip(rows_dup.tolist(), dup[first_dup].tolist()):
            reasons.setdefault(r, _repeat_reason(int(sid[j])))
    first = offsets[:-1]
    if argmax is not None:
        am = np.asarray(argmax, np.int64)
        for r in np.flatnonzero(am != ids[first]).tolist():
            reasons.setdefault(r, _argmax_reason(int(am[r]), int(ids[first[r]])))
    if margin is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            expect = (logits[first].astype(np.float64) - logits[first + 1].astype(np.float64)).astype(np.float32)
        m = np.asarray(margin, np.float32)
        bad = ~((expect == m) | (np.isnan(expect) & np.isnan(m)))
        for r in np.flatnonzero(bad).tolist():
            reasons.setdefault(r, _margin_reason(m[r], expect[r]))
    rows = np.array(sorted(reasons), np.int64)
    return rows, [reasons[r] for r in rows.tolist()]


def _num(x: float) -> str:
    x = float(x)
    return "NaN" if x != x else repr(x)


def _order_reason(pos: int, a: float, b: float) -> str:
    return (f"topk_logits are not best first at position {pos} ({_num(a)} then {_num(b)}); list the top-k by "
            "decreasing logit, NaN last (SPEC.md §3.2)")


def _repeat_reason(token: int) -> str:
    return f"topk_ids repeats an id ({token}); the top-k holds k distinct ids (SPEC.md §3.2)"


def _argmax_reason(argmax: int, first: int) -> str:
    return f"argmax {argmax} differs from topk_ids[0] = {first}; argmax is the first top-k id (SPEC.md §3.2)"


def _margin_reason(margin: float, expect: float) -> str:
    return f"margin {_num(margin)} differs from topk_logits[0] - topk_logits[1] = {_num(expect)} (SPEC.md §3.2)"


def duplicate_message(sample: Any, step: Any, head: Any, parts: Sequence[str] = ()) -> str:
    """Return the message for a (sample, step, head) recorded twice (``parts``: where, if known)."""
    where = f" (in parts {' and '.join(parts)})" if len(parts) > 1 else (f" (in part {parts[0]})" if parts else "")
    return decision_problem(
        sample, step, head, f"recorded more than once{where}; (sample, step, head) MUST be unique in a trace "
        "(SPEC.md §3.1)"
    )


class DecisionKeys:
    """The (sample, step, head) keys a writer has accepted, to refuse a second row of one key.

    Per (sample, head) it keeps the count of steps recorded in order from 0 and a set of the
    others, so a recorder that writes steps in order costs O(1) memory per (sample, head).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], list] = {}  # (sample, head) -> [steps 0..n-1 seen, {other steps}]

    def _add(self, sample: str, head: str, step: int) -> bool:
        st = self._seen.get((sample, head))
        if st is None:
            st = self._seen[(sample, head)] = [0, set()]
        if step < st[0] or step in st[1]:
            return False
        if step == st[0]:
            st[0] += 1
            extra = st[1]
            while st[0] in extra:
                extra.discard(st[0])
                st[0] += 1
        else:
            st[1].add(step)
        return True

    def add(self, sample: str, step: int, head: str) -> None:
        """Accept one key.

        Raises:
            TraceUsageError: the key was accepted before.
        """
        with self._lock:
            if not self._add(sample, head, step):
                raise TraceUsageError(duplicate_message(sample, step, head))

    def add_many(self, samples: Any, steps: Any, heads: Any) -> None:
        """Accept many keys at once, vectorised (one Python step per (sample, head), not per row);
        none is kept if one is refused.

        Args:
            samples, steps, heads: equal-length pyarrow arrays of the keys (utf8, int32, utf8).

        Raises:
            TraceUsageError: a key repeats within the batch or was accepted before.
        """
        import pyarrow.compute as pc

        n = len(steps)
        if n == 0:
            return
        s_enc, h_enc = pc.dictionary_encode(samples), pc.dictionary_encode(heads)
        s_names, h_names = s_enc.dictionary.to_pylist(), h_enc.dictionary.to_pylist()
        s = s_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        h = h_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        st = np.asarray(steps.to_numpy(zero_copy_only=False), np.int64)
        order = np.lexsort((st, h, s))
        s, h, st = s[order], h[order], st[order]
        new_group = np.r_[True, (s[1:] != s[:-1]) | (h[1:] != h[:-1])]
        twice = np.flatnonzero(~new_group[1:] & (st[1:] == st[:-1]))
        if twice.size:
            i = int(twice[0]) + 1
            raise TraceUsageError(duplicate_message(s_names[s[i]], int(st[i]), h_names[h[i]]))
        bounds = np.r_[np.flatnonzero(new_group), n].tolist()
        groups = [((s_names[s[lo]], h_names[h[lo]]), lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
        with self._lock:
            for key, lo, hi in groups:
                seen = self._seen.get(key)
                if seen is None:
                    continue
                g = st[lo:hi]
                old = g < seen[0]
                if seen[1]:
                    old |= np.isin(g, np.fromiter(seen[1], np.int64, len(seen[1])))
                if old.any():
                    j = lo + int(np.argmax(old))
                    raise TraceUsageError(duplicate_message(key[0], int(st[j]), key[1]))
            for key, lo, hi in groups:
                seen = self._seen.setdefault(key, [0, set()])
                g = st[lo:hi]
                if int(g[0]) == seen[0] and int(g[-1]) == seen[0] + (hi - lo) - 1:
                    seen[0] += hi - lo  # sorted and distinct, so exactly the next steps
                    while seen[0] in seen[1]:
                        seen[1].discard(seen[0])
                        seen[0] += 1
                else:
                    for step in g.tolist():
                        self._add(key[0], key[1], step)


def check_decision_row(sample: str, step: int, head: str, ids: np.ndarray, logits: np.ndarray,
                       margin: float, argmax: int) -> None:
    """Refuse one decision row whose top-k breaks SPEC.md §3.2 (see :func:`topk_problems`).

    Raises:
        TraceUsageError: the message of :func:`decision_problem`.
    """
    # plain Python: k is small, and numpy's per-call overhead would dominate (same checks and
    # messages as topk_problems, in the same order)
    v = np.asarray(logits, np.float32).tolist()
    id_list = np.asarray(ids).tolist()
    reason = None
    for i in range(1, len(v)):
        a, b = v[i - 1], v[i]
        if not (a >= b or b != b):  # b != b: b is NaN
            reason = _order_reason(i, a, b)
            break
    if reason is None and len(set(id_list)) != len(id_list):
        reason = _repeat_reason(min(x for x in id_list if id_list.count(x) > 1))
    if reason is None and argmax != id_list[0]:
        reason = _argmax_reason(argmax, id_list[0])
    if reason is None:
        expect = float(np.float32(v[0] - v[1]))  # float64 difference of the float32 values (SPEC.md §3.2)
        m = float(np.float32(margin))
        if not (expect == m or (expect != expect and m != m)):
            reason = _margin_reason(m, expect)
    if reason is not None:
        raise TraceUsageError(decision_problem(sample, step, head, reason))


def check_decision_columns(samples: Any, steps: Any, heads: Any, topk_ids: Any, topk_logits: Any,
                           margin: Any, argmax: Any) -> None:
    """Refuse a batch of decision rows (pyarrow columns) of which one breaks SPEC.md §3.2.

    Raises:
        TraceUsageError: the message of :func:`decision_problem` for the first bad row.
    """
    import pyarrow.compute as pc

    lengths = pc.list_value_length(topk_ids).to_numpy(zero_copy_only=False)
    offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = pc.list_flatten(topk_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    logits = pc.list_flatten(topk_logits).to_numpy(zero_copy_only=False).astype(np.float32)
    rows, reasons = topk_problems(ids, logits, offsets, margin.to_numpy(zero_copy_only=False),
                                  argmax.to_numpy(zero_copy_only=False))
    if rows.size:
        r = int(rows[0])
        raise TraceUsageError(decision_problem(samples[r].as_py(), steps[r].as_py(), heads[r].as_py(), reasons[0]))


def check_text(name: str, v: str) -> str:
    """Return ``v`` checked to be encodable as UTF-8 (no lone surrogates).

    Raises:
        TraceUsageError: naming ``name``.
    """
    if not v.isascii():
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            from .jsonio import quote

            raise TraceUsageError(f"{name} {quote(v)} is not valid Unicode text (it holds a lone surrogate)") from None
    return v


def check_vocab_ids(ids: np.ndarray) -> str | None:
    """Return why vocabulary ids break SPEC.md §2.2, or None.

    Ids are integers in [0, 2**31), distinct, and the largest is below ``2 * len(ids) + 65536``
    so that a reader's id -> piece table stays within a small multiple of the file's size.
    """
    if ids.size == 0:
        return None
    if ids.dtype.kind not in "iu":
        return "ids are not integers"
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi > I32_MAX:
        return f"ids must lie in [0, 2**31), found {lo if lo < 0 else hi}"
    if hi >= 2 * ids.size + VOCAB_SLACK:
        return (f"its largest id {hi} is far beyond its {ids.size} pieces (SPEC.md §2.2 allows ids up to "
                f"2 x pieces + {VOCAB_SLACK})")
    if np.unique(ids).size != ids.size:
        return "an id appears twice"
    return None


#: Sparse vocabularies may skip ids; the largest id is below 2 x pieces + this (SPEC.md §2.2).
VOCAB_SLACK = 1 << 16
