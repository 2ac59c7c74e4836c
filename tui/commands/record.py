"""``trace record -o OUT [options] script.py [args ...]`` (or ``-m module [args ...]``): record an
unmodified script with :func:`recorders.script.run_script`.

``tui/cli.py`` registers the command with :func:`add_parser` and maps the :class:`RecordOutcome`
to the exit code: the script's own failure counts as a mismatch (exit 1) until ``exit_code``
maps ``exit_status`` (then the script's status is the command's); TraceErrors exit 2 and
Ctrl-C 130 (the trace is closed first). A glob that matched nothing, or a run that recorded
nothing, exits 2 with the names seen (all of them, or a count, close matches and the first
ones). The script's stdout is its own; the progress line, the summary and the script's
traceback go to stderr.
"""

from __future__ import annotations

import argparse
import difflib
import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from steptrace.tracefmt.errors import TraceUsageError

if TYPE_CHECKING:
    from rich.text import Text

    from steptrace.recorders.script import ScriptResult

HELP = "record an unmodified PyTorch / ONNX Runtime script, step by step"
DESCRIPTION = """\
Run a Python script (or -m module) in-process, unmodified, and record it into a trace.

Global torch module hooks and patched ONNX Runtime sessions are installed when the script imports
torch / onnxruntime. Names are ROOT.path whatever the call order: ROOT is the class of the outermost
module called (Encoder, Encoder#1 for a second one) or an ONNX model's file stem, path its
named_modules() path or ONNX value name (Encoder.layers.0, decoder.logits). A glob matches the full
name or the path after ROOT (head selects GRULM.head; Encoder.* only the encoder's modules).
Modules and ONNX values matching --modules are recorded under --tensors. Each call of the module
(or tuple element, e.g. GRULM.0, or ONNX session output) matching --logits is a step: its last
position's argmax is the decision. A glob that matches nothing, or a run that records nothing,
exits 2 and lists the names seen.

Samples: --sample-per MODULE starts a sample at each call of MODULE (or run of an ONNX model of
that stem), with ids 0, 1, 2, ... or the lines of --sample-from FILE, in call order, so a
reference and a candidate run over the same corpus line up. Without it the id is --sample (0),
or $STEPTRACE_SAMPLE when the script sets it (os.environ[...] = "utt2") before its steps.

--scores prob decides log(p) of an output that holds probabilities (a softmax); --scores logprob
takes log-probabilities as they are. Without it, an output whose rows lie in [0, 1] and sum to 1
gets a note.

--all-positions decides every position of that output instead, one step per position (CTC frames,
VAD chunks: the call's tensors stay at its first step); the head is then written to the manifest as
open-loop (ids not fed back), unless --open-loop names the open-loop heads itself.

--teacher REF cannot change the script's control flow: it replaces the logits the script receives
by a copy whose decided position is -inf except at the reference's token (forced=true in the trace,
with the run's own argmax), so a greedy or sampling script follows the reference's tokens.

Ctrl-C, sys.exit and the script's exceptions leave a valid, closed trace; the script's traceback is
shown and its exit status is reported.
"""
EPILOG = """\
examples:
  trace record -o ref.trace --logits head --modules '*' decode.py --steps 32
  trace record -o cand.trace --logits logits --modules '*' --teacher ref.trace decode_onnx.py
  trace record -o run.trace --logits lm_head -m mypkg.generate --prompt "hello"
  trace record -o ref.trace --logits head --sample-per Encoder --sample-from utts.txt asr.py utts.txt
  trace record -o p.trace --logits softmax_out --scores prob decode.py
  trace diff ref.trace cand.trace
docs: `trace docs record-script`
"""


@dataclass
class RecordOutcome:
    """What ``trace record`` did: the script's exit status (``mismatch`` when it failed)."""

    mismatch: bool
    exit_status: int
    steps: int
    path: str


def _globs(values: list[str] | None) -> list[str]:
    """Repeatable, comma-separated globs -> one list."""
    return [g.strip() for v in values or [] for g in v.split(",") if g.strip()]


def _command(args: argparse.Namespace, target: list[str]) -> list[str]:
    """The command line as the user would type it, for the trace's metadata."""
    cmd = ["trace", "record", "-o", str(args.output)]
    cmd += [f"--modules={g}" for g in args.modules or []] + [f"--logits={g}" for g in args.logits or []]
    cmd += [f"--sample-per={g}" for g in args.sample_per or []]
    cmd += ["--sample-from", args.sample_from] if args.sample_from else []
    cmd += ["--scores", args.scores] if args.scores != "logits" else []
    cmd += ["--tensors", args.tensors] + (["--teacher", args.teacher] if args.teacher else [])
    cmd += (["--all-positions"] if args.all_positions else []) + [f"--open-loop={h}" for h in args.open_loop or []]
    return cmd + (["-m"] if args.module is not None else []) + target


