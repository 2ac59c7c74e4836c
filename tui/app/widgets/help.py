"""HelpScreen: every key of the viewer and what the colours mean (``?`` opens it)."""

from __future__ import annotations

from typing import ClassVar

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

KEYS = [
    ("Navigation", [
        ("↑ ↓  j k", "previous / next step"),
        ("PgUp PgDn  b space", "page up / down"),
        ("Home End  < >  G", "first / last step"),
        ("g", "go to a step number"),
        ("f", "first divergence of the sample (corpus: the report's worst sample)"),
        ("d", "drift onset (first step where numbers left tolerance)"),
        ("n  N", ("next / previous match of the last search; without one: next / previous "
                  "mismatch (two traces) or low margin (one trace)")),
        ("/", "search a token id or text in a piece (smart case), both sides"),
        ("Esc", "clear the search"),
        ("[  ]", "previous / next sample"),
        ("mouse", "click a row, a sample, a tensor, or a plot column; wheel scrolls"),
    ]),
    ("Panes", [
        ("l", "only low-margin steps (margin below the threshold, either side); again: all"),
        ("t", "tensors pane: tensors of the step in execution order, culprit, values preview"),
        ("s", "samples pane: sort by the next column (or click a header)"),
        ("Tab", "move focus between panes"),
        ("?", "this help"),
        ("q", "quit"),
    ]),
]

LEGEND = [
    ("identical", "green", "bit-exact decisions and tensors"),
    ("equivalent", "green", "same token, within tolerance"),
    ("drift", "yellow", "same token, a logit or tensor beyond tolerance"),
    ("flip", "magenta", "different token, a near tie (within ε on both sides)"),
    ("divergent", "bold red", "different token, not a near tie"),
    ("missing", "red", "one side has no such step"),
    ("after", "dim", "(dim rows) after a free-running divergence: the tokens fed back differ, so these rows "
                     "follow from it and are not counted as new mismatches"),
    ("margin", "bold yellow reverse", "below the low-margin threshold"),
]


class HelpScreen(ModalScreen[None]):
    """Keys and colours; Esc, q or ? closes it."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 96; max-width: 100%; height: auto; max-height: 100%; border: round $accent;
                                  background: $panel; padding: 0 1; }
    """

    def compose(self) -> ComposeResult:
        """The keys table and the colour legend."""
        t = Table.grid(padding=(0, 2))
        t.add_column(style="bold cyan", no_wrap=True)
        t.add_column()
        for section, rows in KEYS:
            t.add_row(Text(section, style="bold underline"), "")
            for k, what in rows:
                t.add_row(k, what)
            t.add_row("", "")
        t.add_row(Text("Colours", style="bold underline"), "")
        for name, style, what in LEGEND:
            t.add_row(Text(name, style=style), what)
        with VerticalScroll():
            yield Static(t)
            yield Static(Text("↑ ↓ PgUp PgDn scroll; Esc, q or ? closes this help", style="dim"))
