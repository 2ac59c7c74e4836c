"""Decision logic shared by every recorder: one place, SPEC.md §3.2 exactly.

:func:`decide` takes the logits of one position and returns a
:class:`tracefmt.decisions.Decision` (argmax, top-k ids and logits, margin, logsumexp, chosen
and watched logits and ranks). How a framework's logits become decisions is a
:class:`LogitsKind` the framework's recorder module registers for its tensor type
(:func:`register_logits_kind`), the same two verbs for every framework:

- ``host``: a numpy view of logits that live on the host, or None for logits on a device;
- ``decide_rows``: decide logits on their device (one small transfer to the host).

numpy arrays (ONNX Runtime, CoreML, JSONL importers) and anything ``np.asarray`` accepts go to
the reference implementation :func:`tracefmt.decisions.decide` (or
:func:`tracefmt.decisions.decide_many` for a batch). :mod:`steptrace.recorders.torch` registers torch
tensors: CPU tensors are viewed as numpy (several times faster there than a dozen small torch
kernels), tensors on a device (CUDA, MPS) are decided there by
:func:`recorders.torch.decide_tensor`. A framework module is loaded when its first tensor
arrives (:data:`FRAMEWORK_MODULES`), so this module imports none of them.

Several heads per step (token and duration, as in TDT transducers) are several calls, one per
head. :func:`decide_rows` decides every row of a 2-d batch (Hugging Face scores) in one pass.
:func:`write_decision` turns a decision into a :meth:`tracefmt.TraceWriter.add_decided` call.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np

from steptrace.tracefmt import TraceWriter
from steptrace.tracefmt.decisions import Decision, decide_many
from steptrace.tracefmt.decisions import decide as _decide_numpy
from steptrace.tracefmt.errors import TraceUsageError

__all__ = ["Decision", "LogitsKind", "decide", "decide_on_device", "decide_rows", "decide_with", "host_logits",
           "is_torch_tensor", "logits_kind", "register_logits_kind", "write_decision"]


class LogitsKind(Protocol):
    """How one framework's logits become decisions (registered with :func:`register_logits_kind`)."""

    def host(self, logits: Any) -> np.ndarray | None:
        """Return host logits as a numpy array (a view where possible), or None when they live
        on a device and are decided there by :meth:`decide_rows`."""

    def decide_rows(self, logits: Any, *, k: int, chosen: list[int | None], watched: list[int]) -> list[Decision]:
        """Decide every row of ``(vocabulary,)`` or ``(batch, vocabulary)`` logits on their device."""


#: Framework modules that register a :class:`LogitsKind`, by the top-level module of the
#: framework's tensor type; loaded when the first such tensor arrives.
FRAMEWORK_MODULES = {"torch": "steptrace.recorders.torch"}
_KINDS: dict[type, LogitsKind | None] = {}


def register_logits_kind(tensor_type: type, kind: LogitsKind) -> None:
    """Decide logits of ``tensor_type`` (and its subclasses) with ``kind``.

    Args:
        tensor_type: the framework's tensor class.
        kind: its :class:`LogitsKind`.
    """
    _KINDS[tensor_type] = kind
    for t in [t for t, k in _KINDS.items() if k is None]:
        del _KINDS[t]  # types seen before the registration: look them up again


def logits_kind(x: object) -> LogitsKind | None:
    """Return the registered :class:`LogitsKind` of ``x``'s type, or None for numpy arrays and
    everything else ``np.asarray`` takes.

    Args:
        x: logits of any kind.
    """
    t = type(x)
    if t in _KINDS:
        return _KINDS[t]
    found = next((_KINDS[b] for b in t.__mro__ if _KINDS.get(b) is not None), None)
    if found is None:
        module = FRAMEWORK_MODULES.get(t.__module__.partition(".")[0])
        if module is not None and module not in sys.modules:
            importlib.import_module(module)  # registers its kind
            return logits_kind(x)
    _KINDS[t] = found
    return found


def is_torch_tensor(x: object) -> bool:
    """Return whether ``x`` is a torch tensor, without importing torch.

    Args:
        x: any object.

    Returns:
        True for ``torch.Tensor`` instances (and subclasses such as ``nn.Parameter``).
    """
    t = type(x)
    known = _TORCH_TYPES.get(t)
    if known is None:
        known = _TORCH_TYPES[t] = t.__module__.startswith("torch") and hasattr(x, "detach")
    return known


_TORCH_TYPES: dict[type, bool] = {}


def host_logits(logits: Any) -> np.ndarray | None:
    """Return host logits as a numpy array (a view where possible), or None for logits on a
    device (decided there by their :class:`LogitsKind`).

    Args:
        logits: a numpy array, anything ``np.asarray`` accepts, or a registered framework tensor.
    """
    if type(logits) is np.ndarray:
        return logits
    kind = logits_kind(logits)
    return np.asarray(logits) if kind is None else kind.host(logits)


