"""The three kinds of JSONL interchange lines (SPEC.md §6): ``meta``, ``decision``, ``tensor``.

Each handler checks one decoded line completely and then makes one :class:`TraceWriter` call.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import string
import tokenize
from typing import Any

import numpy as np

from .checks import check_vocab_ids
from .dtypes import DTYPES, canonical, container
from .jsonio import quote
from .jsonl_fields import I32, I64, LineContext, json_type, show
from .metadata import TraceMetadata
from .payload import DIGEST_ALGORITHMS, digest
from .schema import STAT_COLUMNS
from .stats import TensorStats
from .writer import TraceWriter

#: meta keys that describe the interchange file itself, not the run; dropped on import.
_META_DROPPED = ("kind", "format", "version")
_META_STRINGS = ("model", "precision", "device", "runtime_version", "vocab_head", "created")
_PAYLOADS = ("data_b64", "npy", "raw")
#: Most dimensions a tensor line may have (numpy's portable limit).
MAX_DIMS = 32
#: What numpy's .npy header parser raises on a damaged header (it tokenizes a Python literal).
_NPY_ERRORS = (ValueError, OSError, EOFError, SyntaxError, TypeError, KeyError, tokenize.TokenError)

Vocab = list[str] | dict[int, str]


# ---------------------------------------------------------------------- meta
def parse_meta(ctx: LineContext, obj: dict[str, Any]) -> tuple[TraceMetadata, Vocab | None]:
    """Turn a ``meta`` line into trace metadata and a vocabulary.

    Manifest keys of SPEC.md §2 fill the metadata fields (``runtime`` and ``producer`` may be
    ``{"name", "version"}`` objects or plain strings); ``format``/``version`` are dropped;
    ``digest``, the file's digest algorithm, goes to ``ctx.digest``; every other key is kept in
    ``extra``.

    Raises:
        JsonlError: a key has the wrong type, or ``digest`` names no known algorithm.
    """
    d = {k: v for k, v in obj.items() if k not in _META_DROPPED}
    if "digest" in d:
        ctx.digest = _algorithm(ctx, d.pop("digest"), "meta digest")
    fields: dict[str, Any] = {}
    for key in ("runtime", "producer"):
        v = d.pop(key, None)
        if isinstance(v, dict):
            fields[key] = v.get("name")
            fields[f"{key}_version"] = v.get("version")
        elif v is not None:
            fields[key] = v
    if "runtime_version" in d:
        fields["runtime_version"] = d.pop("runtime_version")
    for key in _META_STRINGS:
        if key in d:
            fields[key] = d.pop(key)
    for key in ("runtime", "runtime_version", "producer", "producer_version", *_META_STRINGS):
        if fields.get(key) is not None and not isinstance(fields[key], str):
            ctx.fail(f"meta {key} must be a string, got {json_type(fields[key])} {show(fields[key])}")
    for key in ("producer", "producer_version", "created", "vocab_head"):
        if fields.get(key) is None:
            fields.pop(key, None)
    command = d.pop("command", None)
    if command is not None and not (isinstance(command, list) and all(isinstance(a, str) for a in command)):
        ctx.fail(f"meta command must be an array of strings (argv), got {show(command)}")
    tags = d.pop("tags", None)
    tags = {} if tags is None else tags
    if not isinstance(tags, dict) or not all(isinstance(v, str) for v in tags.values()):
        ctx.fail(f"meta tags must be an object of strings, got {show(tags)}")
    watched = d.pop("watched", None)
    watched = {} if watched is None else watched
    if not isinstance(watched, dict) or not all(
        type(v) is int and 0 <= v <= I32[1] for v in watched.values()
    ):
        ctx.fail(f"meta watched must map token names to integer ids >= 0 (e.g. {{\"eos\": 3}}), got {show(watched)}")
    vocab = _vocab(ctx, d.pop("vocab", None))
    meta = TraceMetadata(command=command, tags=tags, watched=watched, extra=d, **fields)
    return meta, vocab


def _vocab(ctx: LineContext, v: Any) -> Vocab | None:
    if v is None:
        return None
    if isinstance(v, list):
        if all(isinstance(p, str) for p in v):
            return v
        if not all(p is None or isinstance(p, str) for p in v):
            bad = next(i for i, p in enumerate(v) if not (p is None or isinstance(p, str)))
            ctx.fail(f"meta vocab[{bad}] must be a string (or null for no piece), got {show(v[bad])}")
        sparse = {i: p for i, p in enumerate(v) if p is not None}
        problem = check_vocab_ids(np.fromiter(sparse, np.int64, len(sparse)))
        if problem:
            ctx.fail(f"meta vocab: {problem}")
        return sparse
    if isinstance(v, dict):
        out: dict[int, str] = {}
        for key, piece in v.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10 and int(key) <= I32[1]):
                ctx.fail(f"meta vocab key {key!r} is not a token id (a non-negative integer as a string)")
            if not isinstance(piece, str):
                ctx.fail(f"meta vocab[{key!r}] must be a string, got {show(piece)}")
            out[int(key)] = piece
        problem = check_vocab_ids(np.fromiter(out, np.int64, len(out)))
        if problem:
            ctx.fail(f"meta vocab: {problem}")
        return out
    ctx.fail(f"meta vocab must be an array of pieces or an object {{\"id\": \"piece\"}}, got {json_type(v)}")


# ---------------------------------------------------------------------- decisions
def add_decision(ctx: LineContext, obj: dict[str, Any], writer: TraceWriter) -> str:
    """Record a ``decision`` line (full ``logits`` or ``topk_ids``/``topk_logits``).

    Returns:
        The sample id.

    Raises:
        JsonlError: the line is malformed.
        TraceUsageError: the writer refused a value (the caller adds the line number).
    """
    sample = ctx.text(obj, "sample")
    step = ctx.integer(obj, "step", lo=0)
    head = ctx.text(obj, "head", default="token")
    chosen = ctx.integer(obj, "chosen", default=None, lo=0)
    keys = {
        "forced": ctx.flag(obj, "forced"),
        "piece": ctx.text(obj, "piece", default=None, empty=True),
        **{k: ctx.integer(obj, k, default=None) for k in ("frame", "chunk", "position", "emission")},
        "time_us": ctx.time_us(obj),
    }
    has_topk = "topk_ids" in obj or "topk_logits" in obj
    if "logits" in obj:
        if has_topk:
            ctx.fail("give either logits or topk_ids/topk_logits, not both")
        x = ctx.floats(obj["logits"], "logits")
        k = ctx.integer(obj, "k", default=ctx.k)
        if k < 2:
            ctx.fail(f"k = {k}: a decision keeps at least the top 2 candidates (k >= 2)")
        watched = ctx.watched if head == ctx.vocab_head else []
        writer.add_logits(sample, step, x, head=head, k=k, chosen=chosen, watched=watched, **keys)
        if ctx.keep_logits:
            writer.add_tensor(sample, step, f"logits:{head}", _logits_tensor(x), source="decision", copy=False)
        return sample
    if not has_topk:
        ctx.fail("a decision line needs either logits or topk_ids and topk_logits")
    ids = ctx.ints(ctx.value(obj, "topk_ids"), "topk_ids", lo=0)
    vals = ctx.floats(ctx.value(obj, "topk_logits"), "topk_logits")
    if ids.size != vals.size:
        ctx.fail(f"topk_ids has {ids.size} entries but topk_logits has {vals.size}")
    if ids.size < 2:
        ctx.fail(f"topk_ids holds {ids.size} entries; a decision keeps at least the top 2 (k >= 2)")
    argmax = ctx.integer(obj, "argmax", default=None)
    writer.add_decision(  # the writer checks the top-k (SPEC.md §3.2) and the key's uniqueness
        sample, step, head=head, chosen=int(ids[0]) if chosen is None else chosen, argmax=argmax,
        topk_ids=ids, topk_logits=vals.astype(np.float32),
        logsumexp=ctx.number(obj, "logsumexp"), chosen_logit=ctx.number(obj, "chosen_logit"),
        chosen_rank=ctx.integer(obj, "chosen_rank", default=None, lo=0),
        watched=_watched(ctx, obj.get("watched")), **keys,
    )
    return sample


def _watched(ctx: LineContext, v: Any) -> list[dict[str, Any]] | None:
    if v is None:
        return None
    if not isinstance(v, list):
        ctx.fail(f"watched must be an array of {{\"id\", \"logit\", \"rank\"}} objects, got {json_type(v)}")
    out = []
    for i, w in enumerate(v):
        if not isinstance(w, dict):
            ctx.fail(f"watched[{i}] must be an object {{\"id\", \"logit\", \"rank\"}}, got {json_type(w)}")
        out.append({
            "id": ctx.integer(w, "id", lo=0, label=f"watched[{i}].id"),
            "logit": ctx.number(w, "logit", label=f"watched[{i}].logit"),
            "rank": ctx.integer(w, "rank", default=None, lo=0, label=f"watched[{i}].rank"),
        })
    return out


def _logits_tensor(x: np.ndarray) -> np.ndarray:
    """Full logits as float32 when that loses nothing (the usual runtime dtype), else float64."""
    with np.errstate(over="ignore"):  # values beyond float32 range simply keep float64
        x32 = x.astype(np.float32)
    return x32 if np.array_equal(x32.astype(np.float64), x, equal_nan=True) else x


# ---------------------------------------------------------------------- tensors
def add_tensor(ctx: LineContext, obj: dict[str, Any], writer: TraceWriter) -> str:
    """Record a ``tensor`` line: values from ``data_b64``, ``npy`` or ``raw``, else ``stats``.

    Returns:
        The sample id.

    Raises:
        JsonlError: the line is malformed, or its payload does not match its dtype and shape.
        TraceUsageError: the writer refused a value (the caller adds the line number).
    """
    sample = ctx.text(obj, "sample")
    step = ctx.integer(obj, "step", lo=0)
    name = ctx.text(obj, "name")
    npy = None
    if "npy" in obj and ("dtype" not in obj or "shape" not in obj):
        npy = _npy_header(ctx, obj)  # an .npy file describes itself (SPEC.md §6)
    dtype = ctx.text(obj, "dtype") if "dtype" in obj or npy is None else npy[0]
    if dtype not in DTYPES:
        ctx.fail(f"dtype {quote(dtype)} is not a steptrace dtype; use one of {', '.join(DTYPES)}")
    raw_shape = ctx.value(obj, "shape") if "shape" in obj or npy is None else list(npy[1])
    if isinstance(raw_shape, list) and len(raw_shape) > MAX_DIMS:
        ctx.fail(f"shape has {len(raw_shape)} dimensions; steptrace accepts at most {MAX_DIMS}")
    shape = tuple(ctx.ints(raw_shape, "shape", lo=0, hi=I64[1]).tolist())
    numel = math.prod(shape)
    nbytes = numel * container(dtype).itemsize
    if nbytes > I64[1]:
        ctx.fail(f"shape {list(shape)} is too large ({nbytes} bytes)")
    call = ctx.integer(obj, "call", default=None, lo=0)
    order = ctx.integer(obj, "order", default=None, lo=0)
    source = ctx.text(obj, "source", default=None, empty=True)
    dig, algorithm = _digest(ctx, obj.get("digest"))
    given = [k for k in _PAYLOADS if k in obj]
    if len(given) > 1:
        ctx.fail(f"give only one of data_b64, npy or raw, not {' and '.join(given)}")
    if "offset" in obj and given != ["raw"]:
        ctx.fail("offset is only used with raw")
    if not given:
        if "stats" not in obj:
            ctx.fail("a tensor line needs one of data_b64, npy, raw (values) or stats (statistics only)")
        stats = _stats(ctx, obj["stats"], numel)
        if dig is not None and algorithm != writer.digest_algorithm:
            dig = None  # never stored under another algorithm's name (SPEC.md §4.5, §6)
            ctx.digests_dropped += 1
        writer.add_tensor_stats(
            sample, step, name, dtype=dtype, shape=shape, stats=stats, digest=dig, source=source, call=call, order=order
        )
        return sample
    if given == ["data_b64"]:
        arr = _from_b64(ctx, obj["data_b64"], dtype, shape, nbytes)
    elif given == ["npy"]:
        arr = _from_npy(ctx, obj, dtype, shape)
    else:
        arr = _from_raw(ctx, obj, dtype, shape, nbytes)
    if dtype == "bool" and arr.size and arr.view(np.uint8).max() > 1:
        ctx.fail("a bool tensor holds bytes other than 0x00 and 0x01")
    if dig is not None:  # checked with its own algorithm; the writer digests the values with the part's
        a = canonical(arr, dtype)
        if digest(memoryview(a.reshape(-1)).cast("B"), algorithm) != dig:
            ctx.fail(f"digest does not match the values ({algorithm} of the canonical bytes, SPEC.md §4.5)")
    writer.add_tensor(sample, step, name, arr, source=source, call=call, order=order, dtype=dtype, copy=False)
    return sample


def _digest(ctx: LineContext, v: Any) -> tuple[bytes | None, str]:
    """A line's ``digest``: 32 hex digits in the file's algorithm, or ``"<algorithm>:<32 hex>"``.

    Returns:
        (the 16 bytes or None, their algorithm).
    """
    if v is None:
        return None, ctx.digest
    if isinstance(v, str):
        algorithm, sep, hexdigits = v.rpartition(":")
        algorithm = _algorithm(ctx, algorithm, "digest") if sep else ctx.digest
        if len(hexdigits) == 32 and all(c in string.hexdigits for c in hexdigits):
            return bytes.fromhex(hexdigits), algorithm
    ctx.fail(f"digest must be 32 hex digits (16 bytes), optionally after \"<algorithm>:\", got {show(v)}")


def _algorithm(ctx: LineContext, v: Any, what: str) -> str:
    if isinstance(v, str) and v in DIGEST_ALGORITHMS:
        return v
    ctx.fail(f"{what} names digest algorithm {show(v)}; this steptrace knows {', '.join(DIGEST_ALGORITHMS)}")


def _stats(ctx: LineContext, v: Any, numel: int) -> TensorStats:
    if not isinstance(v, dict):
        ctx.fail("stats must be an object {min, max, mean, std, abs_max, l2, nan_count, inf_count}")
    floats = {c: ctx.number(v, c, label=f"stats.{c}") for c in STAT_COLUMNS}
    counts = {c: ctx.integer(v, c, default=0, lo=0, hi=I64[1], label=f"stats.{c}") for c in ("nan_count", "inf_count")}
    if counts["nan_count"] + counts["inf_count"] > numel:
        ctx.fail(f"stats count {counts['nan_count']} NaN and {counts['inf_count']} Inf in a tensor of {numel} elements")
    return TensorStats(numel=numel, **floats, **counts)


def _from_b64(ctx: LineContext, v: Any, dtype: str, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
    if not isinstance(v, str):
        ctx.fail(f"data_b64 must be a base64 string, got {json_type(v)}")
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError) as exc:
        ctx.fail(f"data_b64 is not valid base64 (standard alphabet, padded, no line breaks): {exc}")
    if len(raw) != nbytes:
        ctx.fail(f"data_b64 holds {len(raw)} bytes but dtype {dtype} and shape {list(shape)} need {nbytes}")
    return np.frombuffer(raw, dtype=container(dtype)).reshape(shape)


def _npy_header(ctx: LineContext, obj: dict[str, Any]) -> tuple[str, tuple[int, ...]]:
    """Return the (steptrace dtype, shape) an .npy file's header declares, checked against its size."""
    path, rel = ctx.payload_path(obj, "npy")
    try:
        with open(path, "rb") as f:
            if f.read(4) == b"PK\x03\x04":
                ctx.fail(f"npy file {rel!r} is an .npz archive; save one array per file with np.save")
            f.seek(0)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dt = np.lib.format.read_array_header_1_0(f, max_header_size=1 << 16)
            elif version in ((2, 0), (3, 0)):
                shape, fortran, dt = np.lib.format.read_array_header_2_0(f, max_header_size=1 << 16)
            else:
                raise ValueError(f"unknown .npy version {version}")
            body = os.fstat(f.fileno()).st_size - f.tell()
    except _NPY_ERRORS as exc:
        ctx.fail(f"npy file {rel!r} has no readable .npy header ({str(exc)[:80]})")
    if dt.hasobject:
        ctx.fail(f"npy file {rel!r} holds Python objects; steptrace reads .npy arrays without pickled objects only")
    if len(shape) > MAX_DIMS:
        ctx.fail(f"npy file {rel!r} has {len(shape)} dimensions; steptrace accepts at most {MAX_DIMS}")
    need = math.prod(shape) * dt.itemsize
    if need > body:
        ctx.fail(f"npy file {rel!r} declares shape {list(shape)[:8]} of {dt} ({need} bytes) but holds {body}")
    name = "bfloat16" if dt.kind == "V" and dt.itemsize == 2 else dt.name
    return name, tuple(shape)


