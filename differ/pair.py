"""One candidate against the reference: compatibility checks, alignment, decision and tensor
comparison, verdicts, and the :class:`~differ.report.PairReport` with its summaries (each
sample's first divergence is built by :mod:`steptrace.differ.firstdivergence`).
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from steptrace.tracefmt import TraceReader

from .align import B_ONLY, BOTH, Alignment, align_keys, align_resync, align_steps
from .decisions import DecisionDiff, compare_decisions
from .divergence import DriftOnset, FirstDivergence
from .errors import IncompatibleTracesError
from .firstdivergence import Lookback, culprit_at, first_divergence, or_none
from .mapping import NameMapping, guess_mapping
from .policy import Policy, coarser, grid_dtype
from .report import PairReport, SampleResult, TraceInfo
from .sequence import char_codes, ctc_keep, edit_distance, pieces_to_text, word_codes
from .side import Side, load_side
from .summary import (
    decision_summary,
    distinct_steps,
    first_in_segments,
    histogram,
    same_sequences,
    segment_max,
    segment_sums,
    steps_table,
    tensor_summary,
    watched_summary,
)
from .tensors import Progress, TensorDiff, compare_tensors, step_signature, to_table
from .verdict import DRIFT, FLIP, VERDICTS, StepStatus, judge_rows, tensor_status

#: When fewer candidate tensor names than this fraction exist in the reference, guess a mapping.
GUESS_BELOW = 0.5


@dataclass
class DiffOptions:
    """How to compare traces.

    Attributes:
        align: ``step``, ``resync``, or comma-separated key columns (``frame,emission``).
        policy: tolerances.
        mapping: candidate -> reference tensor names (None: identity, or a guess if names differ).
        auto_map: guess a mapping by execution order and shape when names barely overlap.
        heads: compare only these heads (default: all; the traces must have the same heads).
        samples: compare only samples matching these globs.
        values: compare tensor values where both sides recorded them (else statistics only).
        jobs: worker processes for value comparisons.
        fail_on: the verdict from which the diff is a mismatch.
        open_loop: heads whose decisions are not fed back, on top of those the traces declare
            (manifest ``open_loop``): their rows are compared to the end of each sample.
        ctc_blank: collapse each sample's token sequence as CTC does (merge repeats, drop this
            blank id) before the sequence, WER and CER figures; the vocabulary head is then
            open-loop.
    """

    align: str = "step"
    policy: Policy = field(default_factory=Policy)
    mapping: NameMapping | None = None
    auto_map: bool = True
    heads: list[str] | None = None
    samples: list[str] | None = None
    values: bool = True
    jobs: int = 1
    fail_on: str = "drift"
    open_loop: list[str] | None = None
    ctc_blank: int | None = None


@dataclass
class _Reference:
    """What is read from the reference once and reused for every candidate."""

    reader: TraceReader
    info: TraceInfo
    samples: list[str]
    heads: list[str]


def trace_info(reader: TraceReader) -> TraceInfo:
    """Describe a trace for the report; its logits' grid is the coarser of its precision, its
    declared ``logits_dtype`` and a recorded ``logits:<head>`` tensor's dtype."""
    m = reader.metadata
    head = m.vocab_head or "token"
    logits_dtype = None
    if f"logits:{head}" in reader.tensor_names():
        dt = reader.tensors(name=f"logits:{head}", columns=["dtype"])
        logits_dtype = dt["dtype"][0].as_py() if dt.num_rows else None
    return TraceInfo(str(reader.path), m.runtime, m.precision, m.model, reader.complete,
                     grid_dtype(m.precision, m.logits_dtype, logits_dtype))


