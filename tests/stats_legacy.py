"""The writer's row path for small tensors as it was before the columnar one (issue 14), kept
verbatim as the reference the columnar path is tested against (tests/test_format_columns.py):
``compute_stats_many`` (one TensorStats per tensor) and ``tensors_batch`` (a record batch from
row tuples). Only the entry points are renamed (``legacy_compute_stats_many``,
``legacy_tensors_batch``).
"""

from __future__ import annotations

import operator

import numpy as np
import pyarrow as pa

from steptrace.tracefmt.schema import TENSORS
from steptrace.tracefmt.stats import TensorStats, _widened_all, compute_stats


def legacy_compute_stats_many(arrays: list[np.ndarray], names: list[str]) -> list[TensorStats]:
    """Compute :func:`compute_stats` of many small canonical arrays in a few numpy calls.

    A recorder hooking every module of a model decoding one token per step hands the writer
    dozens of tensors of a few KB per step; reducing each in its own numpy calls costs more in
    Python (and in the GIL the model's thread waits for) than in arithmetic. Here the arrays
    are widened into one float64 buffer and reduced per segment (``ufunc.reduceat``). Arrays
    holding NaN/Inf or huge values are handed to :func:`compute_stats`, which treats them
    exactly; the others may differ from it in the last bits of mean/std/l2 (SPEC.md §4.4
    allows that: the summation order differs).

    Args:
        arrays: canonical arrays (see :func:`tracefmt.dtypes.canonical`).
        names: their SPEC.md dtype names.

    Returns:
        Their statistics, in order.
    """
    out: list[TensorStats | None] = [None] * len(arrays)
    todo = [i for i, a in enumerate(arrays) if a.size]
    for i in range(len(arrays)):
        if not arrays[i].size:
            out[i] = compute_stats(arrays[i], names[i])
    if todo:
        plain = ("bfloat16", "float16", "bool")
        parts = [arrays[i].reshape(-1) if names[i] not in plain else _widened_all(arrays[i].reshape(-1), names[i])
                 for i in todo]
        x = np.concatenate(parts, dtype=np.float64, casting="unsafe")  # exact: every SPEC dtype fits float64
        sizes = np.fromiter(map(len, parts), np.int64, len(parts))
        starts = np.zeros(len(parts), np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        with np.errstate(invalid="ignore", over="ignore"):
            total = np.add.reduceat(x, starts)
            lo = np.minimum.reduceat(x, starts)
            hi = np.maximum.reduceat(x, starts)
            sumsq = np.add.reduceat(np.multiply(x, x, out=x), starts)
            mean = total / sizes
            std = np.sqrt(np.maximum(sumsq / sizes - mean * mean, 0.0))
            abs_max = np.maximum(np.abs(lo), np.abs(hi))
            l2 = np.sqrt(sumsq)
        # NaN/Inf anywhere in a segment makes its sums non-finite; so do values whose squares
        # overflow: both go to compute_stats (which also scales values beyond 1e150)
        exact = (np.isfinite(sumsq) & (abs_max <= 1e150)).tolist()
        # one conversion per column, not one numpy scalar per field and row
        rows = zip(todo, exact, sizes.tolist(), lo.tolist(), hi.tolist(), mean.tolist(), std.tolist(),
                   abs_max.tolist(), l2.tolist())
        for i, ok, n, lo_, hi_, mean_, std_, am, l2_ in rows:
            out[i] = TensorStats(n, lo_, hi_, mean_, std_, am, l2_, 0, 0) if ok else compute_stats(arrays[i], names[i])
    return out  # type: ignore[return-value]


_STATS = ("numel", "min", "max", "mean", "std", "abs_max", "l2", "nan_count", "inf_count")
_stats_of = operator.attrgetter(*_STATS)


def legacy_tensors_batch(rows: list[tuple]) -> pa.RecordBatch:
    """Build a tensors record batch from processed tensor rows."""
    sample, step, name, call, order, source, dt, shape, stats, dig, ref = zip(*rows)
    st = dict(zip(_STATS, zip(*map(_stats_of, stats))))
    data = {
        "sample": sample, "step": step, "name": name, "call": call, "order": order, "source": source,
        "dtype": dt, "shape": [list(s) for s in shape], **st, "digest": dig, "value_ref": ref,
    }
    return pa.RecordBatch.from_arrays([pa.array(data[f.name], type=f.type) for f in TENSORS], schema=TENSORS)

