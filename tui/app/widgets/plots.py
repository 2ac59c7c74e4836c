"""Plots: sparklines over a sample's steps — the margin of each side (smallest per column; low
margins in yellow) and the tensor error (log scale; beyond tolerance in red) — with the drift
onset (◆), the first divergence (▼) and the cursor (▲) marked. Click a column to go there."""

from __future__ import annotations

import numpy as np
from rich.text import Text
from textual import events
from textual.widget import Widget

from steptrace.tui.app.messages import Jump
from steptrace.tui.viewer.values import Series

LEVELS = " ▁▂▃▄▅▆▇█"
LABEL = 11


def resample(values: np.ndarray, width: int, how: str) -> np.ndarray:
    """Reduce ``values`` (buckets) to ``width`` columns by ``min`` or ``max``, ignoring NaN."""
    n = values.size
    if n == 0:
        return np.full(width, np.nan)
    edges = (np.arange(width + 1) * n) // width
    out = np.full(width, np.nan)
    for i in range(width):  # width columns, not steps
        seg = values[edges[i]: max(edges[i + 1], edges[i] + 1)] if edges[i] < n else values[-1:]
        seg = seg[~np.isnan(seg)]
        if seg.size:
            out[i] = seg.min() if how == "min" else seg.max()
    return out


def spark(values: np.ndarray, *, log: bool = False, cap: float | None = None) -> list[int]:
    """Levels 0..8 of ``values`` (NaN: 0), linear up to ``cap`` or log-scaled."""
    v = values.astype(np.float64)
    ok = ~np.isnan(v)
    if log:
        pos = ok & (v > 0)
        if not pos.any():
            return [1 if o else 0 for o in ok]
        lv = np.full(v.size, np.nan)
        lv[pos] = np.log10(v[pos])
        lo, hi = np.nanmin(lv), np.nanmax(lv)
        lv = np.where(pos, (lv - lo) / (hi - lo) if hi > lo else 1.0, 0.0)
        return [0 if not o else max(1, round(x * 7) + 1) for o, x in zip(ok, lv)]
    top = cap if cap is not None else (np.nanmax(v) if ok.any() else 1.0)
    top = top if top and np.isfinite(top) and top > 0 else 1.0
    return [0 if not o else max(1, min(8, int(np.ceil(min(x, top) / top * 8)))) for o, x in zip(ok, v)]


class Plots(Widget):
    """Sparklines of the open sample; updated with :meth:`show` and :meth:`set_cursor`."""

    DEFAULT_CSS = """
    Plots { height: 7; border: round $primary-darken-2; padding: 0 1; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.series: Series | None = None
        self.cursor_step: int | None = None
        self.border_title = "plots"

    def show(self, series: Series) -> None:
        """Draw ``series``."""
        self.series = series
        self.border_title = f"margin and {series.tensor_label} over steps {series.lo}–{series.hi}"
        self.refresh()

    def set_cursor(self, step: int | None) -> None:
        """Mark reference step ``step``."""
        if step != self.cursor_step:
            self.cursor_step = step
            self.refresh()

    def _row(self, label: str, levels: list[int], styles: list[str]) -> Text:
        t = Text(f"{label:<{LABEL}}"[:LABEL], style="dim", no_wrap=True)
        for lv, st in zip(levels, styles):
            t.append(LEVELS[lv], style=st)
        return t

    def render(self) -> Text:
        """The sparklines, the marker line and the step axis."""
        s = self.series
        width = max(self.content_region.width - LABEL, 8)
        if s is None:
            return Text("…", style="dim")
        out = Text(no_wrap=True)
        cap = max(4.0 * s.low_margin, 1.0)
        for label, m in (("margin A" if s.b_margin is not None else "margin", s.a_margin), ("margin B", s.b_margin)):
            if m is None:
                continue
            col = resample(m, width, "min")
            styles = ["bold yellow" if x < s.low_margin else "green" for x in np.nan_to_num(col, nan=np.inf)]
            out.append_text(self._row(label, spark(col, cap=cap), styles))
            out.append("\n")
        if s.tensor is not None:
            col = resample(s.tensor, width, "max")
            bad = resample(s.tensor_bad.astype(np.float64), width, "max") if s.tensor_bad is not None else None
            styles = ["bold red" if bad is not None and b == 1 else "cyan" for b in
                      (bad if bad is not None else np.zeros(width))]
            label = "tensor err" if "error" in s.tensor_label else "tensor |x|"
            out.append_text(self._row(label, spark(col, log=True), styles))
            out.append("\n")
        marks = [" "] * width
        styles = [""] * width
        for step, ch, st in ((s.drift_onset, "◆", "bold yellow"), (s.first_divergence, "▼", "bold red"),
                             (self.cursor_step, "▲", "bold")):
            if step is not None and s.lo <= step <= s.hi:
                c = s.bucket_of(step, width)
                marks[c], styles[c] = ch, st
        line = Text(" " * LABEL, no_wrap=True)
        for ch, st in zip(marks, styles):
            line.append(ch, style=st)
        out.append_text(line)
        out.append("\n")
        legend = Text(f"{'':<{LABEL}}{s.lo}", style="dim", no_wrap=True)
        notes = []
        if s.drift_onset is not None:
            notes.append(("◆ drift ", "yellow", str(s.drift_onset)))
        if s.first_divergence is not None:
            notes.append(("▼ divergence ", "red", str(s.first_divergence)))
        if self.cursor_step is not None:
            notes.append(("▲ step ", "", str(self.cursor_step)))
        middle = Text("   ").join(Text.assemble((a, st), b) for a, st, b in notes)
        pad = width - len(str(s.lo)) - len(str(s.hi)) - middle.cell_len
        legend.append(" " * max(pad // 2, 1))
        legend.append_text(middle)
        legend.append(" " * max(pad - pad // 2, 1))
        legend.append(str(s.hi), style="dim")
        out.append_text(legend)
        return out

    def on_click(self, event: events.Click) -> None:
        """Jump to the step under the click."""
        s = self.series
        off = event.get_content_offset(self)
        if s is None or off is None or off.x < LABEL:
            return
        width = max(self.content_region.width - LABEL, 8)
        col = off.x - LABEL
        step = s.lo + (col * (s.hi - s.lo + 1)) // width
        self.post_message(Jump(int(step)))
