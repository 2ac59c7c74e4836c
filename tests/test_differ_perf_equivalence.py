"""The differ's optimised paths against straightforward reference implementations on random data.

The references are the plain versions the fast paths replaced: a (rows, k, k) match cube and
per-row reductions for decision comparison, ``np.union1d`` for the outer join, a group cumsum
for "after a divergence", ``np.unique`` per sample for step counts, the reader's own
``chosen_logit``/``chosen_rank`` derivation, and whole-array numpy for tensor metrics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steptrace.differ import compare_values
from steptrace.differ.columns import duplicates, merge_sorted
from steptrace.differ.decisions import Side, compare_decisions, load_side
from steptrace.differ.policy import Policy, TensorTolerance, default_tensor_tolerance
from steptrace.differ.summary import distinct_steps, first_in_segments, same_sequences, segment_max, segment_sums
from steptrace.differ.topk import rank_sum
from steptrace.differ.verdict import _after
from steptrace.tracefmt import TraceReader, TraceWriter

SEEDS = st.integers(0, 2**32 - 1)


# ---------------------------------------------------------------------------------------------
# reference implementations (row-major, one obvious numpy expression per quantity)


def ref_logit_of(ids, logits, tok, chosen, chosen_logit, chosen_rank):
    hit = ids == tok[:, None]
    found = hit.any(axis=1)
    pos = hit.argmax(axis=1)
    logit = np.where(found, logits[np.arange(tok.size), pos], np.nan)
    rank = np.where(found, pos, -1)
    fb = ~found & (tok == chosen)
    return np.where(fb, chosen_logit, logit), np.where(fb, chosen_rank, rank)


def ref_logsumexp(x):
    with np.errstate(invalid="ignore", divide="ignore"):
        m = np.nanmax(np.where(np.isnan(x), -np.inf, x), axis=1)
        mm = np.where(np.isfinite(m), m, 0.0)
        return np.log(np.nansum(np.exp(x - mm[:, None]), axis=1)) + mm


def ref_compare(A: Side, B: Side, ia, ib, head, heads, policy, grid) -> dict[str, np.ndarray]:
    """Every per-row output of compare_decisions for rows present on both sides."""
    r = np.flatnonzero((ia >= 0) & (ib >= 0))
    ia, ib, head = ia[r], ib[r], head[r]
    kk = max(A.ids.shape[1], B.ids.shape[1])

    def pad(x, fill):
        return np.pad(x, ((0, 0), (0, kk - x.shape[1])), constant_values=fill)

    a_ids, b_ids = pad(A.ids[ia].astype(np.int64), -1), pad(B.ids[ib].astype(np.int64), -1)
    a_log, b_log = pad(A.logits[ia].astype(np.float64), np.nan), pad(B.logits[ib].astype(np.float64), np.nan)
    at, bt = A.argmax[ia], B.argmax[ib]
    la_b, ra_b = ref_logit_of(a_ids, a_log, bt, A.chosen[ia], A.chosen_logit[ia], A.chosen_rank[ia])
    lb_a, rb_a = ref_logit_of(b_ids, b_log, at, B.chosen[ib], B.chosen_logit[ib], B.chosen_rank[ib])
    a_top, b_top = a_log[:, 0], b_log[:, 0]
    a_gap, b_gap = a_top - la_b, b_top - lb_a
    mag = np.fmax(np.abs(a_top), np.abs(b_top))
    eps, ltol = np.empty(r.size), np.empty(r.size)
    for h in np.unique(head):
        m = head == h
        eps[m] = policy.for_head(heads[h]).epsilons(grid, mag[m])
        ltol[m] = policy.for_head(heads[h]).logit_tolerance(grid, mag[m])
    same = at == bt
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        match = (a_ids[:, :, None] == b_ids[:, None, :]) & (a_ids[:, :, None] >= 0)
        has = match.any(axis=2)
        b_on_a = np.where(has, b_log[np.arange(r.size)[:, None], match.argmax(axis=2)], np.nan)
        delta = np.abs(a_log - b_on_a)
        delta = np.where(np.isnan(a_log) & np.isnan(b_on_a) & has, 0.0, np.where(has & np.isnan(delta), np.inf, delta))
        ldiff = np.fmax.reduce(np.where(has, delta, np.nan), axis=1)
        la, lb = A.lse[ia], B.lse[ib]
        ldiff = np.fmax(np.nan_to_num(ldiff, nan=0.0), np.where(np.isnan(la) | np.isnan(lb), 0.0, np.abs(la - lb)))
        def bits(x: np.ndarray) -> np.ndarray:
            return x.astype(np.float32).view(np.uint32)

        bitexact = (same & (A.k[ia] == B.k[ib]) & (a_ids == b_ids).all(axis=1)
                    & ((bits(a_log) == bits(b_log)) | np.isnan(a_log) & np.isnan(b_log)).all(axis=1)
                    & ((bits(la) == bits(lb)) | np.isnan(la) & np.isnan(lb)))
        need = np.isnan(la) | np.isnan(lb)
        lse_a = np.where(need, ref_logsumexp(a_log), la)
        lse_b = np.where(need, ref_logsumexp(b_log), lb)
        p = np.where(has, np.exp(a_log - lse_a[:, None]), 0.0)
        q = np.where(has, np.exp(b_on_a - lse_b[:, None]), 0.0)
        terms = np.where((p > 0) & has, p * (np.log(p) - np.log(q)), 0.0)
        pr = np.clip(1.0 - p.sum(axis=1), 0.0, 1.0)
        qr = np.clip(1.0 - q.sum(axis=1), 0.0, 1.0)
        rest = np.where(pr > 0, pr * (np.log(pr) - np.log(np.where(qr > 0, qr, 1e-300))), 0.0)
        kld = np.maximum(terms.sum(axis=1) + rest, 0.0)
        dp = np.exp(lb_a - lse_b) - np.exp(a_top - lse_a)
        drift = same & ~bitexact & (ldiff > ltol)
        rel = np.abs((a_log - a_top[:, None]) - (b_on_a - lb_a[:, None]))
        noise = np.array([np.max(x[ok]) if ok.any() else 0.0 for x, ok in zip(rel, has & np.isfinite(rel))])
        gap_noise = np.where(same, noise, np.nan)
    return {"a_rank_of_b": ra_b, "b_rank_of_a": rb_a, "a_gap": np.where(same, 0.0, a_gap),
            "b_gap": np.where(same, 0.0, b_gap), "epsilon": eps, "gap_noise": gap_noise, "logit_diff": ldiff,
            "logit_tol": ltol, "bitexact": bitexact, "drift": drift, "kld": kld, "dp": dp}


def random_sides(seed: int) -> tuple[Side, Side, np.ndarray, np.ndarray, np.ndarray]:
    """Two random sides with awkward features (ties, NaN, ±inf, k differing, recorded and missing
    logsumexp, chosen outside the top-k, argmax not at rank 0, many identical rows), and an
    alignment of their rows."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    ka, kb = int(rng.integers(2, 10)), int(rng.integers(2, 10))
    vocab = int(rng.integers(max(ka, kb), 40))
    k = max(ka, kb)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(n)]).astype(np.int32)
    logits = -np.sort(-rng.standard_normal((n, k)) * rng.choice([0.01, 1, 10, 1000], (n, 1)), axis=1).astype(np.float32)
    tie = rng.random(n) < 0.1
    logits[tie, 1] = logits[tie, 0]
    for v in (np.nan, np.inf, -np.inf):
        logits[rng.random(n) < 0.03, -1] = v
    logits[rng.random(n) < 0.01, 0] = np.inf
    b_ids, b_logits = ids.copy(), logits.copy()
    noisy = rng.random(n) < rng.choice([0.0, 0.3, 1.0])
    b_logits[noisy] += (rng.standard_normal((int(noisy.sum()), k)) * rng.choice([1e-6, 1e-2])).astype(np.float32)
    swap = rng.random(n) < 0.1
    b_ids[swap, 0], b_ids[swap, 1] = ids[swap, 1], ids[swap, 0]
    b_ids[rng.random(n) < 0.05, -1] = vocab + 1

    def side(ids_: np.ndarray, logits_: np.ndarray, kx: int, lse_p: float) -> Side:
        ids_, logits_ = ids_[:, :kx].copy(), logits_[:, :kx].copy()
        lens = np.full(n, kx)
        short = rng.random(n) < 0.1  # ragged rows: padded with -1 / NaN like dense_lists does
        ids_[short, -1], logits_[short, -1] = -1, np.nan
        lens[short] -= 1
        lse = np.where(rng.random(n) < lse_p, rng.standard_normal(n) + 5, np.nan)
        chosen = np.where(rng.random(n) < 0.9, ids_[:, 0], rng.integers(0, vocab, n)).astype(np.int64)
        known = rng.random(n) < 0.5
        # argmax is topk_ids[0] by SPEC.md; a few rows break that, to reach the fallbacks
        argmax = np.where(rng.random(n) < 0.03, rng.integers(0, vocab, n), ids_[:, 0]).astype(np.int64)
        return Side(sample=np.zeros(n, np.int64), step=np.arange(n), head=rng.integers(0, 2, n),
                    chosen=chosen, argmax=argmax, forced=np.zeros(n, bool),
                    margin=(logits_[:, 0] - logits_[:, 1]).astype(np.float64), lse=lse, ids=ids_, logits=logits_,
                    k=lens, chosen_logit=np.where(known, rng.standard_normal(n), np.nan),
                    chosen_rank=np.where(known, rng.integers(0, 50, n), -1))

    lse_p = float(rng.choice([0.0, 0.5, 1.0]))
    A, B = side(ids, logits, ka, lse_p), side(b_ids, b_logits, kb, lse_p)
    if rng.random() < 0.5:  # recorded logsumexp equal on both sides, sometimes with huge logits
        B.lse = A.lse.copy()
    if rng.random() < 0.2:  # logits wider than SPEC.md's float32
        A.logits, B.logits = A.logits.astype(np.float64), B.logits.astype(np.float64)
        B.logits[rng.random(n) < 0.2] *= 1 + 1e-12  # differs below float32 resolution
    # alignment: mostly the identity, with rows missing on either side and some permuted pairs
    ia = np.arange(n)
    ib = np.arange(n)
    ia[rng.random(n) < 0.05] = -1
    ib[rng.random(n) < 0.05] = -1
    if rng.random() < 0.3:
        ib = np.where(ib >= 0, rng.permutation(n), -1)
    head = np.where(ia >= 0, A.head[np.maximum(ia, 0)], B.head[np.maximum(ib, 0)])
    return A, B, ia, ib, head


