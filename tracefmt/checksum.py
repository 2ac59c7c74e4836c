"""File checksums of a closed part's data files (SPEC.md §5.1, §8).

A checksum is written ``"xxh3-128:<32 hex digits>"``: the 128-bit XXH3 hash of the file's
whole content, printed as the big-endian hex of ``xxhash.xxh3_128().hexdigest()``. The file is
read through a memory map in 64 MiB windows, so a large values file is never copied into memory.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import xxhash

from .errors import TraceCorruptError, TraceFormatError

ALGORITHM = "xxh3-128"
_PREFIX = ALGORITHM + ":"
_WINDOW = 64 << 20


def file_checksum(path: str | os.PathLike[str]) -> str:
    """Return the checksum of the file at ``path``, as SPEC.md §5.1 writes it.

    Args:
        path: the file.

    Returns:
        ``"xxh3-128:"`` followed by 32 lowercase hex digits.

    Raises:
        OSError: the file cannot be read.
    """
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size:
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                view = memoryview(mm)
                try:
                    for start in range(0, size, _WINDOW):
                        h.update(view[start : start + _WINDOW])
                finally:
                    view.release()
    return _PREFIX + h.hexdigest()


def is_checksum(value: object) -> bool:
    """Return whether ``value`` is a checksum string this reader can verify."""
    return (
        isinstance(value, str)
        and value.startswith(_PREFIX)
        and len(value) == len(_PREFIX) + 32
        and all(c in "0123456789abcdef" for c in value[len(_PREFIX) :])
    )


def verify_file(path: Path, expected: str, *, where: str) -> None:
    """Check that the file at ``path`` has checksum ``expected``.

    Args:
        path: the file.
        expected: the checksum recorded at close.
        where: names the part in the message.

    Raises:
        TraceFormatError: ``expected`` is not a checksum of a known algorithm.
        TraceCorruptError: the file is missing, unreadable, or its bytes changed since close.
    """
    if not is_checksum(expected):
        raise TraceFormatError(
            f"{where}: checksum {str(expected)[:60]!r} of {path.name} is not of the form "
            f"'{_PREFIX}<32 hex digits>'; the part's .json is damaged or from a newer steptrace"
        )
    try:
        actual = file_checksum(path)
    except FileNotFoundError:
        raise TraceCorruptError(f"{path} is missing; the trace is damaged") from None
    except OSError as exc:
        raise TraceCorruptError(f"{path} cannot be read ({exc.strerror or exc})") from None
    if actual != expected:
        raise TraceCorruptError(
            f"{path} has changed since its part was closed (checksum {actual[len(_PREFIX):]} != recorded "
            f"{expected[len(_PREFIX):]}); the file is damaged: restore it from a copy"
        )