def check_compatible(ra: TraceReader, rb: TraceReader, heads: list[str] | None,
                     known: tuple[list[str], list[str]] | None = None) -> tuple[list[str], dict[str, int]]:
    """Refuse traces that cannot be compared; return the heads to compare and shared watched ids.

    Args:
        known: ``(ra.heads(), rb.heads())`` when already read.

    Raises:
        IncompatibleTracesError: different heads (without ``heads``), vocabularies or watched ids.
    """
    ha, hb = (set(x) for x in known) if known is not None else (set(ra.heads()), set(rb.heads()))
    if heads:
        for side, h, r in (("reference", ha, ra), ("candidate", hb, rb)):
            miss = [x for x in heads if x not in h and h]
            if miss:
                raise IncompatibleTracesError(f"{side} {r.path} has no head {', '.join(miss)} (it has {', '.join(sorted(h))})")
        use = sorted(heads)
    else:
        if ha and hb and ha != hb:
            raise IncompatibleTracesError(
                f"the traces record different decision heads: reference {sorted(ha)}, candidate {sorted(hb)}; "
                f"compare the common ones with --heads {','.join(sorted(ha & hb)) or 'HEAD'}"
            )
        use = sorted(ha | hb)
    va, vb = ra.vocab, rb.vocab
    if va is not None and vb is not None and va != vb:
        n = min(len(va), len(vb))
        diff = next((i for i in range(n) if va[i] != vb[i]), n)
        what = (f"token {diff} is {va[diff]!r} in the reference and {vb[diff]!r} in the candidate" if diff < n
                else f"the reference has {len(va)} tokens and the candidate {len(vb)}")
        raise IncompatibleTracesError(f"the traces use different vocabularies: {what}; token ids are not comparable")
    wa, wb = ra.metadata.watched, rb.metadata.watched
    for name in set(wa) & set(wb):
        if wa[name] != wb[name]:
            raise IncompatibleTracesError(
                f"watched token {name!r} is id {wa[name]} in the reference and {wb[name]} in the candidate"
            )
    return use, {k: wa[k] for k in sorted(set(wa) & set(wb))}


def select_samples(names: list[str], globs: list[str] | None) -> list[str]:
    """Return the sample ids matching any of ``globs`` (all when None)."""
    if not globs:
        return names
    return [s for s in names if any(fnmatch.fnmatchcase(s, g) for g in globs)]


def _pieces(reader: TraceReader, side: Side, rows: np.ndarray) -> list[str | None] | None:
    """Return the pieces of the chosen tokens of ``rows``, or None when the trace has none."""
    pieces = side.piece
    if pieces is not None and pieces.null_count < len(pieces):
        return pieces.take(pa.array(rows, pa.int64())).to_pylist()
    vocab = reader.vocab
    if vocab is None:
        return None
    return [vocab[t] if 0 <= t < len(vocab) else None for t in side.chosen[rows].tolist()]


