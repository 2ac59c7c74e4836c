"""Transplant triage: the root cause of a divergence, not its first symptom.

    from steptrace.recorders.triage import triage
    from steptrace.recorders.triagerun import TorchRun

    def run_fn(rec):                       # one teacher-forced run of the candidate
        tokens = list(prompt)
        for _ in range(steps):
            with rec.step():
                tokens.append(rec.decide(model(torch.tensor([tokens]))[0, -1]))

    report = triage("ref.trace", TorchRun(model, run_fn, modules=["layers.*"]))
    print(report.sentence())

Algorithm (docs/triage.md): the candidate is re-run teacher-forced on the reference's tokens,
twice without transplant (the second run checks it is deterministic). The target is the first
token divergence of the reference against the candidate trace (or the plain re-run), or the
step asked for. The tensors recorded at the target step that differ from the reference's, in
execution order, are searched by bisection over prefixes for the earliest one whose transplant
together with every tensor before it (the reference's values in place of the candidate's, at the
target step or ``from_step..step``) restores the decision; that prefix trial without it gives its
*local* error (its output when fed the reference's inputs), the plain re-run its *propagated*
error. Components (``{"encoder": "encoder*"}``) are transplanted alone and in every combination.

"Restored" is decided in one place, :func:`recorders.triagejudge.is_restored`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import itertools
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steptrace.differ import DiffOptions, Policy, diff
from steptrace.tracefmt import TraceReader

from .errors import NotDeterministicError, ReferenceValuesError, TriageError
from .reference import Reference
from .triagejudge import (
    Noise,
    check_rerunnable,
    fingerprint,
    is_restored,
    logit_errors,
    pair_noise,
    read_rows,
    same_run,
    values_command,
)
from .triagereport import ComponentRow, ModuleError, RootCause, TriageReport
from .triagerun import Runner, is_excluded
from .triagesession import Exhausted, Session, shown

__all__ = ["DEFAULT_BUDGET", "Noise", "check_rerunnable", "is_restored", "logit_errors", "shown", "triage"]

#: Transplant re-runs allowed by default (a chain of 1,000 tensors needs about 12).
DEFAULT_BUDGET = 24
#: Components at most in a component table (2**n - 1 re-runs).
MAX_COMPONENTS = 4


def _target(ref_path: str, other: str, sample: str | None) -> tuple[str, int, str, str | None] | None:
    """(sample, step, head, culprit) of the first token divergence the differ finds, or None."""
    rep = diff(ref_path, [other], DiffOptions()).to_json()
    for s in rep.get("per_sample", []):
        if sample is not None and s["sample"] != sample:
            continue
        if s.get("first_step") is not None and s.get("kind") in ("flip", "divergent"):
            return s["sample"], int(s["first_step"]), s.get("head") or "token", s.get("culprit")
    return None


def triage(
    reference: str | os.PathLike[str],
    runner: Runner,
    *,
    candidate: str | os.PathLike[str] | None = None,
    sample: str | None = None,
    step: int | None = None,
    head: str | None = None,
    from_step: int | None = None,
    budget: int = DEFAULT_BUDGET,
    components: Mapping[str, str] | None = None,
    local_all: bool = False,
    search: str = "bisect",
    policy: Policy | None = None,
    workdir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TriageReport:
    """Find the earliest tensor whose transplant from the reference restores a divergent decision.

    Args:
        reference: the reference trace (values recorded for the tensors searched).
        runner: re-runs the candidate (:class:`~recorders.triagerun.TorchRun`,
            :class:`~recorders.triagerun.OrtRun`, :class:`~recorders.triagerun.ScriptRun`).
        candidate: a recorded candidate trace whose first divergence is the target (default:
            the first plain re-run's).
        sample: the sample to triage (default: the first that diverges).
        step: the target step (default: the first token divergence).
        head: the decision head at ``step`` (default: the trace's vocabulary head).
        from_step: transplant at every step from this one to the target (state carried over
            steps: KV caches, recurrent state); default: the target step only.
        budget: transplant re-runs allowed (the two plain re-runs are not counted).
        components: component name -> glob (``{"encoder": "encoder*"}``): the component table.
        local_all: measure the local error of every searched tensor (one re-run each).
        search: ``"bisect"`` (default) or ``"linear"`` (one re-run per tensor in execution
            order until one restores: the baseline of ``bench/bench_triage.py``).
        policy: the differ's tolerance policy (default: built-in).
        workdir: where the re-runs' traces go (default: a temporary directory, removed after).
        progress: called with one line per re-run.

    Returns:
        The :class:`~recorders.triagereport.TriageReport`.

    Raises:
        NotDeterministicError: two plain re-runs differ.
        ReferenceValuesError: the reference lacks values of tensors to transplant.
        NotRerunnableError: the candidate trace was imported (JSONL) or ran on Core ML off macOS.
        RerunFailedError: a re-run failed.
        TriageError: a bad option (unknown sample, step outside the run, component matching nothing).
    """
    if search not in ("bisect", "linear"):
        raise TriageError(f"search={search!r}: use 'bisect' or 'linear'")
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise TriageError(f"budget={budget!r}: allow at least 1 transplant re-run")
    comps = dict(components or {})
    if len(comps) > MAX_COMPONENTS:
        raise TriageError(f"{len(comps)} components: the table tries every combination, give at most {MAX_COMPONENTS}")
    t_start = time.perf_counter()
    ref = Reference(reference)
    own_dir = workdir is None
    if not own_dir and Path(workdir).exists() and (not Path(workdir).is_dir() or any(Path(workdir).iterdir())):
        raise TriageError(f"{workdir} is not an empty directory: give triage a new or empty one for its re-runs")
    wd = Path(tempfile.mkdtemp(prefix="steptrace-triage-")) if own_dir else Path(workdir)
    wd.mkdir(parents=True, exist_ok=True)
    pol = policy or Policy()
    s = Session(ref, runner, wd, budget, pol, progress)
    report = TriageReport(str(reference), None if candidate is None else str(candidate), runner.label, runner.runtime,
                          budget=budget, components=comps)
    try:
        if candidate is not None:
            with TraceReader(candidate) as cr:
                check_rerunnable(cr, "the candidate", script=True)
        _run(s, report, candidate, sample, step, head, from_step, comps, local_all, search)
    except Exhausted:
        report.exhausted = True
    finally:
        report.trials = s.trials
        report.seconds = time.perf_counter() - t_start
        s.close()
        ref.close()
        if own_dir:
            shutil.rmtree(wd, ignore_errors=True)
    if report.exhausted and not report.found:
        tried = [t for t in s.trials if t.transplanted]
        report.message = (f"the budget of {budget} transplant re-runs ran out before any transplant restored token "
                          f"{report.ref_token} at step {report.step}; tried "
                          f"{'; '.join(shown(t.transplanted) for t in tried) or 'nothing'}. Raise --budget, or narrow "
                          "--modules")
    return report


def _run(s: Session, report: TriageReport, candidate: Any, sample: str | None, step: int | None, head: str | None,
         from_step: int | None, comps: dict[str, str], local_all: bool, search: str) -> None:
    ref = s.ref
    p1 = s.plain("plain")
    p2 = s.plain("determinism")
    fp1 = fingerprint(p1)
    if not same_run(fp1, fingerprint(p2)):
        raise NotDeterministicError(
            "two plain re-runs of the candidate (same inputs, teacher-forced on the reference) recorded different "
            "tensors or decisions: it is not deterministic, so transplant trials cannot be compared. Seed its "
            "randomness, disable dropout, fix thread counts and non-deterministic kernels, then run triage again")
    s.plain_fp = fp1
    vocab_head = ref.reader.manifest.get("vocab_head") or "token"
    culprit = None
    if step is None:
        found = _target(ref.path, str(candidate) if candidate is not None else str(p1.path), sample)
        if found is None:
            report.message = ("the reference and the candidate choose the same tokens"
                              + (f" on sample {sample!r}" if sample else "") + ": nothing diverges, nothing to triage")
            return
        sample, step, found_head, culprit = found
        head = head or found_head
    if sample is None:
        samples = ref.reader.samples()
        if not samples:
            raise TriageError(f"the reference {ref.path} holds no samples")
        sample = samples[0]
    head = head or vocab_head
    s.sample, s.head, s.step = sample, head, int(step)
    if from_step is not None and not 0 <= from_step <= s.step:
        raise TriageError(f"--from-step {from_step} must lie between 0 and the target step {s.step}")
    s.steps = list(range(from_step, s.step + 1)) if from_step is not None else [s.step]
    report.sample, report.step, report.head, report.from_step = sample, s.step, head, from_step
    s.ref_rows = read_rows(ref.reader, sample, head)
    j = s.ref_rows.at(s.step)
    if j is None:
        raise TriageError(f"the reference has no {head!r} decision at sample {sample!r} step {s.step}")
    plain_rows = read_rows(p1, sample, head)
    i = plain_rows.at(s.step)
    if i is None:
        raise TriageError(f"the re-run has no {head!r} decision at sample {sample!r} step {s.step}")
    report.ref_token = int(s.ref_rows.chosen[j])
    report.cand_token = int(plain_rows.argmax[i])
    s.before = float(logit_errors(s.ref_rows, np.array([j]), plain_rows, np.array([i]))[0])
    report.logit_error = s.before
    s.noise = pair_noise(s.ref_rows, plain_rows, s.step, s.policy, head, ref.reader)
    report.noise = s.noise.bound
    for k, reader in enumerate((p1, p2)):
        token, err = s.outcome(reader)
        s.trials[k] = dataclasses.replace(s.trials[k], step=s.step, token=token, logit_error_before=s.before,
                                          logit_error_after=err,
                                          restored=is_restored(report.ref_token, token, err, s.noise))
    if is_restored(report.ref_token, report.cand_token, s.before, s.noise):
        report.message = (f"teacher-forced on the reference's tokens the candidate chooses token {report.cand_token} "
                          f"at step {s.step} as the reference does (logit error {s.before:.3g}, noise "
                          f"{s.noise.bound:.3g}): the divergence comes from the tokens fed back, not from its numbers")
        report.step = None
        return
    # the tensors to search: recorded at the target step, in execution order
    t = p1.tensors(sample=sample, step=s.step, columns=["name", "call", "order", "source", "dtype"])
    t = t.filter(pc.equal(t["call"], 0)).sort_by("order")
    sources = dict(zip(t["name"].to_pylist(), t["source"].to_pylist()))
    # the decided logits are never transplanted, nor a graph's inputs (teacher forcing feeds them)
    names = [n for n in t["name"].to_pylist() if not is_excluded(n, s.runner.excluded) and sources[n] != "graph input"]
    dtypes = dict(zip(t["name"].to_pylist(), t["dtype"].to_pylist()))
    trace_order = dict(zip(t["name"].to_pylist(), t["order"].to_pylist()))
    if not names:
        raise TriageError(f"the re-run recorded no tensor at sample {sample!r} step {s.step} to transplant; record "
                          "the modules to search (--modules GLOB)")
    _check_values(ref, names, sample, s.steps)
    prop = {n: s.tensor_error(p1, n, dtypes) for n in names}
    # a tensor equal to the reference's bit for bit carries no error: transplanting it is a no-op
    recorded, names = names, [n for n in names if prop[n][0] != 0.0]
    orders = {n: k for k, n in enumerate(names)}
    symptom = next((n for n in names if not prop[n][1]), None)
    if culprit in orders and (symptom is None or orders[culprit] < orders[symptom]):
        symptom = culprit
    if comps:
        _components(s, report, recorded, comps)
    report.candidates = len(names)
    if not names:
        report.message = (f"every tensor recorded at step {s.step} equals the reference's bit for bit, yet token "
                          f"{report.cand_token} differs from {report.ref_token}: the error enters after them (the "
                          "decided logits?) or through state from earlier steps: record more modules, or try "
                          "--from-step 0")
        return
    try:
        root = _search(s, names, search)
    except Exhausted:
        report.exhausted = True
        root = None
    # local errors around the boundary (and of the first symptom); single transplants of both
    want = set(range(len(names))) if local_all else set()
    if root is not None:
        want |= {k for k in (root - 1, root, root + 1) if 0 <= k < len(names)}
    if symptom is not None and symptom in orders:
        want.add(orders[symptom])
    local: dict[str, tuple[float | None, bool]] = {}
    singles = [names[root]] if root is not None else []
    if symptom is not None and symptom in orders and symptom not in singles:
        singles.append(symptom)
    try:
        for name in singles:
            s.trial([name], "single")
        for k in sorted(want):
            reader = p1 if k == 0 else s.trial(names[:k], "local")[1]
            local[names[k]] = s.tensor_error(reader, names[k], dtypes)
    except Exhausted:
        report.exhausted = True
    tried = {tuple(tr.transplanted): tr for tr in s.trials if len(tr.transplanted) == 1}
    modules = []
    for k in sorted(want):
        n = names[k]
        tol = s.policy.tensor(n, dtypes.get(n, "float32")).atol
        tr = tried.get((n,))
        loc = local.get(n, (None, None))
        modules.append(ModuleError(n, int(trace_order[n]), sources.get(n), loc[0], prop[n][0], tol, loc[1] if loc[0] is not None else None,
                                   None if tr is None else tr.restored, None if tr is None else tr.logit_error_after,
                                   _role(k, root, loc, prop, names)))
    report.modules = modules
    by_name = {m.name: m for m in modules}
    if symptom is not None:
        report.first_symptom = by_name.get(symptom)
    if root is not None:
        n = names[root]
        m = by_name[n]
        tr = tried.get((n,))
        prefix = s.cache[tuple(names[: root + 1])][0]
        report.root_cause = RootCause(n, sample, s.step, sources.get(n), m.local_error, m.tolerance,
                                      bool(tr is not None and tr.restored), report.ref_token, s.before,
                                      (tr or prefix).logit_error_after, m.local_within is False)
    elif not report.found:
        report.message = (f"no transplant restores token {report.ref_token} at step {s.step}, not even of all "
                          f"{len(names)} tensors searched (up to {names[-1]}): the error enters after them (the "
                          "decided logits?) or through state from earlier steps: try --from-step 0, or record more "
                          "modules")


def _check_values(ref: Reference, names: Sequence[str], sample: str, steps: Sequence[int]) -> None:
    t = ref.reader.tensors(sample=sample, columns=["step", "name", "call", "has_values"])
    t = t.filter(pc.and_(pc.equal(t["call"], 0), pc.is_in(t["step"], pa.array(list(steps), pa.int32()))))
    have = {(st, n) for st, n, hv in zip(t["step"].to_pylist(), t["name"].to_pylist(), t["has_values"].to_pylist()) if hv}
    missing = [n for n in names if any((st, n) not in have for st in steps)]
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise ReferenceValuesError(
            f"the reference {ref.path} holds no values of {shown} at sample {sample!r} step(s) "
            f"{steps[0]}{'..' + str(steps[-1]) if len(steps) > 1 else ''} (statistics only, or not recorded), so they "
            f"cannot be transplanted. Re-record it with values: {values_command(ref.reader, missing)} "
            "(or give --ref-script to let triage re-record it)")


def _search(s: Session, names: Sequence[str], search: str) -> int | None:
    """Index of the earliest tensor ``i`` such that transplanting ``names[:i + 1]`` (it and every
    tensor before it in execution order) restores the target; None when transplanting all of
    them does not.

    Transplanting a prefix is monotone where single transplants are not (a residual branch
    transplanted alone leaves the residual stream's error in place), so a bisection over ``i``
    needs 1 + ceil(log2 n) re-runs; ``search="linear"`` tries i = 0, 1, ... instead.
    """
    if search == "linear":
        for i in range(len(names)):
            if s.trial(list(names[: i + 1]), "scan")[0].restored:
                return i
        return None
    if not s.trial(list(names), "bisect")[0].restored:
        return None
    lo, hi = 0, len(names) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if s.trial(list(names[: mid + 1]), "bisect")[0].restored:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _role(k: int, root: int | None, local: tuple[float | None, bool | None], prop: Mapping[str, tuple[float | None, bool]],
          names: Sequence[str]) -> str:
    if k == root:
        return "root cause"
    err, within = local
    p_err, p_within = prop[names[k]]
    if err is not None and within is False:
        return "harmless drift" if root is None or k < root else "adds its own error after the root cause"
    if p_within:
        return "within tolerance"
    up = prop[names[k - 1]][0] if k > 0 else None
    if err is not None and up and p_err is not None and p_err > 2 * up:
        return "amplifies upstream error"
    return "carries upstream error"


def _components(s: Session, report: TriageReport, names: Sequence[str], comps: Mapping[str, str]) -> None:
    members = {c: [n for n in names if any(fnmatch.fnmatchcase(n, g) for g in glob.split("|"))]
               for c, glob in comps.items()}
    empty = [c for c, m in members.items() if not m]
    if empty:
        raise TriageError(f"component(s) {', '.join(empty)} match no tensor recorded at step {s.step}; names are "
                          f"{', '.join(names[:12])}")
    rows = report.component_rows = [ComponentRow([], [], False, report.cand_token or -1, s.before)]
    for size in range(1, len(comps) + 1):
        for combo in itertools.combinations(comps, size):
            swap = [n for c in combo for n in members[c]]
            tr, _ = s.trial(list(dict.fromkeys(swap)), "component")
            rows.append(ComponentRow(list(combo), tr.transplanted, tr.restored, tr.token, tr.logit_error_after))
    restoring = [r for r in rows if r.restored]
    if restoring:
        smallest = min(len(r.from_reference) for r in restoring)
        deciders = [c for r in restoring if len(r.from_reference) == smallest for c in r.from_reference]
        report.decided_by = list(dict.fromkeys(deciders))
