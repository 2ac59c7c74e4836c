"""What ``trace triage`` found, as values: the trials it ran, each tensor's local and propagated
error, the root cause, the component table. JSON schema ``steptrace.triage/1``; rendering is
``tui/commands/triage.py``'s.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["SCHEMA", "ComponentRow", "ModuleError", "RootCause", "Trial", "TriageReport"]

SCHEMA = "steptrace.triage/1"


def _num(v: float | None) -> float | str | None:
    """JSON has no inf/NaN: write them as strings."""
    if v is None or math.isfinite(v):
        return v
    return str(v)


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"


@dataclass(frozen=True)
class Trial:
    """One re-run of the candidate.

    Attributes:
        index: 1-based re-run number.
        purpose: ``plain``, ``determinism``, ``bisect``, ``boundary``, ``local``, ``symptom``,
            ``component``.
        transplanted: tensor names replaced by the reference's values (empty: a plain re-run).
        step: the target step.
        steps: the steps at which they were replaced (``[step]``, or ``from_step..step``).
        restored: the target decision is restored (see :func:`recorders.triage.is_restored`).
        token: the candidate's own token (argmax) at the target step.
        logit_error_before: logit error of the plain re-run at the target step.
        logit_error_after: logit error of this re-run there.
        seconds: wall time of the re-run.
    """

    index: int
    purpose: str
    transplanted: list[str]
    step: int
    steps: list[int]
    restored: bool
    token: int
    logit_error_before: float
    logit_error_after: float
    seconds: float

    @property
    def removed(self) -> float | None:
        """Fraction of the plain re-run's logit error this transplant removed (None if it had none)."""
        if not self.logit_error_before:
            return None
        return 1.0 - self.logit_error_after / self.logit_error_before

    def __str__(self) -> str:
        what = ", ".join(self.transplanted) or "(nothing)"
        return (f"#{self.index} {self.purpose}: {what} → {'restored' if self.restored else 'not restored'} "
                f"(token {self.token}, logit error {_fmt(self.logit_error_before)} → {_fmt(self.logit_error_after)})")

    def to_json(self) -> dict[str, Any]:
        """Return the trial as a JSON object."""
        return {"index": self.index, "purpose": self.purpose, "transplanted": list(self.transplanted),
                "step": self.step, "steps": list(self.steps), "restored": self.restored, "token": self.token,
                "logit_error_before": _num(self.logit_error_before), "logit_error_after": _num(self.logit_error_after),
                "removed": _num(self.removed), "seconds": round(self.seconds, 4)}


