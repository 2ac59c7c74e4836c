"""Alignment of two traces' decision rows: by (sample, step), by named keys (``frame,emission``
for transducers, ``chunk`` for streaming), or by token-sequence resync (edit distance) so that an
inserted or dropped token is reported as such and later steps still line up.

Every mode produces one :class:`Alignment`: a full outer join in which rows present on one
side only are kept (never dropped) and marked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .columns import duplicates, merge_sorted, pack_pair
from .side import KEY_COLUMNS, Side
from .errors import AlignmentError, DiffFormatError
from .sequence import align as align_sequences

#: Gap codes of an aligned row.
BOTH, A_ONLY, B_ONLY = 0, 1, 2


@dataclass
class Alignment:
    """A full outer join of two traces' decision rows, ordered by sample, position, head.

    Attributes:
        mode: ``step``, ``keys:<k1,k2>`` or ``resync``.
        ia, ib: each aligned row's row in side A / B, -1 when absent.
        sample, head: codes.
        pos: ordinal of the row's step within its sample (aligned order).
        a_step, b_step: the step on each side, -1 when absent.
        gap: ``BOTH``, ``A_ONLY`` (the candidate lacks it) or ``B_ONLY`` (the candidate adds it).
        approximate: sample codes whose resync middle was too large and paired by position.
    """

    mode: str
    ia: np.ndarray
    ib: np.ndarray
    sample: np.ndarray
    head: np.ndarray
    pos: np.ndarray
    a_step: np.ndarray
    b_step: np.ndarray
    gap: np.ndarray
    approximate: list[int] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Number of aligned rows."""
        return int(self.ia.size)


def _finish(mode: str, A: Side, B: Side, ia: np.ndarray, ib: np.ndarray, pos: np.ndarray) -> Alignment:
    take_a = np.maximum(ia, 0)
    take_b = np.maximum(ib, 0)
    has_a, has_b = ia >= 0, ib >= 0

    def pick(xa: np.ndarray, xb: np.ndarray) -> np.ndarray:
        va = xa[take_a] if xa.size else np.zeros(ia.size, np.int64)
        vb = xb[take_b] if xb.size else np.zeros(ib.size, np.int64)
        return np.where(has_a, va, vb)

    a_step = np.where(has_a, A.step[take_a] if A.rows else 0, -1)
    b_step = np.where(has_b, B.step[take_b] if B.rows else 0, -1)
    gap = np.where(has_a & has_b, BOTH, np.where(has_a, A_ONLY, B_ONLY)).astype(np.int8)
    return Alignment(mode, ia, ib, pick(A.sample, B.sample), pick(A.head, B.head), pos, a_step, b_step, gap)


def _check_unique(key: np.ndarray, side: str, what: str) -> None:
    d = duplicates(key)
    if d.size:
        raise DiffFormatError(
            f"trace {side} records {d.size} {what} more than once; SPEC.md requires them to be unique"
        )


def align_steps(A: Side, B: Side, names: tuple[str, str] = ("A", "B")) -> Alignment:
    """Align by (sample, step, head); ``names`` name the two traces in messages (their paths)."""
    ka, kb = pack_pair([A.sample, A.step, A.head], [B.sample, B.step, B.head])
    _check_unique(ka, names[0], "(sample, step, head)")
    _check_unique(kb, names[1], "(sample, step, head)")
    keys, ia, ib = merge_sorted(ka, kb)
    al = _finish("step", A, B, ia, ib, np.zeros(keys.size, np.int64))
    al.pos = np.where(ia >= 0, al.a_step, al.b_step)
    return al


def align_keys(A: Side, B: Side, keys: list[str], names: tuple[str, str] = ("A", "B")) -> Alignment:
    """Align by (sample, key1, key2, ..., head), e.g. ``["frame", "emission"]`` for transducers.

    Raises:
        AlignmentError: an unknown key, or rows without a value for a key.
    """
    for k in keys:
        if k not in KEY_COLUMNS:
            raise AlignmentError(f"--align {k!r}: alignment keys are step, resync or a list of {', '.join(KEY_COLUMNS)}")
    cols_a, cols_b = [A.sample], [B.sample]
    for k in keys:
        for side, S, cols in ((names[0], A, cols_a), (names[1], B, cols_b)):
            vals, valid = S.keys[k]
            if S.rows and not valid.all():
                raise AlignmentError(
                    f"--align {','.join(keys)}: trace {side} has {int((~valid).sum())} decision rows without "
                    f"a {k!r} value; record {k} on every decision or align by step"
                )
        lo = min([S.keys[k][0].min() for S in (A, B) if S.rows] or [0])
        cols_a.append(A.keys[k][0] - lo)
        cols_b.append(B.keys[k][0] - lo)
    cols_a.append(A.head)
    cols_b.append(B.head)
    ka, kb = pack_pair(cols_a, cols_b)
    what = "(sample, " + ", ".join(keys) + ", head)"
    _check_unique(ka, names[0], what)
    _check_unique(kb, names[1], what)
    ukeys, ia, ib = merge_sorted(ka, kb)
    al = _finish("keys:" + ",".join(keys), A, B, ia, ib, np.zeros(ukeys.size, np.int64))
    hbits = max(int(max(A.head.max(initial=0), B.head.max(initial=0))).bit_length(), 1)
    _, al.pos = np.unique(ukeys >> hbits, return_inverse=True)
    return al


