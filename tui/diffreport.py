"""Rich rendering of a :class:`differ.DiffReport`: the first screen answers the question (verdict,
first divergence with both tokens, margins, ranks, watched tokens, culprit, drift onset), then
the summary table, the samples, culprit clusters and candidate-vs-candidate checks.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from rich import box
from rich.box import Box
from rich.console import Console, Group
from rich.measure import Measurement
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from differ import DiffReport, FirstDivergence, PairReport
from differ.corpusstats import CorpusStats, corpus_stats
from differ.gate import GateResult

from .wording import plural, ratio

STYLE = {"identical": "bold green", "equivalent": "green", "drift": "yellow", "flip": "magenta",
         "divergent": "bold red", "missing": "red"}


def _num(v: float | None, spec: str = ".3g") -> str:
    return "–" if v is None else format(v, spec)


def _tok(tok: int | None, piece: str | None) -> str:
    if tok is None:
        return "–"
    return f"{tok} {piece!r}" if piece is not None else str(tok)


def _divergence(fd: FirstDivergence) -> list[Text | Table]:
    head = f", head {fd.head}" if fd.head else ""
    title = Text.assemble(("First divergence: ", "bold"), f"sample {fd.sample}, step {fd.step}{head} — ",
                          (fd.kind, STYLE.get(fd.kind, "")))
    out: list[Text | Table] = [title]
    if fd.kind == "missing":
        out.append(Text(f"  {fd.detail}"))
    t = Table(box=None, pad_edge=False, show_header=True, header_style="dim")
    t.add_column("")
    t.add_column("token")
    t.add_column("margin", justify="right")
    t.add_column("other's token: rank, gap", justify="right")
    if fd.a_token is not None or fd.b_token is not None:
        t.add_row("reference", _tok(fd.a_token, fd.a_piece), _num(fd.a_margin),
                  f"{_num(fd.a_rank_of_b, 'd') if fd.a_rank_of_b is not None else '> top-k'}, {_num(fd.a_gap)}"
                  if fd.kind in ("flip", "divergent") else "")
        t.add_row("candidate", _tok(fd.b_token, fd.b_piece), _num(fd.b_margin),
                  f"{_num(fd.b_rank_of_a, 'd') if fd.b_rank_of_a is not None else '> top-k'}, {_num(fd.b_gap)}"
                  if fd.kind in ("flip", "divergent") else "")
        out.append(t)
    if fd.kind in ("flip", "divergent") and fd.epsilon is not None:
        out.append(Text(f"  near-tie threshold ε = {fd.epsilon:.3g} logits", style="dim"))
    for w in fd.watched:
        out.append(Text(f"  {w}"))
    if fd.culprit:
        out.append(Text.assemble(("  culprit: ", "bold"), (fd.culprit.name, "bold cyan"),
                                 f"{f' (call {fd.culprit.call})' if fd.culprit.call else ''}  {fd.culprit.metrics}"))
    elif fd.kind != "missing":
        out.append(Text("  culprit: no tensor beyond tolerance at this step"
                        " (none recorded, or the drift started earlier)", style="dim"))
    return out


def first_lines(report: DiffReport, gate: GateResult | None = None) -> list[Text | Table]:
    """The lines of the first screen: verdict (and gate), traces, first divergence, drift onset."""
    w = report.worst
    if gate is not None:
        status = (f"   (gate: {len(gate.broken):,} of {len(gate.checks):,} budgets broken: MISMATCH)" if gate.broken
                  else f"   (gate: all {len(gate.checks):,} budgets held)")
    else:
        status = f"   (fail-on {report.fail_on}: {'MISMATCH' if report.mismatch else 'ok'})"
    lines: list[Text | Table] = [
        Text.assemble(("Verdict: ", "bold"), (report.verdict.upper(), STYLE.get(report.verdict, "")), status),
        Text(f"reference  {report.reference}"),
    ]
    for c in report.candidates:
        mark = "  ← worst" if c is w and len(report.candidates) > 1 else ""
        lines.append(Text(f"candidate  {c.candidate}{mark}"))
    lines.append(Text(""))
    if w.first_divergence:
        lines += _divergence(w.first_divergence)
    else:
        lines.append(Text("No divergence: every compared step is within tolerance.", style="green"))
    if w.drift_onset:
        lines.append(Text.assemble(("Drift onset: ", "bold"), str(w.drift_onset)))
    n = w.samples.get("total", 0)
    lines.append(Text(f"Identical sequences on {ratio(w.sequences.get('identical', 0), n)} samples"
                      f" ({w.alignment['mode']} alignment{', teacher-forced' if w.alignment.get('teacher_forced') else ''})"))
    return lines


def first_screen(report: DiffReport, gate: GateResult | None = None) -> Panel:
    """The panel that answers "where do the runs part, and why?"."""
    return Panel(Group(*first_lines(report, gate)), title="steptrace diff",
                 border_style=STYLE.get(report.verdict, "white"))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def summary_table(report: DiffReport) -> Table:
    """One row per candidate: verdicts of samples and steps, agreement, error rates, tensors."""
    t = Table(title="Summary", title_justify="left")
    for col in ("candidate", "verdict", "samples id/eq/drift/flip/div/miss", "same seq", "top-1 agree", "TER",
                "WER", "KLD mean", "tensors beyond"):
        t.add_column(col, justify="right" if col not in ("candidate", "verdict") else "left")
    for c in report.candidates:
        s = c.samples
        counts = "/".join(f"{s.get(k, 0):,}" for k in ("identical", "equivalent", "drift", "flip", "divergent", "missing"))
        t.add_row(
            c.candidate.path, Text(c.verdict, style=STYLE.get(c.verdict, "")), counts,
            ratio(c.sequences.get("identical", 0), s.get("total", 0)), _pct(c.decisions.get("top1_agreement")),
            _pct(c.sequences.get("token_error_rate")), _pct(c.sequences.get("wer")),
            _num(c.decisions.get("kld", {}).get("mean")),
            ratio(c.tensors.get("beyond", 0), c.tensors.get("compared", 0)),
        )
    return t


def corpus_lines(c: PairReport, stats: CorpusStats) -> list[Text]:
    """The seeds' corpus figures of one candidate, llama.cpp style, one per line."""
    basis = c.decisions.get("kld", {}).get("basis", "topk")
    k, d, s = stats.kld, stats.dp_rms, stats.same_top1
    lines = [Text(stats.headline())]
    if s.value is not None:
        err = f" ± {100 * s.error:.2g} %" if s.error is not None else ""
        lines.append(Text(f"Same top-1: {100 * s.value:.3f} %{err} of {plural(s.n, 'step')}"))
    if k.value is not None:
        err = f" ± {k.error:.2g}" if k.error is not None else ""
        lines.append(Text(f"KLD ({'top-k' if basis == 'topk' else basis}): mean {k.value:.4g}{err}, "
                          f"p50 {k.p50:.4g}, p99 {k.p99:.4g}, max {k.max:.4g}"))
    if d.value is not None:
        err = f" ± {100 * d.error:.2g} %" if d.error is not None else ""
        lines.append(Text(f"Δp RMS: {100 * d.value:.3f} %{err} (probability of the reference's top token)"))
    return lines


