"""Summaries of one candidate's comparison for the report: decision statistics, tensor counts,
histograms, watched-token biases, per-sample step counts and the per-row steps table.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa

from .align import BOTH, Alignment
from .decisions import DecisionDiff
from .mapping import NameMapping
from .neartie import RULES
from .side import Side
from .tensors import TensorDiff
from .verdict import FLIP, VERDICTS, StepStatus

#: Margin histogram bin edges (logits) for flipped vs unflipped steps.
MARGIN_EDGES = [0.0, 0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, float("inf")]


def distinct_steps(sample: np.ndarray, step: np.ndarray, nsamples: int) -> np.ndarray:
    """Per sample code, how many distinct steps >= 0 its aligned rows have on one side."""
    have = step >= 0
    key = (sample << 32) | step if have.all() else (sample[have] << 32) | step[have]
    if key.size > 1 and not (key[1:] >= key[:-1]).all():
        key = np.sort(key)
    first = np.r_[True, key[1:] != key[:-1]] if key.size else np.zeros(0, bool)
    return np.bincount(key[first] >> 32, minlength=nsamples)


def segment_sums(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Sum of ``x`` over each segment ``[bounds[s], bounds[s + 1])`` (empty segments: 0)."""
    cs = np.zeros(x.size + 1, dtype=np.int64)
    np.cumsum(x, out=cs[1:])
    return cs[bounds[1:]] - cs[bounds[:-1]]


