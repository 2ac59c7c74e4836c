"""Tensor payloads: statistics, the bitwise digest, and value encodings (SPEC.md §4).

Everything here works on the canonical bytes of a tensor: little-endian, C order, one byte per
bool, bfloat16 as its 16-bit pattern.
"""

from __future__ import annotations

import hashlib
import math
import threading
from dataclasses import dataclass

import numpy as np
import xxhash
import zstandard

from .dtypes import DTYPES, F16_SPECIAL_MAGNITUDE, container, widen_bfloat16, widen_float16
from .errors import TraceCorruptError, TraceFormatError, TraceUsageError

#: Encodings a value payload may carry (SPEC.md §4.3).
ENCODINGS = ("raw", "zstd", "zstd-shuffle")
DIGEST_BYTES = 16
#: Readers refuse to inflate a single tensor beyond this many bytes unless told otherwise.
DEFAULT_MAX_TENSOR_BYTES = 16 << 30


@dataclass(frozen=True, slots=True)
class TensorStats:
    """Summary statistics of one tensor over its finite elements (NaN and ±Inf only counted)."""

    numel: int
    min: float | None
    max: float | None
    mean: float | None
    std: float | None
    abs_max: float | None
    l2: float | None
    nan_count: int
    inf_count: int


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


def _as_float64(flat: np.ndarray, name: str) -> np.ndarray:
    """The elements of a canonical array as float64 (rare path: huge values)."""
    if name == "bfloat16":
        return widen_bfloat16(flat).astype(np.float64)
    return flat.astype(np.float64)


_CHUNK = 1 << 18  # elements per pass: each statistic reads a cache-sized chunk, not the whole tensor
_scratch = threading.local()


def _scratch64(n: int) -> np.ndarray:
    """A per-thread float64 buffer of ``n <= _CHUNK`` elements (fresh memory is slow to touch)."""
    buf = getattr(_scratch, "f64", None)
    if buf is None:
        buf = _scratch.f64 = np.empty(_CHUNK, np.float64)
    return buf[:n]


def _widened(c: np.ndarray, name: str, *, specials: bool = True) -> np.ndarray:
    """Return chunk ``c`` as numbers numpy reduces natively (float16/bfloat16 widened exactly to
    float32 in a reused per-thread buffer: fresh memory is slow to touch). ``specials=False``:
    float16 ±inf/NaN come out as finite values of magnitude >= 2**16 (see
    :func:`tracefmt.dtypes.widen_float16`)."""
    if name == "bool":
        return c.view(np.uint8)
    if name not in ("float16", "bfloat16"):
        return c
    buf = getattr(_scratch, "f32", None)
    if buf is None:
        buf = _scratch.f32 = np.empty(_CHUNK, np.float32)
    out = buf[: c.size]
    if name == "float16":  # numpy's float16 cast is not vectorised here: ~8x slower
        widen_float16(c, out, specials=specials)
    else:
        np.left_shift(c, 16, out=out.view(np.uint32), dtype=np.uint32)
    return out


def compute_stats(a: np.ndarray, name: str) -> TensorStats:
    """Compute the SPEC.md statistics of a canonical array of dtype ``name``.

    min/max/mean/std/abs_max/l2 are taken over finite elements in float64 accumulation; std is
    the population standard deviation. They are ``None`` when no element is finite; l2 is 0.0
    for an empty tensor.

    Args:
        a: canonical array (see :func:`tracefmt.dtypes.canonical`).
        name: its SPEC.md dtype name.

    Returns:
        The statistics.
    """
    n = int(a.size)
    if n == 0:
        return TensorStats(0, None, None, None, None, None, 0.0, 0, 0)
    flat = a.reshape(-1)
    is_float = DTYPES[name][1] == "f"
    lo, hi, total, sumsq, count, nan_count, inf_count = math.inf, -math.inf, 0.0, 0.0, 0, 0, 0
    with np.errstate(invalid="ignore", over="ignore"):  # +inf + -inf, overflow: handled below
        for start in range(0, n, _CHUNK):
            chunk = flat[start : start + _CHUNK]
            c = _widened(chunk, name, specials=False)
            lo_c, hi_c = float(c.min()), float(c.max())
            if name == "float16" and max(-lo_c, hi_c) >= F16_SPECIAL_MAGNITUDE:
                c = _widened(chunk, name)  # ±inf/NaN in the chunk: widened as they are, filtered below
            # Σx and Σx² from a float64 copy of the chunk in a reused buffer: x² of a float32
            # is exact in float64, and two vectorised passes over a cached chunk cost less
            # than a casting reduction plus einsum (no BLAS: its threads thrash on a busy machine)
            w = _scratch64(c.size)
            np.copyto(w, c, casting="unsafe")
            s = float(np.add.reduce(w))
            if is_float and not math.isfinite(s):
                bad = ~np.isfinite(c)
                nans = int(np.count_nonzero(np.isnan(c)))
                nan_count += nans
                inf_count += int(np.count_nonzero(bad)) - nans
                c = c[~bad]
                if not c.size:
                    continue
                w = w[: c.size]
                np.copyto(w, c, casting="unsafe")
                s = float(np.add.reduce(w))
                lo_c, hi_c = float(c.min()), float(c.max())
            lo = min(lo, lo_c)
            hi = max(hi, hi_c)
            total += s
            sumsq += float(np.add.reduce(np.multiply(w, w, out=w)))
            count += int(c.size)
    if count == 0:
        return TensorStats(n, None, None, None, None, None, None, nan_count, inf_count)
    abs_max = max(abs(lo), abs(hi))
    scale = 1.0
    if abs_max > 1e150:  # huge values: redo the sums scaled, so squares cannot overflow float64
        scale = abs_max
        x = _as_float64(flat, name) / scale
        x = x[np.isfinite(x)]
        total, sumsq = float(x.sum()), float(np.einsum("i,i->", x, x))
    mean = total / count
    var = max(sumsq / count - mean * mean, 0.0)
    return TensorStats(
        numel=n,
        min=lo,
        max=hi,
        mean=mean * scale,
        std=math.sqrt(var) * scale,
        abs_max=abs_max,
        l2=math.sqrt(sumsq) * scale,
        nan_count=nan_count,
        inf_count=inf_count,
    )


