"""Arrow schemas, file names and version constants of format v1 (SPEC.md §2–§5)."""

from __future__ import annotations

import pyarrow as pa

FORMAT_NAME = "steptrace"
#: Version this code writes. Readers accept any minor of the same major.
FORMAT_VERSION = "1.2"
FORMAT_MAJOR = 1

MANIFEST = "steptrace.json"
PARTS_DIR = "parts"
#: Arrow schema metadata keys carried by every data file.
META_VERSION = b"steptrace.version"
META_KIND = b"steptrace.kind"
META_PART = b"steptrace.part"

KINDS = ("decisions", "tensors", "values")

WATCHED_TYPE = pa.struct(
    [pa.field("id", pa.int32(), False), pa.field("logit", pa.float32()), pa.field("rank", pa.int32())]
)

#: Decisions: one row per (sample, step, head). Written with plain utf8 keys while recording;
#: compacted files dictionary-encode ``sample``, ``head`` and ``piece`` (readers accept both).
DECISIONS = pa.schema(
    [
        pa.field("sample", pa.utf8(), False),
        pa.field("step", pa.int32(), False),
        pa.field("head", pa.utf8(), False),
        pa.field("chosen", pa.int32(), False),
        pa.field("argmax", pa.int32(), False),
        pa.field("forced", pa.bool_(), False),
        pa.field("topk_ids", pa.list_(pa.int32()), False),
        pa.field("topk_logits", pa.list_(pa.float32()), False),
        pa.field("margin", pa.float32(), False),
        pa.field("logsumexp", pa.float32()),
        pa.field("chosen_logit", pa.float32()),
        pa.field("chosen_rank", pa.int32()),
        pa.field("watched", pa.list_(WATCHED_TYPE)),
        pa.field("piece", pa.utf8()),
        pa.field("frame", pa.int32()),
        pa.field("chunk", pa.int32()),
        pa.field("position", pa.int32()),
        pa.field("emission", pa.int32()),
        pa.field("time", pa.timestamp("us", tz="UTC")),
    ]
)

STAT_COLUMNS = ("min", "max", "mean", "std", "abs_max", "l2")

#: Tensors: one row per (sample, step, name, call): stats and digest always, values by reference.
TENSORS = pa.schema(
    [
        pa.field("sample", pa.utf8(), False),
        pa.field("step", pa.int32(), False),
        pa.field("name", pa.utf8(), False),
        pa.field("call", pa.int32(), False),
        pa.field("order", pa.int32(), False),
        pa.field("source", pa.utf8()),
        pa.field("dtype", pa.utf8(), False),
        pa.field("shape", pa.list_(pa.int64()), False),
        pa.field("numel", pa.int64(), False),
        *[pa.field(c, pa.float64()) for c in STAT_COLUMNS],
        pa.field("nan_count", pa.int64(), False),
        pa.field("inf_count", pa.int64(), False),
        pa.field("digest", pa.binary(16)),
        pa.field("value_ref", pa.int64()),
    ]
)

#: Values: one row per recorded tensor value; row i is referenced by ``value_ref == i``.
VALUES = pa.schema([pa.field("encoding", pa.utf8(), False), pa.field("data", pa.large_binary(), False)])

SCHEMAS = {"decisions": DECISIONS, "tensors": TENSORS, "values": VALUES}
#: Columns a reader cannot do without; every other column is optional (null when absent).
REQUIRED = {
    "decisions": ("sample", "step", "head", "chosen", "topk_ids", "topk_logits"),
    "tensors": ("sample", "step", "name", "dtype", "shape"),
    "values": ("encoding", "data"),
}
#: Columns dictionary-encoded when a part is compacted at close.
DICTIONARY_COLUMNS = {
    "decisions": ("sample", "head", "piece"),
    "tensors": ("sample", "name", "source", "dtype"),
    "values": (),
}


def data_file(part: str, kind: str) -> str:
    """Return the file name, relative to ``parts/``, of ``part``'s data file of ``kind``."""
    return f"{part}.{kind}.arrow"


def part_file(part: str) -> str:
    """Return the file name, relative to ``parts/``, of ``part``'s status file."""
    return f"{part}.json"


def file_metadata(kind: str, part: str) -> dict[bytes, bytes]:
    """Return the Arrow schema metadata every data file of ``kind`` carries."""
    return {META_VERSION: FORMAT_VERSION.encode(), META_KIND: kind.encode(), META_PART: part.encode()}
