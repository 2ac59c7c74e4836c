"""Corpus gates: budgets a diff must meet, such as ``identical>=0.89,kld_mean<=0.0014,flips_only_near_ties``.

A gate is a list of terms, each a figure compared with a limit (``kld_mean<=0.0014``) or a
condition (``flips_only_near_ties``). :meth:`Gate.check` evaluates every term on every candidate
of a :class:`~differ.report.DiffReport` and returns a :class:`GateResult` naming the budgets that
broke. The same terms can be written as a ``[gate]`` section of TOML::

    [gate]
    identical = ">= 0.89"          # fraction of samples with identical token sequences
    kld_mean = "<= 0.0014"
    flips_only_near_ties = true

Rates (``identical``, ``same_top1``, ``ter``, ``wer``, ``cer``) take a fraction (``0.89``) or a
percentage (``89%``); ``identical`` above 1 is a count of samples (``identical>=2338``).
"""

from __future__ import annotations

import math
import operator
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .corpusstats import CorpusStats, corpus_stats
from .errors import PolicyError

if TYPE_CHECKING:
    from .report import DiffReport, PairReport

OPS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt, "==": operator.eq,
}

#: Figures a term can compare, with what they mean (``trace diff --help`` lists them).
FIGURES = {
    "identical": "samples with identical token sequences (fraction, or a count above 1)",
    "same_top1": "fresh steps where both runs' top-1 is the same token (fraction)",
    "kld_mean": "mean KL divergence per fresh step", "kld_p50": "median KL divergence",
    "kld_p99": "99th percentile of the KL divergence", "kld_max": "largest KL divergence",
    "dp_rms": "RMS of the change of the reference's top-token probability",
    "ter": "token error rate (fraction)", "wer": "word error rate (fraction)", "cer": "character error rate",
    "changes": "fresh steps where the tokens differ (count)",
    "divergent": "token changes that are not near ties (count)",
    "change_margin_max": "largest reference margin at a token change (logits)",
}
#: Conditions a term can name without a limit.
CONDITIONS = {
    "flips_only_near_ties": "every token change is a near-tie flip: no divergent step, no sample losing steps",
}
_RATES = {"identical", "same_top1", "ter", "wer", "cer"}
_TERM = re.compile(r"^\s*([a-z_0-9]+)\s*(<=|>=|==|<|>)\s*([-+0-9.eE]+)\s*(%?)\s*$")


@dataclass(frozen=True)
class GateTerm:
    """One budget: ``figure op limit``, or a condition (``op`` and ``limit`` None)."""

    figure: str
    op: str | None = None
    limit: float | None = None
    percent: bool = False

    def __str__(self) -> str:
        if self.op is None:
            return self.figure
        return f"{self.figure}{self.op}{self.limit * 100:g}%" if self.percent else f"{self.figure}{self.op}{self.limit:g}"


@dataclass(frozen=True)
class GateCheck:
    """One term evaluated on one candidate.

    Attributes:
        candidate: the candidate's path.
        term: the budget.
        value: the measured figure (None for conditions, or when the figure is unknown).
        ok: whether the budget holds (an unknown figure breaks it).
        detail: what was measured, in words.
    """

    candidate: str
    term: GateTerm
    value: float | None
    ok: bool
    detail: str

    def __str__(self) -> str:
        return f"{'ok' if self.ok else 'BROKEN'}  {self.term}: {self.detail}"

    def to_json(self) -> dict[str, Any]:
        """Return the check as a JSON object."""
        v = self.value
        return {"candidate": self.candidate, "term": str(self.term), "figure": self.term.figure, "op": self.term.op,
                "limit": self.term.limit, "value": None if v is None or not math.isfinite(v) else v,
                "ok": self.ok, "detail": self.detail}


@dataclass(frozen=True)
class GateResult:
    """Every term on every candidate; :attr:`passed` when none broke."""

    checks: list[GateCheck]

    @property
    def broken(self) -> list[GateCheck]:
        """The checks whose budget broke."""
        return [c for c in self.checks if not c.ok]

    @property
    def passed(self) -> bool:
        """No budget broke."""
        return not self.broken

    def __str__(self) -> str:
        n, b = len(self.checks), len(self.broken)
        if not b:
            return f"gate passed: {n} budget{'s' if n != 1 else ''} held"
        return f"gate FAILED: {b} of {n} budget{'s' if n != 1 else ''} broken (" + "; ".join(
            f"{c.term}: {c.detail}" for c in self.broken) + ")"

    def to_json(self) -> dict[str, Any]:
        """Return the result as a JSON object."""
        return {"passed": self.passed, "broken": len(self.broken), "checks": [c.to_json() for c in self.checks]}


