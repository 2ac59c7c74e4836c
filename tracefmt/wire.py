"""The items a recording process hands its writer process (``TraceWriter(process=True)``),
as bytes: what travels through the pipe between the two, and how arrays travel through the
shared ring beside it.

A frame on the pipe is ``<u32 length><u8 kind><payload>``. The recording process sends one
CONFIG frame (JSON), then ITEMS frames, FLUSH and CLOSE; the writer process answers FLUSH,
CLOSE and any failure with REPLY frames (JSON). An ITEMS payload starts with the ring position
after its last array (``<u64>``: the writer process releases the ring up to there once it has
copied the arrays out), then holds records, each ``<u8 record kind>`` and its fields:

- ``STR``: a string (sample, name, source, dtype, head) given an id once per connection;
- ``TENSOR``: a :class:`~tracefmt.writeitems.TensorItem`, its array at an offset of the ring;
- ``LOGITS``: a :class:`~tracefmt.writeitems.LogitsItem`, its logits in the ring;
- ``DECISION``, ``STATS``: a decision row, a tensor with statistics from elsewhere (JSON);
- ``BATCH``: a checked record batch of decisions (Arrow IPC stream bytes);
- ``TEMPLATE``: a :class:`~tracefmt.lane.RowTemplate` given an id once per connection (its rows
  as ``TENSOR`` records without sample and step, each with its order and ring offset relative
  to the first row's);
- ``ROWSET``: a step's rows from a template: its id, the sample, the step, the first row's
  order and its array's ring offset (the arrays lie one after the other, each at ``ALIGN``).

Nothing here is pickled or evaluated: both ends are steptrace, and the decoder builds only
numpy arrays, numbers and strings from the bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from itertools import count
from typing import Any

import numpy as np
import pyarrow as pa

from .dtypes import container
from .errors import TraceWriteError
from .stats import TensorStats
from .writeitems import (
    DecisionBatchItem,
    DecisionItem,
    DecisionRow,
    LogitsItem,
    RowKeys,
    StatsItem,
    TensorItem,
)

# frame kinds
CONFIG, ITEMS, FLUSH, CLOSE, REPLY = 1, 2, 3, 4, 5
# record kinds inside an ITEMS frame
STR, TENSOR, LOGITS, DECISION, STATS, BATCH, TEMPLATE, ROWSET = 0, 1, 2, 3, 4, 5, 6, 7

_FRAME = struct.Struct("<IB")
_END = struct.Struct("<Q")
_STR = struct.Struct("<BII")
# kind, sample, step, name, call, order, source (-1: None), dtype, values, ndim, offset, nbytes
_TENSOR = struct.Struct("<BIqIiiiIBBQQ")
# kind, sample, step, head, k, chosen, dtype, ndim, offset, nbytes, meta length
_LOGITS = struct.Struct("<BIqIiqIBQQI")
#: a TENSOR record with its shape, by the number of dimensions
_ROWS = [struct.Struct(_TENSOR.format + f"{ndim}q") for ndim in range(8)]
# kind, template id, rows
_TEMPLATE = struct.Struct("<BII")
# kind, template id, sample, step, first order, ring offset of the first array
_ROWSET = struct.Struct("<BIIqiQ")
_BLOB = struct.Struct("<BI")
_LEN = struct.Struct("<I")

#: Arrays start at multiples of this many bytes of the ring.
ALIGN = 64
#: Templates one connection defines at most (each is kept by both ends until the writer closes).
MAX_TEMPLATES = 1024


def write_frame(fd: int, kind: int, payload: bytes | bytearray | memoryview) -> None:
    """Write one frame to the pipe ``fd`` (all of it; raises OSError if the other end is gone)."""
    data = memoryview(_FRAME.pack(len(payload), kind) + payload) if len(payload) < 4096 else None
    if data is None:
        _write_all(fd, memoryview(_FRAME.pack(len(payload), kind)))
        data = memoryview(payload)
    _write_all(fd, data)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def read_frame(fd: int) -> tuple[int, bytes] | None:
    """Read one frame from the pipe ``fd``: ``(kind, payload)``, or None at the end of the pipe
    (the other process exited or closed it).

    Raises:
        TraceWriteError: the pipe ended inside a frame.
    """
    head = _read_exactly(fd, _FRAME.size)
    if head is None:
        return None
    n, kind = _FRAME.unpack(head)
    payload = _read_exactly(fd, n) if n else b""
    if payload is None:
        raise TraceWriteError("the pipe between the recording process and its writer process ended inside a frame")
    return kind, payload


def _read_exactly(fd: int, n: int) -> bytes | None:
    chunks = []
    left = n
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            if left == n:
                return None
            raise TraceWriteError("the pipe between the recording process and its writer process ended inside a frame")
        chunks.append(chunk)
        left -= len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _json_float(x: float | None) -> Any:
    """A float for JSON that keeps NaN and ±Inf (as strings) and None."""
    if x is None or math.isfinite(x):
        return x
    return repr(x)


def _float(x: Any) -> float | None:
    return None if x is None else float(x)


def _stats_doc(s: TensorStats) -> list:
    return [s.numel, *(_json_float(v) for v in (s.min, s.max, s.mean, s.std, s.abs_max, s.l2)),
            s.nan_count, s.inf_count]


def _stats_of(doc: list) -> TensorStats:
    numel, mn, mx, mean, std, amax, l2, nan, inf = doc
    return TensorStats(int(numel), _float(mn), _float(mx), _float(mean), _float(std), _float(amax), _float(l2),
                       int(nan), int(inf))


class ItemEncoder:
    """The recording process's half: items to records (strings given ids as they first come)."""

    def __init__(self) -> None:
        self._ids: dict[str, int] = {}
        # RowTemplate -> its id on this connection
        self._templates: dict[Any, int] = {}
        # the last logits' watched ids and keys, and their JSON
        self._meta: bytes | None = None
        self._meta_of: tuple[list[int], Any] = ([], None)
        #: The records of the next ITEMS frame.
        self.buf = bytearray()
        #: How many items it holds.
        self.count = 0

    def _sid(self, s: str) -> int:
        i = self._ids.get(s)
        if i is None:
            i = self._ids[s] = len(self._ids)
            raw = s.encode("utf-8", "surrogatepass")
            self.buf += _STR.pack(STR, i, len(raw))
            self.buf += raw
        return i

    def tensor(self, it: TensorItem, offset: int) -> None:
        """A tensor whose canonical array was copied to ``offset`` of the ring."""
        a = it.array
        sid = self._sid
        src = -1 if it.source is None else sid(it.source)
        self.buf += _TENSOR.pack(TENSOR, sid(it.sample), it.step, sid(it.name), it.call, it.order, src, sid(it.dtype),
                                 (2 if it.stats is not None else 0) | bool(it.values), a.ndim, offset, a.nbytes)
        if a.ndim:
            self.buf += struct.pack(f"<{a.ndim}q", *a.shape)
        if it.stats is not None:
            self._blob(_stats_doc(it.stats))
        self.count += 1

    def row(self, sample: str, step: int, name: str, call: int, order: int, source: str | None, dtype: str,
            a: np.ndarray, values: bool, offset: int) -> None:
        """:meth:`tensor` of a row given as its fields (no statistics)."""
        self.rows([(sample, step, name, call, order, source, dtype, a, values)], [offset])

    def rows(self, rows: list[tuple], offsets: list[int]) -> None:
        """:meth:`row` of each of ``rows`` (``(sample, step, name, call, order, source, dtype,
        array, values)``) whose array is at the same place of ``offsets``."""
        ids, sid, structs, packed = self._ids, self._sid, _ROWS, []
        get, add = ids.get, packed.append
        for (sample, step, name, call, order, source, dtype, a, values), offset in zip(rows, offsets):
            s = get(sample)
            if s is None:
                s = sid(sample)
            n = get(name)
            if n is None:
                n = sid(name)
            src = -1 if source is None else get(source)
            if src is None:
                src = sid(source)
            d = get(dtype)
            if d is None:
                d = sid(dtype)
            ndim = a.ndim
            st = structs[ndim] if ndim < len(structs) else struct.Struct(_TENSOR.format + f"{ndim}q")
            add(st.pack(TENSOR, s, step, n, call, order, src, d, bool(values), ndim, offset, a.nbytes, *a.shape))
        self.buf += b"".join(packed)
        self.count += len(packed)

    def template(self, t: Any) -> int | None:
        """The id of :class:`~tracefmt.lane.RowTemplate` ``t`` on this connection (a TEMPLATE
        record the first time); None once :data:`MAX_TEMPLATES` are defined (the rows then travel
        as TENSOR records)."""
        tid = self._templates.get(t)
        if tid is not None or len(self._templates) >= MAX_TEMPLATES:
            return tid
        tid = self._templates[t] = len(self._templates)
        sid, structs, packed = self._sid, _ROWS, [_TEMPLATE.pack(TEMPLATE, tid, len(t.fields))]
        for (name, call, source, dtype, values), shape, nb, off, order in zip(t.fields, t.shapes, t.sizes, t.offsets,
                                                                              count()):
            ndim = len(shape)
            st = structs[ndim] if ndim < len(structs) else struct.Struct(_TENSOR.format + f"{ndim}q")
            packed.append(st.pack(TENSOR, 0, 0, sid(name), call, order, -1 if source is None else sid(source), sid(dtype),
                                  values, ndim, off, nb, *shape))
        self.buf += b"".join(packed)
        return tid

    def rowset(self, tid: int, sample: str, step: int, order: int, offset: int, rows: int) -> None:
        """The ``rows`` rows of template ``tid`` at ``sample``, ``step``, from order ``order``, their
        arrays from ``offset`` of the ring."""
        self.buf += _ROWSET.pack(ROWSET, tid, self._sid(sample), step, order, offset)
        self.count += rows

    def logits(self, it: LogitsItem, offset: int) -> None:
        """Logits copied to ``offset`` of the ring, and what their decision needs."""
        a = it.logits
        meta = self._meta
        if meta is None or it.watched != self._meta_of[0] or it.keys != self._meta_of[1]:  # a decode loop's are all alike
            meta = self._meta = json.dumps([it.watched, list(it.keys)]).encode()
            self._meta_of = (list(it.watched), it.keys)
        self.buf += _LOGITS.pack(LOGITS, self._sid(it.sample), it.step, self._sid(it.head), it.k, it.chosen,
                                 self._sid(a.dtype.str), a.ndim, offset, a.nbytes, len(meta))
        self.buf += struct.pack(f"<{a.ndim}q", *a.shape)
        self.buf += meta
        self.count += 1

    def _blob(self, doc: Any, kind: int | None = None) -> None:
        raw = json.dumps(doc, allow_nan=False).encode("utf-8", "surrogatepass")
        if kind is None:
            self.buf += _LEN.pack(len(raw))
        else:
            self.buf += _BLOB.pack(kind, len(raw))
        self.buf += raw

    def decision(self, it: DecisionItem) -> None:
        """A finished decision row."""
        r = it.row
        self._blob([r.sample, r.step, r.head, r.chosen, r.argmax, r.forced, r.topk_ids.tolist(),
                    [_json_float(float(x)) for x in r.topk_logits.tolist()], _json_float(r.margin),
                    _json_float(r.logsumexp), _json_float(r.chosen_logit), r.chosen_rank,
                    None if r.watched is None else [[w["id"], _json_float(w["logit"]), w["rank"]] for w in r.watched],
                    r.piece, r.frame, r.chunk, r.position, r.emission, r.time], DECISION)
        self.count += 1

    def stats(self, it: StatsItem) -> None:
        """A tensor whose statistics (and digest) were computed elsewhere."""
        self._blob([it.sample, it.step, it.name, it.call, it.order, it.source, it.dtype, list(it.shape),
                    _stats_doc(it.stats), None if it.digest is None else it.digest.hex()], STATS)
        self.count += 1

    def batch(self, it: DecisionBatchItem) -> None:
        """A whole record batch of decisions."""
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, it.batch.schema) as w:
            w.write_batch(it.batch)
        raw = sink.getvalue()
        self.buf += _BLOB.pack(BATCH, raw.size)
        self.buf += memoryview(raw)
        self.count += 1

    def take(self) -> bytearray:
        """The records so far (and start the next frame's)."""
        buf, self.buf, self.count = self.buf, bytearray(), 0
        return buf


