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

import copy
import os
from collections.abc import Container, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from steptrace.tracefmt import WriteSummary
from steptrace.tracefmt.decisions import Decision
from steptrace.tracefmt.errors import TraceUsageError, UnsupportedDtypeError
from steptrace.tracefmt.payload import TensorStats

from .capture import HostCopy, Recorder
from .decisions import decide_with, register_logits_kind
from .errors import RecorderUsageError, TransplantMismatchError
from .policy import CapturePolicy, PolicyLike

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
#: CPU outputs up to this size are copied in the hook and handed to the writer at the end of the
#: step (bigger ones go at once, into the writer's recycled buffers)
_SMALL_BYTES = 64 << 10
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
    x = t.detach().reshape(-1).double()
    finite = x.isfinite()
    zero = torch.zeros((), dtype=torch.float64, device=x.device)
    xf = torch.where(finite, x, zero)
    lo = torch.where(finite, x, float("inf")).amin()
    hi = torch.where(finite, x, float("-inf")).amax()
    scale = torch.ones_like(zero)
    if t.dtype == torch.float64:
        big = torch.maximum(lo.abs(), hi.abs())
        scale = torch.where(finite.any() & (big > 1e150), big, scale)
        xf = xf / scale
    return torch.stack([finite.sum().double(), lo, hi, xf.sum(), (xf * xf).sum(), x.isnan().sum().double(),
                        x.isinf().sum().double(), scale])


def _stats_from(numel: int, s: np.ndarray) -> TensorStats:
    count, lo, hi, total, sumsq, nans, infs, scale = (float(v) for v in s)
    if count == 0:
        return TensorStats(numel, None, None, None, None, None, 0.0 if numel == 0 else None, int(nans), int(infs))
    mean = total / count
    std = max(sumsq / count - mean * mean, 0.0) ** 0.5
    return TensorStats(numel, lo, hi, mean * scale, std * scale, max(abs(lo), abs(hi)), sumsq**0.5 * scale,
                       int(nans), int(infs))


class TorchCopy:
    """A :class:`recorders.capture.HostCopy` of a torch tensor: statistics reduced on its
    device, values copied to (pinned, for CUDA) host memory without blocking the caller.

    Args:
        t: the tensor.
        dtype: its SPEC.md dtype name.
    """

    def __init__(self, t: torch.Tensor, dtype: str) -> None:
        self.dtype = dtype
        self.numel = t.numel()
        src = t.detach()
        if dtype == "bfloat16":
            src = src.view(torch.int16)
        cuda = src.device.type == "cuda"
        stats = device_stats(t) if self.numel else None
        if cuda:
            self._host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self._host.copy_(src, non_blocking=True)
            self._stats = None if stats is None else torch.empty(8, dtype=torch.float64, pin_memory=True)
            if stats is not None:
                self._stats.copy_(stats, non_blocking=True)
            self._event: Any = torch.cuda.Event()
            self._event.record()
        else:
            self._host = src.to("cpu", copy=True, memory_format=torch.contiguous_format)
            self._stats = None if stats is None else stats.cpu()
            self._event = None

    def done(self) -> bool:
        """Return whether the copy has landed (never blocks)."""
        return self._event is None or bool(self._event.query())

    def _wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()

    def result(self) -> tuple[np.ndarray, TensorStats]:
        """Wait for the copy; return the canonical host array and the device statistics."""
        self._wait()
        arr = self._host.numpy()
        if self.dtype == "bfloat16":
            arr = arr.view(np.uint16)
        stats = _stats_from(0, np.zeros(8)) if self._stats is None else _stats_from(self.numel, self._stats.numpy())
        return arr, stats

    def nonfinite(self) -> bool:
        """Wait for the copy; return whether the tensor holds NaN or ±Inf."""
        self._wait()
        return self._stats is not None and bool(self._stats[5] + self._stats[6] > 0)