@dataclass(frozen=True)
class Gate:
    """A list of budgets (parse with :func:`parse_gate` or :func:`gate_from_toml`)."""

    terms: tuple[GateTerm, ...]

    def __bool__(self) -> bool:
        return bool(self.terms)

    def __str__(self) -> str:
        return ",".join(map(str, self.terms))

    def __add__(self, other: Gate) -> Gate:
        return Gate(self.terms + other.terms)

    def check(self, report: DiffReport) -> GateResult:
        """Evaluate every term on every candidate of ``report``.

        Returns:
            The :class:`GateResult`.
        """
        checks = []
        for c in report.candidates:
            stats = corpus_stats(c.steps_table)
            for term in self.terms:
                checks.append(_check(term, c, stats))
        return GateResult(checks)


def _figure(name: str, c: PairReport, s: CorpusStats) -> tuple[float | None, str]:
    """The value of figure ``name`` for candidate ``c`` and how it reads."""
    seq = c.sequences
    n = c.samples.get("total", 0)
    if name == "identical":
        k = seq.get("identical", 0)
        return (k / n if n else None), f"{k:,} / {n:,} samples identical" + (f" ({100 * k / n:.1f} %)" if n else "")
    if name == "same_top1":
        v = s.same_top1.value
        return v, f"same top-1 on {'–' if v is None else f'{100 * v:.2f} %'} of {s.compared:,} steps"
    if name.startswith("kld_"):
        v = s.kld.value if name == "kld_mean" else getattr(s.kld, name[4:])
        return v, f"{name.replace('_', ' ')} {'–' if v is None else f'{v:.4g}'}"
    if name == "dp_rms":
        v = s.dp_rms.value
        return v, f"Δp RMS {'–' if v is None else f'{v:.4g}'}"
    if name in ("ter", "wer", "cer"):
        v = seq.get("token_error_rate" if name == "ter" else name)
        return v, f"{name.upper()} {'–' if v is None else f'{100 * v:.3g} %'}"
    if name == "changes":
        return float(s.changes), f"{s.changes:,} token change{'s' if s.changes != 1 else ''}"
    if name == "divergent":
        return float(s.divergent), f"{s.divergent:,} divergent step{'s' if s.divergent != 1 else ''}"
    if name == "change_margin_max":
        v = s.change_margin_max
        return (v if v is not None else 0.0), ("no token change" if v is None else f"largest reference margin at a "
                                                                                     f"change {v:.3g}")
    raise PolicyError(f"unknown gate figure {name!r}")


def _check(term: GateTerm, c: PairReport, s: CorpusStats) -> GateCheck:
    path = c.candidate.path
    if term.op is None:  # the only condition: flips_only_near_ties
        lost = c.samples.get("missing", 0)
        ok = s.divergent == 0 and lost == 0 and c.samples.get("divergent", 0) == 0
        if ok:
            detail = f"{s.changes:,} token change{'s' if s.changes != 1 else ''}, all near-tie flips"
        else:
            bad = [p for p in c.per_sample if p.verdict in ("divergent", "missing")]
            first = f" (first: {bad[0].sample} step {bad[0].first_step})" if bad and bad[0].first_step is not None else ""
            detail = (f"{s.divergent:,} divergent step{'s' if s.divergent != 1 else ''}, "
                      f"{len(bad):,} sample{'s' if len(bad) != 1 else ''} divergent or missing steps{first}")
        return GateCheck(path, term, None, ok, detail)
    value, detail = _figure(term.figure, c, s)
    limit = term.limit
    if term.figure == "identical" and value is not None and limit is not None and limit > 1 and not term.percent:
        value = float(c.sequences.get("identical", 0))  # a count of samples
    if value is None:
        return GateCheck(path, term, None, False, f"{detail} (not measured: nothing to compare)")
    ok = OPS[term.op](value, limit)
    return GateCheck(path, term, value, ok, detail + ("" if ok else f", budget {term.op} {_limit(term)}"))


