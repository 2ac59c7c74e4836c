"""Rich rendering of a :class:`steptrace.differ.DiffReport`: the first screen answers the question (verdict,
first divergence with both tokens, margins, ranks, watched tokens, culprit, drift onset), then
the summary table, the corpus figures, the samples, culprit clusters and candidate-vs-candidate
checks. The same blocks are laid out as plain text or markdown by :mod:`steptrace.tui.render.text`.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from steptrace.differ import DiffReport, FirstDivergence, NearTieEvidence, PairReport
from steptrace.differ.corpusstats import CorpusStats, corpus_stats
from steptrace.differ.gate import GateResult

from steptrace.tui.render.progress import progress_bar
from steptrace.tui.render.styles import VERDICT_STYLE
from steptrace.tui.render.wording import plural, ratio

__all__ = ["FORMATS", "STYLE", "Block", "blocks", "first_lines", "first_screen", "progress_bar", "render"]

STYLE = VERDICT_STYLE


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
    ev = fd.evidence
    if ev is not None:
        out += _evidence(fd, ev)
    for w in fd.watched:
        out.append(Text(f"  {w}"))
    if fd.culprit:
        at = (f" (recorded at step {fd.culprit.step}: nothing beyond tolerance at step {fd.step})"
              if fd.culprit.step != fd.step else "")
        out.append(Text.assemble(("  culprit: ", "bold"), (fd.culprit.name, "bold cyan"),
                                 f"{f' (call {fd.culprit.call})' if fd.culprit.call else ''}{at}  {fd.culprit.metrics}"))
    elif fd.kind != "missing":
        out.append(Text("  culprit: no tensor beyond tolerance at this step or before it"
                        " (none recorded, or all within tolerance)", style="dim"))
    if fd.confirm_with_values:
        names = fd.confirm_with_values
        mods = " ".join(f"--modules '{n}'" for n in names[:3]) + (" ..." if len(names) > 3 else "")
        out.append(Text(f"  judged from statistics only (lower bounds; a culprit before it may hide): record "
                        f"values to confirm — {', '.join(names)} (trace record --tensors full {mods})", style="dim"))
    return out


def _evidence(fd: FirstDivergence, ev: NearTieEvidence) -> list[Text]:
    """The numbers that made this flip a near tie or a divergence, in two lines."""
    ulps = f" ({_num(ev.a_gap_ulps, '.3g')} / {_num(ev.b_gap_ulps, '.3g')} ulps of {ev.grid})"
    noise = (f"pair's noise {_num(ev.noise)} (p{ev.noise_percentile:g} of {ev.noise_steps:,} agreeing steps, "
             f"cap {ev.noise_cap:g})" if ev.noise is not None
             else f"pair's noise unmeasured ({ev.noise_steps:,} agreeing steps)")
    why = {"grid": f"both gaps within the {ev.grid} grid's ε {_num(ev.grid_epsilon)}",
           "coin_toss": f"both gaps within 0.5 % of the logit scale ({_num(ev.coin_toss)}): a coin toss",
           "noise": "the shift is within the noise this pair shows where it agrees",
           "epsilon": f"both gaps within --epsilon {_num(ev.grid_epsilon)}"}.get(ev.rule or "")
    verdict = (Text.assemble(("  near tie: ", "bold"), why) if why else
               Text.assemble(("  not a near tie: ", "bold"),
                             f"the shift exceeds the noise, the grid ε {_num(ev.grid_epsilon)} and the "
                             f"coin-toss bound {_num(ev.coin_toss)}"))
    return [Text(f"  shift needed to swap them {_num(ev.shift)} = gaps {_num(fd.a_gap)} + {_num(fd.b_gap)}{ulps}; "
                 f"{noise}", style="dim"), verdict]


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
        from steptrace.tui.render.text import format_report

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
