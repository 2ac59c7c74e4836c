"""``trace triage REF.trace [options] script.py [args ...]`` (or ``-m module``): find the root cause
of a divergence by transplant bisection (:func:`recorders.triage.triage`), re-running the script
as ``trace record`` does.

``tui/cli.py`` registers the command with :func:`add_parser`; the :class:`TriageOutcome` maps to
exit 0 (root cause found, or nothing diverges), 1 (no transplant within the budget restores the
decision) and TraceErrors to 2. The report goes to stdout, one progress line per re-run to
stderr; ``--json FILE`` writes schema ``steptrace.triage/1``.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from steptrace.tracefmt.errors import TraceUsageError
from steptrace.tui.commands.output import check_writable, write_output
from steptrace.tui.render.console import stderr_console

HELP = "find the root cause of a divergence: transplant bisection over re-runs of a script"
DESCRIPTION = """\
Re-run the candidate script teacher-forced on REF's tokens, then replace candidate tensors by REF's
recorded values at the divergent step and re-run again, bisecting over execution order for the
earliest tensor whose transplant (with every tensor before it) restores REF's decision (same
token, logit error back within the pair's noise). The trial that transplants every tensor before
it gives its local error (fed REF's inputs) next to its propagated error. --components
transplants whole components alone and in combination (seed 003's "enc_ref + pred_cand" table).
torch module outputs and ONNX Runtime values (exposed in the model file the script opens) can be
transplanted.

The target is REF's first token divergence against --candidate CAND, or against a first plain
re-run; --sample/--step choose another. REF needs values (--tensors full) of the tensors searched;
--ref-script re-records it when it has statistics only. Two plain re-runs check the candidate is
deterministic first (exit 2 if not). Re-runs go to a temporary directory, never over your traces.
"""
EPILOG = """\
examples:
  trace triage ref.trace --logits head --modules 'layers.*' decode.py --int8
  trace triage ref.trace --candidate cand.trace --logits joint --modules '*' \\
      --components encoder='encoder*',predictor='predictor*' tdt.py
  trace triage ref.trace --ref-script "decode.py" --logits head --modules 'layers.*' decode.py --int8
exit codes: 0 root cause found (or nothing diverges), 1 no transplant within --budget restores it,
2 usage error, non-deterministic candidate, reference without values, run that cannot be repeated.
docs: `trace docs triage`
"""


@dataclass
class TriageOutcome:
    """What ``trace triage`` found: ``mismatch`` when no transplant restored the decision."""

    mismatch: bool
    found: bool
    json_path: str | None


def _globs(values: list[str] | None) -> list[str]:
    return [g.strip() for v in values or [] for g in v.split(",") if g.strip()]


def parse_components(values: list[str] | None) -> dict[str, str]:
    """``encoder=ENC*,predictor=PRED*`` (repeatable) -> ``{"encoder": "ENC*", ...}``.

    Raises:
        TraceUsageError: an entry without ``NAME=GLOB``.
    """
    out: dict[str, str] = {}
    for entry in _globs(values):
        name, eq, glob = entry.partition("=")
        if not eq or not name.strip() or not glob.strip():
            raise TraceUsageError(f"--components {entry!r}: write NAME=GLOB[,NAME=GLOB...] (e.g. encoder='encoder*')")
        out[name.strip()] = glob.strip()
    return out


def _add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--candidate", metavar="CAND.trace", help="a candidate trace whose first divergence is the target")
    p.add_argument("--modules", action="append", metavar="GLOB",
                   help="torch modules to record and search, as for trace record (repeatable, comma-separated)")
    p.add_argument("--logits", action="append", metavar="GLOB", help="the decided module or element (trace record)")
    p.add_argument("--sample", metavar="ID", help="the sample to triage (default: the first that diverges)")
    p.add_argument("--step", type=int, metavar="N", help="the target step (default: the first token divergence)")
    p.add_argument("--from-step", type=int, metavar="N",
                   help="transplant at every step from N to the target (state carried across steps)")
    p.add_argument("--budget", type=int, default=24, metavar="N", help="transplant re-runs allowed (default 24)")
    p.add_argument("--components", action="append", metavar="NAME=GLOB",
                   help="component table: NAME=GLOB[,NAME=GLOB...] (| separates globs of one component)")
    p.add_argument("--local", choices=["boundary", "all"], default="boundary",
                   help="local errors of the tensors around the root cause (default) or of every one (a re-run each)")
    p.add_argument("--ref-script", metavar="'SCRIPT [ARGS]'",
                   help="the reference's script: re-record REF with values when it has statistics only")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON (schema steptrace.triage/1)")
    p.add_argument("--keep", metavar="DIR", help="keep the re-runs' traces in DIR (default: a temporary directory)")
    p.add_argument("-k", type=int, default=8, help="top-k candidates kept per decision (default 8)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``triage`` with its options on ``subparsers``; returns the new parser.

    Options may come before or after ``REF.trace``; the first word after them that is not an
    option starts the script's command line (``-m`` a module's).
    """
    p = subparsers.add_parser("triage", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="trace triage REF.trace [options] (script.py | -m module) [args ...]")
    _add_options(p)
    p.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE",
                   help="run a module as `python -m MODULE [args ...]` does (the rest of the line is its)")
    p.add_argument("rest", nargs=argparse.REMAINDER, metavar="REF.trace [options] script.py [args ...]",
                   help="the reference trace, then the candidate script and its arguments")
    return p


def _split(args: argparse.Namespace) -> list[str]:
    """Parse the words after ``REF.trace`` (options, then the script) into ``args``; return the
    script's command line (``args.module`` holds it after ``-m``)."""
    rest = list(args.rest or [])
    if args.module is not None and not rest:
        raise TraceUsageError("give the reference trace before -m: trace triage REF.trace [options] -m MODULE")
    if not rest:
        raise TraceUsageError("give the reference trace: trace triage REF.trace [options] script.py [args ...]")
    args.reference, rest = rest[0], rest[1:]
    opts: list[str] = []
    while rest and rest[0].startswith("-") and rest[0] not in ("-", "--", "-m"):
        word = rest.pop(0)
        opts.append(word)
        if "=" not in word and rest:
            opts.append(rest.pop(0))
    if rest[:1] == ["-m"]:
        args.module = rest[1:]
        rest = []
    parser = argparse.ArgumentParser(prog="trace triage", add_help=False)
    _add_options(parser)
    try:
        parser.parse_args(opts, namespace=args)
    except SystemExit as exc:
        raise TraceUsageError(f"bad triage options {' '.join(opts)}: see trace triage --help") from exc
    target = list(args.module if args.module is not None else rest)
    return target[1:] if target[:1] == ["--"] else target


def _progress(err: Console) -> Any:
    def line(text: str) -> None:
        err.print(Text.assemble(("triage: ", "cyan"), text), soft_wrap=True)

    return line


def _reference_with_values(args: argparse.Namespace, err: Console, modules: list[str], logits: list[str],
                           tmp: Path) -> str:
    """REF itself, or (``--ref-script``, REF without values) a re-recording of it with values."""
    from steptrace.recorders.triagerun import ScriptRun
    from steptrace.tracefmt import TraceReader

    with TraceReader(args.reference) as r:
        hv = r.tensors(columns=["has_values"])["has_values"].to_pylist()
        tokens = r.decisions(columns=["sample", "step", "head", "chosen"], derive=False)
    if not args.ref_script or (hv and all(hv)):
        return args.reference
    parts = shlex.split(args.ref_script)
    if not parts:
        raise TraceUsageError("--ref-script is empty: give the reference's script and its arguments")
    err.print(Text.assemble(("triage: ", "cyan"), f"{args.reference} holds statistics only; re-recording it with "
                            f"values from {args.ref_script}"))
    out = str(tmp / "reference.trace")
    ScriptRun(parts[0], parts[1:], modules=modules, logits=logits, k=args.k).record(out)
    with TraceReader(out) as r:
        again = r.decisions(columns=["sample", "step", "head", "chosen"], derive=False)
    if not again.equals(tokens):
        raise TraceUsageError(f"the re-recording of {args.ref_script} chose other tokens than {args.reference}: the "
                              "reference script is not deterministic or is not the one REF was recorded from")
    return out


def run(args: argparse.Namespace) -> TriageOutcome:
    """Run ``trace triage``.

    Raises:
        TraceError: usage errors, a candidate that is not deterministic or cannot be re-run, a
            reference without values (exit 2).
    """
    from steptrace.recorders.triage import check_rerunnable, triage
    from steptrace.recorders.triagerun import ScriptRun
    from steptrace.tracefmt import TraceReader

    target = _split(args)
    if args.json:
        check_writable(args.json, what="JSON report")  # before minutes of re-runs, not after
    if args.candidate is not None:
        with TraceReader(args.candidate) as cr:
            check_rerunnable(cr, "the candidate", script=bool(target))
    if not target:
        raise TraceUsageError("give the script that runs the candidate (trace triage REF [options] script.py "
                              "[args ...]) or -m MODULE: triage re-runs it with tensors transplanted")
    modules, logits = _globs(args.modules) or ["*"], _globs(args.logits)
    if not logits:
        raise TraceUsageError("give --logits GLOB: the module whose output is decided at each step (as for trace record)")
    comps = parse_components(args.components)
    err = stderr_console()
    tmp = Path(tempfile.mkdtemp(prefix="steptrace-triage-ref-"))
    try:
        ref = _reference_with_values(args, err, modules, logits, tmp)
        with TraceReader(ref) as rr:
            ref_samples = rr.samples()
        # the script's default sample id must be the reference's (a script may set $STEPTRACE_SAMPLE itself)
        default = ref_samples[0] if len(ref_samples) == 1 else "0"
        runner = ScriptRun(target[0], target[1:], modules=modules, logits=logits, module=args.module is not None,
                           sample=default, k=args.k)
        report = triage(ref, runner, candidate=args.candidate, sample=args.sample, step=args.step,
                        from_step=args.from_step, budget=args.budget, components=comps,
                        local_all=args.local == "all", workdir=args.keep, progress=_progress(err))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.reference = args.reference
    render(report, Console())
    if args.json:
        write_output(args.json, report.dumps() + "\n", what="JSON report")
        err.print(f"JSON report written to {args.json}")
    return TriageOutcome(mismatch=report.mismatch, found=report.found, json_path=args.json)


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:.3g}"


