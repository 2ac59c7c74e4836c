"""TraceWriter: streaming, crash-safe writing of one part of a trace (SPEC.md §5).

The caller's thread only validates its arguments and copies arrays; statistics, digests,
compression and disk I/O run on a background thread behind a queue bounded in bytes.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .batches import decisions_batch, tensors_batch, values_batch
from .checks import (
    I32,
    I32_MAX,
    I64,
    DecisionKeys,
    check_decision_columns,
    check_decision_row,
    check_key,
    check_text,
    opt_float,
    opt_i32,
    opt_int,
    opt_str,
)
from .checksum import file_checksum
from .decisions import Decision, decide, decide_many, first_max
from .dtypes import DTYPES, canonical, container, dtype_name
from .errors import TraceError, TraceUsageError, TraceWriteError, UnsupportedDtypeError
from .ipcfile import ArrowAppender, compact
from .layout import claim_part, create_or_join, part_id
from .metadata import TraceMetadata, utc_now, write_json_atomic
from .payload import (
    DIGEST_BYTES,
    ENCODINGS,
    SMALL_ELEMENTS,
    Encoder,
    TensorStats,
    compute_stats,
    compute_stats_many,
    digest,
)
from .schema import DECISIONS, PARTS_DIR, data_file, part_file

_MODES = ("create", "append", "overwrite")


class _Now:
    """Default of ``time_us``: the wall-clock time of the call."""

    def __repr__(self) -> str:
        return "NOW"


NOW = _Now()
#: Steps whose order/call counters are kept; a writer returning to an older step must pass
#: ``order`` and ``call`` itself.
_COUNTED_STEPS = 4096


@dataclass(frozen=True)
class WriteSummary:
    """What :meth:`TraceWriter.close` wrote."""

    path: str
    part: str
    decisions: int
    tensors: int
    values: int
    tensor_bytes: int  # raw bytes of all tensors seen (stats computed over them)
    file_bytes: int  # bytes of this part's files on disk
    stall_seconds: float  # time the caller waited because the queue was full
    seconds: float  # from open to close

    def __str__(self) -> str:
        return (
            f"{self.path} part {self.part}: {self.decisions} decisions, {self.tensors} tensors "
            f"({self.values} with values), {self.file_bytes / 1e6:.1f} MB on disk"
        )


class _Budget:
    """Bytes queued for the background thread; blocks producers above a limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.stalled = 0.0
        self._cv = threading.Condition()

    def force(self, n: int) -> None:
        """Take ``n`` bytes without waiting."""
        with self._cv:
            self.used += n

    def take(self, n: int, alive: threading.Thread) -> None:
        with self._cv:
            if self.used and self.used + n > self.limit:
                t0 = time.perf_counter()
                while self.used and self.used + n > self.limit and alive.is_alive():
                    self._cv.wait(0.1)
                self.stalled += time.perf_counter() - t0
            self.used += n

    def give(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


class _BufferPool:
    """Recycled copy buffers: copying into fresh memory runs at ~1 GB/s here (first touch of every
    page), into reused memory at ~14 GB/s. Buffers come in power-of-two sizes from 64 KiB."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.pooled = 0
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def copy(self, a: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Return (a copy of ``a`` in a pooled buffer, the buffer to give back), or a plain copy."""
        if a.nbytes < (64 << 10):
            return a.copy(), None
        size = 1 << (a.nbytes - 1).bit_length()
        with self._lock:
            free = self._free.get(size)
            buf = free.pop() if free else None
            if buf is not None:
                self.pooled -= size
        if buf is None:
            buf = np.empty(size, np.uint8)
        out = buf[: a.nbytes].view(a.dtype).reshape(a.shape)
        np.copyto(out, a)
        return out, buf

    def give(self, buf: np.ndarray) -> None:
        """Take ``buf`` back for reuse (dropped if the pool is full)."""
        with self._lock:
            if self.pooled + buf.nbytes <= self.limit:
                self._free.setdefault(buf.nbytes, []).append(buf)
                self.pooled += buf.nbytes


_open_writers: weakref.WeakSet[TraceWriter] = weakref.WeakSet()


@atexit.register
def _close_forgotten_writers() -> None:
    for w in list(_open_writers):
        try:
            w.close()
        except TraceError:
            pass  # already reported to the caller on its own calls; nothing more to do at exit


def _stats_of_small(items: list) -> None:
    """Fill in the statistics of the small tensor rows ("t" items without stats) of ``items``,
    in place, with :func:`tracefmt.payload.compute_stats_many`."""
    small = [i for i, it in enumerate(items) if it[0] == "t" and it[10] is None and it[8].size <= SMALL_ELEMENTS]
    if len(small) < 2:
        return
    stats = compute_stats_many([items[i][8] for i in small], [items[i][7] for i in small])
    for i, st in zip(small, stats):
        it = items[i]
        items[i] = (*it[:10], st, it[11])


def _decisions_of_logits(items: list) -> int:
    """Derive the decisions of the logits rows ("L" items) of ``items`` in as few numpy calls as
    possible (:func:`tracefmt.decisions.decide_many` per group of equal shape, dtype, k and
    watched ids); each becomes a "d" item, in place. Returns the logits' bytes, for the caller
    to give back to the queue's budget."""
    groups: dict[tuple, list[int]] = {}
    for i, it in enumerate(items):
        if it[0] == "L":
            x = it[4]
            groups.setdefault((x.shape, x.dtype.str, it[5], tuple(it[7])), []).append(i)
    freed = 0
    for (_shape, _dt, k, watched), group in groups.items():
        for at in range(0, len(group), 32):  # 32 rows at a time: the float64 scratch stays in cache
            idx = group[at : at + 32]
            xs = np.stack([items[i][4] for i in idx])
            decisions = decide_many(xs, k=k, chosen=[items[i][6] for i in idx], watched=list(watched))
            for i, d in zip(idx, decisions):
                _, sample, step, head, x, _k, _c, _w, row_keys = items[i]
                items[i] = ("d", _decision_row(sample, step, head, d, row_keys))
                freed += x.nbytes
    return freed


_ROW_KEYS = ("forced", "piece", "frame", "chunk", "position", "emission", "time_us")


def _row_keys(keys: Mapping[str, Any]) -> tuple:
    """Check the optional columns of a decision row given as keywords; return them in row order."""
    if not keys.keys() - {"forced", "piece"}:  # a recorder's call: the common keys only
        piece = keys.get("piece")
        if piece is not None and type(piece) is not str:
            raise TraceUsageError(f"piece must be a string or None, got {piece!r}")
        return bool(keys.get("forced", False)), piece, None, None, None, None, time.time_ns() // 1000
    unknown = keys.keys() - set(_ROW_KEYS)
    if unknown:
        raise TraceUsageError(f"unknown decision field(s) {', '.join(sorted(unknown))}; use {', '.join(_ROW_KEYS)}")
    t = keys.get("time_us", NOW)
    return (
        bool(keys.get("forced", False)), opt_str("piece", keys.get("piece")), opt_i32("frame", keys.get("frame")),
        opt_i32("chunk", keys.get("chunk")), opt_i32("position", keys.get("position")),
        opt_i32("emission", keys.get("emission")),
        time.time_ns() // 1000 if t is NOW else opt_int("time_us", t, I64),
    )


def _decision_row(sample: str, step: int, head: str, d: Decision, row_keys: tuple) -> tuple:
    """The queued row of a Decision from :func:`tracefmt.decisions.decide` (whose fields have the
    row's types already). ``chosen_logit``/``chosen_rank`` only when ``chosen`` is outside the
    top-k (SPEC.md §3.1 lets readers derive them otherwise)."""
    forced, piece, frame, chunk, position, emission, time_us = row_keys
    in_top = d.chosen in d.topk_ids
    return (
        sample, step, head, d.chosen, d.argmax, forced, d.topk_ids, d.topk_logits, d.margin, d.logsumexp,
        None if in_top else d.chosen_logit, None if in_top else d.chosen_rank, d.watched or None,
        piece, frame, chunk, position, emission, time_us,
    )


class TraceWriter:
    """Writes one part of a trace. Use as a context manager; several processes may write
    parts of the same trace at once (``mode="append"``), each recording its own samples.
    The ``add_*`` methods may be called from several threads of one process.

    Each ``add_*`` call hands its row to the background thread at once, which wakes that thread:
    a GIL hand-off between the two threads that costs the caller ~10-30 us here, and stalls a
    Python-bound caller while the background thread runs Python. A caller adding many rows per
    step (a recorder hooking every module) calls :meth:`hold`: rows then travel in batches of
    up to 2048 rows, a quarter of ``queue_bytes`` (8 MB at most) or ``flush_ms / 2``.

    Args:
        path: the trace directory.
        metadata: run metadata (a :class:`TraceMetadata` or a dict of its fields). Stored in the
            manifest by the writer that creates the trace, and in this part's status file.
        vocab: token pieces, as a sequence indexed by id or a mapping id -> piece.
        mode: ``"create"`` (fail if a trace exists), ``"append"`` (add a part to an existing
            trace, or create it), ``"overwrite"`` (delete an existing trace first).
        flush_steps: flush to disk after this many new steps.
        flush_ms: flush at least this often (milliseconds) while data is pending.
        queue_bytes: most tensor bytes held in the queue before the caller waits.
        encoding: value encoding, one of ``raw``, ``zstd``, ``zstd-shuffle``.
        zstd_level: zstd level for values.
        compact: at close, rewrite the decisions and tensors files in large dictionary-encoded
            batches (smaller files, faster scans).
        compact_level: zstd level of the compacted files.
        fsync: fsync after every flush (survives power loss, not only a killed process).

    Raises:
        TraceExistsError: ``mode="create"`` and a trace exists at ``path``.
        TraceUsageError: a bad option.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        metadata: TraceMetadata | Mapping[str, Any] | None = None,
        vocab: Sequence[str] | Mapping[int, str] | None = None,
        mode: str = "create",
        flush_steps: int = 64,
        flush_ms: float = 1000.0,
        queue_bytes: int = 256 << 20,
        encoding: str = "zstd",
        zstd_level: int = 1,
        compact: bool = True,
        compact_level: int = 6,
        fsync: bool = False,
    ) -> None:
        if mode not in _MODES:
            raise TraceUsageError(f"mode {mode!r} is unknown; use one of {', '.join(_MODES)}")
        if encoding not in ENCODINGS:
            raise TraceUsageError(f"encoding {encoding!r} is unknown; use one of {', '.join(ENCODINGS)}")
        if flush_steps < 1 or flush_ms <= 0 or queue_bytes < 1:
            raise TraceUsageError("flush_steps, flush_ms and queue_bytes must be positive")
        self.path = Path(path)
        self.part = part_id()
        self.metadata = TraceMetadata.coerce(dict(metadata) if isinstance(metadata, Mapping) else metadata)
        self._t0 = time.perf_counter()
        self._flush_steps = flush_steps
        self._flush_s = flush_ms / 1000.0
        self._compact = compact
        self._compact_level = compact_level
        self._encoder = Encoder(encoding, zstd_level)  # used by the one encoder thread only
        self._encoding = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steptrace-encoder")
        self._fsync = fsync
        self._closed = False
        self._summary: WriteSummary | None = None
        self._error: BaseException | None = None
        # (sample, step) -> [next order, {name: next call}], for the most recent steps
        self._steps: OrderedDict[tuple[str, int], list] = OrderedDict()
        self._lock = threading.Lock()  # add_* may be called from several threads
        self._held: list[tuple] | None = None  # rows kept by hold() until hand_over()
        self._held_bytes = 0
        self._held_since = 0.0
        self._hold_bytes = max(min(queue_bytes // 4, 8 << 20), 1)
        self._hold_rows = 2048
        self._hold_s = self._flush_s / 2
        self._counts = {"decisions": 0, "tensors": 0, "values": 0, "tensor_bytes": 0}

        create_or_join(self.path, mode=mode, metadata=self.metadata, part=self.part, vocab=vocab)
        parts = self.path / PARTS_DIR
        self._status_path = parts / part_file(self.part)
        claim_part(self._status_path, self.part)  # exclusive: a second writer of this part name fails here
        self._keys = DecisionKeys()
        self._status: dict[str, Any] = {
            "part": self.part,
            "status": "open",
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": utc_now(),
            "metadata": self.metadata.to_manifest(),
        }
        write_json_atomic(self._status_path, self._status)
        self._files = {
            kind: ArrowAppender(parts / data_file(self.part, kind), kind, self.part, level=level, fsync=fsync)
            for kind, level in (("values", None), ("tensors", 1), ("decisions", 1))
        }
        self._queue: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=f"steptrace-writer-{self.part}", daemon=True)
        self._budget = _Budget(queue_bytes)
        self._pool = _BufferPool(queue_bytes)
        self._thread.start()
        _open_writers.add(self)

    # ------------------------------------------------------------------ set-up
    # ------------------------------------------------------------------ caller side
    def _check_open(self) -> None:
        if self._error is not None:
            raise TraceWriteError(f"writing {self.path} failed: {self._error}") from self._error
        if self._closed:
            raise TraceUsageError("this TraceWriter is closed")

    def _order_call(self, sample: str, step: int, name: str, order: int | None, call: int | None) -> tuple[int, int]:
        """Return (order, call): the caller's values, or the next ones counted for (sample, step)."""
        if order is not None and call is not None:
            return opt_i32("order", order), opt_i32("call", call)
        with self._lock:
            auto_order, auto_call = self._next_order(sample, step, name)
        return (auto_order if order is None else opt_i32("order", order),
                auto_call if call is None else opt_i32("call", call))

    def _next_order(self, sample: str, step: int, name: str) -> tuple[int, int]:
        """Return (order, call) for the next tensor of ``name`` at (sample, step)."""
        key = (sample, step)
        st = self._steps.get(key)
        if st is None:
            st = self._steps[key] = [0, {}]
            if len(self._steps) > _COUNTED_STEPS:
                self._steps.popitem(last=False)
        else:
            self._steps.move_to_end(key)
        order = st[0]
        call = st[1].get(name, 0)
        st[0] = order + 1
        st[1][name] = call + 1
        return order, call

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
        sample, step = check_key(sample, step)
        if not isinstance(head, str) or not head:
            raise TraceUsageError(f"head must be a non-empty string, got {head!r}")
        check_text("head", head)
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
        check_decision_row(sample, step, head, ids, logits, opt_float("margin", margin), opt_i32("argmax", argmax))
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
        row = (
            sample, step, head, chosen_i, opt_i32("argmax", argmax), bool(forced),
            ids.astype(np.int32), logits, opt_float("margin", margin),
            opt_float("logsumexp", logsumexp),
            opt_float("chosen_logit", chosen_logit), opt_i32("chosen_rank", chosen_rank),
            rows_watched, opt_str("piece", piece),
            opt_i32("frame", frame), opt_i32("chunk", chunk), opt_i32("position", position),
            opt_i32("emission", emission),
            time.time_ns() // 1000 if time_us is NOW else opt_int("time_us", time_us, I64),
        )
        self._keys.add(sample, step, head)
        self._put(("d", row))

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
        check_decision_columns(cols["sample"], cols["step"], cols["head"], cols["topk_ids"], cols["topk_logits"],
                               cols["margin"], cols["argmax"])
        self._keys.add_many(cols["sample"], cols["step"], cols["head"])
        arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in DECISIONS]
        self._put(("D", pa.RecordBatch.from_arrays(arrays, schema=DECISIONS)))
        return n

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
            self._check_open()
            sample, step = check_key(sample, step)
            for v in (d.chosen, d.argmax, d.chosen_rank, *(w["id"] for w in d.watched)):
                opt_i32("token id", v)
            self._put(("d", _decision_row(sample, step, head, d, _row_keys(keys))))
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
        if self._error is not None or self._closed:
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
        row_keys = _row_keys(keys)
        if chosen is None:
            chosen = first_max(x) if x.ndim == 1 else None
        if chosen is None or x.ndim != 1 or x.size < 2 or x.dtype.kind not in "fiub":
            d = decide(x, k=k, chosen=chosen, watched=watched)  # raises on malformed logits
            self._put(("d", _decision_row(sample, step, head, d, row_keys)))
            chosen = d.chosen
        else:
            ids = [t if type(t) is int else opt_i32("token id", t) for t in (chosen, *watched)]
            v = x.size
            for t in ids:
                if t is None or not 0 <= t < v:
                    raise TraceUsageError(f"token id {t} is outside the logits (vocabulary of {v})")
            copy = x.copy()
            self._put(("L", sample, step, head, copy, k, ids[0], ids[1:], row_keys), copy.nbytes)
        if keep_logits:
            self.add_tensor(sample, step, f"logits:{head}", x, source="decision")
        return int(chosen)

    def add_tensor(
        self,
        sample: str,
        step: int,
        name: str,
        array: np.ndarray,
        *,
        values: bool = True,
        source: str | None = None,
        call: int | None = None,
        order: int | None = None,
        dtype: str | None = None,
        copy: bool = True,
        stats: TensorStats | None = None,
    ) -> None:
        """Record one tensor: statistics and digest always, values when ``values`` is true.

        Args:
            sample, step: the step it belongs to.
            name: tensor name (module path, ONNX value name, ...).
            array: the tensor (any SPEC.md dtype; bfloat16 as ml_dtypes or uint16 + ``dtype``).
            values: store the values too (else stats + digest only).
            source: where it came from (module class, ONNX node, CoreML op).
            call: call index of ``name`` within the step; counted automatically when None
                (over the 4096 most recent steps; pass it when returning to older steps).
            order: execution order within the step; counted automatically when None.
            dtype: SPEC.md dtype name overriding the array's (``"bfloat16"`` for uint16 bits).
            copy: copy the array before returning (set False only for arrays nobody mutates).
            stats: statistics already computed (e.g. on a GPU); computed here when None.

        Raises:
            UnsupportedDtypeError: the dtype is not a SPEC.md dtype.
            TraceUsageError: malformed arguments.
            TraceWriteError: the background writer failed earlier.
        """
        self._check_open()
        sample, step = check_key(sample, step)
        if not isinstance(name, str) or not name:
            raise TraceUsageError(f"tensor name must be a non-empty string, got {name!r}")
        opt_str("source", source)
        arr = np.asarray(array)
        dt = dtype_name(arr, dtype)
        a = canonical(arr, dt)
        pooled = None
        if copy and np.may_share_memory(a, arr):
            a, pooled = self._pool.copy(a)
        order, call = self._order_call(sample, step, name, order, call)
        if stats is not None and not isinstance(stats, TensorStats):
            raise TraceUsageError("stats must be a tracefmt.TensorStats")
        self._put(("t", sample, step, name, call, order, source, dt, a, bool(values), stats, pooled), a.nbytes)

    def add_tensor_row(
        self, sample: str, step: int, name: str, call: int, order: int, source: str | None, dtype: str,
        array: np.ndarray, values: bool, *, copy: bool = True,
    ) -> None:
        """:meth:`add_tensor` for callers that check their own arguments (recorders hooking every
        module of a model, where each Python step of the hook counts): everything is positional
        and only ``array``'s dtype is checked.

        Args:
            sample: a non-empty sample id.
            step: a step in ``[0, 2**31)``.
            name: a non-empty tensor name.
            call, order: its call index and execution order within the step (int32).
            source: where it came from, or None.
            dtype: its SPEC.md dtype name.
            array: a numpy array of ``dtype``'s little-endian container (bfloat16 as uint16
                bits), any layout: copied before returning.
            values: store the values too.
            copy: False: ``array`` is C-contiguous and nobody changes it later (kept as it is).

        Raises:
            UnsupportedDtypeError: ``array``'s dtype is not ``dtype``'s container.
            TraceWriteError: the background writer failed earlier.
        """
        if self._error is not None or self._closed:
            self._check_open()
        if array.dtype != container(dtype):
            raise UnsupportedDtypeError(f"tensor {name!r}: a {array.dtype} array cannot hold SPEC.md dtype {dtype!r}")
        pooled = None
        if not copy and array.flags.c_contiguous:
            a = array
        elif array.nbytes < (64 << 10) or not array.flags.c_contiguous:
            a = array.copy(order="C")
        else:
            a, pooled = self._pool.copy(array)
        self._put(("t", sample, step, name, call, order, source, dtype, a, values, None, pooled), a.nbytes)

    def add_tensor_stats(
        self,
        sample: str,
        step: int,
        name: str,
        *,
        dtype: str,
        shape: Sequence[int],
        stats: TensorStats,
        digest: bytes | None,
        source: str | None = None,
        call: int | None = None,
        order: int | None = None,
    ) -> None:
        """Record a tensor whose statistics were computed elsewhere (on a GPU, in C++).

        Args:
            dtype, shape: of the tensor.
            stats: its :class:`TensorStats`.
            digest: the SPEC.md digest of its canonical bytes (16 bytes), or None if unknown.
            Other arguments as for :meth:`add_tensor`.
        """
        self._check_open()
        sample, step = check_key(sample, step)
        if not isinstance(name, str) or not name:
            raise TraceUsageError(f"tensor name must be a non-empty string, got {name!r}")
        opt_str("source", source)
        if not isinstance(stats, TensorStats):
            raise TraceUsageError("stats must be a tracefmt.TensorStats")
        if dtype not in DTYPES:
            raise TraceUsageError(f"dtype {dtype!r} is not a steptrace dtype")
        if digest is not None and len(digest) != 16:
            raise TraceUsageError("digest must be 16 bytes (SHA-256 truncated, SPEC.md §4.2)")
        shape_t = tuple(int(s) for s in shape)
        if any(s < 0 for s in shape_t):
            raise TraceUsageError(f"shape {list(shape_t)} has a negative dimension")
        order, call = self._order_call(sample, step, name, order, call)
        self._put(("s", sample, step, name, call, order, source, dtype, shape_t, stats, digest))

    def hold(self) -> None:
        """Keep the rows of later ``add_*`` calls (from any thread) and hand them to the
        background thread in batches, until :meth:`hand_over`.

        A batch goes when the held rows reach 2048 rows or a quarter of ``queue_bytes`` (8 MB
        at most), or when the oldest has waited ``flush_ms / 2`` (the background thread takes rows that
        wait longer itself, so a run that hangs still gets them written); :meth:`flush` and
        :meth:`close` hand them over too. A process killed while rows are held loses them, as
        it loses rows not yet flushed.
        """
        with self._lock:
            if self._held is None:
                self._held = []
                self._held_bytes = 0
                self._held_since = time.monotonic()
                self._queue.put(("wake",))  # the background thread now wakes up to take old rows

    def hand_over(self) -> None:
        """Hand the held rows to the background thread and stop holding."""
        self._send_held(stop=True)

    def _put(self, item: tuple, nbytes: int = 0) -> None:
        """Queue ``item`` (taking ``nbytes`` of the queue's budget), or hold it (see :meth:`hold`)."""
        if self._held is not None:
            with self._lock:
                held = self._held
                if held is not None:
                    held.append(item)
                    self._held_bytes += nbytes
                    if (self._held_bytes < self._hold_bytes and len(held) < self._hold_rows
                            and time.monotonic() - self._held_since < self._hold_s):
                        return
            if held is not None:
                self._send_held()
                return
        if nbytes:
            self._budget.take(nbytes, self._thread)
        self._queue.put(item)

    def _send_held(self, *, stop: bool = False, force: bool = False) -> None:
        """Queue the held rows as one item (``stop``: and stop holding); ``force``: take their
        bytes of the budget without waiting (the background thread taking them itself)."""
        with self._lock:
            held, nbytes = self._held, self._held_bytes
            if held is None or (not held and not stop):
                return
            self._held = None if stop else []
            self._held_bytes = 0
            self._held_since = time.monotonic()
        if not held:
            return
        if force:
            self._budget.force(nbytes)
        elif nbytes:
            self._budget.take(nbytes, self._thread)
        self._queue.put(("many", held))

    def _held_age(self) -> float | None:
        """Seconds the oldest held row has waited; None when nothing is held."""
        with self._lock:
            return time.monotonic() - self._held_since if self._held else None

    def flush(self) -> None:
        """Write everything queued so far to disk; returns when it is there."""
        self._check_open()
        self._send_held()
        done = threading.Event()
        self._queue.put(("flush", done))
        while not done.wait(0.1):
            if not self._thread.is_alive():
                break
        self._check_open()

    def close(self) -> WriteSummary:
        """Flush, finish every file, compact, mark the part closed; idempotent.

        Returns:
            The :class:`WriteSummary`.

        Raises:
            TraceWriteError: writing failed (the data flushed before the failure stays readable).
        """
        if self._summary is not None:
            return self._summary
        if not self._closed:
            self._closed = True
            self.hand_over()
            self._queue.put(("close",))
            self._thread.join()
            _open_writers.discard(self)
        if self._error is not None:
            raise TraceWriteError(f"writing {self.path} failed: {self._error}") from self._error
        try:
            sizes = {}
            for kind, f in self._files.items():
                f.close()
                if self._compact and kind != "values":
                    sizes[kind] = compact(f.path, kind, self.part, level=self._compact_level)
                else:
                    sizes[kind] = os.path.getsize(f.path)
            self._status.update(
                status="closed",
                closed=utc_now(),
                counts={k: self._files[k].rows for k in ("decisions", "tensors", "values")},
                bytes=sizes,
                checksums=self._checksums(),
            )
            write_json_atomic(self._status_path, self._status)
        except OSError as exc:
            self._error = exc
            raise TraceWriteError(f"closing {self.path} failed: {exc}") from exc
        self._summary = WriteSummary(
            path=str(self.path),
            part=self.part,
            decisions=self._counts["decisions"],
            tensors=self._counts["tensors"],
            values=self._counts["values"],
            tensor_bytes=self._counts["tensor_bytes"],
            file_bytes=sum(sizes.values()),
            stall_seconds=self._budget.stalled,
            seconds=time.perf_counter() - self._t0,
        )
        return self._summary

    def _checksums(self) -> dict[str, str]:
        """Checksums of this part's finished data files, and of the vocabulary it wrote (SPEC.md §5.1)."""
        sums = {kind: file_checksum(f.path) for kind, f in self._files.items()}
        vocab = self.path / f"vocab-{self.part}.arrow"
        if vocab.exists():
            sums["vocab"] = file_checksum(vocab)
        return sums

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ background side
    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # noqa: BLE001 (a bug here must not leave callers waiting on a dead thread)
            self._error = self._error or exc
            self._drain_after_error()

    def _drain_after_error(self) -> None:
        """After a failure: take items until close, giving their bytes back (nothing is written)."""
        while True:
            got = self._queue.get()
            for item in got[1] if got[0] == "many" else (got,):
                if item[0] == "close":
                    self._encoding.shutdown()
                    return
                if item[0] == "flush":
                    item[1].set()
                elif item[0] == "t":
                    self._budget.give(item[8].nbytes)
                elif item[0] == "L":
                    self._budget.give(item[4].nbytes)

    def _loop(self) -> None:
        dec: list[tuple] = []
        ten: list[tuple] = []
        val: list[tuple[str, bytes]] = []
        steps_seen: set[tuple[str, int]] = set()  # distinct steps since the last flush
        deadline: float | None = None

        def flush() -> None:
            nonlocal dec, ten, val, deadline
            # One value per record batch: value_ref i is batch i + 1 (batch 0 is the empty batch
            # that carries the schema), so a reader finds a value without reading every batch.
            for enc, fut in val:  # payloads are compressed on the encoder thread; in order
                self._files["values"].write(values_batch([(enc, fut.result())]))
            if ten:
                self._files["tensors"].write(tensors_batch(ten))
            if dec:
                self._files["decisions"].write(decisions_batch(dec))
            dec, ten, val = [], [], []
            steps_seen.clear()
            deadline = None

        while True:
            timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if self._held is not None:  # wake up to take rows held too long (a caller that hangs)
                timeout = self._hold_s if timeout is None else min(timeout, self._hold_s)
            try:
                got = self._queue.get(timeout=timeout)
            except queue.Empty:
                age = self._held_age()
                if age is not None and age >= self._hold_s:
                    self._send_held(force=True)  # picked up by the next get()
                elif deadline is not None and time.monotonic() >= deadline:
                    self._guard(flush)
                continue
            items = (got,)
            freed = n_fast = 0
            if got[0] == "many":  # rows handed over by hand_over(): small tensors' stats in one go
                items = got[1]
                self._guard(_stats_of_small, items)
                if self._error is None:
                    try:
                        if logits_bytes := _decisions_of_logits(items):
                            self._budget.give(logits_bytes)
                    except (ValueError, TypeError, TraceError) as exc:
                        self._error = exc
            for item in items:
                kind = item[0]
                if kind == "t" and item[10] is not None and not item[9] and self._error is None:
                    # statistics known, no values (small tensors handed over together): only
                    # the digest is left; a few Python steps per row, the budget given back
                    # per batch (each step here is a step the model's thread may wait for)
                    _, sample, step, name, call, order, source, dt, a, _v, stats, pooled = item
                    ten.append((sample, step, name, call, order, source, dt, a.shape, stats,
                                sha256(a).digest()[:DIGEST_BYTES], None))
                    steps_seen.add((sample, step))
                    freed += a.nbytes
                    n_fast += 1
                    if pooled is not None:
                        self._pool.give(pooled)
                    if len(steps_seen) > self._flush_steps:
                        self._guard(flush)
                    continue
                if kind == "close":
                    self._guard(flush)
                    self._encoding.shutdown()
                    return
                if kind == "flush":
                    self._guard(flush)
                    item[1].set()
                    continue
                if kind == "wake":
                    continue
                if kind == "D":  # a whole batch of decisions: written as it is
                    self._guard(flush)
                    self._guard(self._files["decisions"].write, item[1])
                    self._counts["decisions"] += item[1].num_rows
                    continue
                steps_seen.add((item[1][0], item[1][1]) if kind == "d" else (item[1], item[2]))
                if self._error is None:
                    self._guard(self._accept, item, dec, ten, val)  # gives a tensor's bytes back when done
                elif kind == "t":
                    self._budget.give(item[8].nbytes)
                if deadline is None:
                    deadline = time.monotonic() + self._flush_s
                if len(steps_seen) > self._flush_steps:
                    self._guard(flush)
            if n_fast:
                self._budget.give(freed)
                self._counts["tensors"] += n_fast
                self._counts["tensor_bytes"] += freed
                if deadline is None:
                    deadline = time.monotonic() + self._flush_s

    def _guard(self, fn: Any, *args: Any) -> None:
        if self._error is not None:
            return
        try:
            fn(*args)
        except (OSError, pa.ArrowException, ValueError, TypeError, TraceError) as exc:  # reported on the next call
            self._error = exc

    def _give_when_done(self, nbytes: int, jobs: list[Future], pooled: np.ndarray | None) -> Callable[[], None]:
        """Give ``nbytes`` back to the queue budget (and ``pooled`` to the buffer pool) when every
        job has finished and the returned callable has been called (by the stats' thread)."""
        left = [len(jobs) + 1]
        lock = threading.Lock()

        def done(_f: Future | None = None) -> None:
            with lock:
                left[0] -= 1
                last = left[0] == 0
            if last:
                self._budget.give(nbytes)
                if pooled is not None:
                    self._pool.give(pooled)

        for job in jobs:
            job.add_done_callback(done)
        return done

    def _accept(self, item: tuple, dec: list, ten: list, val: list) -> None:
        kind = item[0]
        if kind == "d":
            dec.append(item[1])
            self._counts["decisions"] += 1
            return
        if kind == "L":  # logits from add_logits: derive the decision here
            _, sample, step, head, x, k, chosen, watched, row_keys = item
            try:
                dec.append(_decision_row(sample, step, head, decide(x, k=k, chosen=chosen, watched=watched), row_keys))
            finally:
                self._budget.give(x.nbytes)
            self._counts["decisions"] += 1
            return
        if kind == "t" and not item[9]:  # statistics and digest only: no encoder job to wait for
            _, sample, step, name, call, order, source, dt, a, _keep, stats, pooled = item
            try:
                if stats is None:
                    stats = compute_stats(a, dt)
                dig = digest(memoryview(a).cast("B") if a.size else b"")
            finally:
                self._budget.give(a.nbytes)
                if pooled is not None:
                    self._pool.give(pooled)
            self._counts["tensor_bytes"] += a.nbytes
            ten.append((sample, step, name, call, order, source, dt, a.shape, stats, dig, None))
            self._counts["tensors"] += 1
            return
        if kind == "t":
            _, sample, step, name, call, order, source, dt, a, keep, stats, pooled = item
            buf = memoryview(a).cast("B") if a.size else memoryview(b"")
            # Compression runs on the encoder thread while this one computes the stats and the
            # digest (zstd, SHA-256 and numpy reductions release the GIL; a third thread measured
            # slower on two cores); the queue's bytes are given back when both are done.
            jobs: list[Future] = []
            ref = None
            if keep:
                pending = self._encoding.submit(self._encoder.encode, buf, a.dtype.itemsize)
                jobs.append(pending)
                ref = self._counts["values"]
                val.append((self._encoder.encoding, pending))
                self._counts["values"] += 1
            stats_done = self._give_when_done(a.nbytes, jobs, pooled)
            try:
                if stats is None:
                    stats = compute_stats(a, dt)
                dig = digest(buf)
            finally:
                stats_done()
            self._counts["tensor_bytes"] += a.nbytes
            ten.append((sample, step, name, call, order, source, dt, a.shape, stats, dig, ref))
        else:  # precomputed stats
            _, sample, step, name, call, order, source, dt, shape, stats, dig = item
            ten.append((sample, step, name, call, order, source, dt, shape, stats, dig, None))
        self._counts["tensors"] += 1


