"""Notices: a bar above the panes listing what the user must know (incomplete or damaged traces,
a diff that failed); hidden while there is nothing to say."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static


class Notices(Static):
    """Persistent notices, one per line (transient ones use ``App.notify``)."""

    DEFAULT_CSS = """
    Notices { height: auto; max-height: 5; background: $warning 25%; color: $text; padding: 0 1; display: none; }
    Notices.-shown { display: block; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        self.items: list[str] = []

    def add(self, *messages: str) -> None:
        """Show ``messages`` (duplicates are dropped)."""
        for m in messages:
            if m and m not in self.items:
                self.items.append(m)
        self.update(Text("\n").join(Text.assemble(("⚠ ", "bold"), m) for m in self.items))
        self.set_class(bool(self.items), "-shown")
