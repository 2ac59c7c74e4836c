"""Step bookkeeping shared by every recorder: the open step, call indices, execution order.

A step is ``(sample, index)``. Steps are opened explicitly (``with book.step(sample=...,
index=...)``) or automatically (:meth:`StepBook.begin_step` from a step module's hook, an ONNX
Runtime ``run()``, a Hugging Face generation step); a record made while no step is open opens the
sample's next step. A sample's step indices must increase: each (sample, step) is recorded once,
which keeps SPEC.md's keys unique.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .errors import RecorderUsageError, StepOrderError


class StepKey(NamedTuple):
    """The (sample, step index) a record belongs to."""

    sample: str
    index: int


class Step:
    """The open step's counters.

    Attributes:
        key: its (sample, index).
        seq: its position among all steps recorded (0, 1, 2, ... over every sample).
        order: the execution order the next tensor record of the step gets.
        calls: calls counted so far per name.
        heads: heads decided so far.
    """

    __slots__ = ("calls", "heads", "key", "order", "seq")

    def __init__(self, key: StepKey, seq: int) -> None:
        self.key = key
        self.seq = seq
        self.order = 0
        self.calls: dict[str, int] = {}
        self.heads: set[str] = set()

    def count(self, name: str) -> int:
        """Count one call of ``name`` in this step (the one place calls are counted).

        Args:
            name: a module, session or tensor name.

        Returns:
            The 0-based call index of this call within the step.
        """
        calls = self.calls
        call = calls.get(name, 0)
        calls[name] = call + 1
        return call


def check_sample(sample: object) -> str:
    """Return ``sample`` if it is a valid sample id.

    Raises:
        RecorderUsageError: it is not a non-empty string.
    """
    if not isinstance(sample, str) or not sample:
        raise RecorderUsageError(f"sample must be a non-empty string, got {sample!r}")
    return sample


class StepScope:
    """``with book.step(...)``: opens the step on entry, ends it on exit if it is still open.
    (A class, not a generator: it runs once per decode step, between the model's calls.)"""

    __slots__ = ("_book", "_index", "_sample", "_step")

    def __init__(self, book: StepBook, sample: str | None, index: int | None) -> None:
        self._book, self._sample, self._index = book, sample, index
        self._step: Step | None = None

    def __enter__(self) -> StepKey:
        key = self._book.begin_step(sample=self._sample, index=self._index)
        self._step = self._book._step
        return key

    def __exit__(self, *exc: object) -> None:
        if self._book._step is not None and self._book._step is self._step:
            self._book.end_step()


class RepeatedRows:
    """A recorder's rows that repeat step after step (a decode loop's hooked modules: the same
    names, calls, dtypes and shapes in the same order), written from a
    :class:`~tracefmt.lane.RowTemplate` once the rows of two steps in a row were the same.

    A recorder gives the rows it writes together as a *signature* (a list of tuples of every
    field but the step, the order and the array) with their arrays: :meth:`repeat` writes them
    from the template when the signature is the template's, else the caller writes them row by
    row and tells :meth:`saw`. Rows written together at different points of a step (before a
    decision and after it, say) are told apart by the step's order where they start.
    """

    __slots__ = ("_at",)

    #: Points of a step followed at most (the orders where rows written together start).
    POINTS = 16

    def __init__(self) -> None:
        # the order where rows start -> [signature of the last step's, template's signature,
        # template, its calls]
        self._at: dict[int, list[Any]] = {}

    def repeat(self, lane: Any, st: Step, sig: list[tuple], arrays: list[np.ndarray]) -> bool:
        """Write the rows of ``arrays`` at ``st`` (from its next order on, their calls added to
        ``st.calls`` as :meth:`saw` was told) if ``sig`` is the template's; False otherwise."""
        order = st.order
        at = self._at.get(order)
        if at is None or sig != at[1]:
            return False
        st.order = order + len(arrays)
        if at[3]:
            st.calls.update(at[3])
        key = st.key
        lane.template_rows(at[2], key.sample, key.index, order, arrays)
        return True

    def saw(self, lane: Any, order: int, sig: list[tuple], rows: list[tuple], calls: dict[str, int] | None = None) -> None:
        """The caller wrote ``rows`` (of signature ``sig``) row by row from ``order`` on;
        ``calls``: the calls they counted, for :meth:`repeat` to count again."""
        at = self._at.get(order)
        if at is None:
            if len(self._at) < self.POINTS:
                self._at[order] = [sig, None, None, None]
        elif sig == at[0]:  # the second step in a row with these rows here: a template of them
            at[1:] = [sig, lane.row_template(rows), dict(calls or {})]
        else:
            at[0] = sig


class StepBook:
    """Opens and closes steps; counts calls and execution order within the open one.

    Args:
        sample: the sample id of steps that do not name one.

    Raises:
        RecorderUsageError: ``sample`` is not a non-empty string.
    """

    def __init__(self, sample: str = "0") -> None:
        self._sample = check_sample(sample)
        self._last: dict[str, int] = {}
        self._auto: tuple[str, int] | None = None  # the last step opened by a record outside any step
        self._step: Step | None = None
        self._seq = -1

    @property
    def current_step(self) -> StepKey | None:
        """The open step, or None between steps."""
        return None if self._step is None else self._step.key

    def set_sample(self, sample: str) -> None:
        """End the open step; later steps that name no sample belong to ``sample``.

        Raises:
            RecorderUsageError: ``sample`` is not a non-empty string.
        """
        check_sample(sample)
        self.end_step()
        self._sample = sample

    def begin_step(self, *, sample: str | None = None, index: int | None = None) -> StepKey:
        """End the open step and open a new one (automatic steps call this).

        Args:
            sample: the sample; defaults to the current sample (see :meth:`set_sample`).
            index: the step index; defaults to the sample's previous index + 1 (0 at first).

        Returns:
            The new step's key.

        Raises:
            StepOrderError: ``index`` is not above the sample's previous step index.
            RecorderUsageError: a malformed sample or index, or the recorder is closed.
        """
        self._check()
        self.end_step()
        s = check_sample(self._sample if sample is None else sample)
        last = self._last.get(s, -1)
        i = last + 1 if index is None else index
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < 2**31:
            raise RecorderUsageError(f"step index must be an integer in [0, 2**31), got {i!r}")
        if i <= last:
            hint = (f"; step {last} was opened automatically by a record made outside any step: open the step "
                    "before running the model (`with rec.step(): logits = model(x)`)") if self._auto == (s, last) else ""
            raise StepOrderError(
                f"step {i} of sample {s!r} opened after step {last}: record each step of a sample once, "
                f"in increasing order (use another sample id for another run of the same input){hint}"
            )
        self._last[s] = i = int(i)
        self._sample = s
        self._seq += 1
        self._step = Step(StepKey(s, i), self._seq)
        self._on_begin(self._step)
        return self._step.key

    def end_step(self) -> None:
        """Close the open step, if any (later records open the next step automatically)."""
        self._step = None

    def step(self, *, sample: str | None = None, index: int | None = None) -> StepScope:
        """Context manager around one explicit step: ``with rec.step(sample="utt1", index=3):``.

        Args:
            sample: as for :meth:`begin_step`.
            index: as for :meth:`begin_step`.

        Returns:
            The context manager; ``with`` gives the step's key.
        """
        return StepScope(self, sample, index)

    def next_call(self, name: str) -> int:
        """Count one call of ``name`` in the open step (opening one if needed).

        Args:
            name: a module, session or tensor name.

        Returns:
            The 0-based call index of this call within the step.
        """
        return self._current().count(name)

    def _current(self) -> Step:
        if self._step is None:
            self._auto = self.begin_step()
        return self._step  # type: ignore[return-value]

    def _check(self) -> None:
        """Raise if no step may be opened now (subclasses: closed, failed)."""

    def _on_begin(self, step: Step) -> None:
        """Called when ``step`` opens (subclasses: budget bookkeeping)."""