@dataclass(frozen=True)
class ModuleError:
    """A tensor's error at the target step: its own (local) and end-to-end (propagated).

    Attributes:
        name: the tensor (module output, ONNX value).
        order: its position in execution order at the target step.
        source: what produced it (module class, ONNX node).
        local_error: max |Δ| of its output when fed the reference's inputs (its predecessor in
            execution order transplanted); None when not measured.
        propagated_error: max |Δ| of its output in the plain re-run.
        tolerance: the tensor tolerance (``atol`` of the differ's policy).
        local_within: the local error is within tolerance (None: not measured).
        restores: transplanting it restores the decision (None: not tried).
        logit_error_after: logit error at the target with it transplanted (None: not tried).
        role: ``root cause``; ``harmless drift`` (its own error, but transplanting it does not
            restore the decision); ``adds its own error after the root cause``; ``amplifies
            upstream error`` (local error within tolerance, propagated error over twice its
            predecessor's); ``carries upstream error``; ``within tolerance``.
    """

    name: str
    order: int
    source: str | None
    local_error: float | None
    propagated_error: float | None
    tolerance: float
    local_within: bool | None
    restores: bool | None
    logit_error_after: float | None
    role: str

    def __str__(self) -> str:
        return (f"{self.name}: local {_fmt(self.local_error)}, propagated {_fmt(self.propagated_error)} "
                f"(tolerance {_fmt(self.tolerance)}) — {self.role}")

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object."""
        return {"name": self.name, "order": self.order, "source": self.source, "local_error": _num(self.local_error),
                "propagated_error": _num(self.propagated_error), "tolerance": self.tolerance,
                "local_within": self.local_within, "restores": self.restores,
                "logit_error_after": _num(self.logit_error_after), "role": self.role}


@dataclass(frozen=True)
class RootCause:
    """The earliest tensor whose transplant, with every tensor before it, restores the target
    decision.

    Attributes:
        name: the tensor.
        sample: the sample.
        step: the target step.
        source: what produced it.
        local_error: its own error (fed the reference's inputs); None if not measured.
        tolerance: its tensor tolerance.
        restores: transplanting it alone restores the decision.
        token: the reference's token there, which the transplant restores.
        logit_error_before: the plain re-run's logit error at the target.
        logit_error_after: the logit error with it transplanted.
        introduces: its local error is beyond tolerance (it introduces the error itself).
    """

    name: str
    sample: str
    step: int
    source: str | None
    local_error: float | None
    tolerance: float
    restores: bool
    token: int
    logit_error_before: float
    logit_error_after: float
    introduces: bool

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object."""
        return {"name": self.name, "sample": self.sample, "step": self.step, "source": self.source,
                "local_error": _num(self.local_error), "tolerance": self.tolerance, "restores": self.restores,
                "token": self.token, "logit_error_before": _num(self.logit_error_before),
                "logit_error_after": _num(self.logit_error_after), "introduces": self.introduces}


@dataclass(frozen=True)
class ComponentRow:
    """One row of the component table: which components ran with the reference's outputs.

    Attributes:
        from_reference: components whose outputs were transplanted.
        transplanted: the tensor names that meant.
        restored: the target decision was restored.
        token: the candidate's token at the target.
        logit_error: the logit error at the target.
    """

    from_reference: list[str]
    transplanted: list[str]
    restored: bool
    token: int
    logit_error: float

    def to_json(self) -> dict[str, Any]:
        """Return the fields as a JSON object."""
        return {"from_reference": list(self.from_reference), "transplanted": list(self.transplanted),
                "restored": self.restored, "token": self.token, "logit_error": _num(self.logit_error)}


@dataclass
class TriageReport:
    """Everything one triage found.

    Attributes:
        reference: the reference trace.
        candidate: the candidate trace the target came from (None: a plain re-run).
        runner: what was re-run.
        runtime: its runtime.
        sample: the target sample.
        step: the target step (None when nothing diverges).
        head: the decision head.
        ref_token: the reference's token at the target.
        cand_token: the plain re-run's own token there.
        logit_error: the plain re-run's logit error there.
        noise: the bound a restored step's logit error must be within.
        from_step: transplants covered ``from_step..step`` (None: the target step only).
        budget: the most transplant re-runs allowed.
        exhausted: the budget ran out before the search ended.
        root_cause: the root cause, or None.
        first_symptom: the first tensor beyond tolerance at the target (``trace diff``'s culprit).
        modules: local vs propagated error of the tensors examined, in execution order.
        trials: every re-run, in order.
        components: component names -> globs, when a component table was asked for.
        component_rows: the component table.
        decided_by: the component(s) whose reference outputs alone restore the decision.
        candidates: how many tensors were searched.
        seconds: wall time of the whole triage.
        message: a sentence for the cases without a root cause.
    """

    reference: str
    candidate: str | None
    runner: str
    runtime: str
    sample: str | None = None
    step: int | None = None
    head: str | None = None
    ref_token: int | None = None
    cand_token: int | None = None
    logit_error: float | None = None
    noise: float | None = None
    from_step: int | None = None
    budget: int = 0
    exhausted: bool = False
    root_cause: RootCause | None = None
    first_symptom: ModuleError | None = None
    modules: list[ModuleError] = field(default_factory=list)
    trials: list[Trial] = field(default_factory=list)
    components: dict[str, str] = field(default_factory=dict)
    component_rows: list[ComponentRow] = field(default_factory=list)
    decided_by: list[str] | None = None
    candidates: int = 0
    seconds: float = 0.0
    message: str | None = None

    @property
    def found(self) -> bool:
        """A root cause was found (or a component decides it)."""
        return self.root_cause is not None or bool(self.decided_by)

    @property
    def mismatch(self) -> bool:
        """A divergence exists and no transplant within the budget explains it (exit 1)."""
        return self.step is not None and not self.found

    @property
    def reruns(self) -> int:
        """Re-runs made (plain ones included)."""
        return len(self.trials)

    def sentence(self) -> str:
        """The finding in one sentence (the report's first line)."""
        rc = self.root_cause
        if rc is None:
            if self.decided_by:
                return (f"{' + '.join(self.decided_by)} decides it: with the reference's outputs of "
                        f"{' and '.join(self.decided_by)} the candidate chooses token {self.ref_token} at step "
                        f"{self.step} again")
            return self.message or "no root cause found"
        if rc.local_error is None:
            own = "its local error was not measured"
        elif rc.introduces:
            own = f"its local error is {rc.local_error:.3g} (tolerance {rc.tolerance:.2g})"
        else:
            own = (f"its local error {rc.local_error:.3g} is within tolerance {rc.tolerance:.2g}, so the error "
                   "reaches it by another path")
        fix = (f"transplanting its output restores token {rc.token}" if rc.restores else
               f"transplanting it with every tensor before it restores token {rc.token} (alone it does not: an "
               "earlier error matters too)")
        text = f"{rc.name} {'introduces' if rc.introduces else 'is where'} the error at step {rc.step}: {own} and {fix}"
        fs = self.first_symptom
        if fs is not None and fs.name != rc.name and fs.restores is False:
            text += (f"; {fs.name} drifts by {_fmt(fs.propagated_error)} but transplanting it changes nothing"
                     if fs.logit_error_after is not None and self.logit_error
                     and abs(fs.logit_error_after - self.logit_error) <= 0.05 * self.logit_error
                     else f"; {fs.name} drifts by {_fmt(fs.propagated_error)} but transplanting it does not restore "
                     "the decision")
        if self.decided_by:
            text += f"; of the components, {' + '.join(self.decided_by)} decides it"
        return text

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON object (schema ``steptrace.triage/1``)."""
        return {
            "schema": SCHEMA,
            "summary": self.sentence(),
            "found": self.found,
            "mismatch": self.mismatch,
            "reference": self.reference,
            "candidate": self.candidate,
            "runner": self.runner,
            "runtime": self.runtime,
            "target": {"sample": self.sample, "step": self.step, "head": self.head, "ref_token": self.ref_token,
                       "cand_token": self.cand_token, "logit_error": _num(self.logit_error),
                       "noise": _num(self.noise), "from_step": self.from_step},
            "root_cause": None if self.root_cause is None else self.root_cause.to_json(),
            "first_symptom": None if self.first_symptom is None else self.first_symptom.to_json(),
            "modules": [m.to_json() for m in self.modules],
            "trials": [t.to_json() for t in self.trials],
            "components": None if not self.components else {
                "globs": dict(self.components), "rows": [r.to_json() for r in self.component_rows],
                "decided_by": self.decided_by},
            "budget": {"reruns": self.budget, "used": sum(t.purpose not in ("plain", "determinism") for t in self.trials),
                       "exhausted": self.exhausted},
            "candidates": self.candidates,
            "seconds": round(self.seconds, 3),
            "message": self.message,
        }

    def dumps(self) -> str:
        """Return the JSON text of :meth:`to_json`."""
        return json.dumps(self.to_json(), indent=2)