# ---------------------------------------------------------------------------------------------
# decisions


@settings(max_examples=40, deadline=None)
@given(SEEDS, st.sampled_from(["float32", "bfloat16"]))
def test_compare_decisions_matches_reference(seed: int, grid: str) -> None:
    A, B, ia, ib, head = random_sides(seed)
    heads = ["duration", "token"]
    policy = Policy()
    got = compare_decisions(A, B, ia, ib, head, heads, policy, grid)
    want = ref_compare(A, B, ia, ib, head, heads, policy, grid)
    rows = np.flatnonzero((ia >= 0) & (ib >= 0))
    for name, w in want.items():
        g = getattr(got, name)[rows]
        if w.dtype.kind in "biu":
            np.testing.assert_array_equal(g, w, err_msg=name)
        else:  # the same arithmetic; sums follow numpy's pairwise order, so this is exact in practice
            np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-15, equal_nan=True, err_msg=name)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 200), st.integers(0, 50), SEEDS)
def test_rank_sum_is_numpys_row_sum(k: int, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k)) * np.exp(rng.uniform(-20, 20, (n, k)))
    np.testing.assert_allclose(rank_sum(np.ascontiguousarray(x.T)), x.sum(axis=1), rtol=1e-15, atol=0)


def test_chosen_logit_and_rank_derived_like_the_reader(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n, rows = 400, []
    with TraceWriter(tmp_path / "t.trace", mode="overwrite") as w:
        for i in range(n):
            k = int(rng.integers(2, 6))
            ids = rng.choice(20, k, replace=False)
            chosen = int(ids[rng.integers(0, k)]) if rng.random() < 0.8 else int(rng.integers(0, 20))
            known = rng.random() < 0.3 or chosen not in ids
            rows.append({"sample": f"s{i % 7}", "step": i, "chosen": chosen, "topk_ids": ids.tolist(),
                         "topk_logits": sorted(rng.standard_normal(k).tolist(), reverse=True),
                         "chosen_logit": float(rng.standard_normal()) if known and rng.random() < 0.7 else None,
                         "chosen_rank": int(rng.integers(0, 30)) if known and rng.random() < 0.7 else None})
        w.add_decisions({c: [r[c] for r in rows] for c in rows[0]} | {
            "topk_ids": pa.array([r["topk_ids"] for r in rows], pa.list_(pa.int32()))})
    reader = TraceReader(tmp_path / "t.trace")
    side = load_side(reader, [f"s{i}" for i in range(7)], ["token"], [])
    t = reader.decisions()  # derive=True: the reader's derivation
    want_l = t["chosen_logit"].to_numpy(zero_copy_only=False)
    want_r = t["chosen_rank"].fill_null(-1).to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(side.chosen_logit, np.where(np.isnan(want_l), np.nan, want_l.astype(np.float64)))
    np.testing.assert_array_equal(side.chosen_rank, want_r)


# ---------------------------------------------------------------------------------------------
# alignment, verdict bookkeeping, per-sample counts


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.booleans())
def test_merge_sorted_and_duplicates_match_reference(seed: int, sort: bool) -> None:
    rng = np.random.default_rng(seed)
    ka = np.unique(rng.integers(0, 60, int(rng.integers(0, 40))))
    kb = ka.copy() if rng.random() < 0.3 else np.unique(rng.integers(0, 60, int(rng.integers(0, 40))))
    if not sort:
        ka, kb = rng.permutation(ka), rng.permutation(kb)
    keys, ia, ib = merge_sorted(ka, kb)
    np.testing.assert_array_equal(keys, np.union1d(ka, kb))
    for k, idx in ((ka, ia), (kb, ib)):
        where = {int(v): i for i, v in enumerate(k)}
        np.testing.assert_array_equal(idx, [where.get(int(x), -1) for x in keys])
    d = rng.integers(0, 20, int(rng.integers(0, 30)))
    if sort:
        d = np.sort(d)
    vals, counts = np.unique(d, return_counts=True)
    np.testing.assert_array_equal(duplicates(d), vals[counts > 1])