# ---------------------------------------------------------------------- the recorder
class TorchRecorder(Recorder):
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
        policy = CapturePolicy.coerce(modules)
        named = dict(model.named_modules())
        module_names = [n for n in named if n]
        missing = [g for g in policy.unmatched(module_names) if not g.startswith("logits:")]
        if missing:
            raise RecorderUsageError(
                f"module pattern(s) {', '.join(map(repr, missing))} match no module of {type(model).__name__}; "
                f"its modules are named like {', '.join(module_names[:6]) or '(none)'}"
            )
        transplant = [transplant] if isinstance(transplant, str) else list(transplant)
        if transplant and options.get("reference") is None:
            raise RecorderUsageError("transplant needs the reference trace to take tensors from: pass reference=PATH")
        bad = CapturePolicy(transplant).unmatched(module_names)
        if bad:
            raise RecorderUsageError(f"transplant pattern(s) {', '.join(map(repr, bad))} match no module")
        if step_module is not None and step_module not in named:
            raise RecorderUsageError(f"step_module {step_module!r} is not a module of {type(model).__name__}")
        param = next(iter(model.parameters()), None)
        defaults = {"runtime": "torch", "runtime_version": torch.__version__}
        if param is not None:
            defaults.update(device=str(param.device), precision=_PRECISION.get(param.dtype))
        defaults.update(options.pop("defaults", None) or {})
        tags = dict(options.pop("tags", None) or {})
        if transplant:
            tags["steptrace.transplant"] = ",".join(transplant)
        super().__init__(trace, policy=policy, defaults=defaults, tags=tags, **options)
        self.model = model
        self._device_stats = device_stats
        self._transplant_steps = transplant_steps
        # CPU tensors without a budget take the lean path (_record_cpu): the hooks run between
        # the model's own ops, with its caches cold, so every Python step there counts
        self._lean = self._ring is None and not device_stats
        # small CPU outputs of the open step: (step, name, source, values, clone), counted and
        # handed to the writer by _finish_deferred in one loop
        self._pending: list[tuple] = []
        self._handles: list[Any] = []
        tp = CapturePolicy(transplant)
        for name, mod in named.items():
            mode, swap = policy.mode(name) if name else "none", bool(name) and tp.mode(name) != "none"
            if mode != "none" or swap:
                self._handles.append(mod.register_forward_hook(self._hook(name, type(mod).__name__, mode, swap)))
        if step_module is not None:
            self._handles.append(named[step_module].register_forward_pre_hook(lambda _m, _a: self._auto_step()))

    def _auto_step(self) -> None:
        self.begin_step()

    def _hook(self, name: str, source: str, mode: str, swap: bool) -> Any:
        if swap:
            def transplant_hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
                self._finish_deferred()
                call = self.next_call(name)
                steps = self._transplant_steps
                if steps is not None and self._current().key.index not in steps:
                    if mode != "none":
                        self._record_output(name, call, output, source, mode)
                    return None
                output = self._transplant(name, call, output)
                if mode != "none":
                    self._record_output(name, call, output, f"{source} [transplanted]", mode)
                return output

            return transplant_hook
        values = mode == "full"
        tensor, strided = torch.Tensor, torch.strided

        def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
            st = self._step or self._current()
            if self._lean and type(output) is tensor and output.is_cpu and not self._closed:
                if output.nbytes <= _SMALL_BYTES and output.dtype in _LEAN and output.layout == strided:
                    # The hook runs between the model's ops, with cold caches: it copies and
                    # nothing more; _finish_deferred checks and counts at the end of the step.
                    self._pending.append((st, name, source, values,
                                          (output.detach() if output.requires_grad else output).clone()))
                    return
                self._finish_deferred()
                self._record_cpu(st, name, st.count(name), output, source, values)
            else:
                self._finish_deferred()
                self._record_output(name, self.next_call(name), output, source, mode)

        return hook

    def _finish_deferred(self) -> None:
        """Count and hand to the writer the small outputs the hooks copied (in hook order)."""
        pending = self._pending
        if not pending:
            return
        self._pending = []
        for st, name, source, values, c in pending:
            self._row(st, name, st.count(name), c, source, values, copy=False)  # the clone is ours already

    def _record_cpu(self, st: Any, name: str, call: int, t: torch.Tensor, source: str, values: bool) -> None:
        """Record a CPU tensor output: :meth:`Recorder.record`'s work in as few Python steps as
        possible (the writer copies the numpy view before returning)."""
        if t.dtype not in _LEAN or self._closed or t.layout != torch.strided:
            self.record(name, t, call=call, source=source, mode="full" if values else "stats")
            return
        self._row(st, name, call, t.detach() if t.requires_grad else t, source, values, copy=True)

    def _row(self, st: Any, name: str, call: int, t: torch.Tensor, source: str, values: bool, *, copy: bool) -> None:
        """Hand the writer the row of CPU tensor ``t`` (a dtype of ``_LEAN``) at the next order."""
        dt, bits = _LEAN[t.dtype]
        a = t.numpy() if bits is None else t.view(bits).numpy().view(np.uint16)
        order = st.order
        st.order = order + 1
        key = st.key
        self.writer.lane.tensor_row(key.sample, key.index, name, call, order, source, dt, a, values, copy=copy)

    def _record_output(self, name: str, call: int, out: Any, source: str, mode: str) -> None:
        if isinstance(out, torch.Tensor):
            self.record(name, out, call=call, source=source, mode=mode)
        elif isinstance(out, (tuple, list)):
            for i, o in enumerate(out):
                self._record_output(f"{name}.{i}", call, o, source, mode)
        elif isinstance(out, Mapping):
            for key, o in out.items():
                self._record_output(f"{name}.{key}", call, o, source, mode)
        # anything else (None, ints, custom objects) holds no tensor to record

    def to_host(self, value: Any, dtype: str | None) -> tuple[np.ndarray | HostCopy, str | None]:
        """View a CPU tensor as numpy (bfloat16 as uint16 bits; valid until the model reuses its
        memory, so callers copy before returning); wrap other devices' tensors
        (or every tensor, with ``device_stats=True``) in a :class:`TorchCopy`.

        Args:
            value: a torch tensor, or anything :meth:`Recorder.to_host` accepts.
            dtype: SPEC.md dtype override for non-tensors.

        Returns:
            ``(host data, SPEC.md dtype)``.

        Raises:
            UnsupportedDtypeError: complex, quantized, sparse or float8 tensors.
        """
        if not isinstance(value, torch.Tensor):
            return super().to_host(value, dtype)
        return tensor_to_host(value, device_stats=self._device_stats)

    def host_logits(self, logits: Any) -> np.ndarray | None:
        """A numpy view of CPU torch logits, None for logits on a device (decided there by
        :meth:`decide_logits`); other logits as :meth:`Recorder.host_logits` takes them.

        Args:
            logits: the logits given to :meth:`decide`.
        """
        if isinstance(logits, torch.Tensor):
            return TORCH_LOGITS.host(logits)
        return super().host_logits(logits)

    def decide_logits(self, logits: Any, *, chosen: int | None, watched: Any) -> Decision:
        """Decide torch logits where they live (:class:`TorchLogits`); other logits as
        :meth:`Recorder.decide_logits` does.

        Args:
            logits: 1-d logits.
            chosen: the id used (None: the argmax).
            watched: ids to watch.

        Returns:
            The :class:`tracefmt.decisions.Decision`.

        Raises:
            TraceUsageError: malformed logits or ids.
        """
        if isinstance(logits, torch.Tensor):
            return decide_with(TORCH_LOGITS, logits, k=self.k, chosen=chosen, watched=watched)
        return super().decide_logits(logits, chosen=chosen, watched=watched)

    def _transplant(self, name: str, call: int, out: Any) -> Any:
        if isinstance(out, torch.Tensor):
            return self._replacement(name, call, out)
        if isinstance(out, tuple) and hasattr(out, "_fields"):
            return type(out)(*(self._transplant(f"{name}.{i}", call, o) for i, o in enumerate(out)))
        if isinstance(out, (tuple, list)):
            return type(out)(self._transplant(f"{name}.{i}", call, o) for i, o in enumerate(out))
        if isinstance(out, dict):
            new = copy.copy(out)  # keeps the mapping's class (OrderedDict, Hugging Face ModelOutput)
            for key, o in out.items():
                new[key] = self._transplant(f"{name}.{key}", call, o)
            return new
        return out

    def _replacement(self, name: str, call: int, t: torch.Tensor) -> torch.Tensor:
        ref = self.reference_tensor(name, call=call)
        dt = _spec_dtype(t, name)
        if ref.dtype != dt or tuple(ref.values.shape) != tuple(t.shape):
            key = self.current_step
            raise TransplantMismatchError(
                f"transplant of {name!r} (call {call}) at sample {key.sample!r} step {key.index}: the reference "
                f"holds {ref.dtype}{list(ref.values.shape)} but this run produced {dt}{list(t.shape)}; transplant "
                "between runs with the same shapes and dtype (record the reference in the candidate's precision)"
            )
        return reference_to_tensor(ref.values, dt, t.device)

    def close(self) -> WriteSummary:
        """Remove the hooks, then close as :meth:`recorders.capture.Recorder.close` does.

        Returns:
            The writer's :class:`steptrace.tracefmt.WriteSummary`.
        """
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return super().close()