def decide(
    logits: Any,
    *,
    k: int = 8,
    chosen: int | None = None,
    watched: Iterable[int] = (),
) -> Decision:
    """Derive a decision from the logits of one position (SPEC.md §3.2).

    Args:
        logits: 1-d logits: a numpy array (or anything ``np.asarray`` accepts) or a registered
            framework tensor (torch) on any device and of any float dtype (NaN and ±inf allowed).
        k: top candidates kept (at least 2; fewer if the head has fewer classes).
        chosen: the id the run used; defaults to the argmax.
        watched: ids whose logit and rank to report (EOS, blank, ...).

    Returns:
        The :class:`tracefmt.decisions.Decision`.

    Raises:
        TraceUsageError: logits are not 1-d or hold fewer than 2 entries, ``k < 2``, or an id
            is outside the logits.
    """
    kind = None if type(logits) is np.ndarray else logits_kind(logits)
    return decide_with(kind, logits, k=k, chosen=chosen, watched=watched)


def decide_with(
    kind: LogitsKind | None, logits: Any, *, k: int, chosen: int | None, watched: Iterable[int]
) -> Decision:
    """:func:`decide` with the :class:`LogitsKind` of ``logits`` known (None: numpy).

    Args:
        kind: the kind, or None for numpy arrays and anything ``np.asarray`` accepts.
        logits, k, chosen, watched: as for :func:`decide`.

    Returns:
        The :class:`tracefmt.decisions.Decision`.

    Raises:
        TraceUsageError: as for :func:`decide`.
    """
    if kind is None:
        return _decide_numpy(np.asarray(logits), k=k, chosen=chosen, watched=list(watched))
    if len(logits.shape) != 1:
        raise TraceUsageError(
            f"logits must be 1-d, got shape {tuple(logits.shape)}; pass the last position only "
            "(logits[0, -1]) or use decide_rows for a batch"
        )
    host = kind.host(logits)
    if host is None:
        return kind.decide_rows(logits, k=k, chosen=[chosen], watched=list(watched))[0]
    return _decide_numpy(host, k=k, chosen=chosen, watched=list(watched))


def decide_rows(
    logits: Any,
    *,
    k: int = 8,
    chosen: Sequence[int | None] | None = None,
    watched: Iterable[int] = (),
) -> list[Decision]:
    """Derive one decision per row of a 2-d batch of logits (one row per sequence).

    Args:
        logits: 2-d ``(batch, vocabulary)`` numpy array or torch tensor.
        k: top candidates kept.
        chosen: per row, the id the run used (None: the argmax); None for all argmax.
        watched: ids watched in every row.

    Returns:
        One :class:`tracefmt.decisions.Decision` per row, in row order.

    Raises:
        TraceUsageError: logits are not 2-d, ``chosen`` has the wrong length, or an id is out
            of range.
    """
    shape = tuple(logits.shape) if hasattr(logits, "shape") else np.shape(logits)
    if len(shape) != 2:
        raise TraceUsageError(f"decide_rows needs 2-d (batch, vocabulary) logits, got shape {shape}")
    if chosen is not None and len(chosen) != shape[0]:
        raise TraceUsageError(f"chosen holds {len(chosen)} ids for {shape[0]} rows of logits")
    rows_chosen = list(chosen) if chosen is not None else [None] * shape[0]
    watched = list(watched)
    kind = None if type(logits) is np.ndarray else logits_kind(logits)
    host = np.asarray(logits) if kind is None else kind.host(logits)
    if host is None:
        return kind.decide_rows(logits, k=k, chosen=rows_chosen, watched=watched)  # type: ignore[union-attr]
    if k < 2:
        raise TraceUsageError(f"k={k}: SPEC.md needs at least the top 2 candidates")
    return decide_many(host, k=k, chosen=rows_chosen, watched=watched)


def write_decision(
    writer: TraceWriter,
    sample: str,
    step: int,
    decision: Decision,
    *,
    head: str = "token",
    forced: bool = False,
    **keys: Any,
) -> None:
    """Write ``decision`` as one decision row.

    ``chosen_logit`` and ``chosen_rank`` are written only when ``chosen`` is outside the top-k
    (SPEC.md §3.1 lets readers derive them otherwise); watched tokens as recorded.

    Args:
        writer: the open writer.
        sample: sample id.
        step: decode step.
        decision: from :func:`decide`.
        head: decision head (``token``, ``duration``, ``vad``, ...).
        forced: ``chosen`` was imposed by teacher forcing.
        **keys: further :meth:`tracefmt.TraceWriter.add_decision` options (``piece``,
            ``frame``, ``chunk``, ``position``, ``emission``, ``time_us``).

    Raises:
        TraceUsageError: malformed values (the writer names the argument).
        TraceWriteError: the writer's background thread failed earlier.
    """
    writer.add_decided(sample, step, decision, head=head, forced=forced, **keys)


