"""The caller's side of a writer process (:mod:`steptrace.tracefmt.writerprocess`): the
:class:`~tracefmt.outbox.Outbox` interface over the ring and the pipe. Items are encoded
(:mod:`steptrace.tracefmt.wire`) and their arrays copied into the ring as they are put, then sent
a frame at a time: at once, or, while holding, when the held rows reach ``hold_rows`` rows or
``hold_bytes`` bytes or the next row finds the oldest ``hold_s`` old."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .outbox import Budget, BufferPool
from .wire import ItemEncoder
from .writeitems import DecisionBatchItem, DecisionItem, LogitsItem, StatsItem, TensorItem
from .writerprocess import WriterProcess

if TYPE_CHECKING:
    from .lane import RowTemplate


class ProcessOutbox:
    """:class:`~tracefmt.outbox.Outbox`'s interface over a :class:`WriterProcess`: items are
    encoded (their arrays copied into the ring) as they are put, and sent a frame at a time.

    Args:
        link: the writer process.
        pool: the writer's buffer pool (arrays it copied come back at once).
        hold_bytes, hold_rows, hold_s: when held rows travel.
    """

    #: :meth:`put` copies an item's arrays into the ring before returning.
    copies_on_put = True

    def __init__(self, link: WriterProcess, pool: BufferPool, *, hold_bytes: int, hold_rows: int, hold_s: float) -> None:
        self.link = link
        self.lock = threading.Lock()
        self.budget = Budget(1 << 62)  # the ring is the bound; its stalls are counted in link.stalled
        self.hold_s = hold_s
        self._pool = pool
        self._enc = ItemEncoder()
        self._holding = False
        self._hold_bytes = hold_bytes
        self._hold_rows = hold_rows
        self._held_bytes = 0
        self._held_since = 0.0

    @property
    def holding(self) -> bool:
        """Rows are being held."""
        return self._holding

    def put(self, item: Any, nbytes: int = 0) -> None:
        """Encode ``item`` and send it (or hold it, see :meth:`tracefmt.outbox.Outbox.hold`)."""
        with self.lock:
            kind = type(item)
            enc = self._enc
            if kind is TensorItem:
                enc.tensor(item, self.link.place(item.array, self._send_locked))
                if item.pooled is not None:
                    self._pool.give(item.pooled)
            elif kind is LogitsItem:
                enc.logits(item, self.link.place(item.logits, self._send_locked))
            elif kind is DecisionItem:
                enc.decision(item)
            elif kind is StatsItem:
                enc.stats(item)
            elif kind is DecisionBatchItem:
                enc.batch(item)
            else:
                raise TypeError(f"a writer process takes no {kind.__name__}")
            self._sent_or_held_locked(nbytes)

    def tensor_row(self, sample: str, step: int, name: str, call: int, order: int, source: str | None, dtype: str,
                   array: np.ndarray, values: bool) -> None:
        """:meth:`put` of a :class:`~tracefmt.writeitems.TensorItem` without making one (the
        lane's rows: ``array`` is copied into the ring before this returns)."""
        with self.lock:
            enc = self._enc
            enc.row(sample, step, name, call, order, source, dtype, array, values,
                    self.link.place(array, self._send_locked))
            self._sent_or_held_locked(array.nbytes)

    def tensor_rows(self, rows: list[tuple]) -> None:
        """:meth:`tensor_row` of each of ``rows`` (:meth:`tracefmt.lane.RecorderLane.tensor_rows`):
        their arrays go into the ring as one block (:meth:`WriterProcess.place_many`)."""
        with self.lock:
            enc = self._enc
            enc.rows(rows, self.link.place_many([r[7] for r in rows], self._send_locked))
            self._sent_or_held_locked(sum(r[7].nbytes for r in rows))

    def template_rows(self, template: RowTemplate, sample: str, step: int, order: int, arrays: list[np.ndarray]) -> None:
        """:meth:`tracefmt.lane.RecorderLane.template_rows`: the arrays go into the ring as one
        block, the rows as one ROWSET record (the template's TEMPLATE record the first time)."""
        with self.lock:
            enc = self._enc
            tid = enc.template(template)
            if tid is None or template.span > self.link.size >> 2:
                enc.rows(template.rows(sample, step, order, arrays), self.link.place_many(arrays, self._send_locked))
            else:
                block = self.link.place_block(template.parts(arrays), template.span, self._send_locked)
                enc.rowset(tid, sample, step, order, block, len(arrays))
            self._sent_or_held_locked(template.nbytes)

    def _sent_or_held_locked(self, nbytes: int) -> None:
        """Send the records encoded so far, unless holding and the held rows (``nbytes`` more
        now) are still under every limit."""
        if self._holding:
            self._held_bytes += nbytes
            if (self._enc.count < self._hold_rows and self._held_bytes < self._hold_bytes
                    and time.monotonic() - self._held_since < self.hold_s):
                return
        self._send_locked()

    def _send_locked(self) -> None:
        if self._enc.count:
            self.link.send_items(self._enc.take())
        self._held_bytes = 0
        self._held_since = time.monotonic()

    def hold(self) -> None:
        """Start holding rows (no-op when holding already)."""
        with self.lock:
            if not self._holding:
                self._holding = True
                self._held_bytes = 0
                self._held_since = time.monotonic()

    def send_held(self, *, stop: bool = False, force: bool = False) -> None:
        """Send the held rows (``stop``: and stop holding)."""
        with self.lock:
            self._send_locked()
            if stop:
                self._holding = False
