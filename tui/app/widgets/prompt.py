"""Prompt: a one-line input at the bottom for ``/`` (search) and ``g`` (go to step)."""

from __future__ import annotations

from typing import ClassVar

from textual.binding import Binding, BindingType
from textual.widgets import Input

from steptrace.tui.app.messages import PromptSubmitted

_PLACEHOLDER = {"search": "search: token id, or text in a piece (smart case) — Enter to find, Esc to cancel",
                "goto": "go to step: a step number — Enter to go, Esc to cancel"}


class Prompt(Input):
    """Hidden until :meth:`ask`; posts :class:`PromptSubmitted` on Enter."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "cancel", show=False)]
    DEFAULT_CSS = """
    Prompt { dock: bottom; display: none; border: tall $accent; height: 3; }
    Prompt.-shown { display: block; }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.kind = "search"
        self._return_to = None

    def ask(self, kind: str, value: str = "") -> None:
        """Show the prompt for ``kind`` (``search`` or ``goto``) and focus it."""
        self.kind = kind
        self.placeholder = _PLACEHOLDER[kind]
        self.restrict = r"-?[0-9]*" if kind == "goto" else None
        self.value = value
        self.add_class("-shown")
        self._return_to = self.screen.focused
        self.screen.set_focus(self)  # now, not after a refresh: keys typed right after `/` land here

    def _close(self) -> None:
        self.remove_class("-shown")
        self.screen.set_focus(self._return_to)  # at once, so the next key goes back to the table

    def action_cancel(self) -> None:
        """Hide without submitting (posts an empty value)."""
        self._close()
        self.post_message(PromptSubmitted(self.kind, ""))

    async def action_submit(self) -> None:
        """Post the value and hide."""
        value = self.value.strip()
        self._close()
        self.post_message(PromptSubmitted(self.kind, value))
