"""N-way diffs over corpora: ``diff(ref, [a, b, ...])`` compares every candidate with the
reference (the seeds' three-way gate), then the candidates with each other on their token
sequences. The public entry point of the differ.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from steptrace.tracefmt import TraceReader
from steptrace.tracefmt.errors import TraceUsageError

from .errors import IncompatibleTracesError
from .pair import DiffOptions, _Reference, check_compatible, compare_pair, select_samples, trace_info
from .report import CrossCheck, DiffReport
from .side import Side, load_side
from .tensors import Progress
from .verdict import VERDICTS


def _open(t: str | os.PathLike[str] | TraceReader) -> TraceReader:
    return t if isinstance(t, TraceReader) else TraceReader(t)


def _sequence_hashes(side: Side, head: int, nsamples: int) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: a 64-bit hash of its token sequence on ``head`` and whether it has one."""
    m = side.head == head
    s, tok = side.sample[m], side.chosen[m].astype(np.uint64)
    starts = np.searchsorted(s, np.arange(nsamples))
    pos = (np.arange(s.size) - starts[s]).astype(np.uint64)
    h = np.zeros(nsamples, np.uint64)
    with np.errstate(over="ignore"):
        np.add.at(h, s, (tok + np.uint64(1)) * (np.uint64(0x9E3779B97F4A7C15) * (pos + np.uint64(1)) | np.uint64(1)))
        h ^= np.bincount(s, minlength=nsamples).astype(np.uint64) * np.uint64(0xC2B2AE3D27D4EB4F)
    return h, np.bincount(s, minlength=nsamples) > 0


def _check_common(ra: TraceReader, rbs: list[TraceReader], ids: dict[int, set[str]]) -> None:
    """Refuse a candidate that shares no sample id with the reference (nothing would align).

    Raises:
        IncompatibleTracesError: 0 samples in common, with a few ids of each side.
    """
    ref = ids[id(ra)]
    for rb in rbs:
        cand = ids[id(rb)]
        if ref and cand and not ref & cand:
            def some(x: set[str]) -> str:
                s = sorted(x)
                return ", ".join(map(repr, s[:3])) + (f", … ({len(s):,} in all)" if len(s) > 3 else "")

            raise IncompatibleTracesError(
                f"0 samples in common: the reference {ra.path} has {some(ref)}, the candidate {rb.path} has "
                f"{some(cand)}; record both runs with the same sample ids (or compare the right traces)")


def diff(
    reference: str | os.PathLike[str] | TraceReader,
    candidates: list[str | os.PathLike[str] | TraceReader],
    options: DiffOptions | None = None,
    *,
    progress: Progress | None = None,
) -> DiffReport:
    """Compare one or more candidate traces with a reference trace.

    Args:
        reference: the reference trace (path or open reader).
        candidates: one or more candidate traces.
        options: alignment, tolerance policy, mapping, filters (defaults: by step, built-in policy).
        progress: ``progress(stage, done, total)``, called as work advances (for a progress bar).

    Returns:
        The :class:`~differ.report.DiffReport`.

    Raises:
        TraceUsageError: no candidate, or a bad option.
        IncompatibleTracesError: traces of different vocabularies, heads or watched ids, or a
            candidate with no sample id in common with the reference.
        TraceError: a trace cannot be read.
    """
    t0 = time.perf_counter()
    opts = options or DiffOptions()
    if opts.fail_on not in VERDICTS[1:]:
        raise TraceUsageError(f"fail_on {opts.fail_on!r}: use one of {', '.join(VERDICTS[1:-1])}")
    if not candidates:
        raise TraceUsageError("give at least one candidate trace to compare with the reference")
    ra = _open(reference)
    rbs = [_open(c) for c in candidates]
    heads = None
    watched_pairs = []
    # each trace's heads, then sample ids, read on two threads; results come back in argument order,
    # so a failure names the first trace that fails (a reader object given twice is asked once)
    readers = list({id(r): r for r in [ra, *rbs]}.values())
    with ThreadPoolExecutor(2, thread_name_prefix="steptrace-diff-meta") as pool:
        head_lists = dict(zip(map(id, readers), pool.map(TraceReader.heads, readers)))
        for rb in rbs:
            h, w = check_compatible(ra, rb, opts.heads, known=(head_lists[id(ra)], head_lists[id(rb)]))
            if heads is not None and h != heads:
                raise IncompatibleTracesError(f"candidate {rb.path} records heads {h}, another candidate {heads}")
            heads = h
            watched_pairs.append(w)
        ids = dict(zip(map(id, readers), pool.map(TraceReader.samples, readers)))
    names = set().union(*ids.values())
    samples = select_samples(sorted(names), opts.samples)
    _check_common(ra, rbs, {k: set(select_samples(sorted(v), opts.samples)) for k, v in ids.items()})
    ref = _Reference(ra, trace_info(ra), samples, heads or [])
    all_watched = sorted({i for w in watched_pairs for i in w.values()})
    if progress:
        progress("reference", 0, 1)
    reports, sides = [], []
    # Each candidate's decisions are read (Arrow sort and take, numpy conversions: mostly without
    # the GIL) on a second thread while the previous trace is read or compared.
    with ThreadPoolExecutor(1, thread_name_prefix="steptrace-diff-read") as pool:

        def read(i: int) -> Future[Side] | None:
            rb = rbs[i]
            if any(r is rb for j, r in enumerate([ra, *rbs]) if j != i + 1):
                return None  # one reader object twice: read it on this thread only
            keep = select_samples(rb.samples(), opts.samples) if opts.samples else None
            return pool.submit(load_side, rb, samples, ref.heads, list(watched_pairs[i].values()), keep)

        pending = read(0)
        A = load_side(ra, samples, ref.heads, all_watched, samples if opts.samples else None)
        if progress:
            progress("reference", 1, 1)
        for i, (rb, w) in enumerate(zip(rbs, watched_pairs)):
            if progress:
                progress("candidates", i, len(rbs))
            side_b = pending.result() if pending is not None else None
            pending = read(i + 1) if i + 1 < len(rbs) else None
            rep, side = compare_pair(ref, A, rb, opts, w, progress, side_b=side_b)
            reports.append(rep)
            sides.append(side)
    if progress:
        progress("candidates", len(rbs), len(rbs))
    cross = []
    if len(sides) > 1:
        vh = ra.metadata.vocab_head or "token"
        head = ref.heads.index(vh) if vh in ref.heads else 0
        hashes = [_sequence_hashes(s, head, len(samples)) for s in sides]
        for i in range(len(sides)):
            for j in range(i + 1, len(sides)):
                common = hashes[i][1] & hashes[j][1]
                same = common & (hashes[i][0] == hashes[j][0])
                cross.append(CrossCheck(str(rbs[i].path), str(rbs[j].path), int(common.sum()), int(same.sum())))
    return DiffReport(trace_info(ra), reports, cross, opts.fail_on, opts.policy.to_json(), time.perf_counter() - t0)


def diff_paths(reference: str | Path, *candidates: str | Path, **options: object) -> DiffReport:
    """Shorthand: ``diff_paths("ref.trace", "cand.trace", align="resync")``.

    Raises:
        TypeError: an unknown option name.
    """
    return diff(reference, list(candidates), DiffOptions(**options))  # type: ignore[arg-type]
