"""``trace view A [B]``: argument parsing and starting the Textual viewer.

``tui/cli.py`` registers the command with :func:`add_parser` and calls :func:`run`; TraceError
subclasses raised here (not a trace, a bad report, bad options) are mapped to exit code 2 there.
textual is imported only inside :func:`run`, so ``trace info`` and ``trace diff`` never load it.
"""

from __future__ import annotations

import argparse

from steptrace.tracefmt.errors import TraceUsageError

HELP = "browse a trace, or two side by side: margins, top-k, tensors, first divergence"
DESCRIPTION = """\
Browse one trace, or a reference and a candidate step by step in the terminal (works over SSH).

Panes: samples (a corpus: verdict, first divergence, lengths), steps (tokens of both sides,
margins, rank of the candidate's token in the reference, watched tokens, verdict colour), step
detail (top-k of both sides with bars), tensors (execution order, metrics, culprit, values),
plots (margins and tensor error over the steps, first divergence and drift onset marked).
With two traces the differ runs in the background; --diff-json reuses a saved report instead.
Rows after a free-running divergence read "after" (dim): the tokens fed back differ from there.
Fits terminals from 80x24: below 140 columns the panes stack, and the plots show when there is room.
"""
EPILOG = """\
keys:
  f first divergence   d drift onset   n/N next/previous mismatch (or search match)
  g go to step   / search token or piece   l low-margin filter   t tensors pane
  [ ] previous/next sample   s sort samples   ? help   q quit   (mouse works too)

examples:
  trace view run.trace
  trace view ref.trace cand.trace --step 120
  trace diff ref.trace cand.trace --json report.json && trace view ref.trace cand.trace --diff-json report.json
  trace view ref.trace cand.trace --sample utt-0042 --low-margin 0.5
  trace triage ref.trace --candidate cand.trace ... --json t.json decode.py && trace view ref.trace cand.trace --triage t.json
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``view`` on ``subparsers``; returns the new parser (its ``func`` is :func:`run`)."""
    p = subparsers.add_parser("view", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", metavar="A", help="a trace (the reference when B is given)")
    p.add_argument("candidate", metavar="B", nargs="?", help="a candidate trace to compare with A")
    p.add_argument("--diff-json", metavar="REPORT", help="reuse a report written by `trace diff A B --json REPORT`")
    p.add_argument("--triage", metavar="REPORT",
                   help="a `trace triage --json` report: its root cause is marked in the tensors pane")
    p.add_argument("--sample", metavar="S", help="open this sample first (default: the worst, else the first)")
    p.add_argument("--step", metavar="N", type=int, help="put the cursor on this step first")
    p.add_argument("--low-margin", metavar="LOGITS", type=float, default=1.0,
                   help="mark margins below this and keep them with `l` (default 1.0)")
    p.add_argument("--align", default="step", metavar="MODE",
                   help="alignment when the diff runs here: step (default), resync, or key columns (frame,emission)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> None:
    """Open the viewer and return when the user quits.

    Raises:
        TraceNotFoundError, TraceFormatError, TraceVersionError: A or B is not a readable trace.
        TraceUsageError: a bad option (--diff-json without B, an unreadable report).
    """
    if args.low_margin is not None and not args.low_margin > 0:
        raise TraceUsageError("--low-margin must be a positive number of logits")
    if args.step is not None and args.step < 0:
        raise TraceUsageError("--step must be 0 or more")
    from steptrace.tui.app.main import ViewApp  # textual is imported here, and only when `view` runs
    from steptrace.tui.viewer.data import ViewModel

    triage = load_triage(args.triage) if getattr(args, "triage", None) else None
    paths = [args.reference] + ([args.candidate] if args.candidate else [])
    model = ViewModel(paths, diff_json=args.diff_json, low_margin=args.low_margin, align=args.align)
    ViewApp(model=model, sample=args.sample, step=args.step, triage=triage).run()


def load_triage(path: str) -> dict:
    """Read a ``trace triage --json`` report (schema ``steptrace.triage/1``).

    Args:
        path: the report file.

    Returns:
        The report as a dict (``root_cause`` may be None).

    Raises:
        TraceUsageError: the file cannot be read or is not a triage report.
    """
    import json

    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError) as exc:
        raise TraceUsageError(f"--triage {path}: cannot read the report ({exc})") from exc
    if not isinstance(doc, dict) or doc.get("schema") != "steptrace.triage/1":
        raise TraceUsageError(f"--triage {path} is not a `trace triage --json` report (schema steptrace.triage/1)")
    return doc
