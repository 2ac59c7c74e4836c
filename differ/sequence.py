"""Token sequences: edit-distance alignment (resync after an inserted or dropped token), error
rates, and text from recorded pieces for WER/CER.

The dynamic programme runs row by row in numpy (each row is one ``minimum.accumulate``), after
trimming the common prefix and suffix, so typical decodes that part late cost almost nothing.
"""

from __future__ import annotations

import re

import numpy as np

#: Largest middle part (len(a) * len(b) cells) aligned exactly; beyond it, pairs by position.
MAX_CELLS = 16_000_000


def _trim(a: np.ndarray, b: np.ndarray) -> tuple[int, int]:
    """Return the lengths of the common prefix and (non-overlapping) common suffix."""
    n = min(a.size, b.size)
    diff = np.flatnonzero(a[:n] != b[:n])
    pre = int(diff[0]) if diff.size else n
    ra, rb = a[pre:][::-1], b[pre:][::-1]
    n2 = min(ra.size, rb.size)
    diff2 = np.flatnonzero(ra[:n2] != rb[:n2])
    suf = int(diff2[0]) if diff2.size else n2
    return pre, suf


def _table(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Return the full Levenshtein table (len(a)+1, len(b)+1), int32."""
    n, m = a.size, b.size
    D = np.empty((n + 1, m + 1), dtype=np.int32)
    j = np.arange(m + 1, dtype=np.int32)
    D[0] = j
    for i in range(1, n + 1):
        prev = D[i - 1]
        t = np.empty(m + 1, dtype=np.int32)
        t[0] = i
        np.minimum(prev[:-1] + (b != a[i - 1]), prev[1:] + 1, out=t[1:])
        D[i] = np.minimum.accumulate(t - j) + j
    return D


def _distance(a: np.ndarray, b: np.ndarray) -> int:
    """Return the Levenshtein distance keeping only one row."""
    n, m = a.size, b.size
    if n == 0 or m == 0:
        return n + m
    j = np.arange(m + 1, dtype=np.int64)
    row = j.copy()
    t = np.empty(m + 1, dtype=np.int64)
    for i in range(1, n + 1):
        t[0] = i
        np.minimum(row[:-1] + (b != a[i - 1]), row[1:] + 1, out=t[1:])
        row = np.minimum.accumulate(t - j) + j
    return int(row[-1])


def edit_distance(a: np.ndarray, b: np.ndarray) -> int:
    """Return the Levenshtein distance between two integer sequences."""
    a, b = np.asarray(a), np.asarray(b)
    pre, suf = _trim(a, b)
    return _distance(a[pre : a.size - suf], b[pre : b.size - suf])


def align(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """Align two sequences with a minimal edit script.

    Args:
        a, b: integer sequences (token ids).

    Returns:
        ``(ia, ib, exact)``: index arrays of equal length, one entry per aligned position, -1
        where that side has a gap (an insertion in b when ``ia == -1``, a deletion when
        ``ib == -1``); ``exact`` is False when the differing middle was too large
        (:data:`MAX_CELLS`) and was paired by position instead.
    """
    a, b = np.asarray(a), np.asarray(b)
    pre, suf = _trim(a, b)
    ma, mb = a[pre : a.size - suf], b[pre : b.size - suf]
    exact = True
    if ma.size * mb.size > MAX_CELLS:
        exact = False
        k = min(ma.size, mb.size)
        mid_a = np.concatenate([np.arange(k), np.arange(k, ma.size), np.full(mb.size - k, -1)])
        mid_b = np.concatenate([np.arange(k), np.full(ma.size - k, -1), np.arange(k, mb.size)])
    elif ma.size == 0 or mb.size == 0:
        mid_a = np.concatenate([np.arange(ma.size), np.full(mb.size, -1)])
        mid_b = np.concatenate([np.full(ma.size, -1), np.arange(mb.size)])
    else:
        D = _table(ma, mb)
        i, j = ma.size, mb.size
        ra: list[int] = []
        rb: list[int] = []
        while i > 0 or j > 0:
            if i > 0 and j > 0 and D[i, j] == D[i - 1, j - 1] + (ma[i - 1] != mb[j - 1]):
                i, j = i - 1, j - 1
                ra.append(i)
                rb.append(j)
            elif i > 0 and D[i, j] == D[i - 1, j] + 1:
                i -= 1
                ra.append(i)
                rb.append(-1)
            else:
                j -= 1
                ra.append(-1)
                rb.append(j)
        mid_a, mid_b = np.array(ra[::-1], dtype=np.int64), np.array(rb[::-1], dtype=np.int64)
    mid_a = np.where(mid_a >= 0, mid_a + pre, -1)
    mid_b = np.where(mid_b >= 0, mid_b + pre, -1)
    ia = np.concatenate([np.arange(pre), mid_a, np.arange(a.size - suf, a.size)]).astype(np.int64)
    ib = np.concatenate([np.arange(pre), mid_b, np.arange(b.size - suf, b.size)]).astype(np.int64)
    return ia, ib, exact


_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def pieces_to_text(pieces: list[str | None]) -> str:
    """Join token pieces into text: SentencePiece ``▁`` and GPT-2 ``Ġ`` become spaces and runs of
    byte pieces ``<0xE4>`` are decoded as UTF-8 (invalid bytes replaced)."""
    out: list[str] = []
    buf = bytearray()
    for p in pieces:
        if p is None:
            continue
        m = _BYTE.fullmatch(p)
        if m:
            buf.append(int(m.group(1), 16))
            continue
        if buf:
            out.append(buf.decode("utf-8", errors="replace"))
            buf.clear()
        out.append(p.replace("▁", " ").replace("Ġ", " ").replace("Ċ", "\n"))
    if buf:
        out.append(buf.decode("utf-8", errors="replace"))
    return " ".join("".join(out).split())


def word_codes(texts: list[str]) -> list[np.ndarray]:
    """Return each text's words as integer codes shared across ``texts``."""
    vocab: dict[str, int] = {}
    return [np.array([vocab.setdefault(w, len(vocab)) for w in t.split()], dtype=np.int64) for t in texts]


def char_codes(text: str) -> np.ndarray:
    """Return the text's characters as code points."""
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


def ctc_keep(seq: np.ndarray, bounds: np.ndarray, blank: int) -> np.ndarray:
    """Return which positions of each segment survive CTC collapse (repeats merged, blanks dropped).

    Args:
        seq: the concatenated per-frame token ids of every sample.
        bounds: sample ``s`` is ``seq[bounds[s]:bounds[s + 1]]``.
        blank: the blank id.
    """
    keep = seq != blank
    if seq.size > 1:
        repeat = np.r_[False, seq[1:] == seq[:-1]]
        repeat[bounds[:-1][bounds[:-1] < seq.size]] = False  # a sample's first frame repeats nothing
        keep &= ~repeat
    return keep
