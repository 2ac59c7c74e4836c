"""Which implementation reduces a large tensor's statistics: numpy (:func:`steptrace.tracefmt.stats.compute_stats`,
always there) or the compiled one-pass kernel (:mod:`steptrace.tracefmt.statskernel`, numba, the
``fast`` extra), which gives the same statistics bit for bit, ~2x faster for float32 and ~1.4x for
float16 (bench/README.md, issue 14).

Importing numba and loading the compiled kernel costs a process ~0.4-0.8 s, most of it holding
the GIL: in a recording process that is the model's thread waiting. So by default (``auto``)
only a writer process (``TraceWriter(process=True)``, whose child has no model thread) takes the
kernel, once it has reduced ``KERNEL_AFTER_ELEMENTS`` elements of large tensors: a recording that
long pays the load back. ``STEPTRACE_KERNEL=numpy|numba|auto`` (the differ's variable: one
choice for both) forces either path: ``numba`` loads it at the first large tensor in any process.
This module never imports numba itself.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from collections.abc import Callable

from .errors import TraceUsageError

__all__ = ["KERNEL_AFTER_ELEMENTS", "KERNEL_ENV", "KERNEL_MIN_ELEMENTS", "allow_kernel_after", "check_kernel_env",
           "kernel_for", "reset"]

#: The environment variable that forces a path: ``numpy``, ``numba`` or ``auto`` (the default).
KERNEL_ENV = "STEPTRACE_KERNEL"
#: Tensors from this many elements are reduced by the kernel once it is loaded (smaller ones are
#: reduced together, column by column: :func:`steptrace.tracefmt.stats.stats_columns`).
KERNEL_MIN_ELEMENTS = 1 << 16
#: Under ``auto``, a writer process loads the kernel once it has reduced this many elements of
#: tensors of at least ``KERNEL_MIN_ELEMENTS`` (at ~1-1.5 ns saved per element, ~0.3-0.4 s).
KERNEL_AFTER_ELEMENTS = 1 << 28

ChunkStats = Callable[..., tuple[float, float, float, float]]

_MODES = ("numpy", "numba", "auto")
_lock = threading.Lock()
_state: dict = {"after": None, "reduced": 0, "kernel": None}  # kernel: None (not loaded), False (never) or the function


def check_kernel_env() -> str:
    """Return the path ``STEPTRACE_KERNEL`` asks for (``numpy``, ``numba`` or ``auto``), checked
    when a writer opens, so that a bad value fails there and not in its background work.

    Raises:
        TraceUsageError: the variable holds something else, or ``numba`` where numba is not installed.
    """
    mode = os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"
    if mode not in _MODES:
        raise TraceUsageError(f"{KERNEL_ENV}={os.environ[KERNEL_ENV]!r}: expected one of {', '.join(_MODES)}")
    if mode == "numba" and importlib.util.find_spec("numba") is None:
        raise TraceUsageError(f"{KERNEL_ENV}=numba, but numba is not installed: pip install 'steptrace[fast]', "
                              "or unset the variable")
    return mode


def allow_kernel_after(elements: int | None) -> None:
    """Under ``auto``, load the kernel in this process once it has reduced ``elements`` elements
    of large tensors (None: never, the default; a writer process passes
    :data:`KERNEL_AFTER_ELEMENTS`)."""
    with _lock:
        _state["after"] = elements


def kernel_for(elements: int) -> ChunkStats | None:
    """The kernel's ``chunk_stats`` to reduce a tensor of ``elements`` elements with, or None
    (numpy): counts the elements towards ``auto``'s threshold.

    Raises:
        TraceUsageError: ``STEPTRACE_KERNEL`` is malformed, or ``numba`` and numba does not import.
    """
    if elements < KERNEL_MIN_ELEMENTS:
        return None
    kernel = _state["kernel"]
    if kernel is not None:
        return kernel or None
    mode = check_kernel_env()
    with _lock:
        if _state["kernel"] is not None:
            return _state["kernel"] or None
        if mode == "numpy":
            _state["kernel"] = False
            return None
        if mode == "auto":
            after = _state["after"]
            if after is None:
                return None
            _state["reduced"] += elements
            if _state["reduced"] < after:
                return None
            if importlib.util.find_spec("numba") is None:
                _state["kernel"] = False
                return None
        try:
            from .statskernel import chunk_stats
        except ImportError as exc:  # numba installed but broken (e.g. it does not support this numpy)
            if mode == "numba":
                raise TraceUsageError(f"{KERNEL_ENV}=numba, but numba does not import ({exc}); "
                                      "unset the variable") from exc
            warnings.warn(f"steptrace: the compiled statistics kernel is unavailable ({exc}); reducing with numpy",
                          RuntimeWarning, stacklevel=2)
            _state["kernel"] = False
            return None
        _state["kernel"] = chunk_stats
        return chunk_stats


def reset() -> None:
    """Forget the decision and the count (tests: a process that changes ``STEPTRACE_KERNEL``)."""
    with _lock:
        _state.update(after=None, reduced=0, kernel=None)
