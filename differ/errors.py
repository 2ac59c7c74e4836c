"""Errors the differ raises. Each is a tracefmt :class:`~tracefmt.errors.TraceError` subclass, so
the ``trace`` command maps it to exit code 2 in its one place, and each message says what to do.
"""

from __future__ import annotations

from steptrace.tracefmt.errors import TraceFormatError, TraceUsageError


class IncompatibleTracesError(TraceUsageError):
    """Two traces cannot be compared: different vocabularies, heads or watched-token ids."""


class PolicyError(TraceUsageError):
    """A tolerance policy (TOML file or command-line override) is malformed."""


class MappingError(TraceUsageError):
    """A tensor-name mapping file is malformed."""


class AlignmentError(TraceUsageError):
    """The traces cannot be aligned as asked (missing key columns, duplicate keys)."""


class ReportFileError(TraceUsageError):
    """A saved diff report cannot be read: missing, unreadable, too large or not JSON."""


class DiffFormatError(TraceFormatError):
    """A trace breaks a rule the differ relies on (e.g. a (sample, step, head) recorded twice)."""


class KernelError(TraceUsageError):
    """``STEPTRACE_KERNEL`` asks for what this install cannot do (a path that is not numpy,
    numba or auto; numba where it is not installed or does not import)."""
