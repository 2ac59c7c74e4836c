"""How ``trace triage`` judges a re-run against the reference: decision rows as dense columns,
the logit error of a step (the differ's ``logit_diff``), the pair's noise, whether a decision is
restored (:func:`is_restored`, the one place that judgement is made), run fingerprints for the
determinism check, and which traces can be re-run at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from steptrace.differ import Policy
from steptrace.differ.policy import grid_dtype
from steptrace.tracefmt import TraceReader

from .errors import NotRerunnableError

__all__ = ["Noise", "Rows", "check_rerunnable", "is_restored", "logit_errors", "pair_noise", "read_rows"]


# ---------------------------------------------------------------------- decisions
@dataclass(frozen=True)
class Rows:
    """One trace's decisions of one sample and head as dense columns (top-k padded with id -1).

    Attributes:
        step: step index per row.
        chosen: the token used.
        argmax: the run's own token.
        ids: ``(rows, k)`` top-k ids.
        logits: ``(rows, k)`` their logits (float64).
        lse: logsumexp per row.
    """

    step: np.ndarray
    chosen: np.ndarray
    argmax: np.ndarray
    ids: np.ndarray
    logits: np.ndarray
    lse: np.ndarray

    def at(self, step: int) -> int | None:
        """Row index of ``step``, or None."""
        i = int(np.searchsorted(self.step, step))
        return i if i < self.step.size and self.step[i] == step else None


def _dense(col: pa.ChunkedArray, fill: float, dtype: type) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False).astype(np.int64)
    k = int(lengths.max()) if lengths.size else 0
    flat = pc.list_flatten(arr).to_numpy(zero_copy_only=False).astype(dtype)
    out = np.full((lengths.size, k), fill, dtype=dtype)
    rows = np.repeat(np.arange(lengths.size), lengths)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    out[rows, cols] = flat
    return out


def read_rows(reader: TraceReader, sample: str, head: str) -> Rows:
    """Read the decisions of ``sample`` and ``head`` as :class:`Rows` (sorted by step).

    Args:
        reader: an open trace.
        sample: the sample id.
        head: the decision head.

    Returns:
        The rows (empty arrays when there are none).
    """
    t = reader.decisions(sample=sample, head=head,
                         columns=["step", "chosen", "argmax", "topk_ids", "topk_logits", "logsumexp"], derive=False)
    return Rows(t["step"].to_numpy().astype(np.int64), t["chosen"].to_numpy().astype(np.int64),
                t["argmax"].to_numpy().astype(np.int64), _dense(t["topk_ids"], -1, np.int64),
                _dense(t["topk_logits"], np.nan, np.float64),
                t["logsumexp"].to_numpy(zero_copy_only=False).astype(np.float64))


def logit_errors(a: Rows, ia: np.ndarray, b: Rows, ib: np.ndarray) -> np.ndarray:
    """Max |Δ| over the logits of ids in both top-k lists, and of logsumexp, per row pair —
    the differ's ``logit_diff`` (``decisions.logit_noise`` is its spread on agreeing steps).

    Args:
        a: reference rows.
        ia: row indices into ``a``.
        b: candidate rows.
        ib: row indices into ``b`` (same length).

    Returns:
        float64 array, one error per pair (0 where nothing finite is shared).
    """
    ai, bi = a.ids[ia], b.ids[ib]
    al, bl = a.logits[ia], b.logits[ib]
    shared = (ai[:, :, None] == bi[:, None, :]) & (ai[:, :, None] >= 0)
    with np.errstate(invalid="ignore"):
        d = np.abs(al[:, :, None] - bl[:, None, :])
        same_inf = np.isinf(al[:, :, None]) & (al[:, :, None] == bl[:, None, :])
        d = np.where(same_inf, 0.0, d)
        d = np.where(shared & np.isnan(d), np.inf, d)
        err = np.where(shared, d, 0.0).max(axis=(1, 2)) if ai.size else np.zeros(len(ia))
        lse = np.abs(a.lse[ia] - b.lse[ib])
    lse = np.where(np.isfinite(lse), lse, 0.0)
    return np.fmax(err, lse)


@dataclass(frozen=True)
class Noise:
    """The logit error a step may keep and still count as restored.

    Attributes:
        pair: the largest logit error (the differ's ``logit_noise`` max) on the steps where the
            plain re-run's own token equals the reference's: those before the target when there
            are any, else every agreeing step; None when no step agrees.
        floor: the differ's logit tolerance for this head at the target's logit magnitude.
        steps: how many steps ``pair`` was measured on.
        basis: which steps (``agreeing steps before the target``, ``agreeing steps``,
            ``tolerance``).
    """

    pair: float | None
    floor: float
    steps: int = 0
    basis: str = "tolerance"

    @property
    def bound(self) -> float:
        """The larger of the two."""
        return self.floor if self.pair is None else max(self.pair, self.floor)


def is_restored(ref_token: int, token: int, logit_error: float, noise: Noise) -> bool:
    """Whether a re-run restores the reference's decision at the target step: its own token is
    the reference's and its logit error is back within the pair's noise.

    This is the only place the judgement is made.

    Args:
        ref_token: the reference's token at the target step.
        token: the re-run's own token (argmax) there.
        logit_error: the re-run's logit error there (:func:`logit_errors`).
        noise: the pair's :class:`Noise`.

    Returns:
        True when restored.
    """
    return token == ref_token and logit_error <= noise.bound


# ---------------------------------------------------------------------- traces
def check_rerunnable(reader: TraceReader, what: str, *, script: bool = False) -> None:
    """Refuse a trace whose run steptrace cannot repeat: one that ran on Core ML off macOS, or
    (unless a script that runs the candidate is given) one imported from JSONL.

    Args:
        reader: the trace.
        what: how to call it in the message (``the candidate``).
        script: a script that re-runs the candidate is given (its runtime is then Python's).

    Raises:
        NotRerunnableError: with what to do instead.
    """
    import sys

    meta = reader.manifest
    tags = meta.get("tags") or {}
    runtime = (meta.get("runtime") or {}).get("name") if isinstance(meta.get("runtime"), dict) else meta.get("runtime")
    if not script and "steptrace.capture" not in tags:
        raise NotRerunnableError(
            f"{what} {reader.path} was imported (JSONL, runtime {runtime or 'unknown'}), so steptrace cannot re-run it. "
            "Do the component swaps in your own runtime: feed it the reference's recorded outputs of one component "
            "at a time (`trace export REF --format jsonl` has them with --tensors full), record each swap to JSONL, "
            "`trace import` it and `trace diff REF SWAP` — or give triage a Python script that runs the candidate")
    if runtime == "coreml" and sys.platform != "darwin":
        raise NotRerunnableError(f"{what} {reader.path} ran on Core ML, whose predict needs macOS; re-run the triage on "
                                 "a Mac (Core ML cannot run a model on this machine)")


def fingerprint(reader: TraceReader, before: int | None = None) -> tuple[pa.Table, pa.Table]:
    """Return what two runs of a deterministic candidate share bit for bit: the tensors' keys
    and digests, the decisions' own tokens and top-k (logits as their float32 bit patterns, so
    NaN compares equal to the same NaN).

    Args:
        reader: a re-run's trace.
        before: keep only steps before this one (None: all).

    Returns:
        ``(tensors, decisions)`` tables in a canonical order.
    """
    t = reader.tensors(columns=["sample", "step", "name", "call", "digest"])
    d = reader.decisions(columns=["sample", "step", "head", "argmax", "topk_ids", "topk_logits"], derive=False)
    if before is not None:
        t = t.filter(pc.less(t["step"], before))
        d = d.filter(pc.less(d["step"], before))
    keys = [("sample", "ascending"), ("step", "ascending"), ("name", "ascending"), ("call", "ascending")]
    d = d.combine_chunks()
    logits = d["topk_logits"].chunk(0) if d["topk_logits"].num_chunks else pa.array([], pa.list_(pa.float32()))
    values = logits.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    bits = pa.ListArray.from_arrays(logits.offsets, pa.array(values.view(np.int32)))  # NaN equals NaN bit for bit
    d = d.set_column(d.schema.get_field_index("topk_logits"), "topk_logits", bits)
    return t.sort_by(keys).combine_chunks(), d


def same_run(a: tuple[pa.Table, pa.Table], b: tuple[pa.Table, pa.Table]) -> bool:
    """Return whether two :func:`fingerprint` results are equal."""
    return a[0].equals(b[0]) and a[1].equals(b[1])


def values_command(reader: TraceReader, names: Sequence[str]) -> str:
    """Return the ``trace record`` command that records ``reader``'s run again with values.

    Args:
        reader: the reference trace (its ``command`` metadata when ``trace record`` made it).
        names: the tensors that need values.

    Returns:
        A command line to show the user.
    """
    cmd = reader.manifest.get("command")
    if isinstance(cmd, list) and cmd[:2] == ["trace", "record"]:
        out, skip = [], False
        for part in cmd:
            if skip:
                skip = False
                continue
            if part == "--tensors":
                skip = True
                continue
            out.append(part)
        i = out.index("-o") + 2 if "-o" in out else 2
        return " ".join([*out[:i], "--tensors", "full", *out[i:]])
    globs = sorted({n.rsplit(".", 1)[0] + ".*" if "." in n else n for n in names})
    return f"trace record -o REF.trace --tensors full --modules '{','.join(globs)}' --logits ... script.py"


def fingerprint_before(fp: tuple[pa.Table, pa.Table], before: int) -> tuple[pa.Table, pa.Table]:
    """Return the rows of a :func:`fingerprint` before step ``before``."""
    t, d = fp
    return t.filter(pc.less(t["step"], before)), d.filter(pc.less(d["step"], before))


def pair_noise(ref_rows: Rows, rows: Rows, step: int, policy: Policy, head: str, reader: TraceReader) -> Noise:
    """Return the :class:`Noise` of the pair (reference, plain re-run) around ``step``.

    Args:
        ref_rows: the reference's rows.
        rows: the plain re-run's rows.
        step: the target step (never counted itself).
        policy: the differ's policy (its logit tolerance is the floor).
        head: the decision head.
        reader: the reference trace (its precision gives the logit grid).

    Returns:
        The noise.
    """
    common, ia, ib = np.intersect1d(ref_rows.step, rows.step, return_indices=True)
    agree = (ref_rows.chosen[ia] == rows.argmax[ib]) & (common != step)
    before = agree & (common < step)
    basis = "agreeing steps before the target" if before.any() else "agreeing steps"
    keep = before if before.any() else agree
    errs = logit_errors(ref_rows, ia[keep], rows, ib[keep])
    j = ref_rows.at(step)
    top = ref_rows.logits[j, 0] if j is not None and ref_rows.logits.shape[1] else 0.0
    grid = grid_dtype(reader.manifest.get("precision"))
    floor = float(np.asarray(policy.for_head(head).logit_tolerance(grid, np.abs(np.array([top]))))[0])
    return Noise(float(errs.max()) if errs.size else None, floor, int(keep.sum()), basis if errs.size else "tolerance")


