"""Budgeted capture: full tensors of the last N steps held in memory, written with values only
when a trigger fires.

Under a :class:`Budget`, every tensor whose policy mode is ``"full"`` is *held*: its row (the
host copy of its values, its call, order and source) stays in a ring of the last ``steps``
steps. A trigger at a step marks that step and the ``steps - 1`` steps before it (and the
``after`` steps that follow it) as *covered*. When a step leaves the ring, each of its rows is
written exactly once: with values if a trigger covered its step, statistics and digest only
otherwise. No row is ever written twice, so ``(sample, step, name, call)`` stays unique.

At close the rows still held are written the same way: with values where a trigger covered
them (including a trigger whose ``after`` steps never came), statistics only elsewhere. A
recording killed before close loses the held rows of its last ``steps`` steps (their decisions
and the ``"stats"`` tensors were written already).

Memory: at most ``steps`` steps of ``"full"`` tensors. "Steps" are counted in recording order
over all samples: a batch decoded one step per sample at a time fills the ring ``batch`` times
faster.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from .errors import RecorderUsageError


@dataclass(frozen=True, kw_only=True)
class Budget:
    """When to keep values of ``"full"`` tensors: a ring of the last ``steps`` steps and triggers.

    Args:
        steps: steps of full tensors held (N); a trigger covers its step and the N - 1 before.
        after: steps after a trigger that are covered too.
        margin_below: a decision whose margin is below this fires (None: off).
        nonfinite: a NaN or ±Inf in any recorded tensor, or a NaN/+Inf logsumexp, fires
            (one extra pass over each recorded host tensor on the caller's thread; device
            tensors are checked on the device and seen when their copy lands).
        at_steps: step indices that fire (for every sample), e.g. ``{0, 41}``.
        heads: decision heads whose margin can fire; None for every head.

    Raises:
        RecorderUsageError: ``steps < 1``, ``after < 0`` or a negative step index.
    """

    steps: int = 8
    after: int = 0
    margin_below: float | None = None
    nonfinite: bool = True
    at_steps: Collection[int] = field(default_factory=frozenset)
    heads: Collection[str] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise RecorderUsageError(f"Budget(steps={self.steps!r}): hold at least 1 step")
        if isinstance(self.after, bool) or not isinstance(self.after, int) or self.after < 0:
            raise RecorderUsageError(f"Budget(after={self.after!r}) must be a non-negative integer")
        at = frozenset(int(s) for s in self.at_steps)
        if any(s < 0 for s in at):
            raise RecorderUsageError(f"Budget(at_steps=...) holds a negative step: {sorted(at)}")
        object.__setattr__(self, "at_steps", at)
        if self.heads is not None:
            object.__setattr__(self, "heads", frozenset(self.heads))

    def margin_fires(self, head: str, margin: float) -> bool:
        """Return whether a decision of ``head`` with ``margin`` fires the margin trigger.

        Args:
            head: the decision head.
            margin: its margin (NaN never fires here; see ``nonfinite``).

        Returns:
            True when ``margin < margin_below`` for a watched head.
        """
        if self.margin_below is None or (self.heads is not None and head not in self.heads):
            return False
        return margin < self.margin_below

    def __str__(self) -> str:
        parts = [f"steps={self.steps}", f"after={self.after}"]
        if self.margin_below is not None:
            parts.append(f"margin_below={self.margin_below}")
        if self.nonfinite:
            parts.append("nonfinite")
        if self.at_steps:
            parts.append("at_steps=" + "/".join(map(str, sorted(self.at_steps))))
        return ",".join(parts)


@dataclass
class HeldRow:
    """One tensor row waiting to be written: where it belongs and its host data.

    ``data`` is a canonical numpy array or a :class:`recorders.capture.HostCopy`.
    """

    sample: str
    step: int
    name: str
    call: int
    order: int
    source: str | None
    dtype: str | None
    data: Any


class Ring:
    """The held steps of a :class:`Budget` and the step ranges triggers covered.

    Steps are identified by a sequence number that increases by one per step recorded.

    Args:
        budget: the budget.
        emit: called once per row as it leaves the ring: ``emit(row, values)``.
    """

    def __init__(self, budget: Budget, emit: Callable[[HeldRow, bool], None]) -> None:
        self.budget = budget
        self._emit = emit
        self._held: deque[tuple[int, list[HeldRow]]] = deque()
        self._covered: list[tuple[int, int]] = []  # inclusive (first, last) sequence ranges

    def begin(self, seq: int) -> None:
        """Start step ``seq``: write out the steps that fell out of the window, hold a new one.

        Args:
            seq: the new step's sequence number (greater than every earlier one).
        """
        while self._held and self._held[0][0] <= seq - self.budget.steps:
            self._evict()
        self._held.append((seq, []))

    def hold(self, row: HeldRow) -> None:
        """Hold ``row`` in the newest step.

        Raises:
            RecorderUsageError: no step was begun.
        """
        if not self._held:
            raise RecorderUsageError("Ring.hold before Ring.begin: open a step first")
        self._held[-1][1].append(row)

    def fire(self, seq: int) -> None:
        """A trigger at step ``seq``: cover it, the ``steps - 1`` before it, ``after`` after it."""
        self._covered.append((seq - self.budget.steps + 1, seq + self.budget.after))

    def covered(self, seq: int) -> bool:
        """Return whether a trigger covered step ``seq``."""
        return any(lo <= seq <= hi for lo, hi in self._covered)

    def rows(self) -> Iterator[tuple[int, HeldRow]]:
        """Yield ``(seq, row)`` for every held row, oldest first."""
        for seq, rows in self._held:
            for row in rows:
                yield seq, row

    def drain(self) -> None:
        """Write every held row (at close): with values where a trigger covered its step."""
        while self._held:
            self._evict()

    def _evict(self) -> None:
        seq, rows = self._held.popleft()
        values = self.covered(seq)
        self._covered = [(lo, hi) for lo, hi in self._covered if hi > seq]
        for row in rows:
            self._emit(row, values)
