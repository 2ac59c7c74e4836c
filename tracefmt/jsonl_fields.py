"""Typed access to the fields of one JSONL interchange line (SPEC.md §6), with line-numbered errors.

Every getter either returns a value of the promised type or raises :class:`JsonlError` naming
the line, the key and what was expected. Arguments that reach :class:`TraceWriter` have been
checked here first: a bad value must fail on its own line, never later in the writer's
background thread (where it would fail the whole import).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from .errors import JsonlError
from .payload import SHA256_128

I32 = (-(2**31), 2**31 - 1)
I64 = (-(2**63), 2**63 - 1)
#: JSON strings that stand for non-finite floats (SPEC.md §6).
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
_MISSING: Any = object()


def show(value: Any) -> str:
    """Return a short JSON rendering of ``value`` for an error message."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def json_type(value: Any) -> str:
    """Return the JSON type name of a decoded value (``number``, ``string``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


@dataclass
class LineContext:
    """Where the importer is (file, line) and the options every line handler needs.

    Args:
        path: the JSONL file as the user named it (for messages).
        base: the resolved folder of the JSONL file; ``npy``/``raw`` paths stay inside it.
        k: default top-k of ``logits`` lines.
        keep_logits: also store full logits as ``logits:<head>`` tensors.
    """

    path: str
    base: Path
    k: int = 8
    keep_logits: bool = False
    line: int = 0
    watched: list[int] = field(default_factory=list)
    vocab_head: str = "token"
    #: The file's digest algorithm (the meta line's ``digest``): that of bare digests, and of
    #: the part the import writes (SPEC.md §6).
    digest: str = SHA256_128
    #: Statistics-only lines whose digest was of another algorithm, recorded without it.
    digests_dropped: int = 0

    def fail(self, reason: str) -> NoReturn:
        """Raise :class:`JsonlError` for the current line.

        Raises:
            JsonlError: always.
        """
        err = JsonlError(self.path, self.line, reason)
        err.__suppress_context__ = True  # as `raise ... from None`: the reason says it all
        raise err

    # ------------------------------------------------------------------ scalars
    def value(self, obj: dict[str, Any], key: str, default: Any = _MISSING) -> Any:
        """Return ``obj[key]``, or ``default``; fail on a missing required key."""
        if key in obj:
            return obj[key]
        if default is _MISSING:
            self.fail(f"missing key {key!r}")
        return default

    def text(
        self, obj: dict[str, Any], key: str, *, default: Any = _MISSING, nullable: bool = False, empty: bool = False
    ) -> Any:
        """Return a string field (``None`` allowed when ``nullable``; ``""`` when ``empty``)."""
        v = self.value(obj, key, default)
        if v is None and (nullable or default is None):
            return None
        if not isinstance(v, str) or (not v and not empty):
            what = "a string" if empty else "a non-empty string"
            self.fail(f"{key} must be {what}, got {json_type(v)} {show(v)}")
        return v

    def integer(
        self,
        obj: dict[str, Any],
        key: str,
        *,
        default: Any = _MISSING,
        lo: int = I32[0],
        hi: int = I32[1],
        label: str | None = None,
    ) -> Any:
        """Return an integer field within ``[lo, hi]`` (``null`` gives ``None`` when the default is None)."""
        v = self.value(obj, key, default)
        name = label or key
        if v is None and default is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            self.fail(f"{name} must be an integer, got {json_type(v)} {show(v)}")
        if not lo <= v <= hi:
            self.fail(f"{name} = {v} is out of range [{lo}, {hi}]")
        return v

    def number(self, obj: dict[str, Any], key: str, *, label: str | None = None) -> float | None:
        """Return an optional float field: a number, ``null`` (None) or ``"nan"``/``"inf"``/``"-inf"``."""
        v = obj.get(key)
        if v is None:
            return None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            try:
                return float(v)
            except OverflowError:
                self.fail(f"{label or key} = {show(v)} is too large for a float")
        if isinstance(v, str) and v in NONFINITE:
            return NONFINITE[v]
        self.fail(f"{label or key} must be a number, null, \"nan\", \"inf\" or \"-inf\", got {json_type(v)} {show(v)}")

    def flag(self, obj: dict[str, Any], key: str) -> bool:
        """Return an optional boolean field (default false)."""
        v = obj.get(key, False)
        if not isinstance(v, bool):
            self.fail(f"{key} must be true or false, got {json_type(v)} {show(v)}")
        return v

    def time_us(self, obj: dict[str, Any]) -> int | None:
        """Return ``time`` as microseconds since the epoch: ISO 8601 (naive = UTC) or a number."""
        v = obj.get("time")
        if v is None:
            return None
        if isinstance(v, str):
            try:
                t = datetime.fromisoformat(v)
            except ValueError:
                self.fail(f"time {show(v)} is not an ISO 8601 time such as \"2024-05-01T12:00:00.123456Z\"")
            if t.tzinfo is None:
                t = t.replace(tzinfo=timezone.utc)
            return (t - _EPOCH) // _MICROSECOND
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and I64[0] <= v <= I64[1]:
            return v
        self.fail(f"time must be an ISO 8601 string or whole microseconds since the epoch, got {show(v)}")

    # ------------------------------------------------------------------ arrays
    def floats(self, value: Any, key: str) -> np.ndarray:
        """Return a JSON array of floats as float64; ``null`` and ``"nan"`` give NaN (SPEC.md §6)."""
        if not isinstance(value, list):
            self.fail(f"{key} must be an array of numbers, got {json_type(value)}")
        types = set(map(type, value))
        if types <= {float, int}:
            try:
                return np.array(value, dtype=np.float64)
            except OverflowError:
                self.fail(f"{key} holds an integer too large for a float")
        out = np.empty(len(value), dtype=np.float64)
        for i, v in enumerate(value):
            if v is None:
                out[i] = math.nan
            elif isinstance(v, str) and v in NONFINITE:
                out[i] = NONFINITE[v]
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                try:
                    out[i] = float(v)
                except OverflowError:
                    self.fail(f"{key}[{i}] = {show(v)} is too large for a float")
            else:
                self.fail(
                    f"{key}[{i}] must be a number, null, \"nan\", \"inf\" or \"-inf\", got {json_type(v)} {show(v)}"
                )
        return out

    def ints(self, value: Any, key: str, *, lo: int = I32[0], hi: int = I32[1]) -> np.ndarray:
        """Return a JSON array of integers in ``[lo, hi]`` as int64."""
        if not isinstance(value, list):
            self.fail(f"{key} must be an array of integers, got {json_type(value)}")
        if not set(map(type, value)) <= {int}:
            bad = next(i for i, v in enumerate(value) if type(v) is not int)
            self.fail(f"{key}[{bad}] must be an integer, got {json_type(value[bad])} {show(value[bad])}")
        if not value:
            return np.zeros(0, dtype=np.int64)
        if min(value) < lo or max(value) > hi:
            bad = next(i for i, v in enumerate(value) if not lo <= v <= hi)
            self.fail(f"{key}[{bad}] = {value[bad]} is out of range [{lo}, {hi}]")
        return np.array(value, dtype=np.int64)

    # ------------------------------------------------------------------ files
    def payload_path(self, obj: dict[str, Any], key: str) -> tuple[Path, str]:
        """Resolve a payload path relative to the JSONL file's folder, refusing escapes.

        Returns:
            (resolved path, the path as written on the line).
        """
        v = obj[key]
        if not isinstance(v, str) or not v:
            self.fail(f"{key} must be a relative path string, got {json_type(v)} {show(v)}")
        if "\0" in v:
            self.fail(f"{key} path {show(v)} holds a NUL character")
        p = Path(v)
        if p.is_absolute() or v.startswith(("/", "\\")):
            self.fail(f"{key} path {v!r} is absolute; paths must be relative to the JSONL file's folder")
        if ".." in p.parts:
            self.fail(f"{key} path {v!r} uses '..'; paths must stay inside the JSONL file's folder")
        try:
            full = (self.base / p).resolve(strict=True)
        except FileNotFoundError:
            self.fail(f"{key} file {v!r} not found (looked in {self.base})")
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on Python < 3.13
            self.fail(f"{key} path {v!r} cannot be resolved ({exc})")
        if not full.is_relative_to(self.base):
            self.fail(f"{key} path {v!r} resolves to {full}, outside the JSONL file's folder (a symlink escapes it)")
        if not full.is_file():
            self.fail(f"{key} path {v!r} is not a regular file")
        if not os.access(full, os.R_OK):
            self.fail(f"{key} file {v!r} is not readable (permission denied)")
        return full, v
