"""Trace metadata and the manifest file ``steptrace.json`` (SPEC.md §2)."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .errors import TraceFormatError, TraceNotFoundError, TraceUsageError, TraceVersionError
from .schema import FORMAT_MAJOR, FORMAT_NAME, FORMAT_VERSION, MANIFEST


#: Dtypes a ``logits_dtype`` may name: the precision the logits were computed in (SPEC.md §2).
LOGITS_DTYPES = ("float64", "float32", "float16", "bfloat16")


def utc_now() -> str:
    """Return the current time as an ISO 8601 UTC string with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _producer_version() -> str:
    from . import __version__

    return __version__


@dataclass
class TraceMetadata:
    """What a trace says about the run that produced it.

    Every field is optional except the producer, which the writer fills in. Unknown manifest
    keys read from newer traces are kept in ``extra`` and written back unchanged.
    """

    runtime: str | None = None
    runtime_version: str | None = None
    model: str | None = None
    precision: str | None = None
    device: str | None = None
    command: list[str] | None = None
    tags: dict[str, str] = field(default_factory=dict)
    watched: dict[str, int] = field(default_factory=dict)
    vocab_head: str = "token"
    open_loop: list[str] = field(default_factory=list)
    logits_dtype: str | None = None
    producer: str = "steptrace"
    producer_version: str = field(default_factory=_producer_version)
    created: str = field(default_factory=utc_now)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: TraceMetadata | dict[str, Any] | None) -> TraceMetadata:
        """Return ``value`` as metadata; a dict may use the field names or the manifest layout.

        Raises:
            TraceUsageError: a value has the wrong type.
        """
        if value is None:
            meta = cls(command=list(sys.argv) if sys.argv and sys.argv[0] else None)
        elif isinstance(value, TraceMetadata):
            meta = value
        elif isinstance(value, dict):
            meta = cls.from_manifest(value) if "format" in value else cls._from_fields(value)
        else:
            raise TraceUsageError(f"metadata must be a TraceMetadata or a dict, not {type(value).__name__}")
        meta.check()
        return meta

    @classmethod
    def _from_fields(cls, d: dict[str, Any]) -> TraceMetadata:
        names = {f.name for f in fields(cls)}
        known = {k: v for k, v in d.items() if k in names and k != "extra"}
        extra = dict(d.get("extra") or {})
        extra.update({k: v for k, v in d.items() if k not in names})
        return cls(**known, extra=extra)

    def check(self) -> None:
        """Check field types.

        Raises:
            TraceUsageError: naming the field and what it must be.
        """
        for name in ("runtime", "runtime_version", "model", "precision", "device"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, str):
                raise TraceUsageError(f"metadata {name} must be a string, got {v!r}")
        if self.command is not None and not (
            isinstance(self.command, list) and all(isinstance(a, str) for a in self.command)
        ):
            raise TraceUsageError("metadata command must be a list of strings (argv)")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.tags.items()):
            raise TraceUsageError("metadata tags must map strings to strings")
        if not all(isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) for k, v in self.watched.items()):
            raise TraceUsageError("metadata watched must map token names to integer ids, e.g. {'eos': 3}")
        if not (isinstance(self.open_loop, list) and all(isinstance(h, str) for h in self.open_loop)):
            raise TraceUsageError("metadata open_loop must be a list of head names, e.g. ['frame']")
        if self.logits_dtype is not None and self.logits_dtype not in LOGITS_DTYPES:
            raise TraceUsageError(f"metadata logits_dtype must be one of {', '.join(LOGITS_DTYPES)}, "
                                  f"got {self.logits_dtype!r}")

    def to_manifest(self, *, vocab: str | None = None) -> dict[str, Any]:
        """Return the JSON object SPEC.md §2 defines for ``steptrace.json``."""
        doc: dict[str, Any] = dict(self.extra)
        doc.update(
            {
                "format": FORMAT_NAME,
                "version": FORMAT_VERSION,
                "created": self.created,
                "producer": {"name": self.producer, "version": self.producer_version},
                "runtime": {"name": self.runtime, "version": self.runtime_version},
                "model": self.model,
                "precision": self.precision,
                "device": self.device,
                "command": self.command,
                "tags": self.tags,
                "watched": self.watched,
                "vocab": vocab,
                "vocab_head": self.vocab_head,
            }
        )
        if self.open_loop:
            doc["open_loop"] = list(self.open_loop)
        if self.logits_dtype is not None:
            doc["logits_dtype"] = self.logits_dtype
        return doc

    @classmethod
    def from_manifest(cls, doc: dict[str, Any]) -> TraceMetadata:
        """Build metadata from a manifest object; unknown keys go to ``extra``.

        Raises:
            TraceFormatError: a known key has the wrong type.
        """
        known = {"format", "version", "created", "producer", "runtime", "model", "precision", "device",
                 "command", "tags", "watched", "vocab", "vocab_head", "open_loop", "logits_dtype"}
        try:
            producer = doc.get("producer") or {}
            runtime = doc.get("runtime") or {}
            meta = cls(
                runtime=runtime.get("name"),
                runtime_version=runtime.get("version"),
                model=doc.get("model"),
                precision=doc.get("precision"),
                device=doc.get("device"),
                command=doc.get("command"),
                tags=dict(doc.get("tags") or {}),
                watched=dict(doc.get("watched") or {}),
                vocab_head=doc.get("vocab_head") or "token",
                open_loop=list(doc.get("open_loop") or []),
                logits_dtype=doc.get("logits_dtype"),
                producer=producer.get("name") or "unknown",
                producer_version=producer.get("version") or "unknown",
                created=doc.get("created") or "",
                extra={k: v for k, v in doc.items() if k not in known},
            )
            meta.check()
        except (AttributeError, TypeError, ValueError, TraceUsageError) as exc:
            raise TraceFormatError(f"{MANIFEST} has a malformed field: {exc}") from None
        return meta

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-serialisable dict."""
        return asdict(self)


def check_version(version: Any, where: str) -> None:
    """Refuse versions this reader cannot read.

    Raises:
        TraceFormatError: ``version`` is not a "MAJOR.MINOR" string.
        TraceVersionError: the major version is newer than this steptrace reads.
    """
    try:
        major = int(str(version)[:20].split(".")[0])
    except ValueError:
        raise TraceFormatError(f"{where}: format version {str(version)[:20]!r} is not MAJOR.MINOR") from None
    if major > FORMAT_MAJOR:
        raise TraceVersionError(
            f"{where} was written in steptrace format {version}; this steptrace reads format "
            f"{FORMAT_MAJOR}.x only. Upgrade steptrace (pip install -U steptrace) to read it."
        )
    if major < 1:
        raise TraceFormatError(f"{where}: format version {version!r} does not exist")


def read_manifest(root: Path) -> dict[str, Any]:
    """Read and check ``root/steptrace.json``.

    Raises:
        TraceNotFoundError: ``root`` does not exist.
        TraceFormatError: ``root`` is not a trace directory or its manifest is malformed.
        TraceVersionError: the trace is of a newer major format version.
    """
    if not root.exists():
        raise TraceNotFoundError(f"{root}: no such trace")
    if not root.is_dir():
        raise TraceFormatError(
            f"{root} is a file, not a steptrace trace (a trace is a directory holding {MANIFEST}); "
            "to bring in a JSONL dump use `trace import jsonl`"
        )
    path = root / MANIFEST
    from .jsonio import MANIFEST_TYPES, check_types, read_json

    try:
        doc = read_json(path, what="the trace's manifest")
    except FileNotFoundError:
        raise TraceFormatError(f"{root} is not a steptrace trace: it has no {MANIFEST}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise TraceFormatError(f"{path} is not a steptrace manifest (no \"format\": \"{FORMAT_NAME}\")")
    check_types(doc, MANIFEST_TYPES, str(path))
    check_version(doc.get("version"), str(path))
    return doc


def write_json_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write ``doc`` to ``path`` atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
