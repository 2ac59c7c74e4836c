"""Checking a trace against SPEC.md, and summarising what it holds (``trace validate|info``)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .checks import decision_problem, duplicate_message, topk_problems
from .dtypes import DTYPES
from .errors import TraceCorruptError, TraceError
from .reader import TraceReader


def _n(n: int, word: str) -> str:
    """``1 part``, ``2,620 parts``."""
    return f"{n:,} {word}{'' if n == 1 else 's'}"


@dataclass
class ValidationReport:
    """The outcome of :func:`validate`: problems break SPEC.md; warnings do not."""

    path: str
    complete: bool
    parts: int
    decisions: int
    tensors: int
    values: int
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No SPEC.md violation was found (an incomplete trace can be ok)."""
        return not self.problems

    def __str__(self) -> str:
        state = "complete" if self.complete else "INCOMPLETE (interrupted or still being written)"
        verdict = "valid" if self.ok else f"INVALID ({_n(len(self.problems), 'problem')})"
        return (f"{self.path}: {verdict}, {state}; {_n(self.parts, 'part')}, {_n(self.decisions, 'decision')}, "
                f"{_n(self.tensors, 'tensor')}, {_n(self.values, 'value')}")

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-serialisable dict."""
        return {**asdict(self), "ok": self.ok}


def _duplicates(t: pa.Table, keys: list[str]) -> pa.Table:
    if t.num_rows == 0:
        return t.select(keys)
    counts = t.group_by(keys).aggregate([([], "count_all")])
    return counts.filter(pc.greater(counts["count_all"], 1))


def _check_decisions(t: pa.Table, parts: list[str], problems: list[str]) -> None:
    n_ids = pc.list_value_length(t["topk_ids"]).to_numpy(zero_copy_only=False)
    n_logits = pc.list_value_length(t["topk_logits"]).to_numpy(zero_copy_only=False)
    bad = int(np.count_nonzero((n_ids != n_logits) | (n_ids < 2)))
    if bad:
        problems.append(f"{bad} decision row(s) have top-k lists of different lengths or k < 2 (SPEC §3.1)")
        return
    offsets = np.zeros(t.num_rows + 1, np.int64)
    np.cumsum(n_ids, out=offsets[1:])
    ids = pc.list_flatten(t["topk_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    logits = pc.list_flatten(t["topk_logits"]).to_numpy(zero_copy_only=False).astype(np.float32)
    margin = t["margin"].to_numpy(zero_copy_only=False).astype(np.float32)
    argmax = t["argmax"].to_numpy(zero_copy_only=False)
    rows, reasons = topk_problems(ids, logits, offsets, margin, argmax)
    if rows.size:
        ex = t.slice(int(rows[0]), 1).select(["sample", "step", "head"]).to_pylist()[0]
        more = f" (and {rows.size - 1} more row(s))" if rows.size > 1 else ""
        problems.append(decision_problem(ex["sample"], ex["step"], ex["head"], reasons[0]) + more)
    steps = t["step"].to_numpy(zero_copy_only=False)
    if steps.size and steps.min() < 0:
        problems.append("negative step numbers (SPEC §3.1)")
    keys = ["sample", "step", "head"]
    counts = t.group_by(keys).aggregate([([], "count_all"), ("_part", "distinct")])
    dup = counts.filter(pc.greater(counts["count_all"], 1))
    if dup.num_rows:
        ex = dup.slice(0, 1).to_pylist()[0]
        more = f" (and {dup.num_rows - 1} more key(s))" if dup.num_rows > 1 else ""
        where = [parts[i] for i in sorted(ex["_part_distinct"])]
        problems.append(duplicate_message(ex["sample"], ex["step"], ex["head"], where) + more)


def _check_tensors(t: pa.Table, reader: TraceReader, problems: list[str], warnings: list[str]) -> None:
    shapes = t["shape"]
    numel = np.ones(t.num_rows, dtype=np.int64)
    flat = pc.list_flatten(shapes).to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(shapes).to_numpy(zero_copy_only=False)
    if flat.size:
        if flat.min() < 0:
            problems.append("tensor shapes with negative dimensions (SPEC §4.1)")
        np.multiply.at(numel, parents, flat)
    bad = int(np.count_nonzero(numel != t["numel"].to_numpy(zero_copy_only=False)))
    if bad:
        problems.append(f"{bad} tensor row(s) have numel != product(shape) (SPEC §4.1)")
    unknown = set(pc.unique(t["dtype"]).to_pylist()) - set(DTYPES)
    if unknown:
        problems.append(f"unknown tensor dtype(s) {sorted(unknown)} (SPEC §4.2)")
    dup = _duplicates(t, ["sample", "step", "name", "call"])
    if dup.num_rows:
        ex = dup.slice(0, 1).to_pylist()[0]
        problems.append(
            f"{dup.num_rows} (sample, step, name, call) key(s) recorded more than once, e.g. "
            f"{ex['sample']!r} step {ex['step']} {ex['name']!r} call {ex['call']} (SPEC §4.1)"
        )
    for i, part in enumerate(reader.parts):
        rows = t.filter(pc.equal(t["_part"], i))
        refs = rows["value_ref"].drop_null().to_numpy(zero_copy_only=False)
        stored = part.recovered.get("values", 0)
        past = int(np.count_nonzero(refs >= stored)) if refs.size else 0
        if past:
            msg = f"part {part.id}: {past} tensor row(s) reference values that are not in its values file"
            (problems if part.complete else warnings).append(
                msg + ("" if part.complete else " (lost when the recording was interrupted)")
            )
        if refs.size and np.unique(refs).size != refs.size:
            problems.append(f"part {part.id}: several tensor rows share one value_ref (SPEC §4.3)")


def validate(path: str | os.PathLike[str], *, deep: bool = False) -> ValidationReport:
    """Check a trace against SPEC.md.

    Args:
        path: the trace directory.
        deep: also inflate every stored value and check it against its digest.
            Every file's checksum (SPEC.md §5.1) is verified in either case.

    Returns:
        A :class:`ValidationReport`; problems make it not ``ok``.

    Raises:
        TraceNotFoundError, TraceFormatError, TraceCorruptError, TraceVersionError: the trace
            cannot be read at all (not a trace, damaged file, newer format).
    """
    reader = TraceReader(path)
    problems: list[str] = reader.verify()
    warnings: list[str] = []
    if problems:  # a file changed since close: its rows cannot be trusted, so they are not read
        return ValidationReport(path=str(path), complete=reader.complete, parts=len(reader.parts),
                                decisions=0, tensors=0, values=0, problems=problems, warnings=warnings)
    if any(p.complete and not p.checksums for p in reader.parts):
        warnings.append("some parts were written before format 1.1 and carry no checksums: damage inside "
                        "them is found only where it breaks the format")
    dec = reader._table("decisions")
    ten = reader._table("tensors")
    values = sum(d.num_rows for d in reader._load("values"))
    for part in reader.parts:
        if not part.complete:
            alive = part.writer_alive
            how = "its writer is still running" if alive else "its writer stopped before closing it"
            warnings.append(
                f"part {part.id} is incomplete ({how}); {part.recovered.get('decisions', 0)} decisions and "
                f"{part.recovered.get('tensors', 0)} tensors were recovered up to its last flush"
            )
        if part.damaged_tail:
            warnings.append(f"part {part.id}: a partly written batch at the end of a file was dropped")
    samples_by_part = [
        set(pc.unique(dec.filter(pc.equal(dec["_part"], i))["sample"]).to_pylist())
        | set(pc.unique(ten.filter(pc.equal(ten["_part"], i))["sample"]).to_pylist())
        for i in range(len(reader.parts))
    ]
    seen: dict[str, str] = {}
    for part, samples in zip(reader.parts, samples_by_part):
        for s in samples:
            if s in seen:
                problems.append(f"sample {s!r} is recorded by two parts ({seen[s]} and {part.id}) (SPEC §3.1)")
            seen[s] = part.id
    if dec.num_rows:
        _check_decisions(dec, [p.id for p in reader.parts], problems)
    if ten.num_rows:
        _check_tensors(ten, reader, problems, warnings)
    if reader.manifest.get("vocab"):
        try:
            reader.vocab
        except TraceError as exc:
            problems.append(str(exc))
    if deep and not problems:
        stored = ten.filter(pc.is_valid(ten["value_ref"]))
        limits = [p.recovered.get("values", 0) for p in reader.parts]
        for row in stored.select(["sample", "step", "name", "call", "value_ref", "_part"]).to_pylist():
            if row["value_ref"] >= limits[row["_part"]]:
                continue  # reported above
            try:
                reader.tensor(row["sample"], row["step"], row["name"], call=row["call"], raw_bits=True)
            except TraceCorruptError as exc:
                problems.append(str(exc))
    return ValidationReport(
        path=str(path),
        complete=reader.complete,
        parts=len(reader.parts),
        decisions=dec.num_rows,
        tensors=ten.num_rows,
        values=values,
        problems=problems,
        warnings=warnings,
    )


def summarize(reader: TraceReader) -> dict[str, Any]:
    """Return what ``trace info`` shows: metadata, parts, samples, steps, heads, tensors, sizes.

    Args:
        reader: an open reader.

    Returns:
        A JSON-serialisable dict.
    """
    dec = reader._table("decisions")
    ten = reader._table("tensors")
    steps = dec.group_by(["sample"]).aggregate([("step", "max"), ("step", "count_distinct")]) if dec.num_rows else None
    heads = dec.group_by(["head"]).aggregate([([], "count_all"), ("margin", "min")]) if dec.num_rows else None
    names = None
    if ten.num_rows:  # first seen (earliest step, then execution order): the tensors in execution order
        first = pc.add(pc.multiply(ten["step"].cast(pa.int64()), 1 << 32), ten["order"].cast(pa.int64()))
        names = ten.append_column("first_seen", first).group_by(["name", "dtype"]).aggregate(
            [([], "count_all"), ("value_ref", "count"), ("nan_count", "sum"), ("inf_count", "sum"),
             ("first_seen", "min")]).sort_by([("first_seen_min", "ascending"), ("name", "ascending")])
    samples = reader.samples()
    sizes: dict[str, int] = {}
    for p in reader.parts:
        for kind, n in p.file_bytes.items():
            sizes[kind] = sizes.get(kind, 0) + n
    return {
        "path": str(reader.path),
        "format_version": reader.manifest.get("version"),
        "complete": reader.complete,
        "metadata": reader.metadata.to_dict(),
        "vocab_size": len(reader.vocab) if reader.vocab is not None else None,
        "parts": [
            {"id": p.id, "status": p.status, "host": p.host, "pid": p.pid, "writer_alive": p.writer_alive,
             "decisions": p.recovered.get("decisions"), "tensors": p.recovered.get("tensors"),
             "values": p.recovered.get("values"), "damaged_tail": p.damaged_tail}
            for p in reader.parts
        ],
        "samples": len(samples),
        "sample_ids": samples[:20],
        "decisions": dec.num_rows,
        "steps": int(pc.sum(steps["step_count_distinct"]).as_py()) if steps is not None else 0,
        "max_steps_per_sample": int(pc.max(steps["step_max"]).as_py()) + 1 if steps is not None else 0,
        "heads": {
            r["head"]: {"decisions": r["count_all"], "min_margin": r["margin_min"]}
            for r in (heads.to_pylist() if heads is not None else [])
        },
        "tensors": ten.num_rows,
        "tensor_names": [  # in execution order
            {"name": r["name"], "dtype": r["dtype"], "records": r["count_all"], "with_values": r["value_ref_count"],
             "nan": r["nan_count_sum"], "inf": r["inf_count_sum"]}
            for r in (names.to_pylist() if names is not None else [])
        ],
        "bytes": sizes,
    }