def ref_after(sample: np.ndarray, pos: np.ndarray, event: np.ndarray) -> np.ndarray:
    newg = np.r_[True, (sample[1:] != sample[:-1]) | (pos[1:] != pos[:-1])]
    starts = np.flatnonzero(newg)
    gid = np.cumsum(newg) - 1
    ev_g = np.logical_or.reduceat(event, starts).astype(np.int64)
    excl = np.cumsum(ev_g) - ev_g
    news = np.r_[True, sample[starts][1:] != sample[starts][:-1]]
    base = np.maximum.accumulate(np.where(news, excl, 0))
    return (excl - base > 0)[gid]


@settings(max_examples=80, deadline=None)
@given(SEEDS)
def test_after_and_distinct_steps_match_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 300))
    sample = np.sort(rng.integers(0, 6, n))
    pos = np.concatenate([np.sort(rng.integers(0, 30, int((sample == s).sum()))) for s in range(6)])
    event = rng.random(n) < rng.choice([0.0, 0.02, 0.3])
    np.testing.assert_array_equal(_after(sample, pos, event), ref_after(sample, pos, event))
    step = np.where(rng.random(n) < 0.2, -1, rng.integers(0, 25, n))
    want = [np.unique(step[(sample == s) & (step >= 0)]).size for s in range(8)]
    np.testing.assert_array_equal(distinct_steps(sample, step, 8), want)


