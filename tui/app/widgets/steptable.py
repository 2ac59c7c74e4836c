"""StepTable: a virtual table of steps (one trace, or reference vs candidate) for any number of rows.

It draws only the visible lines (Textual's Line API). Rows come in pages of :data:`PAGE` from a
loader called on a worker thread; until a page arrives its lines show a placeholder. A few
pages are kept (an LRU), so memory does not depend on how many steps a trace has.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from typing import ClassVar

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding, BindingType
from textual.geometry import Size
from textual.reactive import reactive
from textual.scroll_view import ScrollView
from textual.strip import Strip

from steptrace.tracefmt.errors import TraceError

from steptrace.tui.app.messages import Failed, RowHighlighted, RowsLoaded
from steptrace.tui.viewer.data import RowMap
from steptrace.tui.viewer.values import VERDICT_STYLE, Decision, StepRow, display_piece, row_verdict

PAGE = 128
MAX_PAGES = 24
#: Cells the watched-tokens column gets before the token columns grow (``eos:93/92 10.6``).
WATCHED = 15

Loader = Callable[[RowMap, int, int], list[StepRow]]


def _num(x: float | None, width: int = 7) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–".rjust(width)
    return f"{x:{width}.3f}" if abs(x) < 1000 else f"{x:{width}.3g}"


def _gap(x: float | None) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3g}"


def _cell(s: str, width: int) -> str:
    return (s[: width - 1] + "…" if len(s) > width else s).ljust(width)


def _tok(d: Decision | None, width: int, rank: int = 0) -> str:
    """``id piece`` of the top-k entry ``rank`` of ``d`` (the run's own decision for 0)."""
    if d is None or rank >= len(d.topk_ids):
        return "–".ljust(width)
    piece = d.topk_pieces[rank] if rank < len(d.topk_pieces) else None
    if rank == 0 and piece is None:
        piece = d.piece if d.chosen == d.argmax else None
    s = f"{d.topk_ids[rank]} {display_piece(piece)}"
    if rank == 0 and d.forced and d.chosen != d.argmax:
        s += f" →{d.chosen}"
    return _cell(s, width)


class StepTable(ScrollView, can_focus=True):
    """The steps of the open sample; the cursor row drives the detail pane.

    Args:
        loader: ``loader(rowmap, start, stop)`` returning rows (called on a worker thread).
    """

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("up,k", "move(-1)", "up", show=False),
        Binding("down,j", "move(1)", "down", show=False),
        Binding("pageup,b", "page(-1)", "page up", show=False),
        Binding("pagedown,space", "page(1)", "page down", show=False),
        Binding("home,less_than_sign", "edge(0)", "first", show=False),
        Binding("end,G,greater_than_sign", "edge(1)", "last", show=False),
    ]
    COMPONENT_CLASSES: ClassVar[set[str]] = {"steptable--header", "steptable--cursor", "steptable--low", "steptable--dim"}
    DEFAULT_CSS = """
    StepTable { height: 1fr; border: round $primary-darken-2; overflow-x: hidden; scrollbar-size-vertical: 1; }
    StepTable:focus { border: round $accent; }
    StepTable > .steptable--header { text-style: bold; color: $text-muted; }
    StepTable > .steptable--cursor { background: $accent 35%; }
    StepTable > .steptable--low { color: $warning; text-style: bold reverse; }
    StepTable > .steptable--dim { color: $text-muted; }
    """

    cursor = reactive(0, always_update=True, init=False)

    def __init__(self, loader: Loader, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._loader = loader
        self.rowmap: RowMap | None = None
        self.generation = 0
        self._pages: OrderedDict[int, list[StepRow]] = OrderedDict()
        self._pending: set[int] = set()
        self.painted_rows = False  # a real row has been drawn (benchmarks and tests wait on it)

    # ------------------------------------------------------------------ data
    @property
    def row_count(self) -> int:
        """Rows in the table."""
        return self.rowmap.size if self.rowmap is not None else 0

    @property
    def pair(self) -> bool:
        """Two traces are shown."""
        return self.rowmap is not None and self.rowmap.kind != "trace"

    def set_rows(self, rowmap: RowMap, row: int = 0) -> None:
        """Show ``rowmap`` with the cursor on ``row`` (pages are reloaded)."""
        self.rowmap = rowmap
        self.generation += 1
        self._pages.clear()
        self._pending.clear()
        self.virtual_size = Size(self.size.width, rowmap.size + 1)
        label = f" · {rowmap.filter_label}" if rowmap.filter_label else ""
        self.border_title = f"{rowmap.sample} — {rowmap.size:,} rows{label}"
        self.move_to(row)
        self.refresh()

    def row(self, i: int) -> StepRow | None:
        """Row ``i`` if its page is loaded."""
        page = self._pages.get(i // PAGE)
        if page is None:
            return None
        j = i - (i // PAGE) * PAGE
        return page[j] if j < len(page) else None

    def _request(self, page: int) -> None:
        if page in self._pending or page in self._pages or self.rowmap is None:
            return
        self._pending.add(page)
        rm, gen = self.rowmap, self.generation

        def load() -> None:
            try:
                rows = self._loader(rm, page * PAGE, (page + 1) * PAGE)
            except TraceError as exc:  # tracefmt translates damaged bytes and I/O failures into TraceError
                self.post_message(Failed(f"steps {page * PAGE}–{(page + 1) * PAGE - 1}", str(exc)))
                rows = []  # the page stays a placeholder; it is not asked for again
            self.post_message(RowsLoaded(gen, page * PAGE, rows))

        self.run_worker(load, thread=True, group="rows")

    def on_rows_loaded(self, msg: RowsLoaded) -> None:
        """Keep a loaded page (dropping stale generations) and redraw."""
        msg.stop()
        if msg.generation != self.generation:
            return
        page = msg.start // PAGE
        self._pending.discard(page)
        self._pages[page] = msg.rows
        while len(self._pages) > MAX_PAGES:
            self._pages.popitem(last=False)
        self.refresh()
        if page == self.cursor // PAGE:
            self.post_message(RowHighlighted(self.cursor))

    # ------------------------------------------------------------------ cursor
    def move_to(self, row: int, *, center: bool = True) -> None:
        """Put the cursor on ``row`` (clamped) and scroll it into view."""
        n = self.row_count
        row = min(max(row, 0), max(n - 1, 0))
        visible = max(self.size.height - 1, 1)
        top = int(self.scroll_y)
        if row < top or row >= top + visible:
            target = row - visible // 2 if center else (row if row < top else row - visible + 1)
            self.scroll_to(y=max(target, 0), animate=False, immediate=True)
        self.cursor = row

    def watch_cursor(self, old: int, row: int) -> None:
        """Redraw the old and new cursor rows; announce the new row once its page is loaded."""
        for r in (old, row):  # redraw only the two rows (line 0 is the header)
            self.refresh_line(r + 1)
        if self.row(row) is not None:
            self.post_message(RowHighlighted(row))
        else:
            self._request(row // PAGE)

    def action_move(self, delta: int) -> None:
        """Move the cursor by ``delta`` rows."""
        self.move_to(self.cursor + delta, center=False)

    def action_page(self, direction: int) -> None:
        """Move the cursor by one screen."""
        self.move_to(self.cursor + direction * max(self.size.height - 2, 1), center=False)

    def action_edge(self, end: int) -> None:
        """Go to the first (0) or last (1) row."""
        self.move_to(self.row_count - 1 if end else 0)

    def on_click(self, event: events.Click) -> None:
        """Click a row to put the cursor on it."""
        y = event.get_content_offset(self)
        if y is not None and y.y >= 1:
            self.move_to(int(self.scroll_y) + y.y - 1, center=False)

    # ------------------------------------------------------------------ drawing
    def _widths(self, width: int) -> tuple[int, int]:
        """(token column, watched column) widths for a table ``width`` cells wide: the fixed
        columns first, then the two token columns (8 to 40 cells), the watched column the rest."""
        fixed = 8 + 11 + 1 + 9 + 9 + 5 if self.pair else 8 + 1 + 8 + 8
        rest = max(width - fixed, 0)
        tok = min(max((rest - WATCHED) // 2, 8), 40)
        return tok, max(rest - 2 * tok, 0)

    def _header(self, width: int) -> Text:
        tok, ww = self._widths(width)
        watched = ("watched A/B gap" if self.pair else "watched rk gap") if ww > 15 else "watched"
        if self.pair:
            s = (f"{'step':>7} {'verdict':<11}{'reference':<{tok}} {'candidate':<{tok}}"
                 f"{'margin A':>9}{'margin B':>9}{'rk':>4} {watched:<{ww}}")
        else:
            s = f"{'step':>7} {'token':<{tok}} {'runner-up':<{tok}}{'margin':>8}{'p(top)':>7} {watched:<{ww}}"
        return Text(s[:width], style=self.get_component_rich_style("steptable--header"), no_wrap=True)

    def _line(self, r: StepRow, width: int) -> Text:
        tok, ww = self._widths(width)
        low = self.get_component_rich_style("steptable--low")
        dim = self.get_component_rich_style("steptable--dim")
        t = Text(no_wrap=True, style=dim if r.after else "")
        t.append(f"{r.step:>7} ")
        w = " ".join(f"{n}:{'–' if ra is None else ra}/{'–' if rb is None else rb} {_gap(gap)}"
                     for n, ra, rb, gap in r.watched)[:ww] if self.pair else ""
        if self.pair:
            v = row_verdict(r.verdict, r.after) or "…"
            t.append(f"{v[:10]:<11}", style=Style.parse(VERDICT_STYLE.get(v, "dim")) if not r.after else "")
            differ = r.a is not None and r.b is not None and r.a.argmax != r.b.argmax
            t.append(_tok(r.a, tok) + " ")
            t.append(_tok(r.b, tok), style="bold magenta" if differ and not r.after else "")
            for d in (r.a, r.b):
                m = d.margin if d is not None else None
                t.append("  ")
                t.append(_num(m), style=low if m is not None and m < self._low() else "")
            rk = r.a.rank_of(r.b.argmax) if differ else None
            t.append(f"{'' if not differ else ('>k' if rk is None else rk):>4} ")
            t.append(f"{w:<{ww}}")
        else:
            d = r.a
            t.append(_tok(d, tok) + " ")
            t.append(_tok(d, tok, rank=1))
            m = d.margin if d is not None else None
            t.append(" " + _num(m), style=low if m is not None and m < self._low() else "")
            p = d.probs()[0] if d is not None else None
            t.append(f"{'' if p is None else f'{p:6.3f}':>7} ")
            ws = " ".join(f"{n}:{ra} {_gap(gap)}" for n, ra, _, gap in r.watched)
            t.append(f"{ws[:ww]:<{ww}}")
        return t

    def _low(self) -> float:
        return getattr(self.app, "low_margin", 1.0)

    def render_line(self, y: int) -> Strip:
        """Draw line ``y`` of the viewport: the header, a row, or a placeholder."""
        width = self.scrollable_content_region.width
        if y == 0:
            return Strip(list(self._header(width).render(self.app.console))).adjust_cell_length(width)
        i = int(self.scroll_y) + y - 1
        if self.rowmap is None or i >= self.row_count:
            return Strip.blank(width)
        r = self.row(i)
        if r is None:
            self._request(i // PAGE)
            text = Text(f"{'':>7} …", style=self.get_component_rich_style("steptable--dim"))
        else:
            self.painted_rows = True
            text = self._line(r, width)
        segs = list(text.render(self.app.console))
        strip = Strip(segs).adjust_cell_length(width)
        if i == self.cursor:
            strip = Strip([Segment(s.text, self.get_component_rich_style("steptable--cursor") + s.style
                                   if s.style else self.get_component_rich_style("steptable--cursor"))
                           for s in strip])
        return strip
