"""Tensor comparison over whole traces: join the two tensor tables on (sample, step, name, call)
through the decision alignment's step pairs and the name mapping, judge every pair from digests
and statistics in one vectorised pass, then from values where both sides recorded them
(process pool over samples for large jobs).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from typing import Any

import numpy as np
import pyarrow as pa

from steptrace.tracefmt import TraceReader
from steptrace.tracefmt.errors import ValuesNotRecordedError

from .columns import combined, merge_sorted, pack_pair
from .errors import DiffFormatError
from .kernelpolicy import use_kernel
from .mapping import NameMapping
from .metrics import TensorMetrics, compare_values
from .policy import SIGNIFICAND_BITS, Policy, TensorTolerance, coarser, default_tensor_tolerance
from .tensorcols import (
    BASES,
    REASONS,
    TENSOR_COLUMNS,
    TensorSide,
    digest_algorithm,
    load_tensor_side,
    step_signature,
    store_values_metrics,
    tensor_names,
)
from .tensorpositions import compare_positions

__all__ = ["BASES", "POOL_MIN_ELEMENTS", "REASONS", "TENSOR_COLUMNS", "Progress", "TensorDiff", "compare_tensors",
           "step_signature", "tensor_names", "to_table"]

#: Value comparisons below this many elements in all run in-process (a pool costs ~0.5 s).
POOL_MIN_ELEMENTS = 8 << 20

Progress = Callable[[str, int, int], None]


@dataclass
class TensorDiff:
    """Every matched tensor pair and how it compares; one row per (sample, A step, name, call).

    Attributes:
        table: columns ``sample, a_step, b_step, name, call, order, dtype_a, dtype_b, basis,
            bitexact, within, reason, max_abs, mean_abs, max_rel, cosine, sqnr_db, bad, numel,
            nan_mismatch, inf_mismatch, shape_mismatch, dtype_mismatch`` (sample and name as codes).
        names: name universe (reference names) the codes index.
        unmatched_a, unmatched_b: per name, rows recorded on one side only.
        value_pairs: pairs compared from values; stats_pairs: from statistics only.
    """

    cols: dict[str, np.ndarray]
    names: list[str]
    unmatched_a: dict[str, int] = field(default_factory=dict)
    unmatched_b: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Number of matched pairs."""
        return int(self.cols["sample"].size)

    def metrics(self, i: int) -> TensorMetrics:
        """Return row ``i`` as a :class:`TensorMetrics` value."""
        c = self.cols

        def f(k: str) -> float | None:
            v = float(c[k][i])
            return None if np.isnan(v) else v

        return TensorMetrics(
            basis=BASES[int(c["basis"][i])], bitexact=bool(c["bitexact"][i]), within=bool(c["within"][i]),
            reason=REASONS[int(c["reason"][i])], max_abs=f("max_abs"), mean_abs=f("mean_abs"), max_rel=f("max_rel"),
            cosine=f("cosine"), sqnr_db=f("sqnr_db"), bad=None if c["bad"][i] < 0 else int(c["bad"][i]),
            numel=int(c["numel"][i]), nan_mismatch=int(c["nan_mismatch"][i]), inf_mismatch=int(c["inf_mismatch"][i]),
            shape_mismatch=bool(c["shape_mismatch"][i]), dtype_mismatch=bool(c["dtype_mismatch"][i]),
        )


def _tolerance_dtype(da: str, db: str, grid: str | None = None) -> str:
    """The dtype whose tolerance judges a tensor pair: the coarser float side, and for a pair of
    runs computed at different precisions also no finer than the coarser run's grid (a float32
    tensor downstream of float16 kernels carries float16 error)."""
    if da in SIGNIFICAND_BITS and db in SIGNIFICAND_BITS:
        dt = coarser(da, db)
    elif da in SIGNIFICAND_BITS:
        dt = da
    else:
        dt = db if db in SIGNIFICAND_BITS else da
    if grid is not None and dt in SIGNIFICAND_BITS:
        dt = coarser(dt, grid)
    return dt


