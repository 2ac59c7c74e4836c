"""A trace's parts: finding them in ``parts/`` and reading their status files (SPEC.md §1, §5.1)."""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import TraceCorruptError
from .jsonio import PART_TYPES, check_types, read_json
from .payload import SHA256_128
from .schema import KINDS, PARTS_DIR, data_file, part_file

_PART_SUFFIX = ".json"
_PART_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def _file_sizes(root: Path, pid: str) -> dict[str, int]:
    sizes = {}
    for kind in KINDS:
        try:
            sizes[kind] = (root / data_file(pid, kind)).stat().st_size
        except OSError:
            pass
    return sizes


@dataclass
class PartInfo:
    """One writer's part of a trace, as its status file and data files describe it."""

    id: str
    status: str  # "closed" or "open" (still being written, or its writer died)
    host: str | None = None
    pid: int | None = None
    started: str | None = None
    closed: str | None = None
    counts: dict[str, int] = field(default_factory=dict)  # rows per kind, as written at close
    recovered: dict[str, int] = field(default_factory=dict)  # rows per kind readable now
    damaged_tail: bool = False  # an interrupted batch was dropped at the end of a file
    metadata: dict[str, Any] = field(default_factory=dict)
    file_bytes: dict[str, int] = field(default_factory=dict)  # sizes now
    sizes_at_close: dict[str, int] = field(default_factory=dict)  # sizes recorded at close (format 1.1)
    checksums: dict[str, str] = field(default_factory=dict)  # checksums recorded at close (format 1.1)
    digest: str = SHA256_128  # the tensor digest algorithm (SPEC.md §4.5)

    @property
    def complete(self) -> bool:
        """The part was closed cleanly."""
        return self.status == "closed"

    @property
    def writer_alive(self) -> bool | None:
        """For an open part on this host: whether its writer process still runs (None: unknown)."""
        if self.complete or self.pid is None or self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def scan_parts(trace: Path) -> list[PartInfo]:
    """Find the parts (SPEC.md §1, §5.1): ``<part>.json`` is a part's status file when the
    part has a data file or the object names itself (``"part": "<part>"``); other
    ``.json`` files in ``parts/`` are not steptrace's and are ignored."""
    root = trace / PARTS_DIR
    if not root.is_dir():
        return []
    names = set()
    with_data = set()
    try:
        entries = [p.name for p in root.iterdir()]
    except OSError as exc:
        raise TraceCorruptError(f"{root} cannot be listed ({exc.strerror or exc})") from None
    for name in entries:
        if name.startswith(".") or not _PART_NAME.fullmatch(name):
            continue
        if name.endswith(_PART_SUFFIX):
            names.add(name[: -len(_PART_SUFFIX)])
        else:
            for kind in KINDS:
                if name.endswith(f".{kind}.arrow"):
                    with_data.add(name[: -len(f".{kind}.arrow")])
    parts = []
    for pid in sorted(names | with_data):
        status_path = root / part_file(pid)
        doc: dict[str, Any] = {}
        if pid in names:
            try:
                doc = read_json(status_path, what="part status file")
            except FileNotFoundError:
                doc = {}
            except TraceCorruptError:
                if pid not in with_data:
                    continue  # not a part: a foreign .json file
                raise
            if pid not in with_data and not (isinstance(doc, dict) and doc.get("part") == pid):
                continue  # a foreign .json file (notes.json): SPEC.md §1 says ignore it
            check_types(doc, PART_TYPES, str(status_path))
        status = doc.get("status", "open")
        counts = dict(doc.get("counts") or {})
        parts.append(
            PartInfo(
                id=pid,
                status="closed" if status == "closed" else "open",
                host=doc.get("host"),
                pid=doc.get("pid"),
                started=doc.get("started"),
                closed=doc.get("closed"),
                counts={k: counts[k] for k in KINDS if k in counts},
                metadata=dict(doc.get("metadata") or {}),
                file_bytes=_file_sizes(root, pid),
                sizes_at_close=dict(doc.get("bytes") or {}),
                checksums=dict(doc.get("checksums") or {}),
                digest=str(doc.get("digest", SHA256_128)),
            )
        )
    return parts


def check_sizes(trace: Path, parts: list[PartInfo]) -> None:
    """Compare each closed part's file sizes with those recorded at close (a ``stat`` each).

    Raises:
        TraceCorruptError: a file is missing or of another size (truncated, changed).
    """
    for part in parts:
        if not part.complete:
            continue
        for kind, size in part.sizes_at_close.items():
            if kind in KINDS and part.file_bytes.get(kind) != size:
                path = trace / PARTS_DIR / data_file(part.id, kind)
                now = part.file_bytes.get(kind)
                raise TraceCorruptError(
                    f"{path} " + ("is missing" if now is None else f"holds {now} bytes") + f" but its part was "
                    f"closed with {size}; the file was truncated or changed: restore it from a copy"
                )