@settings(max_examples=80, deadline=None)
@given(SEEDS)
def test_segment_helpers_match_per_sample_loops(seed: int) -> None:
    rng = np.random.default_rng(seed)
    ns = int(rng.integers(1, 12))
    sample = np.sort(rng.integers(0, ns, int(rng.integers(0, 200))))
    bounds = np.searchsorted(sample, np.arange(ns + 1))
    x = rng.integers(0, 6, sample.size).astype(np.int8)
    flag = rng.random(sample.size) < 0.2
    rows = np.flatnonzero(flag)
    seg = [slice(bounds[s], bounds[s + 1]) for s in range(ns)]
    np.testing.assert_array_equal(segment_sums(flag, bounds), [flag[g].sum() for g in seg])
    np.testing.assert_array_equal(segment_max(x, bounds), [x[g].max() if x[g].size else 0 for g in seg])
    want = [int(np.flatnonzero(flag[g])[0]) + g.start if flag[g].any() else -1 for g in seg]
    np.testing.assert_array_equal(first_in_segments(rows, bounds), want)
    la, lb = rng.integers(0, 5, ns), rng.integers(0, 5, ns)
    lb = np.where(rng.random(ns) < 0.6, la, lb)
    sa, sb = np.r_[0, np.cumsum(la)], np.r_[0, np.cumsum(lb)]
    seq_a = rng.integers(0, 3, int(sa[-1]))
    seq_b = rng.integers(0, 3, int(sb[-1]))
    for s in range(ns):  # make some sequences equal
        if la[s] == lb[s] and rng.random() < 0.7:
            seq_b[sb[s] : sb[s + 1]] = seq_a[sa[s] : sa[s + 1]]
    want_same = [la[s] == lb[s] and bool((seq_a[sa[s] : sa[s + 1]] == seq_b[sb[s] : sb[s + 1]]).all()) for s in range(ns)]
    np.testing.assert_array_equal(same_sequences(seq_a, seq_b, sa, sb), want_same)


