"""The recorders' fast path into a :class:`steptrace.tracefmt.TraceWriter` (an internal interface).

A recorder hooking every module of a model writes dozens of rows per decode step from inside
the model's forward pass, where each Python step costs 5-20x its micro-benchmark price (cold
caches). :class:`RecorderLane` (``writer.lane``) is how it does so: rows held and handed to the
background thread in batches (:meth:`RecorderLane.hold`), tensor rows given positionally with
only the dtype checked (:meth:`RecorderLane.tensor_row`), and decisions from
:func:`tracefmt.decisions.decide` written without re-checking their fields
(:meth:`RecorderLane.decided`), and steps whose rows repeat the last step's written from a
:class:`RowTemplate` (:meth:`RecorderLane.template_rows`: only the arrays change). Everything
else goes through the writer's checked ``add_*`` methods. Callers of this interface check their
own arguments; it is not for user code.
"""

from __future__ import annotations

from itertools import accumulate
from typing import TYPE_CHECKING, Any

import numpy as np

from .checks import check_key, opt_i32
from .decisions import Decision
from .dtypes import container
from .errors import TraceUsageError, UnsupportedDtypeError
from .outbox import BufferPool, Outbox
from .wire import ALIGN
from .writeitems import DecisionItem, RowSetItem, TensorItem, row_keys, row_of_decision

if TYPE_CHECKING:
    from .writer import TraceWriter

#: Arrays below this many bytes are copied plainly; larger ones into recycled buffers.
POOLED_BYTES = 64 << 10


class RowTemplate:
    """The rows of a step that repeats (a decode loop's hooked modules, step after step): every
    field of each row but the sample, the step, the array and the order, which is the first
    row's plus the row's position. Made by :meth:`RecorderLane.row_template` from one step's
    rows (their dtypes checked there, once); :meth:`RecorderLane.template_rows` then writes a
    later step's rows from it and that step's arrays alone.

    The arrays of a step travel as one block: each at :data:`ALIGN` bytes from the block's start.

    Attributes:
        fields: per row ``(name, call, source, dtype, values)``.
        shapes: per row, the array's shape.
        sizes: per row, the array's bytes.
        nbytes: the arrays' bytes in all.
        offsets: per row, where its array starts in the block.
        pads: per row, the zero bytes after its array in the block (None: none anywhere).
        span: the block's bytes.
    """

    __slots__ = ("fields", "nbytes", "offsets", "pads", "shapes", "sizes", "span")

    def __init__(self, rows: list[tuple]) -> None:
        self.fields = [(r[2], r[3], r[5], r[6], bool(r[8])) for r in rows]
        self.shapes = [r[7].shape for r in rows]
        self.sizes = sizes = [r[7].nbytes for r in rows]
        self.nbytes = sum(sizes)
        padded = [(nb + ALIGN - 1) & -ALIGN for nb in sizes]
        self.offsets = list(accumulate(padded[:-1], initial=0)) if padded else []
        self.pads = None if padded == sizes else [bytes(p - nb) for p, nb in zip(padded, sizes)]
        self.span = sum(padded)

    def parts(self, arrays: list[np.ndarray]) -> list[Any]:
        """``arrays`` (a step's, one per row) and the padding between them: the block's parts."""
        pads = self.pads
        return arrays if pads is None else [x for pair in zip(arrays, pads) for x in pair]

    def block(self, arrays: list[np.ndarray]) -> bytes:
        """``arrays`` (a step's, one per row) as one block."""
        return b"".join(self.parts(arrays))

    def items(self, sample: str, step: int, order: int, block: bytes | np.ndarray) -> list[TensorItem]:
        """The :class:`~tracefmt.writeitems.TensorItem` of each row at ``sample``, ``step``, the
        first at execution order ``order``, its array a view of ``block``."""
        buf = block if type(block) is np.ndarray else np.frombuffer(block, np.uint8)
        return [TensorItem(sample, step, name, call, order + i, source, dtype,
                           buf[off : off + nb].view(container(dtype)).reshape(shape), values, None, None)
                for i, ((name, call, source, dtype, values), shape, off, nb)
                in enumerate(zip(self.fields, self.shapes, self.offsets, self.sizes))]

    def rows(self, sample: str, step: int, order: int, arrays: list[np.ndarray]) -> list[tuple]:
        """The rows (as :meth:`RecorderLane.tensor_rows` takes them) of ``arrays`` at ``sample``,
        ``step``, the first at execution order ``order``."""
        return [(sample, step, name, call, order + i, source, dtype, a, values)
                for i, ((name, call, source, dtype, values), a) in enumerate(zip(self.fields, arrays))]