# ---------------------------------------------------------------------------- value jobs
_readers: dict[str, TraceReader] = {}


def _reader(path: str) -> TraceReader:
    if path not in _readers:
        _readers[path] = TraceReader(path)
    return _readers[path]


def _value_job(path_a: str, path_b: str, jobs: list[tuple], threads: int,
               kernel: bool) -> list[TensorMetrics | None]:
    """Compare a batch of tensor pairs from values (runs in a worker process or in-process), with
    the compiled kernel or numpy as the whole diff decided."""
    ra, rb = _reader(path_a), _reader(path_b)
    out: list[TensorMetrics | None] = []
    for sa, stepa, namea, calla, stepb, nameb, callb, tol, bitexact, sumsq in jobs:
        try:
            a = ra.tensor(sa, stepa, namea, call=calla)
            b = rb.tensor(sa, stepb, nameb, call=callb)
        except ValuesNotRecordedError:
            out.append(None)
            continue
        out.append(compare_values(a, b, tol, bitexact=bitexact, sumsq=sumsq, threads=threads, kernel=kernel))
    return out


def compare_tensors(
    ra: TraceReader,
    rb: TraceReader,
    samples: list[str],
    step_map: tuple[np.ndarray, np.ndarray, np.ndarray],
    b_only_steps: tuple[np.ndarray, np.ndarray],
    policy: Policy,
    mapping: NameMapping,
    *,
    use_values: bool = True,
    jobs: int = 1,
    progress: Progress | None = None,
    cross_grid: str | None = None,
) -> TensorDiff:
    """Compare every tensor recorded by both traces.

    Args:
        ra, rb: reference and candidate readers.
        samples: sorted sample universe (codes).
        step_map: ``(sample, b_step, a_step)`` pairs from the decision alignment: candidate steps
            translate to reference steps through it; steps without decisions keep their number.
        b_only_steps: ``(sample, b_step)`` candidate steps with no reference counterpart.
        policy: tensor tolerances.
        mapping: candidate -> reference names.
        use_values: compare values where both sides recorded them (else statistics only).
        jobs: worker processes for value comparisons (1: in-process).
        progress: ``progress(stage, done, total)`` callback.
        cross_grid: for runs computed at different precisions, the coarser run's grid: every
            tensor is judged at least at that grid's tolerance, and a default absolute tolerance
            scales with the reference's magnitude (``abs_max``) below 1 — what the coarser
            precision explains relative to the tensor's own scale (docs/differ.md §5).
    """
    rename = mapping.rename if (mapping.names or mapping.rules) else None
    names = sorted(set(tensor_names(ra)) | set(tensor_names(rb, rename)))
    A = load_tensor_side(ra, samples, names, None)
    B = load_tensor_side(rb, samples, names, rename)
    b_step = B.step.copy()
    if step_map[0].size:
        ka, kb = pack_pair([step_map[0], step_map[1]], [B.sample, B.step])
        order = np.argsort(ka)
        pos = np.searchsorted(ka[order], kb)
        pos_c = np.minimum(pos, order.size - 1)
        hit = (pos < order.size) & (ka[order][pos_c] == kb)
        b_step = np.where(hit, step_map[2][order[pos_c]], b_step)
    drop_b = np.zeros(B.sample.size, bool)
    if b_only_steps[0].size:
        ko, kb = pack_pair([b_only_steps[0], b_only_steps[1]], [B.sample, B.step])
        drop_b = np.isin(kb, ko)
    keep_b = np.flatnonzero(~drop_b)
    ka, kb = pack_pair([A.sample, A.step, A.name, A.call], [B.sample[keep_b], b_step[keep_b], B.name[keep_b], B.call[keep_b]])
    for k, side in ((ka, str(ra.path)), (kb, str(rb.path))):
        s = np.sort(k)
        if (s[1:] == s[:-1]).any():
            raise DiffFormatError(f"trace {side} records a (sample, step, name, call) tensor more than once "
                                  "(after name mapping: two candidate names may map to one reference name)")
    _, ia, ibk = merge_sorted(ka, kb)
    ib = np.where(ibk >= 0, keep_b[np.maximum(ibk, 0)], -1) if keep_b.size else np.full(ibk.size, -1, np.int64)
    both = (ia >= 0) & (ib >= 0)
    unmatched_a: dict[str, int] = {}
    unmatched_b: dict[str, int] = {}
    for arr, side_names, dest in ((A.name[ia[(ia >= 0) & (ib < 0)]], names, unmatched_a),
                                  (B.name[ib[(ib >= 0) & (ia < 0)]], names, unmatched_b)):
        u, c = np.unique(arr, return_counts=True)
        dest.update({side_names[i]: int(n) for i, n in zip(u, c)})
    if drop_b.any():
        u, c = np.unique(B.name[drop_b], return_counts=True)
        for i, n in zip(u, c):
            unmatched_b[names[i]] = unmatched_b.get(names[i], 0) + int(n)
    ia, ib = ia[both], ib[both]
    n = ia.size
    cols: dict[str, np.ndarray] = {
        "sample": A.sample[ia], "a_step": A.step[ia], "b_step": B.step[ib], "name": A.name[ia],
        "call": A.call[ia], "order": A.order[ia], "numel": A.numel[ia],
    }
    dt_a = [A.dtype[i] for i in ia.tolist()]
    dt_b = [B.dtype[i] for i in ib.tolist()]
    dtypes = sorted(set(dt_a) | set(dt_b))
    dcode = {d: i for i, d in enumerate(dtypes)}
    cols["dtype_a"] = np.array([dcode[d] for d in dt_a], dtype=np.int64)
    cols["dtype_b"] = np.array([dcode[d] for d in dt_b], dtype=np.int64)
    shape_full = A.shape_full[ia] == B.shape_full[ib]
    shape_ok = A.shape_sq[ia] == B.shape_sq[ib]
    dtype_same = cols["dtype_a"] == cols["dtype_b"]
    # digests settle equality only when both traces use one and the same algorithm (SPEC.md §4.5)
    algorithm = digest_algorithm(ra)
    same_algorithm = algorithm is not None and algorithm == digest_algorithm(rb)
    dig_ok = A.digest_ok[ia] & B.digest_ok[ib] & same_algorithm
    same_digest = dig_ok & (A.digest[ia] == B.digest[ib]).all(axis=1)
    bitexact = same_digest & dtype_same & shape_full
    # tolerances per (name, dtype) pair
    nd = max(len(dtypes), 1)
    triple = (cols["name"] * nd + cols["dtype_a"]) * nd + cols["dtype_b"]
    uniq, tol_idx = np.unique(triple, return_inverse=True)
    tols: list[TensorTolerance] = [
        policy.tensor(names[int(u) // (nd * nd)],
                      _tolerance_dtype(dtypes[int(u) // nd % nd], dtypes[int(u) % nd], cross_grid))
        for u in uniq
    ]
    atol = np.array([t.atol for t in tols])[tol_idx] if n else np.zeros(0)
    rtol = np.array([t.rtol for t in tols])[tol_idx] if n else np.zeros(0)
    skip = np.array([t.skip for t in tols], bool)[tol_idx] if n else np.zeros(0, bool)
    # statistics: lower bounds of the errors
    sa = {k: v[ia] for k, v in A.stats.items()}
    sb = {k: v[ib] for k, v in B.stats.items()}
    scaled = np.zeros(n, bool)
    if cross_grid is not None and n:
        # across precisions, a built-in absolute tolerance is relative to the reference's scale
        builtin = np.array([t.atol == default_tensor_tolerance(
            _tolerance_dtype(dtypes[int(u) // nd % nd], dtypes[int(u) % nd], cross_grid)).atol
            for t, u in zip(tols, uniq)], bool)[tol_idx]
        scale = np.clip(np.nan_to_num(sa["abs_max"], nan=1.0, posinf=1.0), 2.0**-14, 1.0)
        scaled = builtin & (scale < 1.0)
        atol = np.where(scaled, atol * scale, atol)
    with np.errstate(invalid="ignore", divide="ignore"):
        lb_max = np.fmax.reduce([np.abs(sa["max"] - sb["max"]), np.abs(sa["min"] - sb["min"]),
                                 np.abs(sa["mean"] - sb["mean"]), np.abs(sa["std"] - sb["std"]),
                                 np.abs(sa["l2"] - sb["l2"]) / np.sqrt(np.maximum(cols["numel"], 1))])
        lb_mean = np.abs(sa["mean"] - sb["mean"])
        lb_rel = lb_max / sa["abs_max"]
    lb_max = np.where(bitexact, 0.0, lb_max)
    lb_mean = np.where(bitexact, 0.0, lb_mean)
    nan_mis = np.abs(A.nan[ia] - B.nan[ib])
    inf_mis = np.abs(A.inf[ia] - B.inf[ib])
    basis = np.where(bitexact, 0, 2).astype(np.int8)
    # judge from statistics, vectorised: the first failing check in REASONS order wins
    def tol_col(key: str, default: float) -> np.ndarray:
        vals = np.array([default if getattr(t, key) is None else getattr(t, key) for t in tols], dtype=np.float64)
        return vals[tol_idx] if n else np.zeros(0)

    nan_equal = np.array([t.nan_equal for t in tols], bool)[tol_idx] if n else np.zeros(0, bool)
    nan_both = np.minimum(A.nan[ia], B.nan[ib])
    abs_max_a = np.nan_to_num(sa["abs_max"], nan=0.0)
    with np.errstate(invalid="ignore"):
        checks = [
            ("shape", ~shape_ok),
            ("nan", (nan_mis > 0) | ((nan_both > 0) & ~nan_equal)),
            ("inf", inf_mis > 0),
            ("elements", lb_max > atol + rtol * abs_max_a),
            ("max_abs", lb_max > tol_col("max_abs", np.inf)),
            ("mean_abs", lb_mean > tol_col("mean_abs", np.inf)),
        ]
    reason = np.zeros(n, np.int8)
    for name, bad in reversed(checks):
        reason[bad] = REASONS.index(name)
    reason[bitexact | skip] = 0
    within = reason == 0
    cols.update(
        basis=basis, bitexact=bitexact, within=within, reason=reason, max_abs=lb_max, mean_abs=lb_mean,
        max_rel=np.where(bitexact, 0.0, lb_rel), cosine=np.where(bitexact, 1.0, np.nan),
        sqnr_db=np.where(bitexact, np.inf, np.nan), bad=np.where(bitexact, 0, -1).astype(np.int64),
        nan_mismatch=nan_mis, inf_mismatch=inf_mis, shape_mismatch=~shape_ok, dtype_mismatch=~dtype_same,
    )
    # values where both sides have them and digests do not settle it
    if use_values:
        need = np.flatnonzero(~bitexact & ~skip & shape_ok & A.values[ia] & B.values[ib])
        if need.size:
            row_tol = [replace(tols[tol_idx[i]], atol=float(atol[i])) if scaled[i] else tols[tol_idx[i]]
                       for i in need.tolist()]
            _values_pass(ra, rb, samples, names, A, B, ia, ib, need, cols, row_tol, dig_ok, jobs, progress)
    cols["positions"] = np.zeros(n, np.int64)
    if use_values:
        compare_positions(ra, rb, samples, names, A, B, ia, ib, np.flatnonzero(~shape_ok & ~skip), cols,
                          lambda i: replace(tols[tol_idx[i]], atol=float(atol[i])) if scaled[i] else tols[tol_idx[i]])
    return TensorDiff(cols, names, unmatched_a, unmatched_b)


def _values_pass(ra: TraceReader, rb: TraceReader, samples: list[str], names: list[str], A: TensorSide,
                 B: TensorSide, ia: np.ndarray, ib: np.ndarray, need: np.ndarray, cols: dict[str, np.ndarray],
                 row_tol: list[TensorTolerance], dig_ok: np.ndarray, jobs: int,
                 progress: Progress | None) -> None:
    b_names = combined(B.table["name"]).to_pylist() if need.size else []
    job_rows = []
    for k, i in enumerate(need.tolist()):
        a_row, b_row = int(ia[i]), int(ib[i])
        l2a, l2b = A.stats["l2"][a_row], B.stats["l2"][b_row]
        sumsq = (None, None) if (np.isnan(l2a) or np.isnan(l2b) or A.nan[a_row] or B.nan[b_row] or A.inf[a_row]
                                 or B.inf[b_row]) else (float(l2a) ** 2, float(l2b) ** 2)
        job_rows.append((
            samples[int(A.sample[a_row])], int(A.step[a_row]), names[int(A.name[a_row])], int(A.call[a_row]),
            int(B.step[b_row]), b_names[b_row], int(B.call[b_row]), row_tol[k],
            False if dig_ok[i] else None, sumsq,
        ))
    total_elems = int(cols["numel"][need].sum())
    kernel = bool(job_rows) and use_kernel(total_elems)  # one path for the whole diff
    # batches by sample, so each worker reads one sample's tensors
    by_sample: dict[str, list[int]] = {}
    for k, jr in enumerate(job_rows):
        by_sample.setdefault(jr[0], []).append(k)
    batches = list(by_sample.values())
    results: list[TensorMetrics | None] = [None] * len(job_rows)
    pa_, pb_ = str(ra.path), str(rb.path)
    done = 0
    if progress:
        progress("tensor values", 0, len(batches))
    if jobs > 1 and len(batches) > 1 and total_elems >= POOL_MIN_ELEMENTS:
        with ProcessPoolExecutor(min(jobs, len(batches)), mp_context=get_context("spawn")) as ex:
            futs = [(b, ex.submit(_value_job, pa_, pb_, [job_rows[k] for k in b], 1, kernel)) for b in batches]
            for b, fut in futs:
                for k, m in zip(b, fut.result()):
                    results[k] = m
                done += 1
                if progress:
                    progress("tensor values", done, len(batches))
    else:
        _readers.setdefault(pa_, ra)
        _readers.setdefault(pb_, rb)
        threads = max(1, min(2, os.cpu_count() or 1))
        for b in batches:
            for k, m in zip(b, _value_job(pa_, pb_, [job_rows[k] for k in b], threads, kernel)):
                results[k] = m
            done += 1
            if progress:
                progress("tensor values", done, len(batches))
    for k, i in enumerate(need.tolist()):
        m = results[k]
        if m is None:
            continue
        store_values_metrics(cols, i, m, bitexact=bool(m.bitexact))


def to_table(td: TensorDiff, samples: list[str]) -> pa.Table:
    """Return the tensor comparisons as a pyarrow Table with string sample and name columns."""
    c = dict(td.cols)
    out: dict[str, Any] = {
        "sample": pa.DictionaryArray.from_arrays(pa.array(c.pop("sample"), pa.int32()), pa.array(samples or [""])),
        "name": pa.DictionaryArray.from_arrays(pa.array(c.pop("name"), pa.int32()), pa.array(td.names or [""])),
    }
    c["basis"] = np.array(BASES, dtype=object)[c["basis"]] if c["basis"].size else np.zeros(0, object)
    c["reason"] = np.array(REASONS, dtype=object)[c["reason"]] if c["reason"].size else np.zeros(0, object)
    out.update({k: pa.array(v) for k, v in c.items() if k not in ("dtype_a", "dtype_b")})
    return pa.table(out)
