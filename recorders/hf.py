"""Hugging Face ``generate`` recorder: every step's decision of every sequence of the batch,
each sequence its own sample. The only module of steptrace that imports transformers; torch
calls go through :mod:`steptrace.recorders.torch` helpers (scores are handled as torch tensors
duck-typed).

    out = record_generate(model, "cand.trace", input_ids=ids, attention_mask=mask,
                          max_new_tokens=32, use_cache=False, samples=["a", "b", "c"]).output

    with GenerateRecorder("cand.trace", model, tokenizer=tok, reference="ref.trace") as rec:
        out = rec.generate(input_ids=ids, max_new_tokens=32)     # teacher-forced by ref.trace

How it hooks in: a :class:`StepTraceLogitsProcessor`, appended after generate's own processors,
sees the scores of step *t* (what greedy search takes the argmax of; possibly masked to -inf by
processors such as ``min_new_tokens`` or ``suppress_tokens``, which SPEC.md §3.2 handles), keeps
a copy and returns them (teacher forcing: masked to -inf except the reference's token). With
``do_sample=True`` generate applies its sampling warpers (temperature, top-k, top-p) after every
processor, so the recorded scores are the model's processed logits before them. A
:class:`StepTraceStoppingCriteria` runs after the token is appended and writes step *t*'s
decisions with ``chosen`` = the token generate actually appended (sampling included). A
sequence is recorded up to and including its first EOS (``model.generation_config.eos_token_id``,
watched as ``eos``); the padding generate appends after it is not recorded.

Not supported: beam search (``num_beams > 1``: beams are reordered at every step, so a row of
the scores is not one sequence — refused with :class:`GenerationModeError`), assisted and
prompt-lookup decoding (several tokens per step; refused likewise). On MPS, generate may run one
extra step past ``max_new_tokens`` and drop it afterwards; that step stays in the trace.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import transformers
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from steptrace.tracefmt import WriteSummary

from .capture import HostCopy, Recorder
from .decisions import decide_rows, is_torch_tensor
from .errors import GenerationModeError, RecorderUsageError
from .generation import check_mode, eos_ids, simple_options
from .pieces import PieceJoiner, token_pieces
from .torch import force_rows, tensor_to_host, torch_defaults

__all__ = [
    "GenerateRecorder",
    "GenerateRecording",
    "GenerationModeError",
    "StepTraceLogitsProcessor",
    "StepTraceStoppingCriteria",
    "record_generate",
]


class GenerateRecorder(Recorder):
    """Records the decisions of Hugging Face ``generate`` calls, one sample per sequence.

    Args:
        trace: the trace directory to write.
        model: the generating model (a ``transformers`` model with ``generation_config``).
        tokenizer: a tokenizer whose decoded ids fill the vocabulary and each decision's
            ``piece``; None for no pieces (or pass ``vocab=``).
        prefix: default sample ids are ``f"{prefix}{n}"``, ``n`` counting sequences over every
            :meth:`generate` call of this recorder.
        **options: :class:`recorders.capture.Recorder` options (``reference`` for teacher
            forcing, ``policy`` — ``{"logits:token": "stats"}`` records each step's scores —,
            ``k``, ``watched``, ``metadata``, ``vocab``, ``mode``, ``writer_options``, ``tags``).
            EOS ids of ``model.generation_config`` are watched as ``eos`` (``eos.1``, ... for
            more) unless ``watched`` names them.

    Raises:
        RecorderUsageError: a bad option.
        TraceExistsError: a trace exists at ``trace`` and ``mode="create"``.
        TraceNotFoundError: the reference trace does not exist.
    """

    def __init__(
        self,
        trace: str | os.PathLike[str],
        model: Any,
        *,
        tokenizer: Any = None,
        prefix: str = "",
        **options: Any,
    ) -> None:
        if not isinstance(prefix, str):
            raise RecorderUsageError(f"prefix must be a string, got {prefix!r}")
        self.model = model
        self.eos = eos_ids(model)
        watched = dict(options.pop("watched", None) or {})
        for i, e in enumerate(self.eos):
            if e not in watched.values():
                watched["eos" if i == 0 else f"eos.{i}"] = e
        self.tokenizer = tokenizer
        self._partial: frozenset[int] = frozenset()
        if tokenizer is not None and options.get("vocab") is None:
            options["vocab"], self._partial = token_pieces(tokenizer)
        config = getattr(model, "config", None)
        defaults = {**torch_defaults(model), "model": getattr(config, "name_or_path", None) or type(model).__name__}
        defaults.update(options.pop("defaults", None) or {})
        tags = {"transformers.version": transformers.__version__,
                "transformers.model_type": str(getattr(config, "model_type", None)),
                **dict(options.pop("tags", None) or {})}
        super().__init__(trace, watched=watched, defaults=defaults, tags=tags, **options)
        self.prefix = prefix
        self.last_samples: list[str] = []
        self._count = 0
        self._live: list[StepTraceLogitsProcessor] = []

    def to_host(self, value: Any, dtype: str | None) -> tuple[np.ndarray | HostCopy, str | None]:
        """Host data of a torch tensor (scores recorded as ``logits:<head>``) or of anything
        :meth:`recorders.capture.Recorder.to_host` accepts.

        Raises:
            UnsupportedDtypeError: a tensor dtype SPEC.md does not define.
        """
        if is_torch_tensor(value):
            return tensor_to_host(value)
        return super().to_host(value, dtype)

    def processors(
        self, *, samples: Sequence[str] | None = None, head: str = "token"
    ) -> tuple[LogitsProcessorList, StoppingCriteriaList]:
        """Return a fresh logits processor and stopping criteria for one ``generate`` call, as
        the list types ``generate`` takes.

        Pass them as they are: ``generate(..., logits_processor=procs, stopping_criteria=crits)``
        (or use :meth:`generate`); to add your own, put them first:
        ``LogitsProcessorList([mine, *procs])``. ``procs[0]`` is the
        :class:`StepTraceLogitsProcessor`, ``crits[0]`` the :class:`StepTraceStoppingCriteria`.
        Without the criteria each step is written at the next step, and the last one at
        :meth:`close` with ``chosen`` = the argmax (exact for greedy decoding only).

        Args:
            samples: one sample id per row of the scores (batch × ``num_return_sequences``);
                None: ``f"{prefix}{n}"``.
            head: the decision head.

        Returns:
            ``(LogitsProcessorList([processor]), StoppingCriteriaList([criteria]))``.
        """
        proc = StepTraceLogitsProcessor(self, samples=samples, head=head)
        return LogitsProcessorList([proc]), StoppingCriteriaList([StepTraceStoppingCriteria(proc)])

    def _take_ids(self, rows: int) -> list[str]:
        ids = [f"{self.prefix}{self._count + i}" for i in range(rows)]
        self._count += rows
        return ids

    def generate(self, *args: Any, samples: Sequence[str] | None = None, head: str = "token", **kwargs: Any) -> Any:
        """Call ``model.generate(*args, **kwargs)`` with this recorder's processor and criteria
        appended to any given; every step of every sequence is recorded.

        Args:
            *args: passed to ``generate``.
            samples: one sample id per sequence (batch × ``num_return_sequences``); None:
                ``f"{prefix}{n}"``.
            head: the decision head.
            **kwargs: passed to ``generate``.

        Returns:
            What ``generate`` returns.

        Raises:
            GenerationModeError: beam search, assisted or prompt-lookup decoding.
            RecorderUsageError: ``samples`` does not hold one id per sequence.
            ReferenceNotFoundError: teacher forcing past the reference's last step.
        """
        check_mode(self.model, kwargs)
        procs, crits = self.processors(samples=samples, head=head)
        proc = procs[0]
        kwargs["logits_processor"] = LogitsProcessorList([*(kwargs.get("logits_processor") or []), *procs])
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.get("stopping_criteria") or []), *crits])
        finished = False
        try:
            out = self.model.generate(*args, **kwargs)
            finished = True
        finally:
            if not finished:
                proc.discard()  # generate failed: the pending step's token was never appended
        proc.finish()
        self.last_samples = list(proc.samples or [])
        return out

    def close(self) -> WriteSummary:
        """Write steps still pending (see :meth:`processors`), then close the trace.

        Returns:
            The writer's :class:`steptrace.tracefmt.WriteSummary`.
        """
        if not self._closed:
            for proc in list(self._live):
                proc.finish()
        return super().close()


class StepTraceLogitsProcessor(LogitsProcessor):
    """A ``LogitsProcessor`` recording each step's scores as decisions, one sample per row.

    Keep it after your own processors (as :meth:`GenerateRecorder.generate` does) so the
    recorded scores are the ones greedy search takes the argmax of. Under teacher forcing it returns
    the scores masked to -inf except the reference's token (recording ``forced=true``, the
    token as ``chosen`` and the run's own ``argmax`` and ranks).

    Args:
        recorder: the :class:`GenerateRecorder` writing the trace.
        samples: one sample id per row; None: the recorder's ``f"{prefix}{n}"``.
        head: the decision head.

    Raises:
        RecorderUsageError: ``samples`` holds duplicates or non-strings.
    """

    def __init__(self, recorder: GenerateRecorder, *, samples: Sequence[str] | None = None, head: str = "token") -> None:
        if samples is not None:
            samples = list(samples)
            if not all(isinstance(s, str) and s for s in samples) or len(set(samples)) != len(samples):
                raise RecorderUsageError(f"samples must be distinct non-empty strings, got {samples!r}")
        self.recorder = recorder
        self.samples = samples
        self.head = head
        self._start: int | None = None
        self._finished: list[bool] = []
        self._pending: tuple[int, Any, list[int], set[int], list[int]] | None = None
        self._joiners: dict[int, PieceJoiner] = {}
        recorder._live.append(self)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Record step *t*'s scores (written once its token is known); return the scores to use.

        Args:
            input_ids: ``(rows, length)`` token ids so far.
            scores: ``(rows, vocabulary)`` processed scores.

        Returns:
            ``scores``, or under teacher forcing a copy masked to the reference's tokens.

        Raises:
            RecorderUsageError: the rows do not match ``samples`` (or the first call's rows).
            ReferenceNotFoundError: teacher forcing past the reference's last step.
        """
        rows = int(scores.shape[0])
        if self._start is None:
            self._start = int(input_ids.shape[1])
            if self.samples is None:
                self.samples = self.recorder._take_ids(rows)
            self._finished = [False] * len(self.samples)
        if rows != len(self.samples):
            raise RecorderUsageError(
                f"generate scored {rows} rows for {len(self.samples)} samples: give one sample id per sequence "
                "(batch × num_return_sequences); beam search (num_beams > 1) is not supported"
            )
        self._flush(input_ids[:, -1].tolist())
        step = int(input_ids.shape[1]) - self._start
        active = [i for i in range(rows) if not self._finished[i]]
        rec = self.recorder
        forced: list[int] = []
        out = scores
        if rec.teacher_forcing and active:
            forced = [rec.reference.token(self.samples[i], step, head=self.head) for i in active]  # type: ignore[union-attr]
            out = force_rows(scores, active, forced)
        self._pending = (step, scores.detach().clone(), active, set(active) if forced else set(), forced)
        return out

    def _flush(self, chosen: Sequence[int] | None) -> None:
        """Write the pending step with ``chosen[i]`` for row i (None: forced token or argmax)."""
        if self._pending is None:
            return
        step, scores, active, forced_rows, forced = self._pending
        self._pending = None
        if not active:
            return
        rec = self.recorder
        if chosen is None:
            chosen_active = forced if forced else [None] * len(active)
        else:
            chosen_active = [int(chosen[i]) for i in active]
        sub = scores if len(active) == scores.shape[0] else scores[active]
        watched = list(rec.metadata.watched.values()) if self.head == rec.metadata.vocab_head else []
        decisions = decide_rows(sub, k=rec.k, chosen=chosen_active, watched=watched)
        keep_logits = rec.policy.mode(f"logits:{self.head}") != "none"
        eos = set(rec.eos)
        joined = rec._partial and self.head == rec.metadata.vocab_head
        for j, (i, d) in enumerate(zip(active, decisions)):
            keys = {}
            if joined:
                joiner = self._joiners.setdefault(i, PieceJoiner(rec.tokenizer, rec._partial))
                piece = joiner.piece(d.chosen)
                if piece is not None:
                    keys["piece"] = piece
            with rec.step(sample=self.samples[i], index=step):  # type: ignore[index]
                rec.record_decision(d, head=self.head, forced=i in forced_rows, **keys)
                if keep_logits:
                    rec.record(f"logits:{self.head}", sub[j], source="generate scores")
            if d.chosen in eos:
                self._finished[i] = True

    def finish(self) -> None:
        """Write a step still pending (the last one when no :class:`StepTraceStoppingCriteria`
        ran): ``chosen`` is the forced token or the argmax (exact for greedy decoding)."""
        self._flush(None)
        self.discard()

    def discard(self) -> None:
        """Drop a pending step without writing it (generate failed before using its token)."""
        self._pending = None
        if self in self.recorder._live:
            self.recorder._live.remove(self)