class RecorderLane:
    """The recorders' unchecked, batched way into one writer (``TraceWriter.lane``).

    Args:
        writer: the writer (its open state is checked at each call).
        outbox: the writer's queue and held rows.
        pool: the writer's recycled copy buffers.
    """

    def __init__(self, writer: TraceWriter, outbox: Outbox, pool: BufferPool) -> None:
        self._writer = writer
        self._outbox = outbox
        self._pool = pool
        # a writer process's outbox copies rows into its ring at once: no item, no copy here
        self._direct = getattr(outbox, "tensor_row", None)

    def hold(self) -> None:
        """Keep the rows of later ``add_*`` and lane calls (from any thread) and hand them to the
        background thread in batches, until :meth:`hand_over`.

        A batch goes when the held rows reach 2048 rows or a quarter of ``queue_bytes`` (8 MB
        at most), or when the oldest has waited ``flush_ms / 2`` (the background thread takes
        rows that wait longer itself, so a run that hangs still gets them written);
        :meth:`TraceWriter.flush` and :meth:`TraceWriter.close` hand them over too. A process
        killed while rows are held loses them, as it loses rows not yet flushed.
        """
        self._outbox.hold()

    def hand_over(self) -> None:
        """Hand the held rows to the background thread and stop holding."""
        self._outbox.send_held(stop=True)

    def tensor_row(
        self, sample: str, step: int, name: str, call: int, order: int, source: str | None, dtype: str,
        array: np.ndarray, values: bool, *, copy: bool = True,
    ) -> None:
        """:meth:`TraceWriter.add_tensor` for callers that check their own arguments: everything
        is positional and only ``array``'s dtype is checked.

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
        w = self._writer
        if w._failed_or_closed():
            w._check_open()
        if array.dtype != container(dtype):
            raise UnsupportedDtypeError(f"tensor {name!r}: a {array.dtype} array cannot hold SPEC.md dtype {dtype!r}")
        if self._direct is not None:
            self._direct(sample, step, name, call, order, source, dtype, array, values)
            return
        pooled = None
        if not copy and array.flags.c_contiguous:
            a = array
        elif array.nbytes < POOLED_BYTES or not array.flags.c_contiguous:
            a = array.copy(order="C")
        else:
            a, pooled = self._pool.copy(array)
        self._outbox.put(TensorItem(sample, step, name, call, order, source, dtype, a, values, None, pooled), a.nbytes)

    def tensor_rows(self, rows: list[tuple]) -> None:
        """:meth:`tensor_row` of each of ``rows`` (``(sample, step, name, call, order, source,
        dtype, array, values)``, in that order), with ``copy=False``: arrays the caller owns and
        never changes.

        Raises:
            UnsupportedDtypeError: an array's dtype is not its ``dtype``'s container.
            TraceWriteError: the background writer failed earlier.
        """
        w = self._writer
        if w._failed_or_closed():
            w._check_open()
        for row in rows:
            if row[7].dtype != container(row[6]):
                raise UnsupportedDtypeError(f"tensor {row[2]!r}: a {row[7].dtype} array cannot hold SPEC.md dtype {row[6]!r}")
        if self._direct is not None:
            self._outbox.tensor_rows(rows)  # type: ignore[attr-defined]
            return
        item, items, nbytes, pool = TensorItem, [], 0, self._pool
        for sample, step, name, call, order, source, dtype, a, values in rows:
            pooled = None
            if not a.flags.c_contiguous:
                if a.nbytes < POOLED_BYTES:
                    a = a.copy(order="C")
                else:
                    a, pooled = pool.copy(a)
            items.append(item(sample, step, name, call, order, source, dtype, a, values, None, pooled))
            nbytes += a.nbytes
        self._outbox.put_many(items, nbytes)  # held, or queued as one item: one wake for them all

    def row_template(self, rows: list[tuple]) -> RowTemplate:
        """A :class:`RowTemplate` of ``rows`` (as :meth:`tensor_rows` takes them: rows of one step
        at consecutive execution orders, C-contiguous arrays the caller owns), for later steps
        with the same rows.

        Raises:
            UnsupportedDtypeError: an array's dtype is not its ``dtype``'s container.
            TraceUsageError: an array is not C-contiguous, or the rows are not of one step at
                consecutive orders.
        """
        if any(r[:2] != rows[0][:2] or r[4] != rows[0][4] + i for i, r in enumerate(rows)):
            raise TraceUsageError("a row template is made of the rows of one step at consecutive orders")
        for row in rows:
            a = row[7]
            if a.dtype != container(row[6]):
                raise UnsupportedDtypeError(f"tensor {row[2]!r}: a {a.dtype} array cannot hold SPEC.md dtype {row[6]!r}")
            if not a.flags.c_contiguous:
                raise TraceUsageError(f"tensor {row[2]!r}: a row template's arrays are C-contiguous copies")
        return RowTemplate(rows)

    def template_rows(self, template: RowTemplate, sample: str, step: int, order: int, arrays: list[np.ndarray]) -> None:
        """:meth:`tensor_rows` of ``template``'s rows at ``sample``, ``step``, the first at execution
        order ``order``, with ``arrays``: one per row, C-contiguous, of the template's dtypes and
        shapes (unchecked: the caller made them as it made the template's), owned by the caller
        and never changed.

        Raises:
            TraceWriteError: the background writer failed earlier.
        """
        w = self._writer
        if w._failed_or_closed():
            w._check_open()
        if self._direct is not None:
            self._outbox.template_rows(template, sample, step, order, arrays)  # type: ignore[attr-defined]
            return
        # one block: the step's copies are freed now, and the writer's thread makes the rows (a
        # step's dozens of small arrays held until the writer takes them fragment the heap the
        # model allocates its own tensors from)
        self._outbox.put_many([RowSetItem(template, sample, step, order, template.block(arrays))], template.nbytes)

    def decided(self, sample: str, step: int, decision: Decision, *, head: str, **keys: Any) -> None:
        """Write a Decision whose fields have the row's types already (from
        :func:`tracefmt.decisions.decide`): only the key and the ids' range are checked.

        Args:
            sample, step, head: the row's key (``head`` a non-empty string).
            decision: the decision.
            **keys: forced, piece, frame, chunk, position, emission, time_us.

        Raises:
            TraceUsageError: a bad key, id or keyword.
            TraceWriteError: the background writer failed earlier.
        """
        self._writer._check_open()
        sample, step = check_key(sample, step)
        d = decision
        for v in (d.chosen, d.argmax, d.chosen_rank, *(w["id"] for w in d.watched)):
            opt_i32("token id", v)
        self._outbox.put(DecisionItem(row_of_decision(sample, step, head, d, row_keys(keys))))