def decide_on_device(
    torch: Any,
    logits: Any,
    *,
    k: int = 8,
    chosen: Sequence[int | None] | None = None,
    watched: Sequence[int] = (),
) -> list[Decision]:
    """Decide every row of a torch tensor of logits on its device, one host transfer in all (the
    algorithm of :func:`recorders.torch.decide_tensor`, whose docs give the rules).

    Args:
        torch: the torch module (:mod:`steptrace.recorders.torch` passes it: the one module that
            imports torch).
        logits: ``(vocabulary,)`` or ``(batch, vocabulary)`` tensor, any float dtype and device.
        k: top candidates kept (at least 2; fewer if the vocabulary is smaller).
        chosen: per row, the id used (None: the argmax); None for all argmax.
        watched: ids whose logit and rank to report, in every row.

    Returns:
        One :class:`tracefmt.decisions.Decision` per row.

    Raises:
        TraceUsageError: bad shape, ``k < 2``, or an id outside the vocabulary.
    """
    x = logits.detach()
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() != 2 or x.shape[1] < 2:
        raise TraceUsageError(f"logits must be (vocabulary,) or (batch, vocabulary) with >= 2 classes, got {tuple(logits.shape)}")
    if k < 2:
        raise TraceUsageError(f"k={k}: SPEC.md needs at least the top 2 candidates")
    b, v = x.shape
    k = min(k, v)
    rows_chosen = list(chosen) if chosen is not None else [None] * b
    for t in [c for c in rows_chosen if c is not None] + list(watched):
        if not 0 <= int(t) < v:
            raise TraceUsageError(f"token id {t} is outside the logits (vocabulary of {v})")
    xf = x if x.dtype == torch.float64 else x.float()  # exact for float16/bfloat16: same order as float64
    dev = xf.device
    nan = xf.isnan()
    key = xf.masked_fill(nan, float("-inf"))
    vals, idx = key.topk(k, dim=1)
    kth = vals[:, k - 1 :]
    by_id = idx.argsort(dim=1)
    idx, vals = idx.gather(1, by_id), vals.gather(1, by_id)
    by_val = vals.sort(dim=1, descending=True, stable=True).indices
    greater_ids, greater = idx.gather(1, by_val), vals.gather(1, by_val)
    n_greater = (greater > kth).sum(1, keepdim=True)
    ids = torch.arange(v, device=dev)
    tie_score = torch.where(key == kth, ids + nan.long() * v, 2 * v)
    tied = tie_score.topk(k, dim=1, largest=False).indices  # (NaN, id) ascending
    j = torch.arange(k, device=dev).unsqueeze(0)
    top = torch.where(j < n_greater, greater_ids, tied.gather(1, (j - n_greater).clamp(min=0)))
    if x.dtype == torch.float16:  # numpy widens float16 NaN to the canonical NaN: do the same
        xf = xf.masked_fill(nan, float("nan"))
    top_logits = xf.gather(1, top).float()
    x64 = xf.double()
    lse = torch.logsumexp(x64, dim=1)
    m = x64.amax(dim=1)
    lse = torch.where(m.isinf(), m, lse).masked_fill(nan.any(1), float("nan"))
    own = torch.tensor([-1 if c is None else int(c) for c in rows_chosen], device=dev)
    tokens = torch.cat([torch.where(own < 0, top[:, 0], own).unsqueeze(1),
                        torch.tensor([list(watched)] * b, dtype=torch.long, device=dev).reshape(b, -1)], 1)
    tv = xf.gather(1, tokens)
    before = ids.view(1, 1, v) < tokens.unsqueeze(2)
    xs = xf.unsqueeze(1)
    rank_num = (xs > tv.unsqueeze(2)).sum(2) + ((xs == tv.unsqueeze(2)) & before).sum(2)
    rank_nan = (~nan).sum(1, keepdim=True) + (nan.unsqueeze(1) & before).sum(2)
    ranks = torch.where(tv.isnan(), rank_nan, rank_num)
    packed = torch.cat([top.double(), top_logits.double(), lse.unsqueeze(1), tokens.double(), ranks.double(),
                        tv.float().double()], 1).cpu().numpy()
    out = []
    m1 = tokens.shape[1]
    for row in packed:
        tk_ids = row[:k].astype(np.int32)
        tk_logits = row[k : 2 * k].astype(np.float32)
        toks = row[2 * k + 1 : 2 * k + 1 + m1].astype(np.int64)
        rks = row[2 * k + 1 + m1 : 2 * k + 1 + 2 * m1].astype(np.int64)
        tls = row[2 * k + 1 + 2 * m1 :].astype(np.float32)
        out.append(Decision(
            chosen=int(toks[0]), argmax=int(tk_ids[0]), topk_ids=tk_ids, topk_logits=tk_logits,
            margin=float(np.float32(float(tk_logits[0]) - float(tk_logits[1]))), logsumexp=float(row[2 * k]),
            chosen_logit=float(tls[0]), chosen_rank=int(rks[0]),
            watched=[{"id": int(t), "logit": float(lg), "rank": int(r)} for t, lg, r in zip(toks[1:], tls[1:], rks[1:])],
        ))
    return out