def segment_max(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Maximum of non-negative ``x`` over each segment (empty segments: 0)."""
    out = np.zeros(bounds.size - 1, dtype=x.dtype)
    full = np.flatnonzero(bounds[1:] > bounds[:-1])
    if full.size:
        out[full] = np.maximum.reduceat(x, bounds[full])
    return out


def first_in_segments(rows: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """The first of the sorted ``rows`` inside each segment, -1 where none."""
    at = np.searchsorted(rows, bounds[:-1])
    hit = at < rows.size
    hit[hit] = rows[at[hit]] < bounds[1:][hit]
    return np.where(hit, rows[np.minimum(at, max(rows.size - 1, 0))] if rows.size else -1, -1)


def same_sequences(seq_a: np.ndarray, seq_b: np.ndarray, sa: np.ndarray, sb: np.ndarray) -> np.ndarray:
    """Per sample, whether its token sequences are equal (sample ``s`` is ``seq_a[sa[s]:sa[s + 1]]``
    and ``seq_b[sb[s]:sb[s + 1]]``)."""
    la, lb = np.diff(sa), np.diff(sb)
    same_len = la == lb
    if same_len.all() and (sa == sb).all():  # the usual case: position i of one is position i of the other
        return segment_sums(seq_a != seq_b, sa) == 0
    owner = np.repeat(np.arange(la.size), la)  # sample of each position of seq_a
    m = same_len[owner]
    pos = np.flatnonzero(m)
    other = pos - sa[owner[m]] + sb[owner[m]]
    differs = np.bincount(owner[m], weights=seq_a[pos] != seq_b[other], minlength=la.size)
    return same_len & (differs == 0)


def quantiles(x: np.ndarray) -> dict[str, float | None]:
    """Mean, median, 99th percentile and maximum of the non-NaN values (one partition for both
    percentiles)."""
    nan = np.isnan(x)
    if nan.any():
        x = x[~nan]
    if not x.size:
        return {"mean": None, "p50": None, "p99": None, "max": None}
    p50, p99 = np.percentile(x, [50, 99])
    return {"mean": float(x.mean()), "p50": float(p50), "p99": float(p99), "max": float(x.max())}


def decision_summary(al: Alignment, dd: DecisionDiff, st: StepStatus, A: Side, B: Side) -> dict[str, Any]:
    m = (al.gap == BOTH) & ~st.after
    same = dd.a_tok[m] == dd.b_tok[m]
    flipped = st.verdict[m] >= FLIP
    margins = dd.a_margin[m]
    eps = dd.epsilon[m]
    return {
        "compared": int(m.sum()),
        "top1_agreement": float(same.mean()) if m.any() else None,
        "flips": int((st.verdict[m] == FLIP).sum()),
        "divergent": int((st.verdict[m] == VERDICTS.index("divergent")).sum()),
        "kld": {**quantiles(dd.kld[m]), "basis": "topk"},
        "dp_rms": float(np.sqrt(np.nanmean(dd.dp[m] ** 2))) if m.any() and not np.isnan(dd.dp[m]).all() else None,
        "logit_noise": quantiles(dd.logit_diff[m][same]),
        "gap_noise": {hn.head: hn.to_json() for hn in st.noise.values()},
        "near_ties": {RULES[c]: int(((st.verdict[m] == FLIP) & (dd.rule[m] == c)).sum()) for c in range(1, len(RULES))},
        "epsilon": {"min": float(np.nanmin(eps)) if eps.size else None, "max": float(np.nanmax(eps)) if eps.size else None},
        "margin_histogram": {
            "edges": MARGIN_EDGES,
            "flipped": np.histogram(np.abs(margins[flipped]), MARGIN_EDGES)[0].tolist(),
            "unflipped": np.histogram(np.abs(margins[~flipped & ~np.isnan(margins)]), MARGIN_EDGES)[0].tolist(),
        },
    }


def tensor_summary(td: TensorDiff | None, mapping: NameMapping) -> dict[str, Any]:
    if td is None:
        return {"compared": 0, "bitexact": 0, "within": 0, "beyond": 0, "by_basis": {}, "unmatched_reference": {},
                "unmatched_candidate": {}, "mapping": mapping.to_json()}
    c = td.cols
    basis = Counter(np.array(["digest", "values", "stats"])[c["basis"]].tolist()) if td.rows else Counter()
    beyond = ~c["within"]
    worst = Counter(np.array(td.names, dtype=object)[c["name"][beyond]].tolist()) if beyond.any() else Counter()
    return {
        "compared": td.rows,
        "bitexact": int(c["bitexact"].sum()),
        "within": int(c["within"].sum()),
        "beyond": int(beyond.sum()),
        "by_basis": dict(basis),
        "beyond_by_name": dict(worst.most_common(20)),
        "unmatched_reference": dict(sorted(td.unmatched_a.items())[:50]),
        "unmatched_candidate": dict(sorted(td.unmatched_b.items())[:50]),
        "mapping": mapping.to_json(),
    }


def histogram(steps: list[int]) -> dict[str, list]:
    if not steps:
        return {"edges": [], "counts": []}
    hi = max(steps) + 1
    width = max(1, int(np.ceil(hi / 20)))
    edges = list(range(0, hi + width, width))
    counts = np.histogram(steps, edges)[0].tolist()
    return {"edges": edges, "counts": counts}


def watched_summary(bias: dict[str, list[float]], watched: dict[str, int]) -> dict[str, Any]:
    out = {}
    for name, xs in bias.items():
        if not xs:
            out[name] = {"id": watched[name], "lost": 0}
            continue
        x = np.sort(np.array(xs))
        out[name] = {
            "id": watched[name], "lost": int(x.size),
            "bias_p50": float(np.percentile(x, 50)), "bias_max": float(x.max()),
            "fixed_by_bias": {f"+{b:g}": int((x < b).sum()) for b in (0.5, 1, 2, 4, 8)},
        }
    return out


def steps_table(al: Alignment, dd: DecisionDiff, st: StepStatus, samples: list[str], heads: list[str],
                 id_to_name: dict[int, str]) -> pa.Table:
    cols = {
        "sample": pa.DictionaryArray.from_arrays(pa.array(al.sample, pa.int32()), pa.array(samples or [""])),
        "pos": al.pos, "a_step": al.a_step, "b_step": al.b_step,
        "head": pa.DictionaryArray.from_arrays(pa.array(al.head, pa.int32()), pa.array(heads or [""])),
        "gap": al.gap,
        "verdict": pa.DictionaryArray.from_arrays(pa.array(st.verdict.astype(np.int32)), pa.array(list(VERDICTS))),
        "after": st.after, "a_token": dd.a_tok, "b_token": dd.b_tok, "a_chosen": dd.a_chosen, "b_chosen": dd.b_chosen,
        "a_margin": dd.a_margin, "b_margin": dd.b_margin, "a_rank_of_b": dd.a_rank_of_b, "b_rank_of_a": dd.b_rank_of_a,
        "a_gap": dd.a_gap, "b_gap": dd.b_gap, "shift": dd.a_gap + dd.b_gap, "epsilon": dd.epsilon,
        "near_tie_rule": pa.DictionaryArray.from_arrays(pa.array(dd.rule.astype(np.int32)), pa.array(list(RULES))),
        "noise": dd.noise, "gap_noise": dd.gap_noise, "logit_diff": dd.logit_diff, "kld": dd.kld,
        "dp": dd.dp, "tensors": st.t_count, "tensor_beyond": st.t_fail, "first_beyond": st.t_first,
    }
    for tok, w in dd.watched.items():
        name = id_to_name.get(tok, str(tok))
        for k in ("a_rank", "b_rank", "b_lost_by", "b_bias"):
            cols[f"{name}_{k}"] = w[k]
    return pa.table({k: (v if isinstance(v, pa.Array) else pa.array(v)) for k, v in cols.items()})
