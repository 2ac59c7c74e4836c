"""Values the viewer's data layer hands to widgets: plain frozen dataclasses, no I/O.

They travel to widgets inside the dataclass Messages of :mod:`steptrace.tui.app.messages`; widgets render
them and never touch a reader or the differ.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from steptrace.differ.verdict import VERDICTS  # noqa: F401  (re-exported for the widgets)

from steptrace.tui.render.styles import VERDICT_STYLE  # noqa: F401  (re-exported for the widgets)


#: How invisible characters of a piece are drawn: a space is ␣, a newline ⏎, a tab ⇥.
_VISIBLE = str.maketrans({" ": "␣", "\n": "⏎", "\t": "⇥", "\r": "␍", "\u00a0": "⍽"})


def display_piece(piece: str | None) -> str:
    """``piece`` as drawn in the viewer: spaces and control characters made visible (``" the"`` →
    ``"␣the"``, ``"\n"`` → ``"⏎"``); SentencePiece's ``▁`` is kept; None is empty."""
    if not piece:
        return ""
    s = piece.translate(_VISIBLE)
    if any(ord(c) < 32 or ord(c) == 127 for c in s):
        s = "".join(c if ord(c) >= 32 and ord(c) != 127 else f"\\x{ord(c):02x}" for c in s)
    return s


def row_verdict(verdict: str | None, after: bool) -> str | None:
    """The verdict a row shows: ``after`` for rows after a free-running divergence (their tokens
    follow from it), else the differ's verdict."""
    return "after" if after and verdict is not None else verdict


@dataclass(frozen=True)
class Decision:
    """One recorded decision (SPEC.md §3) of one head at one step."""

    step: int
    head: str
    chosen: int
    argmax: int
    forced: bool
    topk_ids: tuple[int, ...]
    topk_logits: tuple[float, ...]
    topk_pieces: tuple[str | None, ...]
    margin: float
    logsumexp: float | None
    piece: str | None
    watched: tuple[tuple[str, int, float | None, int | None], ...] = ()  # (name, id, logit, rank)

    def probs(self) -> list[float]:
        """Probabilities of the top-k: ``exp(logit - logsumexp)``, or renormalised over the top-k."""
        xs = [x for x in self.topk_logits if math.isfinite(x)]
        if not xs:
            return [0.0] * len(self.topk_logits)
        if self.logsumexp is not None and math.isfinite(self.logsumexp):
            lse = self.logsumexp
        else:
            m = max(xs)
            lse = m + math.log(sum(math.exp(x - m) for x in xs))
        return [math.exp(x - lse) if math.isfinite(x) else 0.0 for x in self.topk_logits]

    def rank_of(self, token: int) -> int | None:
        """Rank of ``token`` in this top-k, or None when it is beyond it."""
        try:
            return self.topk_ids.index(token)
        except ValueError:
            return None


@dataclass(frozen=True)
class StepRow:
    """One row of the step table: a step of one trace, or an aligned pair of steps.

    ``verdict`` is None without a diff; ``after`` marks rows after a divergence of the fed-back
    tokens; ``low`` marks a margin below the low-margin threshold on either side.
    """

    row: int
    a_step: int | None
    b_step: int | None
    a: Decision | None
    b: Decision | None
    verdict: str | None = None
    after: bool = False
    low: bool = False
    watched: tuple[tuple[str, int | None, int | None, float | None], ...] = ()  # (name, a rank, b rank, b lost by)

    @property
    def step(self) -> int:
        """The step shown for the row (the reference's, else the candidate's)."""
        return self.a_step if self.a_step is not None else (self.b_step if self.b_step is not None else -1)


@dataclass(frozen=True)
class TensorStat:
    """One tensor record of one trace (statistics; values by reference when recorded)."""

    name: str
    call: int
    order: int
    source: str | None
    dtype: str
    shape: tuple[int, ...]
    min: float | None
    max: float | None
    mean: float | None
    abs_max: float | None
    nan_count: int
    inf_count: int
    part: int
    value_ref: int | None
    digest: bytes | None = None

    @property
    def has_values(self) -> bool:
        """Values were recorded (not statistics only)."""
        return self.value_ref is not None


@dataclass(frozen=True)
class TensorCompare:
    """The differ's comparison of one tensor at one step (docs/differ.md §5)."""

    basis: str
    bitexact: bool
    within: bool
    reason: str | None
    max_abs: float | None
    max_rel: float | None
    cosine: float | None
    sqnr_db: float | None


@dataclass(frozen=True)
class TensorLine:
    """One line of the tensors pane: a tensor on both sides, its comparison, culprit flag."""

    name: str
    call: int
    order: int
    a: TensorStat | None
    b: TensorStat | None
    compare: TensorCompare | None = None
    culprit: bool = False


@dataclass(frozen=True)
class StepDetail:
    """Everything the detail and tensors panes show for one selected row."""

    sample: str
    row: StepRow
    a_heads: tuple[Decision, ...]
    b_heads: tuple[Decision, ...]
    tensors: tuple[TensorLine, ...]
    epsilon: float | None = None
    a_label: str = "A"
    b_label: str | None = None
    evidence: str | None = None  # flip/divergent rows: the numbers that decided it (docs/differ.md §4)
    pointer: str | None = None  # a divergence whose tensors live at an earlier step: where the culprit is


@dataclass(frozen=True)
class SampleRow:
    """One line of the samples pane."""

    sample: str
    a_steps: int
    b_steps: int | None = None
    verdict: str | None = None
    first_step: int | None = None
    kind: str | None = None
    drift_step: int | None = None
    culprit: str | None = None


@dataclass(frozen=True)
class Series:
    """Per-bucket values over a sample's steps for the plots (buckets cover ``lo..hi``).

    ``a_margin``/``b_margin`` hold the smallest margin in each bucket (NaN: no step);
    ``tensor`` the largest tensor error (two traces) or magnitude (one trace); ``tensor_bad``
    buckets holding a tensor beyond tolerance (or NaN/Inf with one trace).
    """

    sample: str
    lo: int
    hi: int
    a_margin: np.ndarray
    b_margin: np.ndarray | None = None
    tensor: np.ndarray | None = None
    tensor_bad: np.ndarray | None = None
    tensor_label: str = "tensor |max|"
    first_divergence: int | None = None
    drift_onset: int | None = None
    low_margin: float = 1.0

    def bucket_of(self, step: int, width: int) -> int:
        """Column (0..width-1) at which ``step`` is drawn on a plot ``width`` columns wide."""
        span = max(self.hi - self.lo + 1, 1)
        return min(max((step - self.lo) * width // span, 0), width - 1)
