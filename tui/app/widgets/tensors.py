"""TensorsPane: the tensors of the highlighted step in execution order, with the differ's metrics
(two traces) or statistics (one trace), the culprit highlighted, and a values preview of the
tensor under the cursor when values were recorded."""

from __future__ import annotations

from rich.text import Text
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from steptrace.tui.app.messages import TensorChosen
from steptrace.tui.viewer.values import TensorLine


def _g(x: float | None, spec: str = ".3g") -> str:
    return "–" if x is None else format(x, spec)


class TensorsPane(Vertical):
    """A table of tensor lines and a preview line below it."""

    DEFAULT_CSS = """
    TensorsPane { height: 1fr; border: round $primary-darken-2; display: none; }
    TensorsPane.-shown { display: block; }
    TensorsPane > DataTable { height: 1fr; }
    TensorsPane > #tensor-preview { height: auto; max-height: 6; color: $text-muted; padding: 0 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.border_title = "tensors"
        self.lines: tuple[TensorLine, ...] = ()
        self._pair = False
        self.columns_shown: tuple[str, ...] = ()

    def compose(self):
        """The tensor table and the values preview below it."""
        yield DataTable(cursor_type="row", zebra_stripes=True, id="tensor-table")
        yield Static("", id="tensor-preview")

    def show(self, lines: tuple[TensorLine, ...], *, pair: bool, step: int, note: str | None = None) -> None:
        """List ``lines`` (the tensors of reference step ``step``); ``note`` says where to look
        when the culprit of this step's divergence was recorded at an earlier step."""
        self.lines = lines
        self._pair = pair
        table = self.query_one(DataTable)
        table.clear(columns=True)
        # explicit widths (auto widths race with the pane being shown in the same refresh): every
        # column as wide as it needs (# at least 4 digits), the name gets the rest of the pane
        num = max([len(str(ln.order)) for ln in lines] + [4])
        status = max([len(self._status(ln).plain) for ln in lines] + [8]) if pair else 0
        shapes = max([len("x".join(map(str, ln.a.shape))) for ln in lines if ln.a] + [5]) if not pair else 0
        rest = [("", status), ("max|Δ|", 8), ("cos", 8), ("basis", 6)] if pair else \
            [("values", 6), ("|x| max", 8), ("mean", 8), ("dtype", 8), ("shape", min(shapes, 16))]
        longest = max([len(ln.name) + (len(f" #{ln.call}") if ln.call else 0) for ln in lines] + [8])
        pane = self.parent.size.width if self.parent is not None and self.parent.size.width else self.size.width

        def room() -> int:  # what the name gets: the pane less borders, scrollbar, padding, other columns
            return pane - 4 - 2 * (len(rest) + 2) - num - sum(w for _, w in rest)

        # a narrow pane drops the least telling columns before it cuts names (values stay in the preview)
        for drop in (("basis", "cos") if pair else ("mean", "values", "dtype")):
            if room() >= min(longest, 32):
                break
            rest = [c for c in rest if c[0] != drop]
        self.columns_shown = ("#", "tensor", *(label for label, _ in rest))
        name_w = max(min(longest, room()), 12)
        for label, width in (("#", num), ("tensor", name_w), *rest):
            table.add_column(label, width=width)
        for ln in lines:
            name = Text(ln.name + (f" #{ln.call}" if ln.call else ""), style="bold red" if ln.culprit else "")
            if pair:
                c = ln.compare
                cells = {"": self._status(ln), "max|Δ|": _g(c.max_abs if c else None),
                         "cos": _g(c.cosine if c else None, ".6f"), "basis": c.basis if c else ""}
            else:
                a = ln.a
                cells = {"values": "yes" if a and a.has_values else "stats", "|x| max": _g(a.abs_max if a else None),
                         "mean": _g(a.mean if a else None), "dtype": a.dtype if a else "",
                         "shape": "x".join(map(str, a.shape)) if a else ""}
            table.add_row(ln.order, name, *(cells[label] for label, _ in rest))
        self.border_title = f"tensors at step {step} ({len(lines)})"
        self.query_one("#tensor-preview", Static).update(Text(note, style="yellow") if note else "")
        if lines:
            pick = next((i for i, ln in enumerate(lines) if ln.culprit), 0)
            table.move_cursor(row=pick, animate=False)
            self.post_message(TensorChosen(lines[pick]))

    @staticmethod
    def _status(ln: TensorLine) -> Text:
        """``= exact``, ``ok``, ``✗ reason`` (``◀`` on the culprit), or which side has the tensor."""
        c = ln.compare
        if c is None:
            ok = Text("only A" if ln.b is None else ("only B" if ln.a is None else "?"), style="yellow")
        else:
            ok = Text("= exact" if c.bitexact else ("ok" if c.within else f"✗ {c.reason or 'beyond'}"),
                      style="green" if c.within else "bold red")
        if ln.culprit:
            ok.append(" ◀", style="bold red")
        return ok

    def preview(self, text: str) -> None:
        """Show the values preview text."""
        self.query_one("#tensor-preview", Static).update(Text(text))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """Preview the tensor under the cursor."""
        event.stop()
        if 0 <= event.cursor_row < len(self.lines):
            self.post_message(TensorChosen(self.lines[event.cursor_row]))
