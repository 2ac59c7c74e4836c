"""The stderr console every command writes its notes and diagnostics to."""

from __future__ import annotations

import sys

from rich.console import Console


def stderr_console() -> Console:
    """A rich console on stderr: wrapped to the terminal's width on a terminal; off one (a pipe,
    a log file, CI) each note stays on one line, so paths and messages can be searched for.

    Returns:
        The console (no syntax highlighting of numbers and paths).
    """
    return Console(stderr=True, highlight=False, soft_wrap=not sys.stderr.isatty())