def margin_table(stats: CorpusStats) -> Table:
    """Token changes next to all fresh steps, by the reference's margin (empty buckets left out)."""
    t = Table(title="Token changes by reference margin", title_justify="left")
    for col in ("reference margin", "steps", "token changes", "near-tie flips", "change rate"):
        t.add_column(col, justify="left" if col == "reference margin" else "right")
    for b in stats.buckets:
        if b.steps:
            t.add_row(b.label, f"{b.steps:,}", f"{b.changes:,}", f"{b.near_ties:,}",
                      f"{100 * b.changes / b.steps:.2f} %")
    return t


def gate_table(gate: GateResult, candidates: int) -> Table:
    """Every budget of the gate on every candidate, broken ones first."""
    t = Table(title="Gate", title_justify="left")
    if candidates > 1:
        t.add_column("candidate")
    for col in ("budget", "status", "measured"):
        t.add_column(col)
    for c in sorted(gate.checks, key=lambda x: x.ok):
        row = [c.candidate] if candidates > 1 else []
        t.add_row(*row, str(c.term), Text("ok", style="green") if c.ok else Text("BROKEN", style="bold red"), c.detail)
    return t


def samples_table(c: PairReport, rows: int) -> Table:
    """The worst samples of one candidate (worst verdict first, then earliest divergence)."""
    order = {"missing": 0, "divergent": 1, "flip": 2, "drift": 3, "equivalent": 4, "identical": 5}
    ps = sorted(c.per_sample, key=lambda p: (order[p.verdict], p.first_step if p.first_step is not None else 1 << 30))
    t = Table(title=f"Samples ({c.candidate.path}, {min(rows, len(ps)):,} of {len(ps):,})", title_justify="left")
    for col in ("sample", "verdict", "first step", "head", "steps ref/cand", "mismatches", "drift from", "culprit"):
        t.add_column(col, justify="right" if col in ("first step", "mismatches", "drift from") else "left")
    for p in ps[:rows]:
        t.add_row(p.sample + (f" (only in {p.only_in})" if p.only_in else ""), Text(p.verdict, style=STYLE.get(p.verdict, "")),
                  _num(p.first_step, "d") if p.first_step is not None else "–", p.head or "–",
                  f"{p.a_steps:,}/{p.b_steps:,}", f"{p.mismatches:,}",
                  _num(p.drift_step, "d") if p.drift_step is not None else "–", p.culprit or "–")
    return t


