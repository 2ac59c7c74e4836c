"""Exporting a trace as JSONL interchange lines (SPEC.md §6), streamed batch by batch."""

from __future__ import annotations

import base64
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import zstandard

from .errors import TraceExistsError, TraceWriteError
from .export import TensorScan, as_reader
from .payload import DEFAULT_DIGEST
from .reader import TraceReader
from .schema import STAT_COLUMNS

_ENCODER = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
_NONFINITE_TEXT = frozenset(("nan", "inf", "-inf"))
_ALIGNMENT = ("frame", "chunk", "position", "emission")
_BATCH_ROWS = 4096
_YEAR_1_US = -62_135_596_800_000_000  # 0001-01-01T00:00:00Z in microseconds since the epoch
_YEAR_10000_US = 253_402_300_800_000_000
_PROGRESS_EVERY_S = 0.1


def _f32_values(values: np.ndarray) -> list[float | str]:
    """float32 values as the shortest decimals that read back to the same float32; NaN/±Inf as strings."""
    return [s if s in _NONFINITE_TEXT else float(s) for s in values.astype(np.float32).astype(str).tolist()]


def _f32_column(col: pa.Array) -> list[float | str | None]:
    """A nullable float32 column as :func:`_f32_values`, None where null."""
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    values = _f32_values(col.fill_null(0).to_numpy(zero_copy_only=False))
    return [v if ok else None for v, ok in zip(values, valid, strict=True)]


def _f64(x: float | None) -> float | str | None:
    if x is None or math.isfinite(x):
        return x
    return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")


def _f32(x: float | None) -> float | str | None:
    return None if x is None else _f32_values(np.array([x]))[0]


def _iso_times(col: pa.Array) -> list[str | int | None]:
    """timestamp[us] values as ISO 8601 UTC strings with microseconds (``...T12:00:00.123456Z``);
    times outside years 1-9999, which ISO 8601 parsers refuse, as integer microseconds."""
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    us = col.cast(pa.int64()).fill_null(0).to_numpy(zero_copy_only=False)
    text = np.datetime_as_string(us.astype("datetime64[us]"), unit="us", timezone="UTC").tolist()
    iso = (us >= _YEAR_1_US) & (us < _YEAR_10000_US)
    return [(t if i else u) if ok else None for t, u, i, ok in zip(text, us.tolist(), iso, valid, strict=True)]


def _split(flat: list[Any], col: pa.Array) -> list[list[Any]]:
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False)
    ends = np.cumsum(lengths).tolist()
    return [flat[e - n : e] for e, n in zip(ends, lengths.tolist(), strict=True)]


def decision_lines(table: pa.Table, *, batch_rows: int = _BATCH_ROWS) -> Iterator[list[str]]:
    """Yield SPEC.md §6 ``decision`` lines (``topk_ids`` form) for the rows of ``table``, per batch.

    Every non-null column is written; ``time`` as ISO 8601 UTC with microseconds.
    """
    for batch in table.to_batches(max_chunksize=batch_rows):
        c = {name: batch.column(name) for name in batch.schema.names}
        py = {name: c[name].to_pylist() for name in ("sample", "step", "head", "chosen", "argmax", "forced",
                                                     "topk_ids", "chosen_rank", "piece", *_ALIGNMENT)}
        topk_logits = _split(_f32_values(pc.list_flatten(c["topk_logits"]).to_numpy(zero_copy_only=False)),
                             c["topk_logits"])
        floats = {name: _f32_column(c[name]) for name in ("margin", "logsumexp", "chosen_logit")}
        watched = c["watched"].to_pylist()
        times = _iso_times(c["time"])
        lines = []
        for i in range(batch.num_rows):
            row: dict[str, Any] = {
                "kind": "decision", "sample": py["sample"][i], "step": py["step"][i], "head": py["head"][i],
                "chosen": py["chosen"][i], "argmax": py["argmax"][i], "forced": py["forced"][i],
                "topk_ids": py["topk_ids"][i], "topk_logits": topk_logits[i], "margin": floats["margin"][i],
                "logsumexp": floats["logsumexp"][i], "chosen_logit": floats["chosen_logit"][i],
                "chosen_rank": py["chosen_rank"][i],
                "watched": None if watched[i] is None else [
                    {"id": w["id"], "logit": _f32(w["logit"]), "rank": w["rank"]} for w in watched[i]
                ],
                "piece": py["piece"][i],
                **{name: py[name][i] for name in _ALIGNMENT},
                "time": times[i],
            }
            lines.append(_ENCODER.encode({k: v for k, v in row.items() if v is not None}))
        yield lines


def file_digest(scan: TensorScan) -> str:
    """The digest algorithm an export names on its meta line (SPEC.md §6): that of the parts
    holding the most tensor rows (ties and a trace without tensors: :data:`DEFAULT_DIGEST`), so
    that an import writes its part with it and keeps those rows' statistics-only digests."""
    parts = len(scan.part_digests)
    counts = np.bincount(scan.row_parts, minlength=parts) if scan.num_rows else np.zeros(parts, np.int64)
    rows: dict[str, int] = {}
    for algorithm, n in zip(scan.part_digests, counts.tolist(), strict=True):
        rows[algorithm] = rows.get(algorithm, 0) + n
    return max(rows, key=lambda a: (rows[a], a == DEFAULT_DIGEST), default=DEFAULT_DIGEST)