def sample_ids(path: str) -> list[str]:
    """The sample ids of a ``--sample-from`` file: one per non-blank line, stripped.

    Raises:
        TraceUsageError: the file cannot be read or holds no id.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TraceUsageError(f"cannot read the --sample-from file {path}: {exc}") from exc
    ids = [line.strip() for line in text.splitlines() if line.strip()]
    if not ids:
        raise TraceUsageError(f"the --sample-from file {path} holds no sample id (one per line)")
    return ids


#: Names listed in full by :func:`names_seen` up to this many.
NAMES_SHOWN = 40


def names_seen(names: list[str], globs: list[str], relative: dict[str, str] | None = None) -> str:
    """The names a run saw, for a message about globs that matched none of them: every name
    when there are at most ``NAMES_SHOWN``, else a count, close matches of each glob (difflib,
    case-insensitive, over full names and names after the root) and the first names.

    Args:
        names: names seen, in the order first seen.
        globs: the globs that matched nothing.
        relative: full name -> name after its root's label.

    Returns:
        One line of text.
    """
    if not names:
        return "no module was called and no ONNX session was run"
    relative = relative or {}
    by_lower: dict[str, str] = {}
    for n in names:
        for key in (n, relative.get(n, "")):
            if key:
                by_lower.setdefault(key.lower(), n)
    close: list[str] = []
    for g in globs:
        for hit in difflib.get_close_matches(g.lower(), list(by_lower), n=3, cutoff=0.6):
            if by_lower[hit] not in close:
                close.append(by_lower[hit])
    mean = f"did you mean {', '.join(close)}? " if close else ""
    if len(names) <= NAMES_SHOWN:
        return f"{mean}names seen: {', '.join(names)}"
    return (f"{mean}{len(names):,} names seen, the first {NAMES_SHOWN}: {', '.join(names[:NAMES_SHOWN])}, … "
            "(trace info on a recording with --modules '*' lists the recorded ones)")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``record`` with all its options on ``subparsers``; returns the new parser."""
    p = subparsers.add_parser("record", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              usage="trace record -o OUT [options] (script.py | -m module) [args ...]")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="trace directory to create")
    p.add_argument("--modules", action="append", metavar="GLOB",
                   help="record torch modules / ONNX values matching GLOB (repeatable, or comma-separated)")
    p.add_argument("--logits", action="append", metavar="GLOB",
                   help="module, output element (NAME.0, NAME.logits) or ONNX output whose last position is "
                        "decided at each call; each call is a step (repeatable)")
    p.add_argument("--tensors", choices=["stats", "full", "none"], default="stats",
                   help="capture of --modules matches: statistics and digest (default), values too, or nothing")
    p.add_argument("--teacher", metavar="REF", help="reference trace whose tokens the logits are forced to")
    p.add_argument("--all-positions", action="store_true",
                   help="decide every position of a [.., T, V] --logits output, one step per position (CTC frames, "
                        "VAD chunks); the head is then open-loop unless --open-loop says otherwise")
    p.add_argument("--open-loop", action="append", metavar="HEAD",
                   help="decision head whose ids are not fed back into the model, written to the manifest "
                        "(repeatable; the decided head is 'token'; --open-loop= declares none)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing trace at OUT")
    p.add_argument("--sample", default="0", metavar="ID", help="sample id unless the script sets $STEPTRACE_SAMPLE")
    p.add_argument("--sample-per", action="append", metavar="MODULE",
                   help="each call of a module (or ONNX model stem) matching this glob starts a new sample: "
                        "ids 0, 1, ... in call order (repeatable)")
    p.add_argument("--sample-from", metavar="FILE",
                   help="ids of the --sample-per samples, one per line, in call order")
    p.add_argument("--scores", choices=["logits", "prob", "logprob"], default="logits",
                   help="what the --logits output holds: logits (default), probabilities (log(p) is decided) "
                        "or log-probabilities")
    p.add_argument("-k", type=int, default=8, help="top-k candidates kept per decision (default 8)")
    p.add_argument("--writer", choices=["auto", "thread", "process"], default="auto",  # recorders.scripthooks.WRITERS
                   help="make statistics, digests and files in a writer process of its own, which never holds "
                        "the script's GIL, or in a background thread of this one; auto (default): a process when "
                        "--modules records tensors (on POSIX systems), a thread otherwise")
    p.add_argument("-m", dest="module", nargs=argparse.REMAINDER, metavar="MODULE",
                   help="run a module as `python -m MODULE [args ...]` does (the rest of the line is its)")
    p.add_argument("target", nargs=argparse.REMAINDER, metavar="script.py [args ...]",
                   help="the script and its arguments (after -m: the module's arguments)")
    return p


class _Stderr:
    """Where ``trace record`` writes its notes and summary: the rich stderr console on a terminal
    (the progress line, colours); off one, plain lines on ``sys.stderr``, as that console writes
    them there, without importing rich (~20 ms of every recording's start)."""

    def __init__(self) -> None:
        self.console = None
        if sys.stderr.isatty():
            from steptrace.tui.render.console import stderr_console

            self.console = stderr_console()

    def line(self, text: str, label: str = "", style: str = "") -> None:
        """Write ``label`` (in ``style``) then ``text`` verbatim (no markup) on one line."""
        if self.console is None:
            sys.stderr.write(f"{label}{text}\n")
            sys.stderr.flush()
            return
        from rich.text import Text

        self.console.print(Text.assemble((label, style), text) if label else Text(text, style=style))


