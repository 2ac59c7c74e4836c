"""TensorsPane: the tensors of the highlighted step in execution order, with the differ's metrics
(two traces) or statistics (one trace), the culprit highlighted, and a values preview of the
tensor under the cursor when values were recorded."""

from __future__ import annotations

from rich.text import Text
from textual.containers import Vertical
from textual.widgets import DataTable, Static

from ..messages import TensorChosen
from ..viewvalues import TensorLine


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

    def compose(self):
        """The tensor table and the values preview below it."""
        yield DataTable(cursor_type="row", zebra_stripes=True, id="tensor-table")
        yield Static("", id="tensor-preview")

    def show(self, lines: tuple[TensorLine, ...], *, pair: bool, step: int) -> None:
        """List ``lines`` (the tensors of reference step ``step``)."""
        self.lines = lines
        self._pair = pair
        table = self.query_one(DataTable)
        table.clear(columns=True)
        # explicit widths: auto widths race with the pane being shown in the same refresh
        name_w = min(max([len(ln.name) + (len(f" #{ln.call}") if ln.call else 0) for ln in lines] + [8]), 40)
        cols = ((("#", 2), ("tensor", name_w), ("", 14), ("max|Δ|", 8), ("cos", 8), ("basis", 6)) if pair else
                (("#", 2), ("tensor", name_w), ("values", 6), ("|x| max", 8), ("mean", 8), ("dtype", 8), ("shape", 10)))
        for label, width in cols:
            table.add_column(label, width=width)
        for ln in lines:
            name = Text(ln.name + (f" #{ln.call}" if ln.call else ""), style="bold red" if ln.culprit else "")
            if pair:
                c = ln.compare
                if c is None:
                    ok = Text("only A" if ln.b is None else ("only B" if ln.a is None else "?"), style="yellow")
                else:
                    ok = Text("= exact" if c.bitexact else ("ok" if c.within else f"✗ {c.reason or 'beyond'}"),
                              style="green" if c.within else "bold red")
                if ln.culprit:
                    ok.append(" ◀", style="bold red")
                table.add_row(ln.order, name, ok, _g(c.max_abs if c else None), _g(c.cosine if c else None, ".6f"),
                              c.basis if c else "")
            else:
                a = ln.a
                table.add_row(ln.order, name, "yes" if a and a.has_values else "stats", _g(a.abs_max if a else None),
                              _g(a.mean if a else None), a.dtype if a else "", "x".join(map(str, a.shape)) if a else "")
        self.border_title = f"tensors at step {step} ({len(lines)})"
        self.query_one("#tensor-preview", Static).update("")
        if lines:
            pick = next((i for i, ln in enumerate(lines) if ln.culprit), 0)
            table.move_cursor(row=pick, animate=False)
            self.post_message(TensorChosen(lines[pick]))

    def preview(self, text: str) -> None:
        """Show the values preview text."""
        self.query_one("#tensor-preview", Static).update(Text(text))

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        """Preview the tensor under the cursor."""
        event.stop()
        if 0 <= event.cursor_row < len(self.lines):
            self.post_message(TensorChosen(self.lines[event.cursor_row]))
