"""StepDetailPane: the top-k of both sides side by side with logits and probability bars, the
decision statistics (margin, logsumexp, watched tokens) and every other head of the step."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.widget import Widget

from ..viewvalues import VERDICT_STYLE, Decision, StepDetail

_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(p: float, width: int) -> str:
    """A horizontal bar of ``p`` (0..1) in ``width`` cells, in eighths of a cell."""
    if not math.isfinite(p) or p <= 0:
        return ""
    n = min(p, 1.0) * width * 8
    full, part = int(n // 8), int(n % 8)
    return "█" * full + (_EIGHTHS[part] if part and full < width else "")


def _piece(p: str | None) -> str:
    return "" if p is None else p


def _side(d: Decision | None, other: Decision | None, width: int) -> list[Text]:
    """One line per top-k entry of ``d``; the other side's token is marked."""
    if d is None:
        return [Text("no step", style="dim")]
    lines = []
    probs = d.probs()
    tok_w = max(width - 17, 6)
    for i, (tid, logit, piece) in enumerate(zip(d.topk_ids, d.topk_logits, d.topk_pieces)):
        mark = other is not None and tid == other.argmax and tid != d.argmax
        label = f"{tid} {_piece(piece)}"
        label = label[: tok_w - 1] + "…" if len(label) > tok_w else label
        style = "bold" if i == 0 else ("bold magenta" if mark else "")
        t = Text(no_wrap=True)
        t.append(f"{i} ", style="dim")
        t.append(f"{label:<{tok_w}}", style=style)
        t.append(f"{logit:7.3f} " if math.isfinite(logit) else f"{logit!s:>7} ")
        t.append(f"{bar(probs[i], 6):<6}", style="magenta" if mark else "cyan")
        lines.append(t)
    return lines


def _stats(d: Decision | None) -> Text:
    if d is None:
        return Text("")
    t = Text(no_wrap=False)
    t.append("margin ", style="dim")
    t.append(f"{d.margin:.4g}", style="bold yellow" if d.margin < 1.0 else "")
    if d.logsumexp is not None:
        t.append("  lse ", style="dim")
        t.append(f"{d.logsumexp:.4g}")
    if d.forced or d.chosen != d.argmax:
        t.append(f"  chosen {d.chosen}{' (forced)' if d.forced else ''}", style="yellow")
    for name, wid, logit, rank in d.watched:
        gap = d.topk_logits[0] - logit if logit is not None else None
        t.append(f"\n{name} ", style="dim")
        t.append(f"rank {rank}" if rank is not None else "rank ?", style="bold red" if rank == 0 else "")
        if gap is not None:
            t.append(f", {gap:.3g} below top")
    return t


def _tensors(d: StepDetail, width: int) -> Table:
    """The step's tensors in execution order: metrics (two traces) or statistics, culprit marked."""
    pair = d.b_label is not None
    t = Table(box=None, padding=(0, 1), show_edge=False, expand=False)
    t.add_column("#", style="dim", justify="right")
    t.add_column("tensor", no_wrap=True, overflow="ellipsis", max_width=max(width - 30, 12))
    if pair:
        t.add_column("max|Δ|", justify="right")
        t.add_column("", no_wrap=True)
    else:
        t.add_column("|x| max", justify="right")
        t.add_column("shape", no_wrap=True)
    for ln in d.tensors:
        name = Text(ln.name + (f" #{ln.call}" if ln.call else ""), style="bold red" if ln.culprit else "")
        if pair:
            c = ln.compare
            if c is None:
                verdict = Text("only A" if ln.b is None else ("only B" if ln.a is None else "–"), style="yellow")
            else:
                verdict = Text("exact" if c.bitexact else ("ok" if c.within else "✗ " + (c.reason or "")),
                               style="green" if c.within else "bold red")
            if ln.culprit:
                verdict.append(" ◀ culprit", style="bold red")
            t.add_row(str(ln.order), name, "–" if c is None or c.max_abs is None else f"{c.max_abs:.3g}", verdict)
        else:
            a = ln.a
            nan = a is not None and (a.nan_count or a.inf_count)
            t.add_row(str(ln.order), name, "–" if a is None or a.abs_max is None else f"{a.abs_max:.3g}",
                      Text(("x".join(map(str, a.shape)) or "0-d") if a else "", style="bold red" if nan else ""))
    return t


