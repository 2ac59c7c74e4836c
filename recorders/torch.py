"""PyTorch recorder: forward hooks on named modules, decisions on the logits' device, teacher
forcing and transplant. The only module of steptrace that imports torch.

    with TorchRecorder("run.trace", model, modules={"encoder.layers.*": "stats", "decoder.*": "full"},
                       step_module="decoder") as rec:
        for t in range(max_steps):          # each call of model.decoder opens the next step
            logits = model(tokens)
            token = rec.decide(logits[0, -1])  # records the decision, returns the token to use

A CTC (or any per-position) output is decided at every position, one step each, its head
declared open-loop when the recorder opens::

    with TorchRecorder("ctc.trace", model, modules={"encoder.*": "stats"}, open_loop=["token"]) as rec:
        for utt, x in batches:
            rec.set_sample(utt)
            frames = rec.decide_positions(model(x)[0])   # [T, V]: steps 0..T-1, encoder at step 0

Host copies: CPU tensors are cloned on the model thread (one memcpy) and handed to the writer,
whose thread computes statistics, digest and compression. Tensors on other devices (CUDA) are
reduced there — statistics by torch ops into one small tensor — and copied to pinned host
memory with ``non_blocking=True`` behind a CUDA event; a recorder thread waits for the event,
digests the bytes (the digest needs host bytes) and hands them to the writer. The model thread
never waits for a copy, a digest, compression or the disk (only when the writer's queue is full:
``WriteSummary.stall_seconds``). Devices without pinned memory or events (MPS, XPU) copy
synchronously.
"""

from __future__ import annotations

import os
from collections.abc import Container, Sequence
from typing import Any

import numpy as np
import torch

from steptrace.tracefmt.decisions import Decision
from steptrace.tracefmt.errors import UnsupportedDtypeError

from .capture import HostCopy
from .decisions import decide_on_device, register_logits_kind
from .hostcopy import DeviceCopy, device_sums
from .modulehooks import ModuleRecorder
from .policy import PolicyLike

__all__ = ["TORCH_LOGITS", "TorchLogits", "TorchRecorder", "decide_tensor", "device_stats"]

_DTYPES = {
    torch.float64: "float64", torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
    torch.int64: "int64", torch.int32: "int32", torch.int16: "int16", torch.int8: "int8", torch.uint8: "uint8",
    torch.bool: "bool",
}
for _name in ("uint16", "uint32", "uint64"):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _name
#: CPU dtypes the hooks' lean path records: torch dtype -> (SPEC.md name, torch dtype to view the
#: bits as before ``.numpy()``, or None)
_LEAN = {dt: (name, torch.int16 if dt == torch.bfloat16 else None) for dt, name in _DTYPES.items()}
_PRECISION = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
              torch.int8: "int8", torch.qint8: "int8"}


def _spec_dtype(t: torch.Tensor, name: str | None = None) -> str:
    dt = _DTYPES.get(t.dtype)
    if dt is None or t.is_quantized or t.layout != torch.strided:
        where = f" ({name})" if name else ""
        raise UnsupportedDtypeError(
            f"a {t.dtype} {t.layout} tensor{where} cannot be recorded; steptrace records dense "
            f"{', '.join(sorted(set(_DTYPES.values())))} tensors: dequantize or cast it, or leave its module "
            "out of the capture patterns"
        )
    return dt


# ---------------------------------------------------------------------- decisions
def decide_tensor(
    logits: torch.Tensor,
    *,
    k: int = 8,
    chosen: Sequence[int | None] | None = None,
    watched: Sequence[int] = (),
) -> list[Decision]:
    """Decide every row of ``logits`` on its device (SPEC.md §3.2), one host transfer in all.

    Top-k uses ``torch.topk`` with NaN as -inf, then fixes the order exactly: ids above the
    k-th value sorted by (logit desc, id asc), then the ids tied at the k-th value by (NaN
    last, id asc). Ranks count strictly greater logits plus equal ones with smaller ids (NaN
    after every number). ``logsumexp`` is ``torch.logsumexp`` in float64 (NaN if any NaN).

    Args:
        logits: ``(vocabulary,)`` or ``(batch, vocabulary)`` tensor, any float dtype and device.
        k: top candidates kept (at least 2; fewer if the vocabulary is smaller).
        chosen: per row, the id used (None: the argmax); None for all argmax.
        watched: ids whose logit and rank to report, in every row.

    Returns:
        One :class:`tracefmt.decisions.Decision` per row.

    Raises:
        TraceUsageError: bad shape, ``k < 2``, or an id outside the vocabulary.
    """
    return decide_on_device(torch, logits, k=k, chosen=chosen, watched=watched)


_CONVERT: dict[torch.dtype, str] = {}  # torch dtype -> "" (view as it is), "float" or "double"


