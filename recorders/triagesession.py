"""The state of one ``trace triage``: the reference, the target, the re-runs made (cached by
what they transplanted) and the budget they spend. Used by :mod:`steptrace.recorders.triage`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from steptrace.differ import Policy, compare_values
from steptrace.tracefmt import TraceReader
from steptrace.tracefmt.errors import TraceNotFoundError

from .errors import NotDeterministicError, TriageError
from .reference import Reference
from .triagejudge import Noise, Rows, fingerprint, fingerprint_before, is_restored, logit_errors, read_rows, same_run
from .triagereport import Trial
from .triagerun import Runner

__all__ = ["Exhausted", "Session", "shown"]


class Exhausted(Exception):
    """The transplant budget is spent (ends the search; :func:`recorders.triage.triage` reports it)."""


class Session:
    """The state of one triage: the reference, the re-runs made, the target.

    Args:
        ref: the reference.
        runner: re-runs the candidate.
        workdir: where the re-runs' traces go.
        budget: transplant re-runs allowed.
        policy: the differ's tolerance policy.
        progress: called with one line per re-run.
    """

    def __init__(self, ref: Reference, runner: Runner, workdir: Path, budget: int, policy: Policy,
                 progress: Callable[[str], None] | None) -> None:
        self.ref = ref
        self.runner = runner
        self.workdir = workdir
        self.budget = budget
        self.policy = policy
        self.progress = progress
        self.trials: list[Trial] = []
        self.cache: dict[tuple[str, ...], tuple[Trial, TraceReader]] = {}
        self.readers: list[TraceReader] = []
        self.used = 0
        self.sample = ""
        self.head = "token"
        self.step = 0
        self.steps: list[int] = []
        self.ref_rows: Rows | None = None
        self.noise = Noise(None, 0.0)
        self.before = 0.0
        self.plain_fp: tuple[pa.Table, pa.Table] | None = None

    def say(self, text: str) -> None:
        """Report one line of progress."""
        if self.progress is not None:
            self.progress(text)

    def record(self, names: Sequence[str], label: str) -> tuple[TraceReader, float]:
        """Re-run with ``names`` transplanted at the session's steps; return its trace and seconds."""
        path = str(self.workdir / f"run-{len(self.trials) + 1:03d}.trace")
        t0 = time.perf_counter()
        steps = None if not names else set(self.steps)
        self.runner.rerun(path, self.ref, list(names), steps)
        reader = TraceReader(path)
        self.readers.append(reader)
        return reader, time.perf_counter() - t0

    def plain(self, purpose: str) -> TraceReader:
        """Re-run with nothing transplanted (not counted against the budget)."""
        self.say(f"re-run {len(self.trials) + 1}: {purpose} (teacher-forced, nothing transplanted)")
        reader, secs = self.record([], purpose)
        self.trials.append(Trial(len(self.trials) + 1, purpose, [], -1, [], False, -1, math.nan, math.nan, secs))
        return reader

    def outcome(self, reader: TraceReader) -> tuple[int, float]:
        """The re-run's own token and logit error at the target step.

        Raises:
            TriageError: the re-run has no decision there.
        """
        rows = read_rows(reader, self.sample, self.head)
        i, j = rows.at(self.step), self.ref_rows.at(self.step)  # type: ignore[union-attr]
        if i is None or j is None:
            raise TriageError(f"the re-run has no {self.head!r} decision at sample {self.sample!r} step {self.step}; "
                              "the candidate must run at least as many steps as the reference")
        err = float(logit_errors(self.ref_rows, np.array([j]), rows, np.array([i]))[0])  # type: ignore[arg-type]
        return int(rows.argmax[i]), err

    def trial(self, names: Sequence[str], purpose: str) -> tuple[Trial, TraceReader]:
        """The trial transplanting ``names`` (run once; later asks get the cached one).

        Raises:
            Exhausted: the budget is spent.
            NotDeterministicError: the re-run differs from the plain one before the transplant.
        """
        key = tuple(names)
        if key in self.cache:
            return self.cache[key]
        if self.used >= self.budget:
            raise Exhausted
        self.used += 1
        n = len(self.trials) + 1
        reader, secs = self.record(names, purpose)
        if self.plain_fp is not None and not same_run(fingerprint(reader, min(self.steps)),
                                                    fingerprint_before(self.plain_fp, min(self.steps))):
            raise NotDeterministicError(
                f"re-run {n} differs from the plain re-run before step {min(self.steps)}, where nothing was "
                "transplanted: the candidate is not deterministic (seed its randomness, disable dropout, fix thread "
                "counts and non-deterministic kernels) and triage cannot compare its re-runs")
        token, err = self.outcome(reader)
        ref_token = int(self.ref_rows.chosen[self.ref_rows.at(self.step)])  # type: ignore[union-attr]
        ok = is_restored(ref_token, token, err, self.noise)
        t = Trial(n, purpose, list(names), self.step, list(self.steps), ok, token, self.before, err, secs)
        self.trials.append(t)
        self.say(f"re-run {n} ({self.used}/{self.budget}): {purpose} {shown(names)} → "
                 f"{'restored' if ok else 'not restored'} (token {token}, logit error {err:.3g}, {secs:.2f} s)")
        self.cache[key] = (t, reader)
        return t, reader

    def tensor_error(self, reader: TraceReader, name: str, dtypes: Mapping[str, str]) -> tuple[float | None, bool]:
        """(max |Δ|, within tolerance) of ``name`` at the target step in ``reader`` vs the reference."""
        try:
            a = self.ref.reader.tensor(self.sample, self.step, name, call=0)
            b = reader.tensor(self.sample, self.step, name, call=0)
        except TraceNotFoundError:  # not recorded by this re-run (or the reference): nothing to compare
            return None, True
        m = compare_values(np.asarray(a), np.asarray(b), self.policy.tensor(name, dtypes.get(name, "float32")))
        return (0.0 if m.bitexact else m.max_abs), bool(m.within)

    def close(self) -> None:
        """Release the re-runs' traces."""
        for r in self.readers:
            r.close()


def shown(names: Sequence[str]) -> str:
    """A list of transplanted names for one line: all of up to three, else first … last (count).

    Args:
        names: tensor names in execution order.

    Returns:
        The text (``(nothing)`` for none).
    """
    if len(names) <= 3:
        return ", ".join(names) or "(nothing)"
    return f"{names[0]} … {names[-1]} ({len(names)} tensors)"


