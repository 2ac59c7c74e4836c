"""Helpers for tests that damage traces on purpose."""

from __future__ import annotations

import json
from pathlib import Path


def forget_checksums(trace: Path) -> None:
    """Drop the sizes and checksums recorded at close from every part of ``trace``, as a format
    1.0 writer left them, so that a test reaches the defences behind the checksum check."""
    for status in (trace / "parts").glob("*.json"):
        doc = json.loads(status.read_text())
        doc.pop("checksums", None)
        doc.pop("bytes", None)
        status.write_text(json.dumps(doc))