@dataclass
class Block:
    """One part of the report: ``panel`` (the first screen), ``table``, ``lines`` (monospace lines
    under a title, e.g. a histogram) or ``note`` (lines of text)."""

    kind: str
    body: Table | list[Text | Table]
    title: str | None = None


def blocks(report: DiffReport, *, rows: int = 20, gate: GateResult | None = None) -> list[Block]:
    """The report as blocks in reading order (each output format lays them out its own way)."""
    out = [Block("panel", first_lines(report, gate), "steptrace diff")]
    if gate is not None:
        out.append(Block("table", gate_table(gate, len(report.candidates))))
    out.append(Block("table", summary_table(report)))
    for c in report.candidates:
        stats = corpus_stats(c.steps_table)
        if stats.compared:
            out.append(Block("lines", corpus_lines(c, stats), f"Corpus figures ({c.candidate.path})"))
            if stats.changes:
                out.append(Block("table", margin_table(stats)))
    w = report.worst
    if w.samples.get("total", 0) > 1:
        out.append(Block("table", samples_table(w, rows)))
    notes: list[Text | Table] = []
    for c in report.candidates:
        if c.culprits:
            t = Table(title=f"Culprit clusters ({c.candidate.path})", title_justify="left")
            t.add_column("first tensor beyond tolerance")
            t.add_column("samples", justify="right")
            for cl in c.culprits[:10]:
                t.add_row(cl["name"], f"{cl['samples']:,}")
            out.append(Block("table", t))
        h = c.first_divergence_histogram
        if h["counts"] and sum(h["counts"]) > 1:
            peak = max(h["counts"])
            bars = [Text(f"  {lo:>6,}–{hi - 1:<6,} {'█' * max(1, round(30 * n / peak))} {n:,}")
                    for lo, hi, n in zip(h["edges"][:-1], h["edges"][1:], h["counts"]) if n]
            out.append(Block("lines", bars, f"First-divergence steps ({c.candidate.path})"))
        for name, wt in c.watched.items():
            if wt.get("lost"):
                fixed = ", ".join(f"{k}: {v:,}" for k, v in wt["fixed_by_bias"].items())
                notes.append(Text.assemble((name, "bold"), f" lost at {plural(wt['lost'], 'first divergence')}; "
                                                           f"a bias would fix — {fixed}"))
        mp = c.tensors.get("mapping", {})
        if mp.get("guessed"):
            notes.append(Text.assemble(("note: ", "yellow"), "tensor names were matched by a guess (execution order + "
                                       f"shape): {plural(len(mp.get('names', {})), 'pair')}; confirm with "
                                       "--save-mapping FILE and --mapping FILE"))
        if c.alignment.get("approximate_samples"):
            notes.append(Text.assemble(("note: ", "yellow"), f"resync paired "
                                       f"{plural(len(c.alignment['approximate_samples']), 'long sample')} by position"))
        if not c.candidate.complete:
            notes.append(Text.assemble(("note: ", "yellow"), f"{c.candidate.path} is incomplete (its recording was "
                                                             "interrupted)"))
    if not report.reference.complete:
        notes.append(Text.assemble(("note: ", "yellow"), f"{report.reference.path} is incomplete (its recording was "
                                                         "interrupted)"))
    for x in report.cross:
        notes.append(Text.assemble(("≡" if x.identical else "≠", "bold"),
                                   f" {x.a} {'≡' if x.identical else '≠'} {x.b}: identical sequences on "
                                   f"{ratio(x.identical_sequences, x.samples)}"))
    if notes:
        out.append(Block("note", notes))
    return out


FORMATS = ("rich", "text", "markdown")
#: Tables in plain text: a dashed line under the header, no other rules (paste-friendly ASCII).
PLAIN_BOX = Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)
_WIDE = 1 << 16


