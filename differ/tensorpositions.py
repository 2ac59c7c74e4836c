"""Value comparison of tensor pairs whose shapes differ in one axis: the positions both runs
computed (a full recompute against an incremental run, docs/differ.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from steptrace.tracefmt import TraceReader
from steptrace.tracefmt.errors import ValuesNotRecordedError

from .columns import combined
from .metrics import compare_values
from .policy import TensorTolerance
from .tensorcols import TensorSide, shape_rows, store_values_metrics


def compare_positions(ra: TraceReader, rb: TraceReader, samples: list[str], names: list[str], A: TensorSide,
                      B: TensorSide, ia: np.ndarray, ib: np.ndarray, rows: np.ndarray, cols: dict[str, np.ndarray],
                      tolerance: Callable[[int], TensorTolerance]) -> None:
    """Compare, from values, the positions both runs computed, for pairs whose shapes differ.

    The rule (docs/differ.md, "Incremental and full computations"): when two tensors have the
    same rank and differ in the size of exactly one axis — a full recompute's ``[1, T, d]``
    against an incremental run's ``[1, 1, d]``, or a cache holding history against a shorter
    one — the last ``n = min(Ta, Tb)`` positions of that axis are compared (both runs end at
    the newest position). The pair is judged by :func:`~differ.metrics.compare_values` on those
    positions and ``cols["positions"]`` holds ``n``. Pairs without values on both sides keep
    their shape mismatch (statistics cover different positions).

    Args:
        ra, rb: the readers; samples, names: the code universes.
        A, B: both sides' columns; ia, ib: the matched rows of each side.
        rows: indices into the matched pairs whose (squeezed) shapes differ.
        cols: the comparison columns, updated in place.
        tolerance: the tolerance of pair ``i``.
    """
    import pyarrow.compute as pc

    rows = rows[A.values[ia[rows]] & B.values[ib[rows]]]
    if not rows.size:
        return
    ra_rank = pc.list_value_length(combined(A.table["shape"]).take(pa.array(ia[rows]))).to_numpy(zero_copy_only=False)
    rb_rank = pc.list_value_length(combined(B.table["shape"]).take(pa.array(ib[rows]))).to_numpy(zero_copy_only=False)
    b_names = combined(B.table["name"])
    for rank in np.unique(ra_rank[ra_rank == rb_rank]).tolist():
        sel = rows[(ra_rank == rank) & (rb_rank == rank)]
        if rank == 0 or not sel.size:
            continue
        sa, sb = shape_rows(A.table["shape"], ia[sel], rank), shape_rows(B.table["shape"], ib[sel], rank)
        differs = sa != sb
        one = (differs.sum(axis=1) == 1)
        axis = differs.argmax(axis=1)
        keep = np.minimum(sa[np.arange(sel.size), axis], sb[np.arange(sel.size), axis])
        for i, ax, n in zip(sel[one & (keep > 0)].tolist(), axis[one & (keep > 0)].tolist(),
                            keep[one & (keep > 0)].tolist()):
            a_row, b_row = int(ia[i]), int(ib[i])
            sample = samples[int(A.sample[a_row])]
            try:
                a = ra.tensor(sample, int(A.step[a_row]), names[int(A.name[a_row])], call=int(A.call[a_row]))
                b = rb.tensor(sample, int(B.step[b_row]), b_names[b_row].as_py(), call=int(B.call[b_row]))
            except ValuesNotRecordedError:
                continue
            cut = (slice(None),) * ax + (slice(-n, None),)
            m = compare_values(a[cut], b[cut], tolerance(i))
            store_values_metrics(cols, i, m, bitexact=False)  # differing shapes: never bit-exact as a whole
            cols["shape_mismatch"][i] = False
            cols["numel"][i] = m.numel
            cols["positions"][i] = n
