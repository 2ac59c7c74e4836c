"""``trace docs [TOPIC]``: the project's documents, as installed with the package.

The documents live in ``docs/`` of the source tree (and SPEC.md at its root); ``tui/docs`` links
to them, so a wheel carries them as package data of ``tui`` and an installed ``trace`` can show
them without the source or a network. ``--help`` texts point here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from importlib import resources

from steptrace.tracefmt.errors import TraceUsageError

#: Topic -> (file, what it covers).
TOPICS = {
    "differ": ("differ.md", "trace diff: alignment, verdicts, ε, tolerances, corpus figures, gates, JSON report"),
    "format": ("SPEC.md", "the trace format (binding): layout, schemas, tensors, JSONL interchange, reading with "
                          "Polars/DuckDB"),
    "recorders": ("recorders.md", "recording from PyTorch: hooks, budgets, transplants"),
    "record-script": ("recorders_hf_script.md", "`trace record script.py` and Hugging Face generate()"),
    "onnx-coreml": ("recorders_onnx_coreml.md", "recording from ONNX Runtime and CoreML"),
    "triage": ("triage.md", "trace triage: transplant bisection, local vs propagated error, component tables"),
    "layout": ("layout.md", "where things are: the steptrace package, its layers, tui by role, the import rules"),
}
HELP = "show the documentation that ships with steptrace"
EPILOG = """\
examples:
  trace docs                 list the documents
  trace docs differ | less   read one
  trace docs format --path   where the installed file is
"""


@dataclass(frozen=True)
class DocsOutcome:
    """``trace docs`` never finds a mismatch."""

    mismatch: bool = False


def doc_text(topic: str) -> str:
    """The text of document ``topic`` (a key of :data:`TOPICS`).

    Raises:
        TraceUsageError: an unknown topic, or a package installed without its documents.
    """
    if topic not in TOPICS:
        raise TraceUsageError(f"no document {topic!r}; topics: {', '.join(TOPICS)}")
    f = resources.files("steptrace.tui") / "docs" / TOPICS[topic][0]
    try:
        return f.read_text(encoding="utf-8")
    except OSError:
        raise TraceUsageError(f"{TOPICS[topic][0]} is not installed with this package (tui/docs is missing); read "
                              "it in the docs/ folder of the steptrace source") from None


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``docs`` on ``subparsers``; returns the new parser."""
    p = subparsers.add_parser("docs", help=HELP, description=HELP + ".", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("topic", nargs="?", choices=list(TOPICS), metavar="TOPIC",
                   help=f"one of {', '.join(TOPICS)} (default: list them)")
    p.add_argument("--path", action="store_true", help="print the installed file's path instead of its text")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> DocsOutcome:
    """Print the list of documents, one document, or its path.

    Raises:
        TraceUsageError: an unknown topic, or documents missing from the installation.
    """
    if args.topic is None:
        width = max(map(len, TOPICS))
        lines = [f"  {t:<{width}}  {what}" for t, (_, what) in TOPICS.items()]
        sys.stdout.write("documents (trace docs TOPIC):\n" + "\n".join(lines) + "\n")
        return DocsOutcome()
    text = doc_text(args.topic)
    if args.path:
        sys.stdout.write(f"{resources.files('steptrace.tui') / 'docs' / TOPICS[args.topic][0]}\n")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return DocsOutcome()