class StepTraceStoppingCriteria(StoppingCriteria):
    """Writes the pending step of a :class:`StepTraceLogitsProcessor` once generate has appended
    its tokens, so ``chosen`` is the token used (sampled or greedy). Never stops generation.

    Args:
        processor: the processor of the same ``generate`` call.
    """

    def __init__(self, processor: StepTraceLogitsProcessor) -> None:
        self.processor = processor

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        """Write the step whose tokens were just appended; return "not done" for every row."""
        self.processor._flush(input_ids[:, -1].tolist())
        return input_ids[:, -1] < 0  # token ids are never negative: all False, a bool tensor


@dataclass
class GenerateRecording:
    """What :func:`record_generate` produced.

    Attributes:
        output: what ``generate`` returned (token ids, or a ``GenerateOutput``).
        summary: the closed trace's :class:`steptrace.tracefmt.WriteSummary`.
        samples: the sample id of each sequence, in row order.
    """

    output: Any
    summary: WriteSummary
    samples: list[str]


def record_generate(
    model: Any,
    trace: str | os.PathLike[str],
    *args: Any,
    samples: Sequence[str] | None = None,
    prefix: str = "",
    tokenizer: Any = None,
    recorder_options: Mapping[str, Any] | None = None,
    **generate_kwargs: Any,
) -> GenerateRecording:
    """Run ``model.generate`` once, recording every step of every sequence into ``trace``.

    Args:
        model: the ``transformers`` model.
        trace: the trace directory to write.
        *args: positional arguments of ``generate`` (the input ids).
        samples: one sample id per sequence; None: ``f"{prefix}{i}"``.
        prefix: prefix of the default sample ids.
        tokenizer: fills ``piece`` and the vocabulary (optional).
        recorder_options: :class:`GenerateRecorder` options (``reference``, ``policy``, ``k``,
            ``metadata``, ``mode``, ``vocab``, ...).
        **generate_kwargs: passed to ``generate`` (``input_ids``, ``attention_mask``,
            ``max_new_tokens``, ``use_cache``, ``do_sample``, ...); the simple ones are kept in
            the trace's tag ``transformers.generate``.

    Returns:
        A :class:`GenerateRecording` (``output``, ``summary``, ``samples``).

    Raises:
        GenerationModeError: beam search, assisted or prompt-lookup decoding.
        RecorderUsageError: a bad sample list or option.
        ReferenceNotFoundError: teacher forcing past the reference's last step.
        TraceExistsError: a trace exists at ``trace`` (pass ``recorder_options={"mode": "overwrite"}``).
    """
    check_mode(model, generate_kwargs)  # before the trace is created
    opts = dict(recorder_options or {})
    opts["tags"] = {"transformers.generate": simple_options(generate_kwargs), **dict(opts.get("tags") or {})}
    with GenerateRecorder(trace, model, tokenizer=tokenizer, prefix=prefix, **opts) as rec:
        output = rec.generate(*args, samples=samples, **generate_kwargs)
    return GenerateRecording(output, rec.close(), rec.last_samples)