class _Line:
    """The progress line: steps recorded and time, redrawn by rich.live on its own thread."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.steps = 0
        self.t0 = time.monotonic()

    def update(self, steps: int) -> None:
        self.steps = steps

    def __rich__(self) -> Text:
        from rich.text import Text

        return Text(f"● recording {self.label}: {self.steps:,} steps, {time.monotonic() - self.t0:,.0f} s", style="dim")


def run(args: argparse.Namespace) -> RecordOutcome:
    """Run ``trace record``: the script runs with its own stdout; notes go to stderr.

    Raises:
        TraceError: a usage error (no script, an existing trace, a missing reference, a glob
            that matched nothing, a run that recorded nothing) or a recording failure (exit 2).
        KeyboardInterrupt: after Ctrl-C, once the trace is closed (exit 130).
    """
    from steptrace.recorders.script import run_script

    target = list(args.module if args.module is not None else args.target)
    if target[:1] == ["--"]:
        target = target[1:]
    if not target:
        raise TraceUsageError("give the script to record (trace record -o OUT script.py [args ...]) or -m MODULE")
    name, script_args = target[0], target[1:]
    sample_per = _globs(args.sample_per)
    if args.sample_from and not sample_per:
        raise TraceUsageError("--sample-from names the samples that --sample-per MODULE starts; give --sample-per too")
    ids = sample_ids(args.sample_from) if args.sample_from else None
    label = f"-m {name}" if args.module is not None else name
    err = _Stderr()
    line = _Line(label)
    live = None
    if err.console is not None:
        from rich.live import Live

        live = Live(line, console=err.console, refresh_per_second=4, transient=True,
                    redirect_stdout=sys.stdout.isatty(), redirect_stderr=True)
        live.start()
    # Freeze what this process holds before the script runs (steptrace, pyarrow, rich), so the
    # script's full garbage collections never walk our objects, and fewer of them run (in
    # bench_record.py's script workload: 2 full collections instead of 3 with --logits, 3
    # instead of 4 with --modules '*', ~50 ms each); unfrozen once it ends, so nothing leaks
    frozen = gc.get_freeze_count() == 0
    if frozen:
        gc.freeze()
    try:
        result = run_script(name, script_args, trace=args.output, module=args.module is not None,
                            modules=_globs(args.modules), logits=_globs(args.logits), tensors=args.tensors,
                            teacher=args.teacher, overwrite=args.overwrite, sample=args.sample,
                            sample_per=sample_per, sample_ids=ids, scores=args.scores, k=args.k,
                            all_positions=args.all_positions, writer=args.writer,
                            open_loop=None if args.open_loop is None else _globs(args.open_loop),
                            command=_command(args, target), progress=line.update)
    finally:
        if frozen:
            gc.unfreeze()
        if live is not None:
            live.stop()
    if result.traceback:
        sys.stderr.write(result.traceback if result.traceback.endswith("\n") else result.traceback + "\n")
    for note in result.notes:
        err.line(note, "note: ", "yellow")
    s = result.summary
    err.line(f"recorded {result.steps:,} steps ({s.decisions:,} decisions, {s.tensors:,} tensors, "
             f"{s.file_bytes / 1e6:,.1f} MB) into {args.output}")
    if result.interrupted:
        raise KeyboardInterrupt
    if result.status:
        err.line(f"{label} exited with status {result.status}", style="red")
    else:
        _check_matches(result, args)
    return RecordOutcome(mismatch=result.status != 0, exit_status=result.status, steps=result.steps,
                         path=str(args.output))


def _check_matches(result: ScriptResult, args: argparse.Namespace) -> None:
    """Refuse a run whose globs matched nothing or that recorded nothing (the trace is kept).

    Raises:
        TraceUsageError: a --logits, --modules or --sample-per glob matched nothing, or no
            decision and no tensor was recorded.
    """
    missed = [(opt, globs, what) for opt, globs, what in (
        ("--logits", result.unmatched_logits, "module, output element or session output, so it decided nothing"),
        ("--modules", result.unmatched_modules if args.tensors != "none" else [], "module or ONNX value"),
        ("--sample-per", result.unmatched_sample_per, "module or ONNX model, so it started no sample"),
    ) if globs]
    if missed:
        text = "; ".join(f"{opt} {', '.join(globs)} matched no {what}" for opt, globs, what in missed)
        every = [g for _, globs, _ in missed for g in globs]
        raise TraceUsageError(f"{text}. {names_seen(result.names, every, result.relative)}")
    if result.summary.decisions == 0 and result.summary.tensors == 0:
        hint = ("give --logits MODULE (the module or output whose last position is decided at each step)"
                if not _globs(args.logits) else "the --logits module was never called")
        raise TraceUsageError(f"nothing was recorded into {args.output} (no decision, no tensor): {hint}. "
                              f"{names_seen(result.names, _globs(args.logits), result.relative)}")