def _from_npy(ctx: LineContext, obj: dict[str, Any], dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    _npy_header(ctx, obj)  # bounds what np.load allocates by the file's own size
    path, rel = ctx.payload_path(obj, "npy")
    try:
        arr = np.load(path, allow_pickle=False)
    except _NPY_ERRORS as exc:
        ctx.fail(f"npy file {rel!r} is not a readable .npy array without pickled objects ({exc})")
    if not isinstance(arr, np.ndarray):  # an .npz archive
        arr.close()
        ctx.fail(f"npy file {rel!r} is an .npz archive; save one array per file with np.save")
    dt = arr.dtype
    bf16_bits = dtype == "bfloat16" and (dt.name in ("uint16", "bfloat16") or (dt.kind == "V" and dt.itemsize == 2))
    if dt.name != dtype and not bf16_bits:
        ctx.fail(f"npy file {rel!r} holds {dt.name} values but the line says dtype {dtype}")
    if arr.shape != shape:
        ctx.fail(f"npy file {rel!r} has shape {list(arr.shape)} but the line says {list(shape)}")
    return arr.view(np.dtype("<u2") if dt.byteorder != ">" else np.dtype(">u2")) if bf16_bits else arr


def _from_raw(ctx: LineContext, obj: dict[str, Any], dtype: str, shape: tuple[int, ...], nbytes: int) -> np.ndarray:
    path, rel = ctx.payload_path(obj, "raw")
    offset = ctx.integer(obj, "offset", default=0, lo=0, hi=I64[1])
    size = path.stat().st_size
    if offset + nbytes > size:
        ctx.fail(
            f"raw file {rel!r} holds {size} bytes; dtype {dtype} and shape {list(shape)} need {nbytes} bytes "
            f"from offset {offset}, past its end"
        )
    ct = container(dtype)
    if nbytes == 0:
        return np.zeros(shape, dtype=ct)
    try:
        arr = np.fromfile(path, dtype=ct, count=math.prod(shape), offset=offset)
    except OSError as exc:
        ctx.fail(f"raw file {rel!r} cannot be read ({exc})")
    return arr.reshape(shape)
