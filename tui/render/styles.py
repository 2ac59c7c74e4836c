"""Rich styles shared by every view of a diff: the text report and the viewer's widgets."""

from __future__ import annotations

#: Style of each verdict (``after``: a row after a free-running divergence; its tokens follow from it).
VERDICT_STYLE = {"identical": "green", "equivalent": "green", "drift": "yellow", "flip": "magenta",
                 "divergent": "bold red", "missing": "red", "after": "dim"}
