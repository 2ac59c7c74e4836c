"""The trace directory: creating it, joining it from another writer, naming parts (SPEC.md §1, §2, §5)."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from .batches import write_vocab
from .errors import TraceExistsError
from .metadata import TraceMetadata, read_manifest, write_json_atomic
from .schema import MANIFEST, PARTS_DIR


def part_id() -> str:
    """Return a new part id: host-pid-random (SPEC.md §1)."""
    host = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname())[:32] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def create_or_join(
    root: Path, *, mode: str, metadata: TraceMetadata, part: str, vocab: Sequence[str] | Mapping[int, str] | None
) -> None:
    """Create the trace directory and manifest, or join an existing trace (SPEC.md §2, §5.3).

    Raises:
        TraceExistsError: ``mode`` forbids what is there.
        TraceFormatError, TraceVersionError: an existing trace cannot be added to.
    """
    manifest = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise TraceExistsError(f"{root} exists and is a file; choose another path for the trace")
    if mode == "overwrite" and root.exists():
        if not manifest.exists() and any(root.iterdir()):
            raise TraceExistsError(
                f"{root} is a non-empty directory that is not a steptrace trace; refusing to delete it"
            )
        shutil.rmtree(root)
    if manifest.exists():
        if mode == "create":
            raise TraceExistsError(
                f"a trace already exists at {root}; pass mode='append' to add a part to it or "
                "mode='overwrite' to replace it (CLI: --overwrite)"
            )
        read_manifest(root)  # refuses foreign or newer traces before we add to them
        (root / PARTS_DIR).mkdir(exist_ok=True)
        return
    (root / PARTS_DIR).mkdir(parents=True, exist_ok=True)
    vocab_name = None
    if vocab is not None:
        vocab_name = f"vocab-{part}.arrow"
        write_vocab(root / vocab_name, vocab)
    tmp = root / f".{MANIFEST}.{part}.tmp"
    write_json_atomic(tmp, metadata.to_manifest(vocab=vocab_name))
    try:
        os.link(tmp, manifest)  # atomic and never replaces: the first writer wins
    except FileExistsError:
        if mode == "create":
            os.unlink(tmp)
            raise TraceExistsError(f"another writer created a trace at {root} at the same time") from None
        if vocab_name:
            os.unlink(root / vocab_name)
    os.unlink(tmp)


def claim_part(status_path: Path, part: str) -> None:
    """Create ``status_path`` exclusively, so that no two writers ever write one part (SPEC.md §1).

    Raises:
        TraceExistsError: a part of that name exists (another writer holds it, or held it).
    """
    try:
        fd = os.open(status_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise TraceExistsError(
            f"part {part} already exists in {status_path.parent.parent} (another writer uses that part name); "
            "part names must be unique within a trace: let the writer choose one"
        ) from None
    os.close(fd)
