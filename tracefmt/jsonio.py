"""Bounded JSON: parsing manifests, part files and JSONL lines with a size and depth bound,
and checking a parsed document against a schema of types (SPEC.md §2, §5.1, §6).

The nesting depth is measured before ``json.loads`` runs (vectorised over the bytes, string
contents excluded), so a hostile document nested 100,000 deep is refused with a message instead
of a ``RecursionError``; integers too long for Python's int parser and lone surrogates are
refused likewise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .errors import TraceFormatError

#: Largest manifest or part status file read (SPEC.md §2, §5.1).
MAX_JSON_BYTES = 16 << 20
#: Deepest nesting of arrays and objects accepted in any steptrace JSON document or JSONL line.
MAX_JSON_DEPTH = 64
#: Longest text quoted from a document in an error message.
MAX_QUOTE = 80

_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_OPEN = np.zeros(256, np.int8)
_OPEN[[ord("["), ord("{")]] = 1
_OPEN[[ord("]"), ord("}")]] = -1


def quote(value: Any, limit: int = MAX_QUOTE) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters (error messages quote no more)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...)"


def json_depth(raw: bytes) -> int:
    """Return the deepest nesting of arrays and objects in the JSON text ``raw``."""
    if b"[" not in raw and b"{" not in raw:
        return 0
    bare = _STRING.sub(b'""', raw) if b'"' in raw else raw
    steps = _OPEN[np.frombuffer(bare, np.uint8)]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


def parse_json(raw: bytes, *, text: str | None = None, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON text with bounded depth.

    Args:
        raw: UTF-8 JSON text.
        text: ``raw`` already decoded, when the caller has it.
        max_depth: the deepest nesting allowed.

    Returns:
        The document.

    Raises:
        ValueError: not UTF-8 JSON, nested deeper than ``max_depth``, an integer too long to
            parse, or a string holding a lone surrogate; the message says which.
    """
    depth = json_depth(raw)
    if depth > max_depth:
        raise ValueError(f"nested {depth} deep, more than the {max_depth} levels steptrace accepts")
    if text is None:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not valid UTF-8 (byte {exc.start + 1})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except (ValueError, RecursionError) as exc:  # int too long (PEP 651 limit), deep nesting
        raise ValueError(f"not valid JSON: {str(exc)[:MAX_QUOTE]}") from None
    if "\\ud" in text or "\\uD" in text:
        _check_strings(doc)
    return doc


def _check_strings(doc: Any) -> None:
    stack = [doc]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"a string holds a lone surrogate (not UTF-8): {quote(v)}") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


