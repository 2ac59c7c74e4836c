"""Errors raised by the recorders.

Every class subclasses a :mod:`steptrace.tracefmt.errors` class, so ``except TraceError`` catches them and
the ``trace`` command maps them to exit codes like any other steptrace failure. Messages say
what went wrong and what to do.
"""

from __future__ import annotations

from steptrace.tracefmt.errors import TraceNotFoundError, TraceUsageError


class RecorderUsageError(TraceUsageError):
    """A recorder was used in a way that cannot produce a valid trace (bad policy, bad step)."""


class StepOrderError(RecorderUsageError):
    """A step was opened out of order (a sample's step indices must increase) or decided twice."""


class ReferenceNotFoundError(TraceNotFoundError):
    """Teacher forcing or transplant asked the reference trace for something it does not hold
    (a sample, a step past its end, a tensor recorded without values)."""


class TransplantMismatchError(RecorderUsageError):
    """A reference tensor cannot replace a module's output: its dtype or shape differs."""


class GenerationModeError(RecorderUsageError):
    """``generate`` was asked for a decoding mode whose score rows are not one sequence each
    (beam search, assisted or prompt-lookup decoding)."""


class CoreMLUnavailableError(TraceUsageError):
    """Core ML cannot run a model on this machine (prediction needs macOS and its framework)."""


class TriageError(TraceUsageError):
    """``trace triage`` cannot localise a divergence with what it was given (exit 2)."""


class NotDeterministicError(TriageError):
    """Two plain re-runs of the candidate differ: transplant trials cannot be compared."""


class ReferenceValuesError(TriageError):
    """The reference holds statistics only for the tensors a transplant needs."""


class NotRerunnableError(TriageError):
    """The candidate cannot be re-run here (a trace imported from JSONL, Core ML off macOS)."""


class RerunFailedError(TriageError):
    """A re-run of the candidate failed (the script raised or exited with a non-zero status)."""
