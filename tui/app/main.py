"""ViewApp: the Textual app behind ``trace view A [B]`` — a thin UI over :class:`steptrace.tui.viewer.data.ViewModel`.

Everything that reads a trace or runs the differ happens on worker threads; results come back
as the dataclass messages of :mod:`steptrace.tui.app.messages`. Expected failures (damaged or incomplete
traces, traces that cannot be compared) become notices, never a crash.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import ClassVar

import numpy as np
from textual import events
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.timer import Timer
from textual.widgets import Footer, Header

from steptrace.tracefmt.errors import TraceError

from steptrace.tui.app.keys import KeyActions
from steptrace.tui.app.messages import (
    DetailLoaded,
    DiffReady,
    Failed,
    Opened,
    PreviewLoaded,
    RowHighlighted,
    RowsReady,
    SampleChosen,
    SeriesLoaded,
    TensorChosen,
)
from steptrace.tui.viewer.data import RowMap, ViewModel
from steptrace.tui.viewer.tensors import mark_root_cause, preview_text
from steptrace.tui.viewer.values import SampleRow, StepDetail
from steptrace.tui.app.widgets import Notices, Plots, Prompt, SamplesPane, StepDetailPane, StepTable, TensorsPane

_READ_ERRORS = (TraceError,)  # tracefmt translates pyarrow's and the OS's errors


class ViewApp(KeyActions, App[None]):
    """Browse one trace, or a reference and a candidate with their diff.

    Args:
        paths: one or two trace directories (reference first).
        diff_json: a saved ``trace diff --json`` report to reuse.
        sample: the sample to open first (default: the report's worst, else the first).
        step: the step to put the cursor on first.
        low_margin: margins below this (logits) are marked; ``l`` keeps only those steps.
        align: the differ's alignment when it runs here (``step``, ``resync``, key columns).
        model: an already built model (the paths and options are then ignored).

    Raises:
        TraceError: a path is not a readable trace, or a bad argument (raised before the app runs).
    """

    TITLE = "steptrace view"
    # Wide (>= WIDE columns): steps and detail side by side, sharing the width. Narrow: stacked.
    # Short (< TALL rows, stacked < TALL + 16): no plots, a smaller samples pane, so the steps keep their rows; the
    # tensors pane (t) takes the detail pane's place instead of sharing its height.
    CSS = """
    #main { height: 1fr; }
    #center { width: 11fr; }
    #right { width: 9fr; }
    #main.-narrow { layout: vertical; }
    #main.-narrow > #center { width: 1fr; height: 3fr; }
    #main.-narrow > #right { width: 1fr; height: 2fr; }
    #main.-short Plots { display: none; }
    #main.-short SamplesPane { max-height: 6; }
    #main.-short #right.-tensors > StepDetailPane { display: none; }
    SamplesPane { display: none; }
    SamplesPane.-shown { display: block; }
    """
    #: Columns from which the panes sit side by side (below, stacked: each gets the full width).
    WIDE = 140
    #: Rows from which the plots are shown.
    TALL = 32
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f", "first", "first div"),
        Binding("n", "next(1)", "next"),
        Binding("N", "next(-1)", "prev", show=False),
        # priority: opening the prompt must move the focus before the next typed key is routed
        Binding("g", "goto", "go to", priority=True),
        Binding("slash", "search", "search", priority=True),
        Binding("l", "low", "low margins"),
        Binding("t", "tensors", "tensors"),
        Binding("d", "drift", "drift onset", show=False),
        Binding("left_square_bracket", "sample(-1)", "previous sample", show=False),
        Binding("right_square_bracket", "sample(1)", "next sample", show=False),
        Binding("escape", "clear", "clear search", show=False),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit", "quit"),
    ]

    def __init__(self, paths: list[str | os.PathLike[str]] | None = None, *, diff_json: str | None = None,
                 sample: str | None = None, step: int | None = None, low_margin: float = 1.0, align: str = "step",
                 model: ViewModel | None = None, triage: dict | None = None) -> None:
        super().__init__()
        self.triage = triage  # a `trace triage --json` report: its root cause is marked in the tensors pane
        rc = (triage or {}).get("root_cause") or {}
        if sample is None and step is None and rc:
            sample, step = rc.get("sample"), rc.get("step")
        self.model = model or ViewModel(list(paths or []), diff_json=diff_json, low_margin=low_margin, align=align)
        self.low_margin = self.model.low_margin
        self.start_sample, self.start_step = sample, step
        self.sample: str | None = None
        self.rowmap: RowMap | None = None
        self.base: RowMap | None = None
        self.low_on = False
        self.search: str | None = None
        self.diff_state = "none"
        self.samples_rows: list[SampleRow] = []
        self.current_step: int | None = None
        self.detail: StepDetail | None = None
        self._detail_timer: Timer | None = None
        self._low_cache: tuple[RowMap, np.ndarray] | None = None
        self._pending_first = False
        self._series_for: RowMap | None = None
        self._user_chose = sample is not None  # the user picked a sample: do not switch to the worst one

    # ------------------------------------------------------------------ layout
    def compose(self) -> ComposeResult:
        """Header, notices, samples / steps / plots in the centre, step detail / tensors on the right."""
        yield Header()
        yield Notices(id="notices")
        with Horizontal(id="main"):
            with Vertical(id="center"):
                yield SamplesPane(id="samples")
                yield StepTable(self.model.fetch, id="steps")
                yield Plots(id="plots")
            with Vertical(id="right"):
                yield StepDetailPane(id="detail")
                yield TensorsPane(id="tensors")
        yield Prompt(id="prompt")
        yield Footer(compact=True, show_command_palette=False)

    @property
    def table(self) -> StepTable:
        """The step table."""
        return self.query_one(StepTable)

    def on_resize(self, event: events.Resize) -> None:
        """Lay the panes out for the new terminal size."""
        self._fit(event.size.width, event.size.height)

    def _set_title(self) -> None:
        """The traces' names in the header (without ``.trace`` when the terminal is narrow)."""
        a, b = self.model.a, self.model.b

        def name(label: str) -> str:
            return label.removesuffix(".trace") if self.size.width < self.WIDE else label

        self.title = f"{name(a.label)} vs {name(b.label)}" if b is not None else name(a.label)

    def _fit(self, width: int, height: int) -> None:
        if self.is_mounted:
            self._set_title()
            if self.samples_rows:  # opened: the subtitle says what is known
                self._subtitle()
        main = self.query_one("#main")
        narrow = width < self.WIDE
        main.set_class(narrow, "-narrow")
        main.set_class(height < (self.TALL + 16 if narrow else self.TALL), "-short")  # stacked panes need more rows

    def on_mount(self) -> None:
        """Lay out, title, then index the traces on a worker."""
        self._fit(self.size.width, self.size.height)
        self._set_title()
        self.sub_title = "opening…"
        self.table.focus()
        self._work("opening the trace", self._open, "open")

    def _work(self, what: str, fn: Callable[[], Message | None], group: str) -> None:
        """Run ``fn`` on a worker thread; post its message, or a :class:`Failed` notice."""

        def run() -> None:
            try:
                msg = fn()
            except _READ_ERRORS as exc:
                self.post_message(Failed(what, str(exc)))
                return
            if msg is not None:
                self.post_message(msg)

        self.run_worker(run, thread=True, group=group)

    # ------------------------------------------------------------------ opening and diffing
    def _open(self) -> Message:
        notices = self.model.open()
        return Opened(notices, self.model.samples())

    def on_opened(self, msg: Opened) -> None:
        """Show notices and samples; open the first sample; start the diff."""
        self.query_one(Notices).add(*msg.notices)
        if self.triage is not None:
            self.query_one(Notices).add(f"triage: {self.triage.get('summary')}")
        self.samples_rows = msg.samples
        self._show_samples()
        names = [s.sample for s in msg.samples]
        if not names:
            self.query_one(Notices).add("no decisions recorded: nothing to show")
            self.sub_title = "empty"
            return
        sample = self.start_sample if self.start_sample in names else (self.model.worst_sample() or names[0])
        if self.start_sample is not None and self.start_sample not in names:
            self.query_one(Notices).add(f"no sample {self.start_sample!r}; showing {sample}")
        self.open_sample(sample, self.start_step)
        if self.model.pair and self.model.saved is None:
            self.diff_state = "running"
            self._work("diff", self._diff, "diff")
        elif self.model.saved is not None:
            self.diff_state = "done"
        self._subtitle()

    def _show_samples(self) -> None:
        pane = self.query_one(SamplesPane)
        pane.set_class(len(self.samples_rows) > 1, "-shown")
        if len(self.samples_rows) > 1:
            pane.show(self.samples_rows, pair=self.model.pair, current=self.sample)

    def _diff(self) -> Message:
        self.model.compute_diff()
        return DiffReady(self.model.samples())

    def on_diff_ready(self, msg: DiffReady) -> None:
        """Verdicts arrived: update samples, re-align the open sample's rows."""
        self.diff_state = "done"
        self.samples_rows = msg.samples
        worst = self.model.worst_sample()
        if not self._user_chose and worst is not None and worst != self.sample:
            self.sample = worst
            self.open_sample(worst, self.start_step)
            self._show_samples()
            self._subtitle()
            return
        self._show_samples()
        if self.sample is not None:
            step = self.current_step if self.current_step is not None else self.start_step
            self._load_sample_diff(self.sample, step, self._pending_first)
        self._subtitle()

    def on_failed(self, msg: Failed) -> None:
        """Show a failure as a notice (the app keeps running)."""
        if msg.what == "diff":
            self.diff_state = "failed"
        self.query_one(Notices).add(f"{msg.what}: {msg.error}")
        self._subtitle()

    def _first_label(self) -> str:
        return "f:" if self.size.width < self.WIDE else "first divergence (f)"

    def _subtitle(self) -> None:
        m = self.model
        if not m.pair:
            state = "complete" if m.a.complete else "INCOMPLETE"
            n = len(self.samples_rows)
            self.sub_title = f"{n:,} sample{'' if n == 1 else 's'} · {state} · low margin < {m.low_margin:g}"
            return
        if self.diff_state == "running":
            self.sub_title = "diffing… (rows paired by step until the diff is done)"
        elif m.report is not None:
            fd = m.report.worst.first_divergence
            where = f" · {self._first_label()} {fd.sample} step {fd.step}" if fd else ""
            self.sub_title = f"{m.report.verdict}{where}"
        elif m.saved is not None:
            fd = m.saved.first
            self.sub_title = "saved report" + (f" · {self._first_label()} {fd.sample} step {fd.step}" if fd else "")
        else:
            self.sub_title = "diff failed: rows paired by step"

    # ------------------------------------------------------------------ samples and rows
    def open_sample(self, sample: str, step: int | None = None, go_first: bool = False) -> None:
        """Show ``sample``'s rows (by step now; aligned by the differ when known)."""
        self.sample = sample
        self._pending_first = go_first
        self.detail = None
        self._set_rows(self.model.rowmap(sample), step)
        if self.model.pair and (self.model.report is not None or self.model.saved is not None):
            self._load_sample_diff(sample, step, go_first)
        if self.query_one(SamplesPane).has_class("-shown"):
            self.query_one(SamplesPane).mark(sample)

    def _load_sample_diff(self, sample: str, step: int | None, go_first: bool) -> None:
        def load() -> Message | None:
            sd = self.model.sample_diff(sample)
            return RowsReady(self.model.rowmap(sample, sd), step, go_first) if sd is not None else None

        self._work(f"diff of {sample}", load, "sample")

    def _set_rows(self, rm: RowMap, step: int | None) -> None:
        self.base = rm
        self.rowmap = rm
        row = rm.shown(rm.base_row_of_step(step)) if step is not None else 0
        self.table.set_rows(rm, row)
        self._series_for = None  # plots start once the first rows are shown
        if self.low_on:
            self._filter_low(rm, step)

    def on_rows_ready(self, msg: RowsReady) -> None:
        """A sample's aligned rows, or a filter of them, are ready."""
        rm = msg.rowmap
        if rm.sample != self.sample:
            return
        step = msg.step if msg.step is not None else self.current_step
        if rm.select is None:
            self._set_rows(rm, step)
        else:
            if not self.low_on or self.base is None or (rm.kind, rm.base_size) != (self.base.kind, self.base.base_size):
                return
            if rm.size == 0:
                self.low_on = False
                self.notify(f"no step has a margin below {self.model.low_margin:g}", timeout=3)
                return
            self.rowmap = rm
            self.table.set_rows(rm, rm.shown(rm.base_row_of_step(step)) if step is not None else 0)
        if msg.go_first:
            self._pending_first = False
            self.action_first()

    def _filter_low(self, base: RowMap, step: int | None) -> None:
        def load() -> Message:
            rows = self._low_rows(base)
            return RowsReady(self.model.filtered(base, rows, f"low margin < {self.model.low_margin:g}"), step)

        self._work("low-margin filter", load, "filter")

    def _low_rows(self, base: RowMap) -> np.ndarray:
        """Base rows of ``base`` with a low margin (a scan on first use: call from a worker)."""
        cached = self._low_cache
        if cached is not None and cached[0] is base:
            return cached[1]
        rows = self.model.low_rows(base)
        self._low_cache = (base, rows)
        return rows

    def on_sample_chosen(self, msg: SampleChosen) -> None:
        """Open the sample picked in the samples pane."""
        self._user_chose = True
        self.open_sample(msg.sample)
        self.table.focus()

    # ------------------------------------------------------------------ cursor, detail, plots
    def on_row_highlighted(self, msg: RowHighlighted) -> None:
        """Track the cursor's step; load its detail shortly after the cursor settles."""
        r = self.table.row(msg.row)
        if r is None:
            return
        self.current_step = r.step
        self.query_one(Plots).set_cursor(r.a_step)
        base = self.base
        if base is not None and self._series_for is not base:
            self._series_for = base
            self._work("plots", lambda: SeriesLoaded(self.model.series(base), base), "series")
        if self._detail_timer is not None:
            self._detail_timer.stop()
        rm, row = self.rowmap, msg.row
        self._detail_timer = self.set_timer(0.03, lambda: self._work(
            "step detail", lambda: DetailLoaded(self.model.detail(rm, row), rm) if rm is not None else None, "detail"))

    def on_detail_loaded(self, msg: DetailLoaded) -> None:
        """Show the detail (if the cursor is still there)."""
        d = msg.detail
        if d is None or msg.rowmap is not self.rowmap or d.row.row != self.table.cursor:
            return
        d = mark_root_cause(d, self.triage)
        self.detail = d
        self.query_one(StepDetailPane).show(d)
        tensors = self.query_one(TensorsPane)
        if tensors.has_class("-shown"):
            tensors.show(d.tensors, pair=self.model.pair, step=d.row.step, note=d.pointer)

    def on_series_loaded(self, msg: SeriesLoaded) -> None:
        """Draw the plots of the open sample."""
        if msg.rowmap is self.base:
            self.query_one(Plots).show(msg.series)

    def on_tensor_chosen(self, msg: TensorChosen) -> None:
        """Preview the values of the tensor under the tensors pane's cursor."""
        ln = msg.line
        self._work("values preview", lambda: PreviewLoaded(ln.name, preview_text(self.model.a, self.model.b, ln)),
                   "preview")

    def on_preview_loaded(self, msg: PreviewLoaded) -> None:
        """Show a values preview."""
        self.query_one(TensorsPane).preview(msg.text)
