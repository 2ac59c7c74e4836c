"""SamplesPane: the samples of a corpus with verdict, first divergence step and lengths; sortable
(click a column header, or ``s`` to cycle the sort column); Enter or a click opens a sample."""

from __future__ import annotations

from typing import ClassVar

from rich.text import Text
from textual.binding import Binding, BindingType
from textual.widgets import DataTable
from textual.widgets.data_table import RowDoesNotExist

from steptrace.tui.app.messages import SampleChosen
from steptrace.tui.viewer.values import VERDICT_STYLE, VERDICTS, SampleRow

_COLUMNS = ("sample", "verdict", "first", "drift", "steps A", "steps B", "culprit")


def _sort_key(value: object) -> tuple:
    """Sort text and numbers, blanks last; verdicts worst first."""
    if isinstance(value, Text):
        value = value.plain
    if value in ("", "–", None):
        return (2, "")
    if isinstance(value, str) and value in VERDICTS:
        return (0, -VERDICTS.index(value))
    if isinstance(value, (int, float)):
        return (0, value)
    return (1, str(value))


class SamplesPane(DataTable):
    """One row per sample; the open sample is marked."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("s", "cycle_sort", "sort", show=False)]
    DEFAULT_CSS = """
    SamplesPane { height: auto; max-height: 12; border: round $primary-darken-2; }
    SamplesPane:focus { border: round $accent; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self.border_title = "samples"
        self._sort = 1
        self._reverse = False
        self._pair = False
        self._fitted = -1  # the width the columns were fitted to
        self._last: tuple[list[SampleRow], bool] | None = None

    def on_resize(self) -> None:
        """Refit the columns to the new width."""
        if self._last is not None and self.size.width != self._fitted:
            cur = self.get_row_at(self.cursor_row)[0] if self.row_count else None
            rows, pair = self._last
            self.show(rows, pair=pair, current=str(cur.plain if isinstance(cur, Text) else cur) if cur else None)

    def show(self, rows: list[SampleRow], *, pair: bool, current: str | None = None) -> None:
        """Fill the pane with ``rows`` (verdict columns only for two traces); rows already shown
        are updated in place (a rebuilt table would keep stale renders of same-keyed rows)."""
        cols = _COLUMNS if pair else ("sample", "steps A")
        cells = {r.sample: self._cells(r, pair) for r in rows}
        self._last = (rows, pair)
        same = pair == self._pair and self.row_count == len(rows) and self._fitted == self.size.width and \
            [str(c.value) for c in self.columns] == list(cols) and all(self.is_valid_row_index(i) for i in range(len(rows)))
        if same and {str(k.value) for k in self.rows} == set(cells):
            for sample, values in cells.items():
                for col, value in zip(cols, values):
                    self.update_cell(sample, col, value)
        else:
            self.clear(columns=True)
            name_w = min(max([len(r.sample) for r in rows] + [6]), 32)
            widths = {"sample": name_w, "verdict": 10, "first": 6, "drift": 6, "steps A": 7, "steps B": 7,
                      "culprit": 22}
            pane = self.size.width
            if pane:  # the culprit (known once the diff is done) takes the rest: no horizontal scrollbar
                used = sum(widths[c] for c in cols if c != "culprit") + 2 * len(cols) + 2  # cell padding, scrollbar
                widths["culprit"] = max(pane - used, 8)
            self._fitted = pane
            for c in cols:  # fixed widths: verdicts and culprits arrive after the first fill
                self.add_column(c if pair or c != "steps A" else "steps", key=c, width=widths[c])
            for sample, values in cells.items():
                self.add_row(*values, key=sample)
        self._pair = pair
        self.border_title = f"samples ({len(rows):,})"
        if pair and any(r.verdict for r in rows):
            self._apply_sort()
        if current is not None:
            self.mark(current)

    @staticmethod
    def _cells(r: SampleRow, pair: bool) -> list[object]:
        if not pair:
            return [r.sample, r.a_steps]
        v = r.verdict or "…"
        return [r.sample, Text(v, style=VERDICT_STYLE.get(v, "dim")), "–" if r.first_step is None else r.first_step,
                "–" if r.drift_step is None else r.drift_step, r.a_steps, "–" if r.b_steps is None else r.b_steps,
                r.culprit or ""]

    def mark(self, sample: str) -> None:
        """Move the cursor to ``sample`` without opening it."""
        try:
            self.move_cursor(row=self.get_row_index(sample), animate=False)
        except RowDoesNotExist:
            return

    def _apply_sort(self) -> None:
        key = (_COLUMNS if self._pair else ("sample", "steps A"))[self._sort % len(self.columns)]
        self.sort(key, key=_sort_key, reverse=self._reverse)
        self.border_subtitle = f"sorted by {key}{' ↓' if self._reverse else ''}"

    def action_cycle_sort(self) -> None:
        """Sort by the next column."""
        self._sort = (self._sort + 1) % max(len(self.columns), 1)
        self._reverse = False
        self._apply_sort()

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        """Click a header to sort by it; click again to reverse."""
        event.stop()
        idx = list(self.columns).index(event.column_key)
        self._reverse = not self._reverse if idx == self._sort else False
        self._sort = idx
        self._apply_sort()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter or click opens the sample."""
        event.stop()
        self.post_message(SampleChosen(str(event.row_key.value)))
