"""StepDetailPane: the top-k of both sides side by side with logits and probability bars, the
decision statistics (margin, logsumexp, watched tokens) and every other head of the step."""

from __future__ import annotations

import math

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text
from textual.widget import Widget

from steptrace.tui.viewer.values import VERDICT_STYLE, Decision, StepDetail, TensorLine, display_piece, row_verdict

_EIGHTHS = " ▏▎▍▌▋▊▉"


def bar(p: float, width: int) -> str:
    """A horizontal bar of ``p`` (0..1) in ``width`` cells, in eighths of a cell."""
    if not math.isfinite(p) or p <= 0:
        return ""
    n = min(p, 1.0) * width * 8
    full, part = int(n // 8), int(n % 8)
    return "█" * full + (_EIGHTHS[part] if part and full < width else "")


def _piece(p: str | None) -> str:
    return display_piece(p)


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


def _verdict(ln: TensorLine) -> Text:
    c = ln.compare
    if c is None:
        v = Text("only A" if ln.b is None else ("only B" if ln.a is None else "–"), style="yellow")
    else:
        v = Text("exact" if c.bitexact else ("ok" if c.within else "✗ " + (c.reason or "beyond")),
                 style="green" if c.within else "bold red")
    if ln.culprit:
        v.append(" ◀ culprit", style="bold red")
    return v


def _tensors(d: StepDetail, width: int) -> Table:
    """The step's tensors in execution order: metrics (two traces) or statistics, culprit marked.

    Every column but the name gets the width its widest cell needs (the ``#`` column at least 4
    digits); the name takes what is left, cut with … only when it must be.
    """
    pair = d.b_label is not None
    lines = d.tensors
    num = max([len(str(ln.order)) for ln in lines] + [4])
    if pair:
        second = ["–" if ln.compare is None or ln.compare.max_abs is None else f"{ln.compare.max_abs:.3g}"
                  for ln in lines]
        third: list[Text] = [_verdict(ln) for ln in lines]
        heads = ("max|Δ|", "")
    else:
        second = ["–" if ln.a is None or ln.a.abs_max is None else f"{ln.a.abs_max:.3g}" for ln in lines]
        third = [Text(("x".join(map(str, ln.a.shape)) or "0-d") if ln.a else "",
                      style="bold red" if ln.a is not None and (ln.a.nan_count or ln.a.inf_count) else "")
                 for ln in lines]
        heads = ("|x| max", "shape")
    w2 = max([len(x) for x in second] + [len(heads[0])])
    w3 = max([x.cell_len for x in third] + [len(heads[1])])
    names = [Text(ln.name + (f" #{ln.call}" if ln.call else ""), style="bold red" if ln.culprit else "")
             for ln in lines]
    name_w = max(min(max([n.cell_len for n in names] + [6]), width - num - w2 - w3 - 4), 6)
    t = Table(box=None, padding=(0, 1, 0, 0), show_edge=False, expand=False, header_style="dim")
    t.add_column("#", style="dim", justify="right", width=num, no_wrap=True)
    t.add_column("tensor", no_wrap=True, overflow="ellipsis", width=name_w)
    t.add_column(heads[0], justify="right", width=w2, no_wrap=True)
    t.add_column(heads[1], no_wrap=True, width=w3)
    for ln, name, a, b in zip(lines, names, second, third):
        t.add_row(str(ln.order), name, a, b)
    return t


def render_detail(d: StepDetail, width: int) -> RenderableType:
    """The detail of one row as a rich renderable ``width`` cells wide."""
    r = d.row
    title = Text(no_wrap=True)
    title.append(f"step {r.step}", style="bold")
    if r.b_step is not None and r.b_step != r.a_step:
        title.append(f" (candidate step {r.b_step})")
    shown = row_verdict(r.verdict, r.after)
    if shown == "after":
        title.append(" · ")
        title.append("after the divergence (the contexts differ)", style="dim")
    elif shown:
        title.append(" · ")
        title.append(shown, style=VERDICT_STYLE.get(shown, ""))
    if d.epsilon is not None and shown in ("flip", "divergent") and d.evidence is None:
        title.append(f" · ε {d.epsilon:.3g}", style="dim")
    parts: list[RenderableType] = [title]
    if d.evidence is not None and shown in ("flip", "divergent"):
        parts.append(Text(d.evidence, style="dim", overflow="fold"))
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
    if d.pointer:
        parts.append(Text(d.pointer, style="yellow", overflow="fold"))
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
