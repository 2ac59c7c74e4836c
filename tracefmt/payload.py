"""Tensor payloads: the bitwise digest and value encodings (SPEC.md §4); the statistics are in
:mod:`steptrace.tracefmt.stats` (re-exported here).

Everything here works on the canonical bytes of a tensor: little-endian, C order, one byte per
bool, bfloat16 as its 16-bit pattern.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import xxhash
import zstandard

from .dtypes import container
from .errors import TraceCorruptError, TraceFormatError, TraceUsageError
from .stats import SMALL_ELEMENTS, TensorStats, compute_stats, compute_stats_many  # noqa: F401 (re-exported)

#: Encodings a value payload may carry (SPEC.md §4.3).
ENCODINGS = ("raw", "zstd", "zstd-shuffle")
DIGEST_BYTES = 16
#: Readers refuse to inflate a single tensor beyond this many bytes unless told otherwise.
DEFAULT_MAX_TENSOR_BYTES = 16 << 30


#: Digest algorithms (SPEC.md §4.5): a part names its algorithm in its status file (``digest``);
#: parts that name none (format 1.0) use SHA256_128.
SHA256_128 = "sha256-128"
XXH3_128 = "xxh3-128"
DIGEST_ALGORITHMS = (SHA256_128, XXH3_128)
#: What writers use: a 128-bit non-cryptographic hash at memory speed (SPEC.md §8).
DEFAULT_DIGEST = XXH3_128


def _sha256_128(buf: memoryview | bytes | np.ndarray) -> bytes:
    return hashlib.sha256(buf).digest()[:DIGEST_BYTES]


_DIGESTS = {SHA256_128: _sha256_128, XXH3_128: xxhash.xxh3_128_digest}


def digest(buf: memoryview | bytes | np.ndarray, algorithm: str = SHA256_128) -> bytes:
    """Return the SPEC.md §4.5 digest (16 bytes) of canonical tensor bytes.

    Args:
        buf: the canonical bytes (or a C-contiguous canonical array).
        algorithm: ``"sha256-128"`` (the first 16 bytes of SHA-256: format 1.0 parts and JSONL
            lines) or ``"xxh3-128"`` (XXH3's 128-bit hash, seed 0, in its canonical big-endian
            byte order: what writers of format 1.1 use, :data:`DEFAULT_DIGEST`).

    Returns:
        The 16-byte digest.

    Raises:
        TraceFormatError: the algorithm is unknown.
    """
    fn = _DIGESTS.get(algorithm)
    if fn is None:
        raise TraceFormatError(
            f"digest algorithm {algorithm!r} is unknown to this steptrace (it knows {', '.join(DIGEST_ALGORITHMS)}); "
            "upgrade it"
        )
    return fn(buf)


def digest_function(algorithm: str):  # noqa: ANN201 (a bytes -> bytes callable)
    """Return the function computing :func:`digest` with ``algorithm`` (for loops over rows).

    Raises:
        TraceFormatError: the algorithm is unknown.
    """
    digest(b"", algorithm)
    return _DIGESTS[algorithm]



def shuffle_bytes(buf: bytes | memoryview, itemsize: int) -> bytes:
    """Byte-shuffle ``buf``: all first bytes of every item, then all second bytes, and so on."""
    if itemsize == 1:
        return bytes(buf)
    return np.frombuffer(buf, np.uint8).reshape(-1, itemsize).T.tobytes()


def unshuffle_bytes(buf: bytes | memoryview, itemsize: int) -> bytes:
    """Invert :func:`shuffle_bytes`."""
    if itemsize == 1:
        return bytes(buf)
    return np.frombuffer(buf, np.uint8).reshape(itemsize, -1).T.tobytes()


class Encoder:
    """Encodes canonical tensor bytes for the values file. Not thread-safe: one per thread."""

    def __init__(self, encoding: str = "zstd", level: int = 1) -> None:
        if encoding not in ENCODINGS:
            raise TraceUsageError(f"encoding {encoding!r} is unknown; use one of {', '.join(ENCODINGS)}")
        self.encoding = encoding
        self.level = level
        self._zstd = zstandard.ZstdCompressor(level=level, write_content_size=True)

    def encode(self, buf: memoryview, itemsize: int) -> bytes:
        """Return the encoded payload of canonical bytes ``buf`` of items of ``itemsize``."""
        if self.encoding == "raw":
            return bytes(buf)
        if self.encoding == "zstd-shuffle":
            return self._zstd.compress(shuffle_bytes(buf, itemsize))
        return self._zstd.compress(buf)


def decode_values(
    data: memoryview | bytes,
    encoding: str,
    dtype: str,
    shape: tuple[int, ...],
    *,
    max_bytes: int = DEFAULT_MAX_TENSOR_BYTES,
) -> np.ndarray:
    """Decode one value payload into a numpy array of the container dtype of ``dtype``.

    Decompression is bounded by the size the shape and dtype imply (and by ``max_bytes``):
    a payload that inflates to anything else is reported as corrupt.

    Args:
        data: the payload bytes from the values file.
        encoding: one of :data:`ENCODINGS`.
        dtype: the SPEC.md dtype name.
        shape: the tensor shape.
        max_bytes: refuse tensors larger than this many bytes.

    Returns:
        A read-only array of shape ``shape`` (bfloat16 as uint16 bit patterns).

    Raises:
        TraceFormatError: unknown encoding.
        TraceCorruptError: the payload does not inflate to exactly the expected size.
        TraceUsageError: the tensor is larger than ``max_bytes``.
    """
    ct = container(dtype)
    numel = math.prod(shape)
    expected = numel * ct.itemsize
    if expected > max_bytes:
        raise TraceUsageError(
            f"tensor of shape {list(shape)} needs {expected} bytes, above the limit of {max_bytes}; "
            "pass a larger max_tensor_bytes to the reader if this is expected"
        )
    if encoding == "raw":
        raw = data
    elif encoding in ("zstd", "zstd-shuffle"):
        try:
            size = zstandard.frame_content_size(data)
        except zstandard.ZstdError as exc:
            raise TraceCorruptError(f"value payload is not a zstd frame ({exc})") from None
        if size != expected:
            raise TraceCorruptError(
                f"value payload declares {size} bytes but dtype {dtype} and shape {list(shape)} "
                f"need {expected}; the trace is damaged"
            )
        try:
            raw = zstandard.ZstdDecompressor().decompress(data, max_output_size=expected)
        except zstandard.ZstdError as exc:
            raise TraceCorruptError(f"value payload does not decompress ({exc}); the trace is damaged") from None
        if encoding == "zstd-shuffle":
            raw = unshuffle_bytes(raw, ct.itemsize)
    else:
        raise TraceFormatError(f"value encoding {encoding!r} is unknown to this steptrace; upgrade it")
    if len(raw) != expected:
        raise TraceCorruptError(
            f"value payload holds {len(raw)} bytes but dtype {dtype} and shape {list(shape)} need {expected}"
        )
    return np.frombuffer(raw, dtype=ct).reshape(shape)
