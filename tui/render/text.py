"""Reports to paste: a :class:`steptrace.differ.DiffReport` as plain text (full width, nothing cut) or as
markdown (GitHub tables, the first screen and figures in code blocks), laid out from the blocks
of :func:`steptrace.tui.render.diff.blocks`.
"""

from __future__ import annotations

import io
import re

from rich import box
from rich.box import Box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from steptrace.differ import DiffReport
from steptrace.differ.gate import GateResult

from steptrace.tui.render.diff import blocks

#: Tables in plain text: a dashed line under the header, no other rules (paste-friendly ASCII).
PLAIN_BOX = Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)
_WIDE = 1 << 16


def _md_cell(cell: object) -> object:
    """A table cell with ``|`` escaped for a GitHub table."""
    if isinstance(cell, Text):
        return Text(cell.plain.replace("|", "\\|"), style=cell.style) if "|" in cell.plain else cell
    return cell.replace("|", "\\|") if isinstance(cell, str) else cell


def format_report(report: DiffReport, fmt: str, *, rows: int = 20, gate: GateResult | None = None) -> str:
    """The report as ``text`` (plain, every column at full width, nothing cut) or ``markdown``
    (tables as GitHub tables, the first screen and figures in code blocks, for PR descriptions).

    Raises:
        ValueError: an unknown format.
    """
    if fmt not in ("text", "markdown"):
        raise ValueError(f"unknown report format {fmt!r}")
    buf = io.StringIO()
    con = Console(file=buf, width=_WIDE, color_system=None, force_terminal=False, highlight=False, emoji=False,
                  markup=False, legacy_windows=False)
    md = fmt == "markdown"

    def emit(r: Text | Table) -> None:
        width = max(1, Measurement.get(con, con.options, r).maximum)
        con.print(r, width=width, crop=False, overflow="ignore", no_wrap=True)

    def heading(title: str, level: str = "**") -> None:
        con.print(Text(f"{level}{title}{level}" if md and level == "**" else (f"{level} {title}" if md else title)))

    def fence(lines: list[Text | Table]) -> None:
        if md:
            con.print(Text("```text"))
        for ln in lines:
            emit(ln)
        if md:
            con.print(Text("```"))

    for i, b in enumerate(blocks(report, rows=rows, gate=gate)):
        if i:
            con.print(Text(""))
        if b.kind == "panel":
            heading(b.title or "", "###" if md else "")
            if not md:
                con.print(Text("=" * len(b.title or "")))
            fence(b.body)
        elif b.kind == "table":
            t = b.body
            assert isinstance(t, Table)
            if t.title:
                heading(str(t.title))
                t.title = None
                if md:
                    con.print(Text(""))
            if md:  # a | inside a cell would end it
                for col in t.columns:
                    col._cells = [_md_cell(c) for c in col._cells]
            t.box = box.MARKDOWN if md else PLAIN_BOX
            t.show_edge = md
            t.expand = False
            emit(t)
        elif b.kind == "lines":
            heading(f"{b.title}:" if not md else b.title or "")
            fence(b.body)
        else:
            for ln in b.body:
                emit(ln)
                if md:
                    con.print(Text(""))
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(line.rstrip() for line in buf.getvalue().splitlines()))
    return text.strip("\n") + "\n"
