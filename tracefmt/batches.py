"""Building the Arrow record batches a writer flushes (SPEC.md §3, §4), and the vocabulary file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa

from .checks import check_vocab_ids
from .decisions import ExactColumns
from .errors import TraceUsageError
from .schema import DECISIONS, FORMAT_VERSION, TENSORS, VALUES, WATCHED_TYPE
from .writeitems import RowKeys, TensorColumns, TensorRow


def numbers(values: np.ndarray, value_type: pa.DataType, valid: np.ndarray | None = None) -> pa.Array:
    """An Arrow array of a fixed-width ``value_type`` over the bytes of numpy ``values`` (of
    the matching dtype), null where ``valid`` is False. Built from buffers: ``pa.array`` of a
    numpy array imports ``numpy.ma`` (~80 ms) on first use."""
    n = len(values)
    bitmap, nulls = None, 0
    if valid is not None and not valid.all():
        bitmap, nulls = pa.py_buffer(np.packbits(valid, bitorder="little")), n - int(np.count_nonzero(valid))
    data = pa.py_buffer(np.ascontiguousarray(values))
    return pa.Array.from_buffers(value_type, n, [bitmap, data], null_count=nulls)


def list_array(items: list[np.ndarray], value_type: pa.DataType) -> pa.ListArray:
    """Build a list array from 1-d numpy arrays (one per row)."""
    lengths = np.fromiter((len(x) for x in items), dtype=np.int32, count=len(items))
    offsets = np.zeros(len(items) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.concatenate(items) if items else np.zeros(0)
    same = flat.dtype == value_type.to_pandas_dtype()  # else converted (and checked) by pa.array
    return pa.ListArray.from_arrays(numbers(offsets, pa.int32()),
                                    numbers(flat, value_type) if same else pa.array(flat, type=value_type))


def decisions_batch(rows: list[tuple]) -> pa.RecordBatch:
    """Build a decisions record batch from queued row tuples (SPEC.md §3.1 column order)."""
    cols = list(zip(*rows))
    arrays = []
    for i, f in enumerate(DECISIONS):
        if f.name in ("topk_ids", "topk_logits"):
            arrays.append(list_array(list(cols[i]), f.type.value_type))
        else:
            arrays.append(pa.array(cols[i], type=f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=DECISIONS)


def tensors_batch(rows: Sequence[TensorRow] | TensorColumns) -> pa.RecordBatch:
    """Build a tensors record batch from processed tensor rows, one conversion per column.

    Args:
        rows: the rows, as :class:`tracefmt.writeitems.TensorRow` records or as columns.

    Returns:
        The batch (SPEC.md §4.1 column order).

    Raises:
        pyarrow.ArrowException, TypeError: a value does not fit its column.
    """
    c = rows if type(rows) is TensorColumns else TensorColumns.of_rows(rows)  # type: ignore[arg-type]
    n = len(c)
    st = c.stats
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(np.fromiter(map(len, c.shape), np.int32, n), out=offsets[1:])
    dims = np.fromiter(chain.from_iterable(c.shape), np.int64, int(offsets[-1]))
    shape = pa.ListArray.from_arrays(numbers(offsets, pa.int32()), numbers(dims, pa.int64()))
    i64 = pa.int64()
    arrays = [
        pa.array(c.sample, pa.utf8()), pa.array(c.step, pa.int32()), pa.array(c.name, pa.utf8()),
        pa.array(c.call, pa.int32()), pa.array(c.order, pa.int32()), pa.array(c.source, pa.utf8()),
        pa.array(c.dtype, pa.utf8()), shape, numbers(st.numel, i64),
        *[numbers(v, pa.float64(), ok) for v, ok in zip(st.floats, st.valid)],
        numbers(st.nan_count, i64), numbers(st.inf_count, i64), pa.array(c.digest, pa.binary(16)),
        pa.array(c.value_ref, i64),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=TENSORS)


def values_batch(rows: list[tuple[str, bytes]]) -> pa.RecordBatch:
    """Build a values record batch from (encoding, payload) pairs."""
    enc, data = zip(*rows)
    if len(data) == 1:  # the writer's case: wrap the payload without copying it
        offsets = pa.py_buffer(np.array([0, len(data[0])], dtype=np.int64))
        binary = pa.LargeBinaryArray.from_buffers(pa.large_binary(), 1, [None, offsets, pa.py_buffer(data[0])])
    else:
        binary = pa.array(data, pa.large_binary())
    return pa.RecordBatch.from_arrays([pa.array(enc, pa.utf8()), binary], schema=VALUES)


def write_vocab(path: Path, vocab: Sequence[str] | Mapping[int, str]) -> None:
    """Write the vocabulary file (SPEC.md §2.2)."""
    if isinstance(vocab, Mapping):
        ids = [int(i) for i in vocab]
        pieces = [vocab[i] for i in vocab]
    else:
        ids = list(range(len(vocab)))
        pieces = list(vocab)
    if not all(isinstance(p, str) for p in pieces):
        raise TraceUsageError("vocab pieces must be strings")
    problem = check_vocab_ids(np.asarray(ids, dtype=np.int64)) if ids and all(-(1 << 62) < i < 1 << 62 for i in ids) \
        else ("ids must lie in [0, 2**31)" if ids else None)
    if problem:
        raise TraceUsageError(f"vocab: {problem}")
    table = pa.table({"id": pa.array(ids, pa.int32()), "piece": pa.array(pieces, pa.utf8())})
    table = table.replace_schema_metadata({b"steptrace.kind": b"vocab", b"steptrace.version": FORMAT_VERSION.encode()})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)


def decisions_batch_of_columns(c: ExactColumns, samples: list[str], steps: list[int], heads: list[str],
                               keys: list[RowKeys], watched: list[int]) -> pa.RecordBatch:
    """The decisions record batch of :func:`decisions_batch` for the rows of ``c`` (one per
    logits item, with its key and keyed columns), built from the columns with no Python step
    per row but the keyed columns' (:func:`tracefmt.writeitems.row_of_decision`'s rows, value
    for value: ``chosen_logit``/``chosen_rank`` only where ``chosen`` is outside the top k).

    Args:
        c: the exact rows' columns (:func:`tracefmt.decisions.decide_columns`).
        samples, steps, heads, keys: each row's key and keyed columns, in ``c``'s row order.
        watched: the ids watched in every row.
    """
    n, k = c.topk_ids.shape
    in_top = (c.chosen == c.argmax) | (c.topk_ids == c.chosen[:, None]).any(axis=1)
    lists = numbers(np.arange(0, (n + 1) * k, k, dtype=np.int32), pa.int32())
    if watched:
        w = len(watched)
        struct = pa.StructArray.from_arrays(
            [numbers(np.tile(np.asarray(watched, np.int32), n), pa.int32()),
             numbers(np.ascontiguousarray(c.values[:, 1:]).reshape(-1), pa.float32()),
             numbers(c.ranks[:, 1:].astype(np.int32).reshape(-1), pa.int32())],
            fields=list(WATCHED_TYPE))
        watched_col = pa.ListArray.from_arrays(numbers(np.arange(0, (n + 1) * w, w, dtype=np.int32), pa.int32()),
                                               struct)
    else:
        watched_col = pa.nulls(n, pa.list_(WATCHED_TYPE))
    forced, piece, frame, chunk, position, emission, time = zip(*keys) if keys else ((),) * 7
    arrays = [
        pa.array(samples, pa.utf8()), pa.array(steps, pa.int32()), pa.array(heads, pa.utf8()),
        numbers(c.chosen.astype(np.int32), pa.int32()), numbers(c.argmax.astype(np.int32), pa.int32()),
        pa.array(forced, pa.bool_()),
        pa.ListArray.from_arrays(lists, numbers(c.topk_ids.reshape(-1), pa.int32())),
        pa.ListArray.from_arrays(lists, numbers(np.ascontiguousarray(c.topk_logits).reshape(-1), pa.float32())),
        numbers(c.margin, pa.float32()), numbers(c.logsumexp.astype(np.float32), pa.float32()),
        numbers(np.ascontiguousarray(c.values[:, 0]), pa.float32(), valid=~in_top),
        numbers(c.ranks[:, 0].astype(np.int32), pa.int32(), valid=~in_top),
        watched_col,
        pa.array(piece, pa.utf8()), pa.array(frame, pa.int32()), pa.array(chunk, pa.int32()),
        pa.array(position, pa.int32()), pa.array(emission, pa.int32()),
        pa.array(time, pa.timestamp("us", tz="UTC")),
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=DECISIONS)