def compare_pair(ref: _Reference, side_a: Side, rb: TraceReader, opts: DiffOptions, watched: dict[str, int],
                 progress: Progress | None = None, side_b: Side | None = None) -> tuple[PairReport, Side]:
    """Compare one candidate with the reference.

    Args:
        side_b: the candidate's decisions when already read (:func:`load_side` with the
            reference's samples and heads and the pair's watched ids); read here when None.

    Returns:
        The report and the candidate's decisions (kept for candidate-vs-candidate checks).
    """
    info_b = trace_info(rb)
    samples, heads = ref.samples, ref.heads
    if side_b is None:
        keep = select_samples(rb.samples(), opts.samples) if opts.samples else None
        side_b = load_side(rb, samples, heads, list(watched.values()), keep)
    B = side_b
    A = side_a
    vocab_head_name = ref.reader.metadata.vocab_head or "token"
    vocab_head = heads.index(vocab_head_name) if vocab_head_name in heads else 0
    mode = opts.align.strip()
    names = (str(ref.reader.path), str(rb.path))
    if mode == "step":
        al = align_steps(A, B, names)
    elif mode == "resync":
        al = align_resync(A, B, vocab_head, len(samples), names)
    else:
        al = align_keys(A, B, [k.strip() for k in mode.split(",") if k.strip()], names)
    grid = coarser(ref.info.grid, info_b.grid)
    dd = compare_decisions(A, B, al.ia, al.ib, al.head, heads, opts.policy, grid)
    # tensors
    mapping = opts.mapping or NameMapping()
    td: TensorDiff | None = None
    names_b = rb.tensor_names()
    names_a = ref.reader.tensor_names()
    if names_a and names_b:
        if opts.mapping is None and opts.auto_map:
            common = len(set(names_b) & set(names_a))
            if common < GUESS_BELOW * len(names_b):
                mapping = _guess(ref.reader, rb) or mapping
        bothrows = al.gap == BOTH
        pairs = np.unique(np.stack([al.sample[bothrows], al.b_step[bothrows], al.a_step[bothrows]]), axis=1) \
            if bothrows.any() else np.zeros((3, 0), np.int64)
        bo = al.gap == B_ONLY
        bonly = np.unique(np.stack([al.sample[bo], al.b_step[bo]]), axis=1) if bo.any() else np.zeros((2, 0), np.int64)
        cross = grid if ref.info.grid != info_b.grid else None  # runs computed at different precisions
        td = compare_tensors(ref.reader, rb, samples, (pairs[0], pairs[1], pairs[2]), (bonly[0], bonly[1]),
                             opts.policy, mapping, use_values=opts.values, jobs=opts.jobs, progress=progress,
                             cross_grid=cross)
        tf, tfirst, texact, tcount = tensor_status(al, td.cols["sample"], td.cols["a_step"], td.cols["order"],
                                                   td.cols["within"], td.cols["bitexact"])
    else:
        n = al.rows
        tf, tfirst, texact, tcount = np.zeros(n, bool), np.full(n, -1), np.ones(n, bool), np.zeros(n, np.int64)
    declared = set(opts.open_loop or []) | set(ref.reader.metadata.open_loop) | set(rb.metadata.open_loop)
    if opts.ctc_blank is not None:  # CTC frames are never fed back
        declared.add(vocab_head_name)
    open_loop = np.array([h in declared for h in heads], bool)
    st = judge_rows(al, dd, tf, tfirst, texact, tcount, heads=heads, policy=opts.policy, open_loop=open_loop)
    return _report(ref, rb, info_b, A, B, al, dd, td, st, heads, vocab_head, watched, mapping, samples, opts,
                   open_loop), B


def _guess(ra: TraceReader, rb: TraceReader) -> NameMapping | None:
    """Guess a mapping from the first (sample, step) that both traces recorded tensors at."""
    ka = ra.tensors(columns=["sample", "step"])
    kb = rb.tensors(columns=["sample", "step"])
    sa = set(zip(ka["sample"].to_pylist()[:100000], ka["step"].to_pylist()[:100000]))
    for s, st in zip(kb["sample"].to_pylist(), kb["step"].to_pylist()):
        if (s, st) in sa:
            g = guess_mapping(step_signature(ra, s, st), step_signature(rb, s, st))
            return g if g.names else None
    return None