def _bounds(sample: np.ndarray, nsamples: int) -> np.ndarray:
    return np.searchsorted(sample, np.arange(nsamples + 1))


def align_resync(A: Side, B: Side, vocab_head: int, nsamples: int, names: tuple[str, str] = ("A", "B")) -> Alignment:
    """Align each sample's steps by an edit-distance alignment of the ``vocab_head`` tokens
    chosen on each side; every head of a step follows its token's pairing.

    Raises:
        AlignmentError: a step has decisions on other heads but none on ``vocab_head``.
    """
    ma, mb = A.head == vocab_head, B.head == vocab_head
    sa, sb = A.sample[ma], B.sample[mb]
    ta, tb = A.chosen[ma], B.chosen[mb]
    pa_, pb_ = A.step[ma], B.step[mb]
    ba, bb = _bounds(sa, nsamples), _bounds(sb, nsamples)
    ps, pia, pib, ppos = [], [], [], []
    approximate = []
    for s in range(nsamples):
        a0, a1, b0, b1 = ba[s], ba[s + 1], bb[s], bb[s + 1]
        if a1 == a0 and b1 == b0:
            continue
        x, y = ta[a0:a1], tb[b0:b1]
        if x.size == y.size and (x == y).all():
            ia_s = ib_s = np.arange(x.size)
        else:
            ia_s, ib_s, exact = align_sequences(x, y)
            if not exact:
                approximate.append(s)
        ps.append(np.full(ia_s.size, s))
        pia.append(np.where(ia_s >= 0, pa_[a0:a1][np.maximum(ia_s, 0)] if x.size else -1, -1))
        pib.append(np.where(ib_s >= 0, pb_[b0:b1][np.maximum(ib_s, 0)] if y.size else -1, -1))
        ppos.append(np.arange(ia_s.size))
    cat = (lambda xs: np.concatenate(xs).astype(np.int64)) if ps else (lambda xs: np.zeros(0, np.int64))
    P_s, P_a, P_b, P_pos = cat(ps), cat(pia), cat(pib), cat(ppos)

    def positions(S: Side, steps: np.ndarray, side: str) -> np.ndarray:
        have = steps >= 0
        k_rows, k_pairs = pack_pair([S.sample, S.step], [P_s[have], steps[have]])
        order = np.argsort(k_pairs)
        idx = np.searchsorted(k_pairs[order], k_rows)
        idx_c = np.minimum(idx, max(order.size - 1, 0))
        ok = (idx < order.size) & (k_pairs[order][idx_c] == k_rows) if order.size else np.zeros(S.rows, bool)
        if not ok.all():
            bad = int((~ok).sum())
            raise AlignmentError(
                f"--align resync: trace {side} has {bad} decision rows at steps without a decision on the "
                f"token head; resync pairs steps by their tokens, so align by step or by keys instead"
            )
        return P_pos[have][order[idx_c]]

    pos_a = positions(A, P_a, names[0]) if A.rows else np.zeros(0, np.int64)
    pos_b = positions(B, P_b, names[1]) if B.rows else np.zeros(0, np.int64)
    ka, kb = pack_pair([A.sample, pos_a, A.head], [B.sample, pos_b, B.head])
    _check_unique(ka, names[0], "(sample, step, head)")
    _check_unique(kb, names[1], "(sample, step, head)")
    _, ia, ib = merge_sorted(ka, kb)
    al = _finish("resync", A, B, ia, ib, np.zeros(ia.size, np.int64))
    al.pos = np.where(ia >= 0, pos_a[np.maximum(ia, 0)] if A.rows else 0, pos_b[np.maximum(ib, 0)] if B.rows else 0)
    al.approximate = approximate
    return al