def _limit(term: GateTerm) -> str:
    assert term.limit is not None
    return f"{term.limit * 100:g} %" if term.percent else f"{term.limit:g}"


def _term(figure: str, op: str | None, number: str | None, percent: bool, where: str) -> GateTerm:
    if op is None:
        if figure not in CONDITIONS:
            hint = f"; compare it with a limit, e.g. {figure}<=0.001" if figure in FIGURES else ""
            raise PolicyError(f"{where}: unknown gate condition {figure!r}{hint}; conditions: {', '.join(CONDITIONS)}")
        return GateTerm(figure)
    if figure not in FIGURES:
        raise PolicyError(f"{where}: unknown gate figure {figure!r}; figures: {', '.join(FIGURES)}")
    try:
        limit = float(number or "")
    except ValueError:
        raise PolicyError(f"{where}: {number!r} is not a number") from None
    if percent:
        if figure not in _RATES:
            raise PolicyError(f"{where}: {figure} is not a rate; give it without %")
        limit /= 100
    return GateTerm(figure, op, limit, percent)


def parse_gate(text: str) -> Gate:
    """Parse ``identical>=0.89,kld_mean<=0.0014,flips_only_near_ties``.

    Raises:
        PolicyError: an unknown figure or condition, or a term that is not ``FIGURE OP NUMBER``.
    """
    terms = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        m = _TERM.match(part)
        if m:
            terms.append(_term(m[1], m[2], m[3], bool(m[4]), f"--gate {part!r}"))
        elif re.fullmatch(r"[a-z_0-9]+", part):
            terms.append(_term(part, None, None, False, f"--gate {part!r}"))
        else:
            raise PolicyError(f"--gate {part!r}: write FIGURE OP NUMBER (e.g. kld_mean<=0.0014) or a condition "
                              f"({', '.join(CONDITIONS)})")
    if not terms:
        raise PolicyError("--gate is empty; e.g. --gate 'identical>=0.89,kld_mean<=0.0014,flips_only_near_ties'")
    return Gate(tuple(terms))


def gate_from_toml(doc: Mapping[str, Any], source: str) -> Gate:
    """The ``[gate]`` section of a TOML document (an empty gate when there is none).

    Raises:
        PolicyError: the section is not a table, or holds an unknown figure or a bad value.
    """
    sec = doc.get("gate")
    if sec is None:
        return Gate(())
    if not isinstance(sec, Mapping):
        raise PolicyError(f"{source}: [gate] must be a table of FIGURE = \"OP NUMBER\" entries")
    terms = []
    for key, value in sec.items():
        where = f"{source} [gate] {key}"
        if isinstance(value, bool):
            if value:
                terms.append(_term(key, None, None, False, where))
            continue
        m = _TERM.match(f"{key}{value}") if isinstance(value, str) else None
        if m is None:
            raise PolicyError(f"{where}: write {key} = \"<= NUMBER\" (or \">= NUMBER\"); conditions take true")
        terms.append(_term(m[1], m[2], m[3], bool(m[4]), where))
    return Gate(tuple(terms))


def load_gate(spec: str) -> Gate:
    """A gate from ``--gate``: inline terms, or a TOML file with a ``[gate]`` section.

    Raises:
        PolicyError: the file cannot be read or is not TOML, it has no ``[gate]``, or a bad term.
    """
    p = Path(spec)
    if spec.endswith(".toml") or p.is_file():
        try:
            doc = tomllib.loads(p.read_text(encoding="utf-8"))
        except OSError as exc:
            raise PolicyError(f"cannot read the gate file {spec}: {exc.strerror}") from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise PolicyError(f"{spec} is not TOML: {exc}") from None
        gate = gate_from_toml(doc, spec)
        if not gate:
            raise PolicyError(f"{spec} has no [gate] section (or it is empty)")
        return gate
    return parse_gate(spec)


__all__ = ["CONDITIONS", "FIGURES", "Gate", "GateCheck", "GateResult", "GateTerm", "gate_from_toml", "load_gate",
           "parse_gate"]
