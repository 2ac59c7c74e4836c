"""``trace diff REF CAND [CAND ...]``: argument parsing and running the differ.

``tui/cli.py`` registers the command with :func:`add_parser` and maps the :class:`DiffOutcome`
(``mismatch`` -> exit 1) and TraceError subclasses (exit 2) to exit codes; nothing here exits.
Only the report goes to stdout; progress and notes go to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from steptrace.differ import VERDICTS, DiffOptions, DiffReport, Policy, diff, load_mapping, load_policy
from steptrace.differ.gate import CONDITIONS, FIGURES, Gate, GateResult, gate_from_toml, load_gate
from steptrace.differ.policy import parse_override
from steptrace.tracefmt.errors import TraceUsageError
from steptrace.tui.render.console import stderr_console

HELP = "compare traces step by step: first divergence, culprit tensor, verdicts"
DESCRIPTION = """\
Compare a reference trace with one or more candidates, step by step.

Verdicts, best to worst: identical (bit-exact), equivalent (same decisions, within tolerance),
drift (same decisions, something beyond tolerance), flip (different token, a near tie within
epsilon), divergent (different token), missing (a step on one side only). Exit status: 0 when
the verdict is better than --fail-on, 1 when it reaches it, 2 for usage or format errors.
"""
EPILOG = """\
examples:
  trace diff ref.trace cand.trace
  trace diff ref.trace cand.trace --format markdown > report.md    (paste into a PR description)
  trace diff ref.trace fp16.trace q8.trace --json report.json
  trace diff ref.trace lean.trace --gate 'identical>=0.89,kld_mean<=0.0014,flips_only_near_ties'
  trace diff pt.trace trt.trace --align frame,emission --policy tol.toml
  trace diff a.trace b.trace --align resync --tol 'encoder.*:atol=1e-3,rtol=1e-3'
docs: `trace docs differ` (verdicts, default epsilon, policy file, gates, JSON schema)
"""


@dataclass
class DiffOutcome:
    """What ``trace diff`` found: the report, the gate's result (with ``--gate``), and whether it
    counts as a mismatch (exit 1)."""

    report: DiffReport
    mismatch: bool
    gate: GateResult | None = None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``diff`` with all its options on ``subparsers``; returns the new parser."""
    p = subparsers.add_parser("diff", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", help="the reference trace (directory)")
    p.add_argument("candidates", nargs="+", metavar="candidate", help="one or more candidate traces")
    g = p.add_argument_group("alignment")
    g.add_argument("--align", default="step", metavar="MODE",
                   help="step (default), resync (edit distance over tokens: inserted/dropped tokens), "
                        "or decision key columns, e.g. frame,emission (transducers) or chunk (streaming)")
    g.add_argument("--heads", metavar="H[,H]", help="compare only these decision heads")
    g.add_argument("--samples", metavar="GLOB", action="append", help="compare only matching samples (repeatable)")
    g.add_argument("--open-loop", metavar="HEAD", action="append", default=[],
                   help="HEAD's decisions are not fed back (CTC frames, VAD chunks): compare its rows to the end "
                        "of each sample (repeatable; adds to the heads the traces declare)")
    g.add_argument("--ctc", metavar="blank=ID",
                   help="collapse token sequences as CTC does (merge repeats, drop blank ID) for sequence, WER "
                        "and CER figures; implies --open-loop for the vocabulary head")
    t = p.add_argument_group("tolerance")
    t.add_argument("--policy", metavar="FILE", help="tolerance policy (TOML; see `trace docs differ`; its [gate] section applies too)")
    t.add_argument("--epsilon", type=float, metavar="LOGITS",
                   help="near-tie threshold for flips (default: 4 ulps of the logits' dtype grid)")
    t.add_argument("--atol", type=float, help="element-wise absolute tolerance for every tensor")
    t.add_argument("--rtol", type=float, help="element-wise relative tolerance for every tensor")
    t.add_argument("--cosine-min", type=float, help="smallest cosine similarity allowed")
    t.add_argument("--sqnr-min", type=float, metavar="DB", help="smallest SQNR (dB) allowed")
    t.add_argument("--nan-equal", action="store_true", help="NaN on both sides at the same place counts as equal")
    t.add_argument("--tol", action="append", metavar="GLOB:KEY=V[,KEY=V]", default=[],
                   help="per-name override, e.g. 'encoder.*:atol=1e-3,rtol=1e-3' (repeatable)")
    t.add_argument("--stats-only", action="store_true", help="judge tensors from statistics and digests only")
    m = p.add_argument_group("tensor names")
    m.add_argument("--mapping", metavar="FILE", help="candidate -> reference tensor names (TOML)")
    m.add_argument("--no-auto-map", action="store_true",
                   help="never guess a name mapping by execution order and shape")
    m.add_argument("--save-mapping", metavar="FILE", help="write the mapping used (e.g. a guess) as TOML")
    o = p.add_argument_group("output")
    o.add_argument("--json", nargs="?", const="-", metavar="FILE", help="write the JSON report to FILE (or stdout)")
    o.add_argument("--format", default="auto", choices=("auto", "rich", "text", "markdown"),
                   help="report on stdout: rich (boxes, colours, fitted to the terminal), text (plain, full width, "
                        "nothing cut), markdown (for PR descriptions); auto (default): rich on a terminal, else text")
    o.add_argument("--fail-on", default=None, choices=VERDICTS[1:],
                   help="exit 1 when the verdict is this bad or worse (default: drift; with --gate only the gate "
                        "decides unless --fail-on is given)")
    o.add_argument("--gate", metavar="BUDGETS|FILE",
                   help="corpus budgets, exit 1 when one breaks, e.g. 'identical>=0.89,kld_mean<=0.0014,"
                        "flips_only_near_ties', or a TOML file with a [gate] section (the --policy file's [gate] "
                        f"applies too). Figures: {', '.join(FIGURES)}; conditions: {', '.join(CONDITIONS)}")
    o.add_argument("--rows", type=int, default=20, metavar="N", help="sample rows shown in the summary table")
    o.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress on stderr: a bar on a terminal, else a plain line every few seconds "
                        "(default: when stderr is a terminal)")
    o.add_argument("--jobs", type=int, default=None, metavar="N", help="worker processes for tensor values")
    return p


