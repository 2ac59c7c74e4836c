"""JSONL interchange (SPEC.md §6): the public entry for importing and exporting JSON Lines.

Runtimes without an Arrow library write one JSON object per line (``meta``, ``decision``,
``tensor``; plain or zstd-compressed) and :func:`import_jsonl` turns the file into a trace;
:func:`export_jsonl` writes the same lines back from any trace.

The work is split by direction: ``jsonl_import`` (the streaming driver and clean-up),
``jsonl_lines`` (checking one line and making one writer call), ``jsonl_fields`` (typed field
access with line-numbered errors) and ``jsonl_export``.
"""

from __future__ import annotations

from .jsonl_export import export_jsonl
from .jsonl_import import ImportSummary, import_jsonl

__all__ = ["ImportSummary", "export_jsonl", "import_jsonl"]
