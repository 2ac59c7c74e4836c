"""The ``trace`` command: info, validate, import, export, diff, record, view, demo, docs.

Exit codes are decided in one place, :func:`exit_code`: 0 success or equivalent, 1 mismatch
found, 2 usage or format error. Diagnostics go to stderr so stdout stays pipeable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from steptrace.tracefmt import TraceError, __version__
from steptrace.tui.render.wording import plural

if TYPE_CHECKING:  # rich is imported where a command prints with it (`trace record` off a terminal never does)
    from rich.console import Console

EXIT_OK = 0
EXIT_MISMATCH = 1
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Outcome:
    """What a command did, for :func:`exit_code`: ``mismatch`` means a difference was found."""

    mismatch: bool = False


class HasMismatch(Protocol):
    """Any command result with a ``mismatch`` flag (``Outcome``, ``DiffOutcome``)."""

    mismatch: bool


def exit_code(outcome: HasMismatch | None = None, error: BaseException | None = None) -> int:
    """Map a command's outcome or error to the process exit code (the only such mapping).

    Args:
        outcome: the command's result when it finished.
        error: the exception it raised, if any.

    Returns:
        0 ok/equivalent, 1 mismatch, 2 usage or format error (every TraceError), 130 interrupted;
        ``trace record`` passes on the exit status of a recorded script that failed.
    """
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    status = getattr(outcome, "exit_status", 0) if error is None else 0
    if status:
        return int(status)
    if error is not None:
        return EXIT_ERROR
    if outcome is not None and outcome.mismatch:
        return EXIT_MISMATCH
    return EXIT_OK


#: Longest diagnostic printed: a damaged file cannot make a message quote megabytes of it.
MAX_MESSAGE = 2000


def say(label: str, style: str, message: str) -> None:
    """Print ``label: message`` to stderr; the message is shown verbatim (no rich markup), cut
    to :data:`MAX_MESSAGE` characters."""
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 40] + f" ... ({len(message) - MAX_MESSAGE + 40:,} characters cut)"
    from rich.text import Text

    from steptrace.tui.render.console import stderr_console

    stderr_console().print(Text.assemble((f"{label}: ", style), message), soft_wrap=True)


def json_safe(value: object) -> object:
    """Return ``value`` with NaN and ±Inf floats as the strings "nan", "inf", "-inf" (SPEC.md §6),
    so that the JSON printed is standard JSON."""
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _progress_callback(
    label: str, *, total: bool = False
) -> tuple[Callable[[int, int], None] | None, Callable[[], None]]:
    """Return (callback, stop) drawing a rich progress line on stderr when it is a terminal.

    The callback takes (lines done, bytes read), or (lines done, lines in all) with ``total``.
    """
    from steptrace.tui.render.console import stderr_console

    console = stderr_console()
    if not console.is_terminal:
        return None, lambda: None
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                        transient=True)
    task = progress.add_task(label)
    progress.start()

    def update(lines: int, second: int) -> None:
        what = f"of {second:,}" if total else f"lines, {second / 1e6:,.1f} MB"
        progress.update(task, description=f"{label}: {lines:,} {what}")

    return update, progress.stop


# ---------------------------------------------------------------------- commands
def stdout_console() -> Console:
    """The console for reports on stdout: fitted to the terminal, or off a terminal (a pipe, a
    file, a CI log) plain text as wide as its content, so nothing is cut."""
    from rich.console import Console

    con = Console()
    if con.is_terminal:
        return con
    return Console(width=1 << 14, color_system=None, highlight=False, emoji=False)


def cmd_info(args: argparse.Namespace) -> Outcome:
    """``trace info TRACE [--json] [--all]``."""
    from steptrace.tracefmt import TraceReader
    from steptrace.tracefmt.validate import summarize

    with TraceReader(args.trace) as reader:
        info = summarize(reader)
    if args.json:
        sys.stdout.write(json.dumps(json_safe(info), indent=2, default=str, allow_nan=False) + "\n")
    else:
        from steptrace.tui.render.info import render_info

        render_info(info, stdout_console(), every=args.all)
    return Outcome()


def cmd_validate(args: argparse.Namespace) -> Outcome:
    """``trace validate TRACE [--deep] [--strict]``."""
    from steptrace.tracefmt.errors import TraceCorruptError
    from steptrace.tracefmt.validate import validate

    report = validate(args.trace, deep=args.deep)
    for w in report.warnings:
        say("warning", "yellow", w)
    if not report.ok:
        for p in report.problems:
            say("problem", "red", p)
        raise TraceCorruptError(f"{report}")
    if args.strict and not report.complete:
        raise TraceCorruptError(f"{report} (--strict refuses incomplete traces)")
    stdout_console().print(str(report), highlight=False)
    return Outcome()


def cmd_import(args: argparse.Namespace) -> Outcome:
    """``trace import jsonl IN OUT``."""
    from steptrace.tracefmt.jsonl import import_jsonl

    update, stop = _progress_callback(f"importing {args.input}")
    try:
        summary = import_jsonl(
            args.input, args.output, mode="overwrite" if args.overwrite else "create", k=args.k,
            keep_logits=args.keep_logits, progress=update,
        )
    finally:
        stop()
    stdout_console().print(str(summary), highlight=False)
    return Outcome()


def cmd_export(args: argparse.Namespace) -> Outcome:
    """``trace export TRACE --format jsonl|parquet -o OUT``."""
    if args.format == "jsonl":
        from steptrace.tracefmt.jsonl import export_jsonl

        update, stop = _progress_callback(f"exporting {args.trace}", total=True)
        try:
            lines = export_jsonl(args.trace, args.output, progress=update, overwrite=args.overwrite)
        finally:
            stop()
        stdout_console().print(f"wrote {plural(lines, 'line')} to {args.output}", highlight=False)
    else:
        from steptrace.tracefmt.export import export_parquet

        files = export_parquet(args.trace, args.output, overwrite=args.overwrite)
        stdout_console().print(f"wrote {', '.join(files.values())}", highlight=False)
    return Outcome()


# ---------------------------------------------------------------------- parser
INFO_EPILOG = """\
examples:
  trace info run.trace                  metadata, heads, tensors in execution order (long lists folded)
  trace info run.trace --all            every tensor name, one row each
  trace info run.trace --json | jq '.tensor_names[].name'
  trace info run.trace | cat            plain text at full width (nothing cut off a terminal)