# ---------------------------------------------------------------------------------------------
# tensor metrics


@settings(max_examples=60, deadline=None)
@given(SEEDS, st.sampled_from([1, 5, 4096, 40_000, 70_000]), st.sampled_from(["float32", "float16", "float64"]))
def test_compare_values_matches_whole_array_numpy(seed: int, n: int, dtype: str) -> None:
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * rng.choice([1e-3, 1, 1e3])).astype(dtype)
    b = (a + (rng.standard_normal(n) * rng.choice([0, 1e-6, 1e-3])).astype(dtype)).astype(dtype)
    a[rng.random(n) < 0.05] = 0
    if rng.random() < 0.5:
        for x in (a, b):
            x[rng.integers(0, n, 2)] = rng.choice([np.nan, np.inf, -np.inf], 2)
    tol = default_tensor_tolerance(dtype) if rng.random() < 0.5 else TensorTolerance(atol=1e-3, rtol=1e-2)
    m = compare_values(a, b, tol, bitexact=False, threads=int(rng.choice([1, 2])))
    work = np.float32 if dtype != "float64" else np.float64
    fa, fb = a.astype(work), b.astype(work)
    fin = np.isfinite(fa) & np.isfinite(fb)
    assert m.nan_mismatch == int((np.isnan(fa) != np.isnan(fb)).sum())
    assert m.inf_mismatch == int(((fa == np.inf) != (fb == np.inf)).sum() + ((fa == -np.inf) != (fb == -np.inf)).sum())
    if not fin.any():
        return
    x, y = fa[fin], fb[fin]
    with np.errstate(all="ignore"):
        d = np.abs(x - y)
        assert m.max_abs == float(d.max())
        rel = float(np.fmax.reduce(d / np.abs(x)))  # 0/0 skipped; all 0/0 gives 0
        assert m.max_rel == (0.0 if np.isnan(rel) else rel)
        assert m.bad == int((d > (np.abs(x) * work(tol.rtol) + work(tol.atol))).sum())
        assert m.mean_abs == pytest.approx(float(d.astype(np.float64).mean()), rel=1e-5, abs=1e-30)