def render(report: Any, console: Console) -> None:
    """Print a :class:`~recorders.triagereport.TriageReport`: the finding in one sentence first,
    then the target, the local-vs-propagated table, the component table and the trials."""
    from steptrace.recorders.triage import shown

    style = "bold green" if report.found else ("bold red" if report.mismatch else "bold")
    head = [Text(report.sentence(), style=style)]
    if report.step is not None:
        head.append(Text(f"target: sample {report.sample}, step {report.step}, head {report.head} — reference token "
                         f"{report.ref_token}, candidate token {report.cand_token}; logit error {_f(report.logit_error)}"
                         f" (restored means ≤ {_f(report.noise)})"))
    used = sum(t.purpose not in ("plain", "determinism") for t in report.trials)
    head.append(Text(f"{report.reruns} re-runs ({used} of budget {report.budget}"
                     f"{', exhausted' if report.exhausted else ''}), {report.candidates} tensors searched, "
                     f"{report.seconds:.1f} s; runner: {report.runner}", style="dim"))
    console.print(Panel(Group(*head), title="steptrace triage", expand=True))
    if report.modules:
        t = Table(title="local vs propagated error at the target step", title_justify="left")
        for col in ("tensor", "order", "local", "propagated", "tolerance", "transplant", "role"):
            t.add_column(col, justify="right" if col in ("order", "local", "propagated", "tolerance") else "left")
        for m in report.modules:
            tr = "–" if m.restores is None else ("restores" if m.restores else f"no ({_f(m.logit_error_after)})")
            t.add_row(m.name, str(m.order), _f(m.local_error), _f(m.propagated_error), _f(m.tolerance), tr, m.role,
                      style="bold" if report.root_cause and m.name == report.root_cause.name else None)
        console.print(t)
    if report.component_rows:
        t = Table(title="components (ref: REF's outputs transplanted)", title_justify="left")
        names = list(report.components)
        for c in names:
            t.add_column(c)
        t.add_column("token", justify="right")
        t.add_column("logit error", justify="right")
        t.add_column("decision")
        for r in report.component_rows:
            cells = ["ref" if c in r.from_reference else "cand" for c in names]
            t.add_row(*cells, str(r.token), _f(r.logit_error), "restored" if r.restored else "not restored",
                      style="green" if r.restored else None)
        console.print(t)
    if report.trials:
        t = Table(title="re-runs", title_justify="left")
        for col in ("#", "purpose", "transplanted", "steps", "token", "logit error", "removed", "restored", "s"):
            t.add_column(col, justify="right" if col in ("#", "token", "logit error", "removed", "s") else "left")
        for tr in report.trials:
            steps = "–" if not tr.transplanted else (f"{tr.steps[0]}" if len(tr.steps) == 1
                                                      else f"{tr.steps[0]}..{tr.steps[-1]}")
            names = shown(tr.transplanted)
            removed = "–" if tr.removed is None or not tr.transplanted else f"{100 * tr.removed:.0f} %"
            t.add_row(str(tr.index), tr.purpose, names, steps, str(tr.token), _f(tr.logit_error_after),
                      removed, "yes" if tr.restored else "no", f"{tr.seconds:.2f}")
        console.print(t)
