"""Decision logic shared by every recorder: one place, SPEC.md §3.2 exactly.

:func:`decide` takes the logits of one position and returns a
:class:`tracefmt.decisions.Decision` (argmax, top-k ids and logits, margin, logsumexp, chosen
and watched logits and ranks). It works where the logits live:

- numpy arrays (ONNX Runtime, CoreML, JSONL importers) go to the reference implementation
  :func:`tracefmt.decisions.decide`;
- torch tensors on a device (CUDA, MPS) go to :func:`recorders.torch.decide_tensor`, which
  runs ``topk``, ``logsumexp`` and the rank counts on that device and moves one small packed
  tensor to the host (one synchronisation per call, however many rows). Ties and NaN follow
  SPEC.md's order exactly; tests check it bit for bit against the numpy reference;
- torch tensors on the CPU are viewed as numpy and take the numpy path, which is several
  times faster there than a dozen small torch kernels.

Several heads per step (token and duration, as in TDT transducers) are several calls, one per
head. :func:`decide_rows` decides every row of a 2-d batch (Hugging Face scores) in one pass.
:func:`write_decision` turns a decision into a :meth:`tracefmt.TraceWriter.add_decision` call.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from tracefmt import TraceWriter
from tracefmt.decisions import Decision, decide_many
from tracefmt.decisions import decide as _decide_numpy
from tracefmt.errors import TraceUsageError

__all__ = ["Decision", "decide", "decide_rows", "host_logits", "is_torch_tensor", "write_decision"]


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
_CONVERT: dict[Any, str] = {}  # torch dtype -> "" (view as it is), "float" or "double"


def _cpu_numpy(t: Any) -> np.ndarray:
    """A numpy view of CPU torch logits (bfloat16 widened to float32, integers to float64: exactly)."""
    x = t.detach() if t.requires_grad else t
    how = _CONVERT.get(x.dtype)
    if how is None:
        name = str(x.dtype)
        how = _CONVERT[x.dtype] = ("float" if name == "torch.bfloat16"  # exact, NaN payloads kept (as on a device)
                                   else "" if name in ("torch.float32", "torch.float64", "torch.float16")
                                   else "double")
    if how:
        x = x.float() if how == "float" else x.double()
    return x.numpy()


def host_logits(logits: Any) -> np.ndarray | None:
    """Return host logits as a numpy array (a view where possible), or None for logits on a
    device (decided there by :func:`recorders.torch.decide_tensor`).

    Args:
        logits: a numpy array, anything ``np.asarray`` accepts, or a torch tensor.
    """
    if type(logits) is np.ndarray:
        return logits
    if is_torch_tensor(logits):
        return _cpu_numpy(logits) if logits.is_cpu else None
    return np.asarray(logits)


def decide(
    logits: Any,
    *,
    k: int = 8,
    chosen: int | None = None,
    watched: Iterable[int] = (),
) -> Decision:
    """Derive a decision from the logits of one position (SPEC.md §3.2).

    Args:
        logits: 1-d logits: a numpy array (or anything ``np.asarray`` accepts) or a torch
            tensor on any device and of any float dtype (NaN and ±inf allowed).
        k: top candidates kept (at least 2; fewer if the head has fewer classes).
        chosen: the id the run used; defaults to the argmax.
        watched: ids whose logit and rank to report (EOS, blank, ...).

    Returns:
        The :class:`tracefmt.decisions.Decision`.

    Raises:
        TraceUsageError: logits are not 1-d or hold fewer than 2 entries, ``k < 2``, or an id
            is outside the logits.
    """
    if is_torch_tensor(logits) and logits.dim() != 1:
        raise TraceUsageError(
            f"logits must be 1-d, got shape {tuple(logits.shape)}; pass the last position only "
            "(logits[0, -1]) or use decide_rows for a batch"
        )
    host = host_logits(logits)
    if host is None:
        from .torch import decide_tensor

        return decide_tensor(logits, k=k, chosen=[chosen], watched=list(watched))[0]
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
    host = host_logits(logits)
    if host is None:
        from .torch import decide_tensor

        return decide_tensor(logits, k=k, chosen=rows_chosen, watched=watched)
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
