"""The error hierarchy of steptrace.

Every expected failure raised by steptrace is a :class:`TraceError`. Each subclass names
one kind of failure, and each message says what went wrong and what to do about it. The
``trace`` command maps these classes to exit codes in one place (``tui/cli.py``).
"""

from __future__ import annotations


class TraceError(Exception):
    """Root of every expected steptrace failure."""


class TraceUsageError(TraceError):
    """The caller asked for something that cannot be done (bad argument, bad option)."""


class TraceNotFoundError(TraceError):
    """A trace, sample, step or tensor that was asked for does not exist."""


class TraceExistsError(TraceError):
    """A writer was asked to create a trace where one already exists."""


class TraceFormatError(TraceError):
    """A file is not a steptrace trace, or breaks SPEC.md (foreign, malformed, wrong magic)."""


class TraceCorruptError(TraceFormatError):
    """A trace that was closed cleanly has been damaged since (truncated, bytes changed)."""


class TraceVersionError(TraceFormatError):
    """A trace was written by a newer, incompatible major version of the format."""


class TraceWriteError(TraceError):
    """The background writer failed (disk full, permissions); the message names the cause."""


class UnsupportedDtypeError(TraceUsageError):
    """A tensor has a dtype that SPEC.md does not define (complex, object, strings)."""


class ValuesNotRecordedError(TraceNotFoundError):
    """A tensor row exists but its values were not recorded (stats-only capture)."""


class JsonlError(TraceFormatError):
    """A JSONL interchange line is malformed; the message gives the line number and reason."""

    def __init__(self, path: str, line: int, reason: str) -> None:
        self.path = path
        self.line = line
        self.reason = reason
        super().__init__(f"{path}:{line}: {reason}")
