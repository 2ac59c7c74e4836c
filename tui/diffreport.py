"""Rich rendering of a :class:`differ.DiffReport`: the first screen answers the question (verdict,
first divergence with both tokens, margins, ranks, watched tokens, culprit, drift onset), then
the summary table, the samples, culprit clusters and candidate-vs-candidate checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from differ import DiffReport, FirstDivergence, NearTieEvidence, PairReport

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


def first_screen(report: DiffReport) -> Panel:
    """The panel that answers "where do the runs part, and why?"."""
    w = report.worst
    lines: list[Text | Table] = [
        Text.assemble(("Verdict: ", "bold"), (report.verdict.upper(), STYLE.get(report.verdict, "")),
                      f"   (fail-on {report.fail_on}: {'MISMATCH' if report.mismatch else 'ok'})"),
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
    lines.append(Text(f"Identical sequences on {w.sequences.get('identical', 0):,} / {n:,} samples"
                      f" ({w.alignment['mode']} alignment{', teacher-forced' if w.alignment.get('teacher_forced') else ''})"))
    return Panel(Group(*lines), title="steptrace diff", border_style=STYLE.get(report.verdict, "white"))


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
        counts = "/".join(str(s.get(k, 0)) for k in ("identical", "equivalent", "drift", "flip", "divergent", "missing"))
        t.add_row(
            c.candidate.path, Text(c.verdict, style=STYLE.get(c.verdict, "")), counts,
            f"{c.sequences.get('identical', 0)}/{s.get('total', 0)}", _pct(c.decisions.get("top1_agreement")),
            _pct(c.sequences.get("token_error_rate")), _pct(c.sequences.get("wer")),
            _num(c.decisions.get("kld", {}).get("mean")), f"{c.tensors.get('beyond', 0)}/{c.tensors.get('compared', 0)}",
        )
    return t


def samples_table(c: PairReport, rows: int) -> Table:
    """The worst samples of one candidate (worst verdict first, then earliest divergence)."""
    order = {"missing": 0, "divergent": 1, "flip": 2, "drift": 3, "equivalent": 4, "identical": 5}
    ps = sorted(c.per_sample, key=lambda p: (order[p.verdict], p.first_step if p.first_step is not None else 1 << 30))
    t = Table(title=f"Samples ({c.candidate.path}, {min(rows, len(ps))} of {len(ps)})", title_justify="left")
    for col in ("sample", "verdict", "first step", "head", "steps ref/cand", "mismatches", "drift from", "culprit"):
        t.add_column(col)
    for p in ps[:rows]:
        t.add_row(p.sample + (f" (only in {p.only_in})" if p.only_in else ""), Text(p.verdict, style=STYLE.get(p.verdict, "")),
                  _num(p.first_step, "d") if p.first_step is not None else "–", p.head or "–",
                  f"{p.a_steps}/{p.b_steps}", str(p.mismatches),
                  _num(p.drift_step, "d") if p.drift_step is not None else "–", p.culprit or "–")
    return t


def render(report: DiffReport, console: Console, *, rows: int = 20) -> None:
    """Print the whole report: first screen, summary, samples, clusters, cross-checks, notes."""
    console.print(first_screen(report))
    console.print(summary_table(report))
    w = report.worst
    if w.samples.get("total", 0) > 1:
        console.print(samples_table(w, rows))
    for c in report.candidates:
        if c.culprits:
            t = Table(title=f"Culprit clusters ({c.candidate.path})", title_justify="left")
            t.add_column("first tensor beyond tolerance")
            t.add_column("samples", justify="right")
            for cl in c.culprits[:10]:
                t.add_row(cl["name"], str(cl["samples"]))
            console.print(t)
        h = c.first_divergence_histogram
        if h["counts"] and sum(h["counts"]) > 1:
            peak = max(h["counts"])
            console.print(Text(f"First-divergence steps ({c.candidate.path}):", style="bold"))
            for lo, hi, n in zip(h["edges"][:-1], h["edges"][1:], h["counts"]):
                if n:
                    console.print(f"  {lo:>6}–{hi - 1:<6} {'█' * max(1, round(30 * n / peak))} {n}")
        for name, wt in c.watched.items():
            if wt.get("lost"):
                fixed = ", ".join(f"{k}: {v}" for k, v in wt["fixed_by_bias"].items())
                console.print(f"[bold]{name}[/] lost at {wt['lost']} first divergences; a bias would fix — {fixed}")
        mp = c.tensors.get("mapping", {})
        if mp.get("guessed"):
            console.print(f"[yellow]note:[/] tensor names were matched by a guess (execution order + shape): "
                          f"{len(mp.get('names', {}))} pairs; confirm with --save-mapping FILE and --mapping FILE")
        if c.alignment.get("approximate_samples"):
            console.print(f"[yellow]note:[/] resync paired {len(c.alignment['approximate_samples'])} long samples by position")
        if not c.candidate.complete:
            console.print(f"[yellow]note:[/] {c.candidate.path} is incomplete (its recording was interrupted)")
    if not report.reference.complete:
        console.print(f"[yellow]note:[/] {report.reference.path} is incomplete (its recording was interrupted)")
    for x in report.cross:
        console.print(f"[bold]{'≡' if x.identical else '≠'}[/] {x}")


@contextmanager
def progress_bar(console: Console, *, enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """Yield a ``progress(stage, done, total)`` callback drawing a rich bar on ``console``
    (stderr), or None when disabled."""
    if not enabled:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        tasks: dict[str, int] = {}

        def cb(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done, total=total)

        yield cb
