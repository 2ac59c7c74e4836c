"""Argument checks shared by the writers: each raises TraceUsageError naming the argument."""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import TraceUsageError

I32 = np.iinfo(np.int32)
I64 = np.iinfo(np.int64)
# Plain ints: ``np.iinfo.min``/``max`` are properties computed at each access (~0.3 us each),
# and these checks run for every row a recorder writes.
_BOUNDS = {id(I32): (int(I32.min), int(I32.max), 32), id(I64): (int(I64.min), int(I64.max), 64)}
I32_MAX = int(I32.max)


def check_key(sample: Any, step: Any) -> tuple[str, int]:
    """Return (sample, step) checked: a non-empty string and an int32 step >= 0."""
    if not isinstance(sample, str) or not sample:
        raise TraceUsageError(f"sample must be a non-empty string, got {sample!r}")
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step <= I32_MAX:
        raise TraceUsageError(f"step must be an integer in [0, 2**31), got {step!r}")
    return sample, int(step)


def opt_int(name: str, v: Any, limits: np.iinfo) -> int | None:
    """Return ``v`` as int (or None), checked against ``limits``."""
    if v is None:
        return None
    lo, hi, bits = _BOUNDS.get(id(limits)) or (int(limits.min), int(limits.max), limits.bits)
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
        raise TraceUsageError(f"{name} must be a {bits}-bit integer or None, got {v!r}")
    return int(v)


def opt_i32(name: str, v: Any) -> int | None:
    """Return ``v`` as a 32-bit int, or None."""
    return opt_int(name, v, I32)


def opt_float(name: str, v: Any) -> float | None:
    """Return ``v`` as float, or None."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TraceUsageError(f"{name} must be a number or None, got {v!r}")
    return float(v)


def opt_str(name: str, v: Any) -> str | None:
    """Return ``v`` checked to be a string, or None."""
    if v is not None and not isinstance(v, str):
        raise TraceUsageError(f"{name} must be a string or None, got {v!r}")
    return v
