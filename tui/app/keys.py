"""Key actions of the viewer (a mixin of :class:`steptrace.tui.app.main.ViewApp`): landmarks (``f``, ``d``),
mismatches and search matches (``n``/``N``), search (``/``), go to (``g``), the low-margin filter
(``l``), the tensors pane (``t``), samples (``[``/``]``), help (``?``).

Anything slow (a search over millions of steps, a filter scan) runs on a worker thread through
``ViewApp._work`` and comes back as a :class:`~steptrace.tui.app.messages.Found` or
:class:`~steptrace.tui.app.messages.RowsReady` message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import Input

from steptrace.tui.app.messages import Found, Jump, PromptSubmitted
from steptrace.tui.viewer.data import RowMap, ViewModel
from steptrace.tui.viewer.values import SampleRow, StepDetail
from steptrace.tui.app.widgets import HelpScreen, Prompt, SamplesPane, StepTable, TensorsPane


def _step_to(rows: np.ndarray, cur: int, direction: int, what: str) -> Found:
    """The next (``direction`` > 0) or previous entry of sorted ``rows`` around row ``cur``."""
    i = int(np.searchsorted(rows, cur, side="right") if direction > 0 else np.searchsorted(rows, cur, side="left") - 1)
    if 0 <= i < rows.size:
        return Found(int(rows[i]), "")
    return Found(None, f"no {'further' if direction > 0 else 'earlier'} {what}")


class KeyActions:
    """The key bindings' actions, mixed into :class:`steptrace.tui.app.main.ViewApp` (whose state they use)."""

    model: ViewModel
    rowmap: RowMap | None
    base: RowMap | None
    sample: str | None
    search: str | None
    low_on: bool
    diff_state: str
    current_step: int | None
    detail: StepDetail | None
    samples_rows: list[SampleRow]
    _pending_first: bool
    _user_chose: bool
    table: StepTable
    query_one: Callable[..., Any]
    focused: Any
    screen: Any
    notify: Callable[..., Any]
    push_screen: Callable[..., Any]
    _work: Callable[..., None]
    _filter_low: Callable[..., None]
    _low_rows: Callable[..., np.ndarray]
    open_sample: Callable[..., None]

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Hide the divergence keys when one trace is shown (there is nothing to diverge from)."""
        if action in ("goto", "search"):  # priority keys: let an input (or a dialog) have them
            return not isinstance(self.focused, Input) and not isinstance(self.screen, ModalScreen)
        return not (action in ("first", "drift") and not self.model.pair)

    def goto_step(self, step: int) -> None:
        """Put the cursor on reference step ``step`` (or the nearest shown row)."""
        if self.rowmap is not None:
            self.table.move_to(self.rowmap.shown(self.rowmap.base_row_of_step(step)))

    def on_jump(self, msg: Jump) -> None:
        """A click on a plot."""
        self.goto_step(msg.step)

    def _landmark(self, which: int, name: str) -> None:
        m = self.model
        if not m.pair:
            self.notify(f"one trace: no {name} to show — l keeps low margins, / searches tokens", timeout=4)
            return
        if self.diff_state == "running":
            self._pending_first = which == 0
            self.notify("the diff is still running; going there when it is done", timeout=3)
            return
        step = m.landmarks(self.sample)[which] if self.sample else None
        if step is not None:
            self.goto_step(step)
            return
        worst = m.worst_sample()
        if which == 0 and worst is not None and worst != self.sample:
            self.open_sample(worst, go_first=True)
            return
        self.notify(f"no {name} in {self.sample}", timeout=3)

    def action_first(self) -> None:
        """Go to the first divergence (of the sample, else of the corpus)."""
        self._landmark(0, "first divergence")

    def action_drift(self) -> None:
        """Go to the drift onset of the sample."""
        self._landmark(1, "drift onset")

    def action_next(self, direction: int) -> None:
        """Next/previous search match, else mismatch (two traces) or low margin (one trace)."""
        rm = self.rowmap
        if rm is None:
            return
        cur = self.table.cursor
        if self.search:
            q = self.search
            self._work("search", lambda: self._find(rm, cur, q, direction > 0), "search")
            return
        if self.model.pair:
            rows = self.model.mismatch_rows(rm)
            if rows is None:
                self.notify("the diff is not known yet: n/N follow mismatches once it is", timeout=3)
                return
            self.on_found(_step_to(rows, cur, direction, "mismatch"))
            return
        base = self.base
        if base is None:
            return

        def low() -> Message:  # a scan of every margin on first use: off the UI thread
            rows = self._low_rows(base)
            rows = np.searchsorted(rm.select, rows) if rm.select is not None else rows
            found = _step_to(rows, cur, direction, f"step with margin < {self.model.low_margin:g}")
            return Found(found.row, found.note, rm)

        self._work("low margins", low, "search")

    def _find(self, rm: RowMap, cur: int, query: str, forward: bool) -> Message:
        """Search from ``cur`` (wrapping around once); runs on a worker thread."""
        row = self.model.find(rm, cur, query, forward)
        if row is not None:
            return Found(row, "", rm)
        row = self.model.find(rm, -1 if forward else rm.size, query, forward)
        if row is not None and row != cur:
            return Found(row, f"search wrapped to the {'top' if forward else 'bottom'}", rm)
        note = f"{query!r} not found" if row is None else f"only match: {query!r}"
        return Found(row, note, rm)

    def on_found(self, msg: Found) -> None:
        """Go to a search result (unless the rows changed meanwhile)."""
        if msg.rowmap is not None and msg.rowmap is not self.rowmap:
            return
        if msg.row is not None:
            self.table.move_to(msg.row)
        if msg.note:
            self.notify(msg.note, severity="warning" if msg.row is None else "information", timeout=3)

    def action_search(self) -> None:
        """Ask for a token or piece to search."""
        self.query_one(Prompt).ask("search", self.search or "")

    def action_goto(self) -> None:
        """Ask for a step to go to."""
        self.query_one(Prompt).ask("goto")

    def on_prompt_submitted(self, msg: PromptSubmitted) -> None:
        """Run a search or a goto from the prompt."""
        if not msg.value:
            return
        if msg.kind == "goto":
            self.goto_step(int(msg.value))
            return
        self.search = msg.value
        rm, cur = self.rowmap, self.table.cursor
        if rm is not None:
            self._work("search", lambda: self._find(rm, cur, msg.value, True), "search")

    def action_clear(self) -> None:
        """Forget the search (n/N go back to mismatches)."""
        if self.search:
            self.search = None
            self.notify("search cleared", timeout=2)

    def action_low(self) -> None:
        """Toggle the low-margin filter."""
        if self.base is None:
            return
        self.low_on = not self.low_on
        if self.low_on:
            self._filter_low(self.base, self.current_step)
        else:
            self.rowmap = self.base
            self.table.set_rows(self.base, self.base.shown(self.base.base_row_of_step(self.current_step or 0)))

    def action_tensors(self) -> None:
        """Show or hide the tensors pane."""
        pane = self.query_one(TensorsPane)
        pane.toggle_class("-shown")
        self.query_one("#right").set_class(pane.has_class("-shown"), "-tensors")
        if pane.has_class("-shown") and self.detail is not None:
            pane.show(self.detail.tensors, pair=self.model.pair, step=self.detail.row.step, note=self.detail.pointer)

    def action_sample(self, delta: int) -> None:
        """Open the previous/next sample (in the samples pane's order)."""
        pane = self.query_one(SamplesPane)
        names = [str(r.key.value) for r in pane.ordered_rows] if pane.row_count else \
            [s.sample for s in self.samples_rows]
        if not names or self.sample not in names:
            return
        i = names.index(self.sample) + delta
        if 0 <= i < len(names):
            self._user_chose = True
            self.open_sample(names[i])

    def action_help(self) -> None:
        """Show the keys."""
        self.push_screen(HelpScreen())