class TorchLogits:
    """The :class:`recorders.decisions.LogitsKind` of torch tensors: CPU logits viewed as numpy
    (bfloat16 widened to float32, integers to float64: exactly; the numpy path is several times
    faster there than a dozen small torch kernels), logits on a device decided there
    (:func:`decide_tensor`)."""

    def host(self, logits: torch.Tensor) -> np.ndarray | None:
        """A numpy view of CPU logits, or None for logits on a device."""
        if not logits.is_cpu:
            return None
        x = logits.detach() if logits.requires_grad else logits
        how = _CONVERT.get(x.dtype)
        if how is None:
            how = _CONVERT[x.dtype] = ("float" if x.dtype == torch.bfloat16  # exact, NaN payloads kept (as on a device)
                                       else "" if x.dtype in (torch.float32, torch.float64, torch.float16)
                                       else "double")
        if how:
            x = x.float() if how == "float" else x.double()
        return x.numpy()

    def decide_rows(self, logits: torch.Tensor, *, k: int, chosen: list[int | None], watched: list[int]) -> list[Decision]:
        """Decide every row of ``logits`` on its device (:func:`decide_tensor`)."""
        return decide_tensor(logits, k=k, chosen=chosen, watched=watched)


TORCH_LOGITS = TorchLogits()
register_logits_kind(torch.Tensor, TORCH_LOGITS)


# ---------------------------------------------------------------------- device statistics and copies
def device_stats(t: torch.Tensor) -> torch.Tensor:
    """Reduce ``t`` on its device to SPEC.md §4.4 sums, without a host synchronisation.

    Args:
        t: a dense tensor of a SPEC.md dtype (bfloat16 as itself, not its bits).

    Returns:
        A float64 tensor on ``t``'s device: ``[finite count, min, max, Σx, Σx², nan_count,
        inf_count, scale]`` over the finite elements (x divided by ``scale``, 1 unless float64
        values beyond 1e150 would overflow Σx²).
    """
    return device_sums(torch, t)


class TorchCopy(DeviceCopy):
    """A :class:`recorders.capture.HostCopy` of a torch tensor: statistics reduced on its
    device, values copied to (pinned, for CUDA) host memory without blocking the caller
    (:class:`recorders.hostcopy.DeviceCopy`).

    Args:
        t: the tensor.
        dtype: its SPEC.md dtype name.
    """

    def __init__(self, t: torch.Tensor, dtype: str) -> None:
        super().__init__(torch, t, dtype)


# ---------------------------------------------------------------------- torch calls of the other recorders
def torch_defaults(model: Any | None = None) -> dict[str, str | None]:
    """Return the metadata defaults of a torch run (as :class:`TorchRecorder` fills them).

    Args:
        model: a module whose first parameter gives ``device`` and ``precision``; None for
            ``runtime`` and ``runtime_version`` only.

    Returns:
        ``{"runtime": "torch", "runtime_version": ..., "device": ..., "precision": ...}``.
    """
    out: dict[str, str | None] = {"runtime": "torch", "runtime_version": torch.__version__}
    param = next(iter(model.parameters()), None) if isinstance(model, torch.nn.Module) else None
    if param is not None:
        out.update(device=str(param.device), precision=_PRECISION.get(param.dtype))
    return out


def cpu_view(t: Any) -> tuple[str, np.ndarray] | None:
    """Return the SPEC.md dtype and a numpy view of a dense CPU ``torch.Tensor`` of a SPEC.md
    dtype (bfloat16 as uint16 bits), or None for any other tensor (another device, layout or
    dtype, or a subclass: :func:`tensor_to_host` takes those).

    The view is valid until the model reuses the tensor's memory (as :func:`tensor_to_host`'s).

    Args:
        t: a tensor.
    """
    if type(t) is not torch.Tensor or not t.is_cpu or t.layout != torch.strided:
        return None
    lean = _LEAN.get(t.dtype)
    if lean is None:
        return None
    dt, bits = lean
    if t.requires_grad:
        t = t.detach()
    return dt, (t.numpy() if bits is None else t.view(bits).numpy().view(np.uint16))


def tensor_to_host(t: torch.Tensor, *, device_stats: bool | None = None) -> tuple[np.ndarray | HostCopy, str]:
    """Host data of a tensor for :meth:`Recorder.record` (CPU: a numpy view, bfloat16 as uint16
    bits; other devices, or ``device_stats=True``: a :class:`TorchCopy`).

    The CPU view is valid until the model reuses the tensor's memory: ``Recorder.record`` copies it
    before returning (the writer copies into a recycled buffer, fresh memory from ``clone()`` is
    ~15x slower to fill; rows the ring buffer holds get their own copy).

    Args:
        t: the tensor.
        device_stats: reduce statistics on the tensor's device; None: for non-CPU tensors.

    Returns:
        ``(host data, SPEC.md dtype)``.

    Raises:
        UnsupportedDtypeError: complex, quantized, sparse or float8 tensors.
    """
    dt = _spec_dtype(t)
    if device_stats or (device_stats is None and t.device.type != "cpu"):
        return TorchCopy(t, dt), dt
    c = t.detach()
    if dt == "bfloat16":
        return c.view(torch.int16).numpy().view(np.uint16), dt
    return c.numpy(), dt


def _kept(values: torch.Tensor) -> torch.Tensor:
    """The forced tokens' own scores where finite, 0 where masked (-inf) or NaN."""
    return torch.where(values.isfinite(), values, torch.zeros_like(values))