def read_json(path: Path, *, what: str, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Read a steptrace JSON file with a size and depth bound.

    Args:
        path: the file.
        what: what the file is, for messages ("part status file").
        max_bytes: refuse a larger file.

    Returns:
        The document.

    Raises:
        FileNotFoundError: no such file (the caller decides what that means).
        TraceCorruptError: the file is too large, unreadable, or not bounded JSON.
    """
    from .errors import TraceCorruptError

    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise TraceCorruptError(f"{path} ({what}) cannot be read ({exc.strerror or exc})") from None
    if len(raw) > max_bytes:
        raise TraceCorruptError(f"{path} ({what}) is larger than {max_bytes} bytes; the trace is damaged")
    try:
        return parse_json(raw)
    except ValueError as exc:
        raise TraceCorruptError(f"{path} ({what}) is {exc}; the trace is damaged") from None


# ---------------------------------------------------------------------- schema of types
#: Type names of a schema: "str", "int" (JSON integer, no bool), "count" (int in [0, 2**63)),
#: "pid" (int in [0, 2**31)), "number", "bool", "object", "array", "checksum map", or a tuple of
#: them (any of), or a dict (an object whose listed keys have those types).
Schema = Mapping[str, Any]

_I63 = (1 << 63) - 1


def _type_ok(value: Any, kind: Any) -> bool:
    if isinstance(kind, tuple):
        return any(_type_ok(value, k) for k in kind)
    if isinstance(kind, Mapping):
        return isinstance(value, dict)
    if kind is None:
        return value is None
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return type(value) is int
    if kind == "count":
        return type(value) is int and 0 <= value <= _I63
    if kind == "pid":
        return type(value) is int and 0 <= value < 1 << 31
    if kind == "number":
        return type(value) in (int, float) and math.isfinite(value)
    if kind == "bool":
        return type(value) is bool
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "str array":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if kind == "str map":
        return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())
    if kind == "count map":
        return isinstance(value, dict) and all(_type_ok(v, "count") for v in value.values())
    if kind == "i32 map":
        return isinstance(value, dict) and all(type(v) is int and 0 <= v < 1 << 31 for v in value.values())
    raise AssertionError(f"unknown schema type {kind!r}")


def _describe(kind: Any) -> str:
    if isinstance(kind, tuple):
        return " or ".join(_describe(k) for k in kind)
    if isinstance(kind, Mapping):
        return "an object"
    return {None: "null", "str": "a string", "int": "an integer", "count": "an integer >= 0",
            "pid": "an integer in [0, 2**31)", "number": "a finite number", "bool": "true or false",
            "object": "an object", "array": "an array", "str array": "an array of strings",
            "str map": "an object of strings", "count map": "an object of integers >= 0",
            "i32 map": "an object of integer ids in [0, 2**31)"}[kind]


def check_types(doc: Any, schema: Schema, where: str) -> None:
    """Check ``doc`` against ``schema`` (keys absent from ``doc`` are fine; unknown keys ignored).

    Args:
        doc: a parsed JSON object.
        schema: key -> type (see :data:`Schema`); a nested dict checks a nested object.
        where: names the document in messages.

    Raises:
        TraceFormatError: ``doc`` is not an object, or a key has the wrong type.
    """
    if not isinstance(doc, dict):
        raise TraceFormatError(f"{where} must be a JSON object, not {type(doc).__name__}")
    for key, kind in schema.items():
        if key not in doc:
            continue
        value = doc[key]
        if not _type_ok(value, kind):
            raise TraceFormatError(
                f"{where}: {key!r} must be {_describe(kind)}, got {quote(value)}; the file is damaged "
                "or was not written by a steptrace writer"
            )
        if isinstance(kind, Mapping) and isinstance(value, dict):
            check_types(value, kind, f"{where} {key!r}")
        elif isinstance(kind, tuple) and isinstance(value, dict):
            sub = next((k for k in kind if isinstance(k, Mapping)), None)
            if sub is not None:
                check_types(value, sub, f"{where} {key!r}")


_NAME_OR_NULL = ("str", None)
#: SPEC.md §2: the manifest's keys and their types.
MANIFEST_TYPES: Schema = {
    "format": "str",
    "version": "str",
    "created": _NAME_OR_NULL,
    "producer": ({"name": _NAME_OR_NULL, "version": _NAME_OR_NULL}, None),
    "runtime": ({"name": _NAME_OR_NULL, "version": _NAME_OR_NULL}, None),
    "model": _NAME_OR_NULL,
    "precision": _NAME_OR_NULL,
    "device": _NAME_OR_NULL,
    "command": ("str array", None),
    "tags": ("str map", None),
    "watched": ("i32 map", None),
    "vocab": _NAME_OR_NULL,
    "vocab_head": _NAME_OR_NULL,
}
#: SPEC.md §5.1: a part status file's keys and their types.
PART_TYPES: Schema = {
    "part": "str",
    "status": "str",
    "host": _NAME_OR_NULL,
    "pid": ("pid", None),
    "started": _NAME_OR_NULL,
    "closed": _NAME_OR_NULL,
    "counts": ("count map", None),
    "bytes": ("count map", None),
    "checksums": ("str map", None),
    "metadata": (MANIFEST_TYPES, None),
}
