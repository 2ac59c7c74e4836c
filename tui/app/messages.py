"""The viewer's messages: dataclasses carrying the data layer's values to widgets and back.

Workers (threads) post them; Textual delivers them on the app's event loop, where widgets update.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.message import Message

from steptrace.tui.viewer.data import RowMap
from steptrace.tui.viewer.values import SampleRow, Series, StepDetail, StepRow, TensorLine


@dataclass
class Opened(Message):
    """The traces are indexed: notices to show and the samples pane's rows."""

    notices: list[str]
    samples: list[SampleRow]


@dataclass
class Failed(Message):
    """Something could not be read or compared; the message is shown as a notice."""

    what: str
    error: str


@dataclass
class DiffReady(Message):
    """The differ finished: samples now carry verdicts."""

    samples: list[SampleRow]


@dataclass
class RowsReady(Message):
    """The rows of a sample (by step, or aligned by the differ) are known."""

    rowmap: RowMap
    step: int | None = None
    go_first: bool = False


@dataclass
class RowsLoaded(Message):
    """A page of step-table rows was read (``generation`` tells stale pages apart)."""

    generation: int
    start: int
    rows: list[StepRow]


@dataclass
class RowHighlighted(Message):
    """The step table's cursor moved to ``row`` (shown row)."""

    row: int


@dataclass
class DetailLoaded(Message):
    """The detail of the highlighted row of ``rowmap``."""

    detail: StepDetail | None
    rowmap: RowMap


@dataclass
class SeriesLoaded(Message):
    """The plot series of ``rowmap``'s sample."""

    series: Series
    rowmap: RowMap


@dataclass
class SampleChosen(Message):
    """The user opened a sample in the samples pane."""

    sample: str


@dataclass
class TensorChosen(Message):
    """The user highlighted a tensor in the tensors pane."""

    line: TensorLine


@dataclass
class PreviewLoaded(Message):
    """Values preview text of a tensor (both sides)."""

    name: str
    text: str


@dataclass
class Jump(Message):
    """Go to reference step ``step`` (a click on a plot)."""

    step: int


@dataclass
class Found(Message):
    """A search result: go to shown ``row`` of ``rowmap`` (None: nothing found) and say ``note``."""

    row: int | None
    note: str
    rowmap: RowMap | None = None


@dataclass
class PromptSubmitted(Message):
    """The user entered ``value`` at the ``kind`` prompt (``search`` or ``goto``)."""

    kind: str
    value: str
