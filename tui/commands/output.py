"""Output files of the ``trace`` subcommands (``--json FILE``, ``--save-mapping FILE``)."""

from __future__ import annotations

import os
from pathlib import Path

from steptrace.tracefmt.errors import TraceUsageError


def write_output(path: str, text: str, *, what: str) -> None:
    """Write ``text`` to the file ``path`` (a command's --json, --save-mapping, ...).

    Args:
        path: the file to write.
        text: its content (UTF-8).
        what: names the content in the error message (``"JSON report"``).

    Raises:
        TraceUsageError: the file cannot be written (the message names it and why).
    """
    try:
        Path(path).write_text(text, encoding="utf-8")
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise TraceUsageError(f"cannot write the {what} to {path}: {reason}; choose a writable path") from None


def check_writable(path: str, *, what: str) -> None:
    """Refuse, before a long command runs, an output file that could not be written at its end.

    Args:
        path: the file the command will write.
        what: names the content in the error message (``"JSON report"``).

    Raises:
        TraceUsageError: its folder does not exist or is not writable, or it is a folder.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise TraceUsageError(f"cannot write the {what} to {path}: it is a folder; name a file")
    if not folder.is_dir():
        raise TraceUsageError(f"cannot write the {what} to {path}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise TraceUsageError(f"cannot write the {what} to {path}: the folder {folder} is not writable")