def render_detail(d: StepDetail, width: int) -> RenderableType:
    """The detail of one row as a rich renderable ``width`` cells wide."""
    r = d.row
    title = Text(no_wrap=True)
    title.append(f"step {r.step}", style="bold")
    if r.b_step is not None and r.b_step != r.a_step:
        title.append(f" (candidate step {r.b_step})")
    if r.verdict:
        title.append(" · ")
        title.append(r.verdict, style=VERDICT_STYLE.get(r.verdict, ""))
    if d.epsilon is not None and r.verdict in ("flip", "divergent"):
        title.append(f" · ε {d.epsilon:.3g}", style="dim")
    if r.after:
        title.append(" · after the divergence", style="dim")
    parts: list[RenderableType] = [title]
    pair = d.b_label is not None
    side_w = (width - 3) // 2 if pair else min(width, 40)
    t = Table.grid(padding=(0, 1))
    t.add_column(width=side_w, no_wrap=True)
    if pair:
        t.add_column(width=side_w, no_wrap=True)
    heads_a = d.a_heads or ((r.a,) if r.a else ())
    heads_b = d.b_heads or ((r.b,) if r.b else ())
    ma = heads_a[0] if heads_a else None
    mb = heads_b[0] if heads_b else None
    if pair:
        t.add_row(Text(d.a_label, style="bold cyan", overflow="ellipsis"),
                  Text(d.b_label or "", style="bold cyan", overflow="ellipsis"))
        la, lb = _side(ma, mb, side_w), _side(mb, ma, side_w)
        for i in range(max(len(la), len(lb))):
            t.add_row(la[i] if i < len(la) else "", lb[i] if i < len(lb) else "")
        t.add_row(_stats(ma), _stats(mb))
    else:
        t.add_row(Text(d.a_label, style="bold cyan", overflow="ellipsis"))
        for line in _side(ma, None, side_w):
            t.add_row(line)
        t.add_row(_stats(ma))
    parts.append(t)
    extra = [(x, next((y for y in heads_b if y.head == x.head), None)) for x in heads_a[1:]]
    for x, y in extra:
        s = Text(f"{x.head}: ", style="dim")
        s.append(f"{x.argmax} {_piece(x.topk_pieces[0] if x.topk_pieces else None)} (margin {x.margin:.3g})")
        if y is not None:
            s.append("  vs  ")
            s.append(f"{y.argmax} {_piece(y.topk_pieces[0] if y.topk_pieces else None)} (margin {y.margin:.3g})",
                     style="bold magenta" if y.argmax != x.argmax else "")
        parts.append(s)
    if d.tensors:
        parts.append(Text("tensors in execution order (t: pane with values)", style="dim", overflow="ellipsis"))
        parts.append(_tensors(d, width))
    return Group(*parts)


class StepDetailPane(Widget):
    """The detail of the highlighted step (updated by the app).

    A fixed-size pane redrawn in place (no layout pass per cursor move); what does not fit is
    cut — the tensors pane (``t``) lists every tensor with scrolling.
    """

    DEFAULT_CSS = """
    StepDetailPane { height: 1fr; border: round $primary-darken-2; padding: 0 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "step"
        self.detail: StepDetail | None = None

    def show(self, detail: StepDetail) -> None:
        """Render ``detail``."""
        self.detail = detail
        self.border_title = f"step {detail.row.step}"
        self.refresh()

    def render(self) -> RenderableType:
        """The detail, or a placeholder before the first one arrives."""
        if self.detail is None:
            return Text("…", style="dim")
        return render_detail(self.detail, max(self.content_region.width, 20))