docs: `trace docs format` (the trace format), `trace docs` (all documents)
"""
VALIDATE_EPILOG = """\
examples:
  trace validate run.trace              layout, schemas, keys, digests of the metadata (fast)
  trace validate run.trace --deep       also inflate every stored tensor and check its digest
  trace validate run.trace --strict     an interrupted recording is an error too (for CI)
  for t in runs/*.trace; do trace validate --strict "$t" || echo "bad: $t"; done
docs: `trace docs format` (SPEC.md: what a valid trace is)
"""
IMPORT_EPILOG = """\
examples:
  trace import jsonl trt_run.jsonl trt.trace
  trace import jsonl trt_run.jsonl.zst trt.trace --overwrite
  trace import jsonl cpp_logits.jsonl cpp.trace -k 16 --keep-logits   (lines with full logits)
  my_runtime --dump-steps | zstd > run.jsonl.zst && trace import jsonl run.jsonl.zst run.trace
docs: `trace docs format` (SPEC.md §6: the JSONL lines a runtime writes)
"""
EXPORT_EPILOG = """\
examples:
  trace export run.trace --format jsonl -o run.jsonl
  trace export run.trace --format jsonl -o run.jsonl.zst --overwrite
  trace export run.trace --format parquet -o run.parquet/
  python -c "import polars as pl; print(pl.read_parquet('run.parquet/decisions.parquet'))"
docs: `trace docs format` (SPEC.md §6 JSONL, §7 reading with Polars and DuckDB)
"""


COMMANDS = ("info", "validate", "import", "export", "diff", "record", "triage", "view", "demo", "docs")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """Return the argument parser of the ``trace`` command and its subcommands.

    Args:
        only: a command name: build that subcommand alone (``main`` passes the command it runs,
            so ``trace record`` imports no other command's module); None or an unknown name:
            every subcommand (for ``trace --help`` and the error that lists them).
    """
    if only not in COMMANDS:
        only = None

    def want(name: str) -> bool:
        return only is None or only == name

    parser = argparse.ArgumentParser(
        prog="trace",
        description="steptrace: record inference runs step by step, diff them, find the first divergence.",
        epilog="Exit codes: 0 ok/equivalent, 1 mismatch found, 2 usage or format error.",
    )
    parser.add_argument("--version", action="version", version=f"steptrace {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    if want("info"):
        _add_info(sub)
    if want("validate"):
        _add_validate(sub)
    if want("import"):
        _add_import(sub)
    if want("export"):
        _add_export(sub)
    if want("diff"):
        from steptrace.tui.commands import diff as diffcmd

        diffcmd.add_parser(sub).set_defaults(func=diffcmd.run)
    if want("record"):
        from steptrace.tui.commands import record as recordcmd

        recordcmd.add_parser(sub).set_defaults(func=recordcmd.run)
    if want("triage"):
        from steptrace.tui.commands import triage as triagecmd

        triagecmd.add_parser(sub).set_defaults(func=triagecmd.run)
    if want("view"):
        from steptrace.tui.commands import view as viewcmd  # argparse only: textual is imported when `view` runs

        viewcmd.add_parser(sub)
    if want("demo"):
        from steptrace.tui.commands import demo as democmd  # argparse only: onnxruntime is imported when `demo` runs

        democmd.add_parser(sub)
    if want("docs"):
        from steptrace.tui.commands import docs as docscmd

        docscmd.add_parser(sub)
    return parser


def _add_info(sub: argparse._SubParsersAction) -> None:
    from steptrace.tui.render.info import FOLD_OVER

    p = sub.add_parser("info", help="show what a trace holds", description="Show a trace's metadata, parts, "
                       "samples, steps, heads, tensor names (in execution order) and sizes, and whether it is "
                       "complete.", epilog=INFO_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="trace directory")
    p.add_argument("--json", action="store_true", help="print JSON to stdout instead of tables")
    p.add_argument("--all", action="store_true", help=f"list every tensor name (past {FOLD_OVER} names, names that "
                   "differ only in their numbers are folded into one row)")
    p.set_defaults(func=cmd_info)


def _add_validate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a trace against SPEC.md",
                       description="Check a trace against SPEC.md. Exit 0 if valid (an interrupted recording "
                       "is valid but reported incomplete), 2 if truncated, corrupt, foreign or of a newer format.",
                       epilog=VALIDATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="trace directory")
    p.add_argument("--deep", action="store_true", help="also inflate every stored tensor and check its digest")
    p.add_argument("--strict", action="store_true", help="treat an incomplete trace as an error (exit 2)")
    p.set_defaults(func=cmd_validate)


def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import", help="convert JSONL from another runtime into a trace",
                       description="Import JSON Lines (SPEC.md §6; .jsonl or .jsonl.zst) written by a runtime "
                       "without Arrow (C++ TensorRT, Rust, Swift) into a trace.", epilog=IMPORT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source_format", choices=["jsonl"], help="input format")
    p.add_argument("input", help="the .jsonl or .jsonl.zst file")
    p.add_argument("output", help="trace directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace at OUTPUT")
    p.add_argument("-k", type=int, default=8, help="top-k kept for lines with full logits (default 8)")
    p.add_argument("--keep-logits", action="store_true", help="also store full logits as tensors logits:HEAD")
    p.set_defaults(func=cmd_import)


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write a trace as JSONL or Parquet",
                       description="Export a trace as JSON Lines (SPEC.md §6; .zst suffix compresses) or as a "
                       "folder of Parquet files (decisions, tensors with raw values, vocab, metadata).",
                       epilog=EXPORT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", help="trace directory")
    p.add_argument("--format", required=True, choices=["jsonl", "parquet"], help="output format")
    p.add_argument("-o", "--output", required=True, help="output file (jsonl) or folder (parquet)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file (jsonl) or write into "
                   "an existing folder (parquet)")
    p.set_defaults(func=cmd_export)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trace`` command; returns (and exits with) the exit code from :func:`exit_code`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        outcome = args.func(args)
        code = exit_code(outcome)
    except TraceError as exc:
        say("error", "bold red", str(exc))
        code = exit_code(error=exc)
    except KeyboardInterrupt as exc:
        sys.stderr.write("interrupted\n")
        code = exit_code(error=exc)
    except BrokenPipeError:  # stdout closed early by `| head`: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_OK
    return code


if __name__ == "__main__":
    sys.exit(main())