#: Tensors up to this many elements are reduced together by :func:`compute_stats_many`.
SMALL_ELEMENTS = 1 << 14


def _widened_all(a: np.ndarray, name: str) -> np.ndarray:
    """A 1-d canonical array of a dtype numpy does not reduce natively, as numbers it does."""
    if name == "bfloat16":
        return widen_bfloat16(a)
    if name == "float16":
        return widen_float16(a)
    return a.view(np.uint8)  # bool


def compute_stats_many(arrays: list[np.ndarray], names: list[str]) -> list[TensorStats]:
    """Compute :func:`compute_stats` of many small canonical arrays in a few numpy calls.

    A recorder hooking every module of a model decoding one token per step hands the writer
    dozens of tensors of a few KB per step; reducing each in its own numpy calls costs more in
    Python (and in the GIL the model's thread waits for) than in arithmetic. Here the arrays
    are widened into one float64 buffer and reduced per segment (``ufunc.reduceat``). Arrays
    holding NaN/Inf or huge values are handed to :func:`compute_stats`, which treats them
    exactly; the others may differ from it in the last bits of mean/std/l2 (SPEC.md §4.4
    allows that: the summation order differs).

    Args:
        arrays: canonical arrays (see :func:`tracefmt.dtypes.canonical`).
        names: their SPEC.md dtype names.

    Returns:
        Their statistics, in order.
    """
    out: list[TensorStats | None] = [None] * len(arrays)
    todo = [i for i, a in enumerate(arrays) if a.size]
    for i in range(len(arrays)):
        if not arrays[i].size:
            out[i] = compute_stats(arrays[i], names[i])
    if todo:
        plain = ("bfloat16", "float16", "bool")
        parts = [arrays[i].reshape(-1) if names[i] not in plain else _widened_all(arrays[i].reshape(-1), names[i])
                 for i in todo]
        x = np.concatenate(parts, dtype=np.float64, casting="unsafe")  # exact: every SPEC dtype fits float64
        sizes = np.fromiter(map(len, parts), np.int64, len(parts))
        starts = np.zeros(len(parts), np.int64)
        np.cumsum(sizes[:-1], out=starts[1:])
        with np.errstate(invalid="ignore", over="ignore"):
            total = np.add.reduceat(x, starts)
            lo = np.minimum.reduceat(x, starts)
            hi = np.maximum.reduceat(x, starts)
            sumsq = np.add.reduceat(np.multiply(x, x, out=x), starts)
            mean = total / sizes
            std = np.sqrt(np.maximum(sumsq / sizes - mean * mean, 0.0))
            abs_max = np.maximum(np.abs(lo), np.abs(hi))
            l2 = np.sqrt(sumsq)
        # NaN/Inf anywhere in a segment makes its sums non-finite; so do values whose squares
        # overflow: both go to compute_stats (which also scales values beyond 1e150)
        exact = (np.isfinite(sumsq) & (abs_max <= 1e150)).tolist()
        # one conversion per column, not one numpy scalar per field and row
        rows = zip(todo, exact, sizes.tolist(), lo.tolist(), hi.tolist(), mean.tolist(), std.tolist(),
                   abs_max.tolist(), l2.tolist())
        for i, ok, n, lo_, hi_, mean_, std_, am, l2_ in rows:
            out[i] = TensorStats(n, lo_, hi_, mean_, std_, am, l2_, 0, 0) if ok else compute_stats(arrays[i], names[i])
    return out  # type: ignore[return-value]


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