def render(report: DiffReport, console: Console, *, rows: int = 20, fmt: str | None = None,
           gate: GateResult | None = None) -> None:
    """Print the whole report on ``console``.

    Args:
        report: the diff.
        console: where to print.
        rows: sample rows in the samples table.
        fmt: ``rich`` (boxes and colours, fitted to the terminal), ``text`` (plain, full width,
            nothing cut) or ``markdown``; default: rich on a terminal, else text.
        gate: a checked gate to show with the verdict.
    """
    fmt = fmt or ("rich" if console.is_terminal else "text")
    if fmt != "rich":
        console.file.write(format_report(report, fmt, rows=rows, gate=gate))
        return
    for b in blocks(report, rows=rows, gate=gate):
        if b.kind == "panel":
            console.print(Panel(Group(*b.body), title=b.title, border_style=STYLE.get(report.verdict, "white")))
        elif b.kind == "table":
            console.print(b.body)
        else:
            if b.title:
                console.print(Text(f"{b.title}:", style="bold"))
            for line in b.body:
                console.print(line)


def _md_cell(cell: object) -> object:
    """A table cell with ``|`` escaped for a GitHub table."""
    if isinstance(cell, Text):
        return Text(cell.plain.replace("|", "\\|"), style=cell.style) if "|" in cell.plain else cell
    return cell.replace("|", "\\|") if isinstance(cell, str) else cell


def format_report(report: DiffReport, fmt: str, *, rows: int = 20, gate: GateResult | None = None) -> str:
    """The report as ``text`` (plain, every column at full width, nothing cut) or ``markdown``
    (tables as GitHub tables, the first screen and figures in code blocks, for PR descriptions).

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in ("text", "markdown"):
        raise ValueError(f"unknown report format {fmt!r}")
    buf = io.StringIO()
    con = Console(file=buf, width=_WIDE, color_system=None, force_terminal=False, highlight=False, emoji=False,
                  markup=False, legacy_windows=False)
    md = fmt == "markdown"

    def emit(r: Text | Table) -> None:
        width = max(1, Measurement.get(con, con.options, r).maximum)
        con.print(r, width=width, crop=False, overflow="ignore", no_wrap=True)

    def heading(title: str, level: str = "**") -> None:
        con.print(Text(f"{level}{title}{level}" if md and level == "**" else (f"{level} {title}" if md else title)))

    def fence(lines: list[Text | Table]) -> None:
        if md:
            con.print(Text("```text"))
        for ln in lines:
            emit(ln)
        if md:
            con.print(Text("```"))

    for i, b in enumerate(blocks(report, rows=rows, gate=gate)):
        if i:
            con.print(Text(""))
        if b.kind == "panel":
            heading(b.title or "", "###" if md else "")
            if not md:
                con.print(Text("=" * len(b.title or "")))
            fence(b.body)
        elif b.kind == "table":
            t = b.body
            assert isinstance(t, Table)
            if t.title:
                heading(str(t.title))
                t.title = None
                if md:
                    con.print(Text(""))
            if md:  # a | inside a cell would end it
                for col in t.columns:
                    col._cells = [_md_cell(c) for c in col._cells]
            t.box = box.MARKDOWN if md else PLAIN_BOX
            t.show_edge = md
            t.expand = False
            emit(t)
        elif b.kind == "lines":
            heading(f"{b.title}:" if not md else b.title or "")
            fence(b.body)
        else:
            for ln in b.body:
                emit(ln)
                if md:
                    con.print(Text(""))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in buf.getvalue().splitlines()))
    return text.strip("\n") + "\n"


#: Seconds between plain progress lines off a terminal.
PLAIN_EVERY = 5.0


@contextmanager
def progress_bar(console: Console, *, enabled: bool,
                 every: float = PLAIN_EVERY) -> Iterator[Callable[[str, int, int], None] | None]:
    """Yield a ``progress(stage, done, total)`` callback for ``console`` (stderr), or None when
    disabled: a rich bar on a terminal, else plain lines (``diff: tensors 1,200 / 5,000 (24 %)``)
    when a stage starts and ends and at most every ``every`` seconds between, for CI logs."""
    if not enabled:
        yield None
        return
    if not console.is_terminal:
        last: dict[str, float] = {}

        def line(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            first = stage not in last
            if not (first or done >= total or now - last[stage] >= every):
                return
            if not first and done >= total and last[stage] == -1.0:
                return
            last[stage] = -1.0 if done >= total else now
            pct = f" ({100 * done / total:.0f} %)" if total else ""
            console.file.write(f"diff: {stage} {ratio(done, total)}{pct}\n")
            console.file.flush()

        yield line
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        tasks: dict[str, int] = {}

        def cb(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done, total=total)

        yield cb