# =====================================================================================================
# Helpers for the Hugging Face recorder (recorders/hf.py) and `trace record` (recorders/script.py).
# Appended section: the code above is unchanged. These are the only torch calls those modules make.
# =====================================================================================================
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


def install_global_hooks(pre: Any, post: Any) -> Any:
    """Call ``pre(module)`` before and ``post(module, output)`` after every module call anywhere
    (``torch.nn.modules.module.register_module_forward_pre_hook`` / ``..._forward_hook``).

    ``post`` also runs when the forward raised (``always_call=True``; ``output`` is then None)
    and may return a replacement output (None keeps the module's own). Calls made while torch
    traces or compiles (``torch.onnx.export``, ``torch.jit.trace``, ``torch.compile``) are skipped.

    Args:
        pre: called with the module before its forward.
        post: called with the module and its output; returns None or the output to use.

    Returns:
        A function that removes both hooks.
    """
    hooks = torch.nn.modules.module
    tracing = torch.jit.is_tracing
    compiling = torch.compiler.is_compiling

    def on_pre(module: torch.nn.Module, _args: Any) -> None:
        if not (tracing() or compiling()):  # torch.onnx.export / jit.trace / torch.compile: not a run
            pre(module)

    def on_post(module: torch.nn.Module, _args: Any, output: Any) -> Any:
        return None if tracing() or compiling() else post(module, output)

    h_pre = hooks.register_module_forward_pre_hook(on_pre)
    h_post = hooks.register_module_forward_hook(on_post, always_call=True)

    def remove() -> None:
        h_pre.remove()
        h_post.remove()

    return remove


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