def tensor_lines(scan: TensorScan) -> Iterator[list[str]]:
    """Yield SPEC.md §6 ``tensor`` lines per batch: ``data_b64`` when values were recorded,
    else ``stats``; and the row's ``digest`` as ``"<algorithm>:<32 hex>"`` (its part's
    algorithm named, so an import checks the values with it or stores it only under its name)."""
    at = 0
    for rows, data in scan.batches(max_bytes=16 << 20):
        lines = []
        for row, d in zip(rows.to_pylist(), data, strict=True):
            out: dict[str, Any] = {"kind": "tensor"}
            out.update((k, row[k]) for k in ("sample", "step", "name", "call", "order"))
            if row["source"] is not None:
                out["source"] = row["source"]
            out["dtype"] = row["dtype"]
            out["shape"] = row["shape"]
            if d is not None:
                out["data_b64"] = base64.b64encode(d).decode("ascii")
            else:
                out["stats"] = {c: _f64(row[c]) for c in STAT_COLUMNS}
                out["stats"].update(nan_count=row["nan_count"], inf_count=row["inf_count"])
            if row["digest"] is not None:
                out["digest"] = f"{scan.part_digests[scan.row_parts[at]]}:{row['digest'].hex()}"
            at += 1
            lines.append(_ENCODER.encode(out))
        yield lines


def meta_line(reader: TraceReader, digest: str = DEFAULT_DIGEST) -> str:
    """Return the ``meta`` line: the manifest's keys, with ``vocab`` as pieces when known
    (an array when every id up to the largest has a piece, else an object ``{"id": piece}``),
    and ``digest``, the file's digest algorithm (see :func:`file_digest`)."""
    meta: dict[str, Any] = {"kind": "meta", **reader.metadata.to_manifest(), "digest": digest}
    meta.pop("vocab", None)
    vocab = reader.vocab
    if vocab is not None:
        meta["vocab"] = vocab if all(p is not None for p in vocab) else {
            str(i): p for i, p in enumerate(vocab) if p is not None
        }
    return _ENCODER.encode(meta)


def export_jsonl(
    trace: str | os.PathLike[str] | TraceReader,
    out: str | os.PathLike[str],
    *,
    progress: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> int:
    """Write a trace as JSONL interchange lines (SPEC.md §6).

    One ``meta`` line (naming the file's digest algorithm), then every decision (sorted by
    sample, step, head) as a ``topk_ids`` line, then every tensor with ``data_b64`` (values
    recorded) or ``stats``, and its ``digest`` with its algorithm named. NaN and
    ±Inf floats are written as ``"nan"``, ``"inf"``, ``"-inf"``. The file is written under a
    temporary name and renamed at the end, so ``out`` never holds a partial export. Rows are
    converted in batches of bounded rows and bytes, never all at once.

    Args:
        trace: a trace directory or an open :class:`TraceReader`.
        out: the file to write; a name ending in ``.zst`` is zstd-compressed.
        progress: called as ``progress(lines_done, lines_total)`` at most about 10 times a second
            and once at the end.
        overwrite: replace ``out`` when it exists (else an existing ``out`` is refused).

    Returns:
        The number of lines written.

    Raises:
        TraceNotFoundError, TraceFormatError: ``trace`` is not a readable trace.
        TraceCorruptError: the trace is damaged.
        TraceWriteError: ``out`` cannot be written (no such folder, disk full).
        TraceExistsError: ``out`` exists and ``overwrite`` is False (or it is a folder).
    """
    out_path = Path(out)
    if out_path.is_dir():
        raise TraceExistsError(f"{out_path} is a folder; give a file name for the JSONL export")
    if out_path.exists() and not overwrite:
        raise TraceExistsError(f"{out_path} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    reader = as_reader(trace)
    decisions = reader.decisions(derive=False)
    scan = TensorScan(reader)
    total = 1 + decisions.num_rows + scan.num_rows
    tmp = out_path.with_name(f".{out_path.name}.{os.getpid()}.tmp")
    done = 0
    next_report = time.monotonic() + _PROGRESS_EVERY_S

    def write(sink: IO[bytes], lines: list[str]) -> None:
        nonlocal done, next_report
        sink.write(("\n".join(lines) + "\n").encode("utf-8"))
        done += len(lines)
        if progress is not None and time.monotonic() >= next_report:
            progress(done, total)
            next_report = time.monotonic() + _PROGRESS_EVERY_S

    try:
        with open(tmp, "wb") as fh:
            if out_path.name.endswith(".zst"):
                with zstandard.ZstdCompressor(level=3).stream_writer(fh, closefd=False) as sink:
                    _write_all(write, sink, reader, decisions, scan)
            else:
                _write_all(write, fh, reader, decisions, scan)
        os.replace(tmp, out_path)
    except OSError as exc:
        raise TraceWriteError(f"writing {out_path} failed: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)
    if progress is not None:
        progress(done, total)
    return done


def _write_all(write: Callable[[IO[bytes], list[str]], None], sink: IO[bytes], reader: TraceReader,
               decisions: pa.Table, scan: TensorScan) -> None:
    write(sink, [meta_line(reader, file_digest(scan))])
    for lines in decision_lines(decisions):
        write(sink, lines)
    for lines in tensor_lines(scan):
        write(sink, lines)