def _policy(args: argparse.Namespace) -> Policy:
    pol = load_policy(args.policy) if args.policy else Policy()
    glob_keys = {}
    for key, val in (("atol", args.atol), ("rtol", args.rtol), ("cosine_min", args.cosine_min),
                     ("sqnr_db_min", args.sqnr_min)):
        if val is not None:
            glob_keys[key] = val
    if args.nan_equal:
        glob_keys["nan_equal"] = True
    return pol.with_overrides(epsilon=args.epsilon, tensor=glob_keys, rules=[parse_override(x) for x in args.tol])


def options(args: argparse.Namespace) -> DiffOptions:
    """Build :class:`DiffOptions` from parsed arguments.

    Raises:
        TraceUsageError: a bad option value (policy, mapping, jobs).
    """
    if args.jobs is not None and args.jobs < 1:
        raise TraceUsageError("--jobs must be at least 1")
    return DiffOptions(
        align=args.align,
        policy=_policy(args),
        mapping=load_mapping(args.mapping) if args.mapping else None,
        auto_map=not args.no_auto_map,
        heads=[h.strip() for h in args.heads.split(",")] if args.heads else None,
        samples=args.samples,
        values=not args.stats_only,
        jobs=args.jobs or max(1, min(4, os.cpu_count() or 1)),
        fail_on=args.fail_on or "drift",
        open_loop=list(args.open_loop) or None,
        ctc_blank=_ctc_blank(args.ctc),
    )


def _ctc_blank(text: str | None) -> int | None:
    """Parse ``--ctc blank=ID``.

    Raises:
        TraceUsageError: malformed text.
    """
    if text is None:
        return None
    key, _, value = text.partition("=")
    if key.strip() != "blank" or not value.strip().isdigit():
        raise TraceUsageError(f"--ctc {text!r}: write --ctc blank=ID, e.g. --ctc blank=0")
    return int(value)


def gate(args: argparse.Namespace) -> Gate:
    """The budgets of ``--gate`` and of the ``[gate]`` section of the ``--policy`` file.

    Raises:
        PolicyError: a bad term, or a gate file that cannot be read.
    """
    g = Gate(())
    if args.policy:
        import tomllib

        try:
            g = gate_from_toml(tomllib.loads(Path(args.policy).read_text(encoding="utf-8")), args.policy)
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
            pass  # load_policy has already said what is wrong with the file
    if args.gate:
        g = g + load_gate(args.gate)
    return g


def run(args: argparse.Namespace) -> DiffOutcome:
    """Run ``trace diff``: report to stdout (rich, or JSON with ``--json -``), notes to stderr.

    Raises:
        TraceError: any expected failure (the caller maps it to exit 2).
    """
    from rich.console import Console
    from steptrace.tui.commands.output import check_writable, write_output
    from steptrace.tui.render.diff import progress_bar, render

    opts = options(args)
    budgets = gate(args)
    if args.json and args.json != "-":
        check_writable(args.json, what="JSON report")
    if args.save_mapping:
        check_writable(args.save_mapping, what="name mapping")
    err = stderr_console()
    show = args.progress if args.progress is not None else sys.stderr.isatty()
    with progress_bar(err, enabled=show) as cb:
        report = diff(args.reference, args.candidates, opts, progress=cb)
    checked = budgets.check(report) if budgets else None
    if args.save_mapping:
        mapping = report.worst.mapping
        text = mapping.to_toml() if mapping is not None else "[names]\n"
        write_output(args.save_mapping, text, what="name mapping")
        err.print(f"[dim]mapping written to {args.save_mapping}[/]")
    text = _json(report, checked) if args.json else ""
    if args.json == "-":
        sys.stdout.write(text + "\n")
    else:
        if args.json:
            write_output(args.json, text + "\n", what="JSON report")
            err.print(f"[dim]JSON report written to {args.json}[/]")
        out = Console()
        render(report, out, rows=args.rows, fmt=None if args.format == "auto" else args.format, gate=checked)
    if checked is None:
        mismatch = report.mismatch
    else:
        mismatch = not checked.passed or (args.fail_on is not None and report.mismatch)
        if not checked.passed:
            err.print(f"[bold red]{checked}[/]", soft_wrap=True, highlight=False, markup=True)
    return DiffOutcome(report, mismatch, checked)


def _json(report: DiffReport, checked: GateResult | None) -> str:
    """The JSON report, with the gate's checks under ``gate`` when there was one."""
    if checked is None:
        return report.dumps()
    import json

    doc = report.to_json()
    doc["gate"] = checked.to_json()
    return json.dumps(doc, indent=1, ensure_ascii=False, allow_nan=False)