def _report(ref: _Reference, rb: TraceReader, info_b: TraceInfo, A: Side, B: Side, al: Alignment, dd: DecisionDiff,
            td: TensorDiff | None, st: StepStatus, heads: list[str], vocab_head: int, watched: dict[str, int],
            mapping: NameMapping, samples: list[str], opts: DiffOptions, open_loop: np.ndarray) -> PairReport:
    v, after = st.verdict, st.after
    fresh = ~after
    bounds = np.searchsorted(al.sample, np.arange(len(samples) + 1))
    id_to_name = {i: n for n, i in watched.items()}
    resync = al.mode == "resync"
    # sequences on the vocab head, per sample
    va, vb = A.head == vocab_head, B.head == vocab_head
    sa_b = np.searchsorted(A.sample[va], np.arange(len(samples) + 1))
    sb_b = np.searchsorted(B.sample[vb], np.arange(len(samples) + 1))
    rows_a, rows_b = np.flatnonzero(va), np.flatnonzero(vb)
    if opts.ctc_blank is not None:  # CTC: sequences, WER and CER on the collapsed text
        rows_a = rows_a[ctc_keep(A.chosen[rows_a], sa_b, opts.ctc_blank)]
        rows_b = rows_b[ctc_keep(B.chosen[rows_b], sb_b, opts.ctc_blank)]
        sa_b = np.searchsorted(A.sample[rows_a], np.arange(len(samples) + 1))
        sb_b = np.searchsorted(B.sample[rows_b], np.arange(len(samples) + 1))
    seq_a, seq_b = A.chosen[rows_a], B.chosen[rows_b]
    pieces_a = _pieces(ref.reader, A, rows_a)
    pieces_b = _pieces(rb, B, rows_b)
    texts = pieces_a is not None and pieces_b is not None
    ns = len(samples)
    a_steps, b_steps = distinct_steps(al.sample, al.a_step, ns), distinct_steps(al.sample, al.b_step, ns)
    # per-sample figures, vectorised over the sample boundaries
    has_a, has_b = segment_sums(al.ia >= 0, bounds), segment_sums(al.ib >= 0, bounds)
    mism = (v >= FLIP) & fresh
    mismatches, afters = segment_sums(mism, bounds), segment_sums(after, bounds)
    s_verdict = segment_max(np.where(fresh, v, 0), bounds)
    same_seqs = same_sequences(seq_a, seq_b, sa_b, sb_b)
    first_drift = first_in_segments(np.flatnonzero((v == DRIFT) & fresh), bounds)
    first_drifted = first_in_segments(np.flatnonzero(st.drifted & fresh), bounds)
    bad_rows = np.flatnonzero(mism)
    bad_at = np.searchsorted(bad_rows, bounds)
    grid = coarser(ref.info.grid, info_b.grid)
    lookback = Lookback(td)
    per_sample: list[SampleResult] = []
    fds: list[tuple[int, int, FirstDivergence, DriftOnset | None]] = []
    hist_steps: list[int] = []
    culprits: Counter[str] = Counter()
    watched_bias: dict[str, list[float]] = {n: [] for n in watched}
    tok_edits = tok_ref = 0
    word_edits = word_ref = char_edits = char_ref = 0
    identical_seqs = 0
    only_ref = only_cand = 0
    for s in range(ns):
        r0, r1 = int(bounds[s]), int(bounds[s + 1])
        x, y = seq_a[sa_b[s] : sa_b[s + 1]], seq_b[sb_b[s] : sb_b[s + 1]]
        if r0 == r1 and x.size == 0 and y.size == 0:
            continue
        only_in = None
        if r1 > r0 and not has_a[s]:
            only_in, only_cand = "candidate", only_cand + 1
        elif r1 > r0 and not has_b[s]:
            only_in, only_ref = "reference", only_ref + 1
        verdict = int(s_verdict[s])
        same_seq = bool(same_seqs[s])
        identical_seqs += same_seq
        edits = 0 if same_seq else edit_distance(x, y)
        tok_edits += edits
        tok_ref += x.size
        if texts:
            ta = pieces_to_text(pieces_a[sa_b[s] : sa_b[s + 1]])
            tb = ta if same_seq else pieces_to_text(pieces_b[sb_b[s] : sb_b[s + 1]])
            wa, wb = word_codes([ta, tb])
            word_ref += wa.size
            char_ref += len(ta)
            if not same_seq:
                word_edits += edit_distance(wa, wb)
                char_edits += edit_distance(char_codes(ta), char_codes(tb))
        # first divergence: first fresh row worse than drift; else the first drift row
        fd_row = int(first_drift[s])
        if bad_at[s] < bad_at[s + 1]:
            bad = bad_rows[bad_at[s] : bad_at[s + 1]]
            first_pos = al.pos[bad[0]]
            grp = bad[al.pos[bad] == first_pos]
            # worst verdict first, then the vocab head, then head order
            key = [(-int(v[i]), 0 if al.head[i] == vocab_head else 1, int(al.head[i])) for i in grp]
            fd_row = int(grp[min(range(len(grp)), key=key.__getitem__)])
        onset = None
        if first_drifted[s] >= 0:
            i = int(first_drifted[s])
            onset = DriftOnset(samples[s], int(al.a_step[i]), heads[al.head[i]] if heads else None,
                               culprit_at(td, int(st.t_first[i])) if st.t_fail[i] else None, or_none(dd.logit_diff[i]))
        fd = None
        if fd_row >= 0:
            fd = first_divergence(fd_row, samples[s], al, dd, st, td, heads, A, B, ref.reader, rb, id_to_name, resync,
                                  opts.policy, grid, lookback)
            if fd.kind != "drift":
                hist_steps.append(fd.step)
            if fd.culprit:
                culprits[fd.culprit.name] += 1
            for w in fd.watched:
                if w.b_rank and w.a_rank == 0 and w.b_bias is not None:
                    watched_bias[w.token].append(w.b_bias)
            fds.append((verdict, fd.step, fd, onset))
        per_sample.append(SampleResult(
            sample=samples[s], verdict=VERDICTS[verdict], first_step=fd.step if fd else None,
            head=fd.head if fd else None, kind=fd.kind if fd else None,
            a_steps=int(a_steps[s]), b_steps=int(b_steps[s]),
            mismatches=int(mismatches[s]), after=int(afters[s]),
            drift_step=onset.step if onset else None, identical_sequence=same_seq, token_edits=int(edits),
            culprit=fd.culprit.name if fd and fd.culprit else None, only_in=only_in,
            culprit_step=fd.culprit.step if fd and fd.culprit else None,
        ))
    verdict = max((VERDICTS.index(p.verdict) for p in per_sample), default=0)
    first = drift = None
    if fds:
        best = min(fds, key=lambda t: (-t[0], t[1], samples.index(t[2].sample)))
        first, drift = best[2], best[3]
    counts = Counter(p.verdict for p in per_sample)
    samples_json = {"total": len(per_sample), **{k: counts.get(k, 0) for k in VERDICTS},
                    "only_in_reference": only_ref, "only_in_candidate": only_cand}
    steps_json = {"rows": int(al.rows), **{k: int(((v == i) & fresh).sum()) for i, k in enumerate(VERDICTS)},
                  "after_divergence": int(after.sum())}
    return PairReport(
        candidate=info_b,
        verdict=VERDICTS[verdict],
        first_divergence=first,
        drift_onset=drift,
        samples=samples_json,
        steps=steps_json,
        decisions=decision_summary(al, dd, st, A, B),
        tensors=tensor_summary(td, mapping),
        sequences={
            "samples": len(per_sample), "identical": identical_seqs,
            "token_error_rate": tok_edits / tok_ref if tok_ref else None, "token_edits": tok_edits,
            "reference_tokens": tok_ref,
            "wer": word_edits / word_ref if texts and word_ref else None,
            "cer": char_edits / char_ref if texts and char_ref else None,
        },
        first_divergence_histogram=histogram(hist_steps),
        culprits=[{"name": n, "samples": c} for n, c in culprits.most_common()],
        watched=watched_summary(watched_bias, watched),
        per_sample=per_sample,
        alignment={"mode": al.mode, "approximate_samples": [samples[i] for i in al.approximate],
                   "teacher_forced": bool(A.forced.any() or B.forced.any()), "grid": grid,
                   "open_loop": [h for h, o in zip(heads, open_loop) if o], "ctc_blank": opts.ctc_blank},
        steps_table=steps_table(al, dd, st, samples, heads, id_to_name),
        tensors_table=to_table(td, samples) if td is not None else None,
        mapping=mapping,
    )
