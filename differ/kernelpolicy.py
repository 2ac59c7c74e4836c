"""Which implementation folds tensor values: numpy (:mod:`steptrace.differ.onepass`, always
there) or the compiled kernel (:mod:`steptrace.differ.kernel`, numba, the ``fast`` extra).

Importing numba and loading the compiled kernel costs a process ~0.4-0.8 s (the first use after
an install compiles it instead, ~1.5-2.5 s, cached on disk from then on), and the kernel saves
~1-1.6 ns per float32 element compared (bench/README.md, issue 14). So by default (``auto``) a
comparison takes the kernel only when it compares at least ``KERNEL_MIN_ELEMENTS`` elements in
all (a whole ``trace diff``'s values, or one :func:`~steptrace.differ.metrics.compare_values`
call), and numba is installed.
``STEPTRACE_KERNEL=numpy|numba|auto`` forces either path (docs/differ.md §5, *Compiled kernel*).
This module never imports numba itself.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable

from .errors import KernelError
from .onepass import Acc, accumulate

#: The environment variable that forces a path: ``numpy``, ``numba`` or ``auto`` (the default).
KERNEL_ENV = "STEPTRACE_KERNEL"
#: In ``auto``, the fewest elements compared for which the kernel pays for loading numba.
KERNEL_MIN_ELEMENTS = 1 << 30

_MODES = ("numpy", "numba", "auto")

Accumulate = Callable[..., Acc]


def kernel_mode() -> str:
    """Return the path ``STEPTRACE_KERNEL`` asks for: ``numpy``, ``numba`` or ``auto``.

    Raises:
        KernelError: the variable holds something else.
    """
    mode = os.environ.get(KERNEL_ENV, "").strip().lower() or "auto"
    if mode not in _MODES:
        raise KernelError(f"{KERNEL_ENV}={os.environ[KERNEL_ENV]!r}: expected one of {', '.join(_MODES)}")
    return mode


def numba_installed() -> bool:
    """Whether numba can be found (without importing it)."""
    return importlib.util.find_spec("numba") is not None


def use_kernel(elements: int) -> bool:
    """Whether a comparison of ``elements`` values in all should take the compiled kernel.

    Args:
        elements: how many elements the comparison folds (both sides together count once).

    Returns:
        False under ``numpy``; True under ``numba``; under ``auto``, True when ``elements`` is at
        least ``KERNEL_MIN_ELEMENTS`` and numba is installed.

    Raises:
        KernelError: ``STEPTRACE_KERNEL`` is malformed, or is ``numba`` where numba is not installed.
    """
    mode = kernel_mode()
    if mode == "numba":
        if not numba_installed():
            raise KernelError(f"{KERNEL_ENV}=numba, but numba is not installed: "
                              "pip install 'steptrace[fast]', or unset the variable")
        return True
    return mode == "auto" and elements >= KERNEL_MIN_ELEMENTS and numba_installed()


def accumulator(kernel: bool) -> Accumulate:
    """Return the fold to use: the compiled kernel's ``accumulate`` when ``kernel`` is true and
    numba imports, else onepass's.

    Args:
        kernel: as :func:`use_kernel` decided (or a caller's explicit choice).

    Returns:
        A function with :func:`steptrace.differ.onepass.accumulate`'s signature.

    Raises:
        KernelError: numba fails to import (e.g. it does not support this numpy) while
            ``STEPTRACE_KERNEL=numba`` asks for it; under ``auto`` the numpy path is taken with a
            warning instead.
    """
    if not kernel:
        return accumulate
    try:
        from .kernel import accumulate as compiled
    except ImportError as e:
        if kernel_mode() == "numba":
            raise KernelError(f"{KERNEL_ENV}=numba, but numba does not import: {e}") from e
        warnings.warn(f"steptrace: the compiled kernel is unavailable ({e}); comparing with numpy",
                      RuntimeWarning, stacklevel=2)
        return accumulate
    return compiled