class ItemDecoder:
    """The writer process's half: records back to items, arrays copied out of the ring.

    Args:
        ring: the shared ring as bytes.
    """

    def __init__(self, ring: np.ndarray) -> None:
        self._ring = ring
        self._strs: list[str] = []
        # per template id: (per row (name, call, order, source, dtype, container, values, shape,
        # offset, bytes), the bytes from the first array's start to the last one's end)
        self._templates: list[tuple[list[tuple], int]] = []

    def decode(self, payload: bytes) -> tuple[list[Any], int, int]:
        """Decode an ITEMS payload.

        Returns:
            ``(items, bytes of their arrays, ring position to release up to)``.

        Raises:
            TraceWriteError: a malformed record (a bug: both ends are this module).
        """
        mv = memoryview(payload)
        (end,) = _END.unpack_from(mv, 0)
        at = _END.size
        items: list[Any] = []
        nbytes = 0
        strs = self._strs
        ring = self._ring
        n = len(mv)
        try:
            while at < n:
                kind = mv[at]
                if kind == TENSOR:
                    (_, sample, step, name, call, order, src, dt, flags, ndim, off, size) = _TENSOR.unpack_from(mv, at)
                    at += _TENSOR.size
                    shape = struct.unpack_from(f"<{ndim}q", mv, at) if ndim else ()
                    at += 8 * ndim
                    stats = None
                    if flags & 2:
                        (ln,) = _LEN.unpack_from(mv, at)
                        stats = _stats_of(json.loads(bytes(mv[at + 4 : at + 4 + ln])))
                        at += 4 + ln
                    dtype = strs[dt]
                    a = ring[off : off + size].view(container(dtype)).reshape(shape).copy()
                    items.append(TensorItem(strs[sample], step, strs[name], call, order, None if src < 0 else strs[src],
                                            dtype, a, bool(flags & 1), stats, None))
                    nbytes += size
                elif kind == STR:
                    _, i, ln = _STR.unpack_from(mv, at)
                    at += _STR.size
                    if i != len(strs):
                        raise TraceWriteError(f"string id {i} out of sequence")
                    strs.append(bytes(mv[at : at + ln]).decode("utf-8", "surrogatepass"))
                    at += ln
                elif kind == ROWSET:
                    (_, tid, sample, step, order, base) = _ROWSET.unpack_from(mv, at)
                    at += _ROWSET.size
                    sample = strs[sample]
                    rows, block = self._templates[tid]
                    block = ring[base : base + block].copy()  # one copy; the arrays are views of it
                    for name, call, o, source, dtype, cont, values, shape, off, size in rows:
                        a = block[off : off + size].view(cont).reshape(shape)
                        items.append(TensorItem(sample, step, name, call, order + o, source, dtype, a, values, None, None))
                        nbytes += size
                elif kind == TEMPLATE:
                    (_, tid, rows) = _TEMPLATE.unpack_from(mv, at)
                    at += _TEMPLATE.size
                    if tid != len(self._templates):
                        raise TraceWriteError(f"template id {tid} out of sequence")
                    template = []
                    for _ in range(rows):
                        (_, _, _, name, call, order, src, dt, flags, ndim, off, size) = _TENSOR.unpack_from(mv, at)
                        at += _TENSOR.size
                        shape = struct.unpack_from(f"<{ndim}q", mv, at) if ndim else ()
                        at += 8 * ndim
                        dtype = strs[dt]
                        template.append((strs[name], call, order, None if src < 0 else strs[src], dtype, container(dtype),
                                         bool(flags & 1), shape, off, size))
                    last = template[-1] if template else None
                    self._templates.append((template, 0 if last is None else last[8] + last[9]))
                elif kind == LOGITS:
                    (_, sample, step, head, k, chosen, dt, ndim, off, size, ln) = _LOGITS.unpack_from(mv, at)
                    at += _LOGITS.size
                    shape = struct.unpack_from(f"<{ndim}q", mv, at)
                    at += 8 * ndim
                    watched, keys = json.loads(bytes(mv[at : at + ln]))
                    at += ln
                    a = ring[off : off + size].view(np.dtype(strs[dt])).reshape(shape).copy()
                    items.append(LogitsItem(strs[sample], step, strs[head], a, k, chosen, watched, RowKeys(*keys)))
                    nbytes += size
                else:
                    _, ln = _BLOB.unpack_from(mv, at)
                    at += _BLOB.size
                    raw = mv[at : at + ln]
                    at += ln
                    items.append(_blob_item(kind, raw))
        except (struct.error, ValueError, IndexError, TypeError) as exc:
            raise TraceWriteError(f"a malformed item from the recording process: {exc}") from exc
        return items, nbytes, end


def _blob_item(kind: int, raw: memoryview) -> Any:
    if kind == BATCH:
        with pa.ipc.open_stream(pa.py_buffer(bytes(raw))) as r:
            return DecisionBatchItem(r.read_next_batch())
    doc = json.loads(bytes(raw))
    if kind == DECISION:
        (sample, step, head, chosen, argmax, forced, ids, logits, margin, lse, clogit, crank, watched,
         *keys) = doc
        return DecisionItem(DecisionRow(
            sample, step, head, chosen, argmax, forced, np.array(ids, np.int32),
            np.array([float(x) for x in logits], np.float32), float(margin), _float(lse), _float(clogit), crank,
            None if watched is None else [{"id": i, "logit": float(lg), "rank": rk} for i, lg, rk in watched],
            *keys))
    if kind == STATS:
        sample, step, name, call, order, source, dtype, shape, stats, digest = doc
        return StatsItem(sample, step, name, call, order, source, dtype, tuple(shape), _stats_of(stats),
                         None if digest is None else bytes.fromhex(digest))
    raise TraceWriteError(f"unknown record kind {kind}")