def force_rows(scores: torch.Tensor, rows: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
    """Return a copy of 2-d ``scores`` where each row in ``rows`` is -inf except at its token
    (teacher forcing of Hugging Face scores: argmax and sampling both pick the token).

    The forced token keeps its own score (0 where it was -inf or NaN); other rows are unchanged.

    Args:
        scores: ``(batch, vocabulary)`` scores.
        rows: the row indices to force.
        tokens: the token of each forced row.

    Returns:
        The new scores tensor.
    """
    out = scores.detach().clone()
    r = torch.tensor(list(rows), dtype=torch.long, device=scores.device)
    tok = torch.tensor(list(tokens), dtype=torch.long, device=scores.device)
    keep = _kept(scores[r, tok])
    out[r] = float("-inf")
    out[r, tok] = keep
    return out


def peak_at(t: torch.Tensor, index: tuple[int, ...], token: int) -> torch.Tensor:
    """Return a copy of ``t`` whose vector ``t[index]`` is -inf except at ``token`` (teacher
    forcing in ``trace record``: the script's argmax or sampling picks ``token``).

    Args:
        t: floating-point logits, ``[..., vocabulary]``.
        index: the leading indices of the decided vector (``(0, -1)`` for ``[1, T, V]``).
        token: the id to force.

    Returns:
        The new tensor (same dtype, device and shape).
    """
    out = t.detach().clone()
    keep = _kept(t[index + (token,)].detach())
    out[index] = float("-inf")
    out[index + (token,)] = keep
    return out


def reference_to_tensor(values: np.ndarray, dtype: str, device: Any = "cpu") -> torch.Tensor:
    """Return a reference trace's values as a new torch tensor (transplant).

    Args:
        values: the values as :meth:`recorders.Reference.tensor` gives them (bfloat16 as
            uint16 bits).
        dtype: their SPEC.md dtype.
        device: the device to put the tensor on.

    Returns:
        A tensor owning a copy of the values.
    """
    if dtype == "bfloat16":
        r = torch.from_numpy(values.view(np.int16).copy()).view(torch.bfloat16)
    else:
        r = torch.from_numpy(np.array(values, copy=True))
    return r.to(device)


# ---------------------------------------------------------------------- the recorder
class TorchRecorder(ModuleRecorder):
    """Records a torch model's module outputs and decisions, step by step.

    Forward hooks on the modules selected by ``modules`` record each call's output (a call
    index per module and step; tuple/list outputs as ``name.0``, ``name.1``, dict outputs as
    ``name.key``) in execution order (hooks fire as each module returns). Hooks are removed at
    :meth:`close`.

    Args:
        trace: the trace directory to write.
        model: the root module.
        modules: capture policy over module names (``named_modules()`` paths):
            ``{"encoder.layers.*": "stats", "decoder.*": "full"}`` (first match wins), a list
            of globs (``"stats"``), or one mode for every module. The root module itself is
            never hooked for capture; its output is what you pass to :meth:`decide`. The policy
            also applies to ``logits:<head>`` (the full logits given to :meth:`decide`).
        step_module: name of a module each call of which opens the next step (automatic
            steps; ``""`` for the root model). None: steps are explicit (:meth:`step`) or open
            on the first record after the previous step ended.
        transplant: globs of module names whose outputs are replaced by the reference's
            recorded tensors at the same (sample, step, call); needs ``reference``.
        transplant_steps: the step indices at which ``transplant`` replaces outputs (None:
            every step); at other steps those modules are recorded as they ran.
        device_stats: reduce statistics on the tensor's device and finish host copies on a
            recorder thread; None (default) does so for tensors not on the CPU.
        **options: :class:`recorders.capture.Recorder` options (``reference``,
            ``teacher_forcing``, ``budget``, ``sample``, ``k``, ``watched``, ``metadata``,
            ``vocab``, ``mode``, ``writer_options``, ``open_loop``).

    Raises:
        RecorderUsageError: a module glob matches no module, ``step_module`` is not a module of
            the model, or ``transplant`` is given without a reference.
        TraceExistsError: a trace exists at ``trace`` and ``mode="create"``.
    """

    tensor_type = torch.Tensor
    strided = torch.strided
    lean = _LEAN
    logits_kind = TORCH_LOGITS
    host_data = staticmethod(tensor_to_host)
    spec_dtype = staticmethod(_spec_dtype)
    from_reference = staticmethod(reference_to_tensor)

    def __init__(
        self,
        trace: str | os.PathLike[str],
        model: torch.nn.Module,
        *,
        modules: PolicyLike = None,
        step_module: str | None = None,
        transplant: Sequence[str] = (),
        transplant_steps: Container[int] | None = None,
        device_stats: bool | None = None,
        **options: Any,
    ) -> None:
        options["defaults"] = {**torch_defaults(model), **(options.get("defaults") or {})}
        super().__init__(trace, model, modules=modules, step_module=step_module, transplant=transplant,
                         transplant_steps=transplant_steps, device_stats=device_stats, **options)
