"""The torch half of ``trace record``'s module calls (split from :mod:`recorders.torch`, whose
torch it uses): :func:`install_module_calls` wraps
``torch.nn.Module.__call__`` for :class:`recorders.scriptmodules.ModuleHooks`,
:func:`lean_deferrer` makes the per-module copy of its lean path and :func:`lean_decider` the
decision of a logits module's lean path."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from steptrace.tracefmt.decisions import first_max

from .outputs import decided_index
from .torch import _LEAN, torch  # torch is imported by recorders/torch.py alone (docs/layout.md)

__all__ = ["install_module_calls", "lean_decider", "lean_deferrer"]


def install_module_calls(hooks: Any) -> Any:
    """Call ``hooks.torch_pre(module)`` before and ``hooks.torch_post(module, output)`` after
    module calls anywhere, by wrapping ``torch.nn.Module.__call__``.

    ``torch_post`` also runs when the forward raised (``output`` is then None, and the error
    goes on) and may return a replacement output (None keeps the module's own). A module whose
    ``id`` is in ``hooks.quiet`` is called with no hook at all while ``hooks.depth`` (module
    calls in progress, kept by the hooks) is not 0: an unrecorded module inside a recorded one
    then costs one dictionary lookup instead of torch's global-hook dispatch (~6.5 us per call
    on the bench VM). Calls made while torch traces or compiles (``torch.onnx.export``,
    ``torch.jit.trace``, ``torch.compile``) are not hooked.

    A module whose ``id`` is a key of ``hooks.lean`` (a dict, optional) is, inside another
    module's call, called with neither hook: its entry ``defer`` is
    called as ``defer(output)`` after the forward (see :func:`lean_deferrer`), and only when that returns False does ``torch_post`` see the call
    (as if ``torch_pre`` had run: such a module is named already and starts no sample). A
    forward that raises is then seen by neither hook.

    Args:
        hooks: an object with ``torch_pre``, ``torch_post``, ``quiet`` (a container of module
            ids), ``depth`` (an int) and optionally ``lean`` (a dict of module ids), e.g.
            :class:`recorders.scriptmodules.ModuleHooks`.

    Returns:
        A function that restores ``torch.nn.Module.__call__``.
    """
    module_class = torch.nn.Module
    original = module_class.__call__
    tracing = torch._C._is_tracing
    compiling = torch.compiler.is_compiling
    pre, post, quiet = hooks.torch_pre, hooks.torch_post, hooks.quiet
    lean: dict[int, Callable[[Any], bool]] = hooks.lean if hasattr(hooks, "lean") else {}
    active = True
    # torch's own __call__ is _wrapped_call_impl, which only picks the compiled forward or
    # _call_impl: a quiet call does that itself, a Python frame fewer per unrecorded module
    # (any other __call__, wrapped by someone else, is called as it is)
    direct = original is getattr(module_class, "_wrapped_call_impl", None) and hasattr(module_class, "_call_impl")

    def __call__(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        if hooks.depth:
            key = id(self)
            if key in quiet:
                if direct and self._compiled_call_impl is None:
                    return self._call_impl(*args, **kwargs)
                return original(self, *args, **kwargs)
            defer = lean.get(key)
            if defer is not None and active and not compiling() and not tracing():
                if direct and self._compiled_call_impl is None:
                    output = self._call_impl(*args, **kwargs)
                else:
                    output = original(self, *args, **kwargs)
                if defer(output):
                    return output
                hooks.depth += 1  # the general path, as torch_pre would have counted it
                new = post(self, output)
                return output if new is None else new
        if compiling() or tracing() or not active:
            return original(self, *args, **kwargs)
        pre(self)
        try:
            output = original(self, *args, **kwargs)
        except BaseException:  # post sees the failed call (output None); the error goes on as it was
            post(self, None)
            raise
        new = post(self, output)
        return output if new is None else new

    module_class.__call__ = __call__

    def remove() -> None:
        nonlocal active
        active = False  # wrapped again by someone else since: the wrapper stays, passing through
        if module_class.__call__ is __call__:
            module_class.__call__ = original

    return remove


def lean_deferrer(rec: Any) -> Any:
    """Return ``deferrer(name, source, values)``, which makes the ``defer(output)`` of one
    module for :func:`install_module_calls`' lean path: ``defer`` copies a small dense CPU
    tensor of a SPEC.md dtype into the step ``rec`` has open (a
    :class:`~recorders.hostrecorder.HostRecorder`: the call counted now, the row made with the
    others when the step ends, as :meth:`HostRecorder.lane_row` does for small tensors) and
    returns True; it returns False, having done nothing, for anything else (no open step, which
    is also the case once ``rec`` is closed; another type, device, layout or dtype; more than
    ``SMALL_BYTES``; a tensor ``numpy()`` refuses).

    ``defer`` runs between the model's own ops, with its caches cold: it is the whole per-call
    work of a recorded module's output, so it asks torch as little as it can (``numpy()`` itself
    refuses other devices and layouts).

    Args:
        rec: the HostRecorder (with no budget: its rows are not held).
    """
    from .hostrecorder import SMALL_BYTES

    # A copy here, even with a writer process: copying each into its ring as it comes cost ~1.3 us
    # more per call on the model's thread than a.copy(), and the rows' copies go into the ring
    # together when the step ends
    pending, lean, tensor, u16 = rec._pending, _LEAN, torch.Tensor, np.uint16

    def deferrer(name: str, source: str | None, values: bool) -> Callable[[Any], bool]:
        def defer(t: Any, name: str = name, source: str | None = source, values: bool = values,
                  append: Any = pending.append, small: int = SMALL_BYTES) -> bool:
            st = rec._step
            if st is None or type(t) is not tensor:
                return False
            kind = lean.get(t.dtype)
            if kind is None:
                return False
            dt, bits = kind
            try:
                a = t.numpy() if bits is None else t.view(bits).numpy().view(u16)
            except (TypeError, RuntimeError):  # another device or layout, or it requires grad:
                return False  # the general path takes it
            if a.nbytes > small:
                return False
            calls = st.calls
            call = calls.get(name, 0)
            calls[name] = call + 1
            append((st, name, call, source, dt, a.copy(), values))
            return True

        return defer

    return deferrer


#: Logits dtypes whose numpy view a decision takes as it is (others: the general path widens them).
_PLAIN_LOGITS = frozenset({torch.float32, torch.float64, torch.float16})


def lean_decider(hooks: Any, rec: Any) -> Callable[[Any], bool]:
    """Return the ``defer(output)`` of a logits module's lean path for
    :func:`install_module_calls` (:meth:`recorders.scriptmodules.ModuleHooks._is_lean_logits`
    says which modules take it: the module's output is the logits, decided as they are, with no
    teacher, budget or other record of it).

    ``defer`` decides the last position of the first row of a dense CPU tensor of a plain float
    dtype exactly as ``hooks.torch_post`` would (the previous step ended if one was decided in
    this outer call, the step opened, ``rec.decide`` given the row's numpy view, in the hooks'
    writing section) and returns True; it returns False, having done nothing, for anything else
    (another type, dtype, device or layout, a batch of more than one row, a tensor that
    requires grad, logits holding NaN), which the general path then takes, notes included.

    Args:
        hooks: the :class:`recorders.scripthooks.ScriptRecorder`.
        rec: its HostRecorder.
    """
    tensor, plain, section = torch.Tensor, _PLAIN_LOGITS, hooks._writing()

    def defer(t: Any) -> bool:
        if type(t) is not tensor or t.dtype not in plain:
            return False
        shape = t.shape
        if len(shape) >= 3 and shape[0] > 1:
            return False
        try:
            x = t.numpy()
        except (TypeError, RuntimeError):  # another device or layout, or it requires grad
            return False
        row = x[decided_index(shape)]
        am = first_max(row)
        if am is None:  # NaN: the general path decides it
            return False
        with section:
            if hooks._decided:
                hooks._end_step()  # a second logits call inside one outer call: the next step
            hooks._open_step(rec)
            rec.decide(row, chosen=am)
        hooks._decided = True
        return True

    return defer
