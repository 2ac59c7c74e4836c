"""Module outputs as trees of tensors: naming their elements, reaching and replacing one, and the
decided vector of a logits tensor. Framework-free (torch tensors are recognised duck-typed), used
by :mod:`steptrace.recorders.scripthooks`; the naming is :class:`~recorders.torch.TorchRecorder`'s:
tuple/list elements ``name.0``, ``name.1``, mapping elements ``name.key``, nested as deep as
they go.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from .decisions import is_torch_tensor

__all__ = ["decided_index", "element_at", "elements", "peak_numpy", "replace_element"]


def elements(name: str, out: Any, path: tuple = ()) -> Iterator[tuple[str, tuple, Any]]:
    """Yield ``(name, path, tensor)`` for every torch tensor in a module output.

    Args:
        name: the module's name.
        out: its output (a tensor, or tuples, lists and mappings of them; other leaves are skipped).
        path: the path of ``out`` within the whole output (recursion).

    Returns:
        An iterator, in the output's own order.
    """
    if is_torch_tensor(out):
        yield name, path, out
    elif isinstance(out, (tuple, list)):
        for i, o in enumerate(out):
            yield from elements(f"{name}.{i}", o, (*path, i))
    elif isinstance(out, Mapping):
        for key, o in out.items():
            yield from elements(f"{name}.{key}", o, (*path, key))


def element_at(out: Any, path: tuple) -> Any:
    """Return the element of ``out`` at ``path`` (as :func:`elements` gives it)."""
    for p in path:
        out = out[p]
    return out


def replace_element(out: Any, path: tuple, new: Any) -> Any:
    """Return ``out`` with the element at ``path`` replaced by ``new``; the containers on the
    path are copied and keep their classes (namedtuples, dicts, Hugging Face ``ModelOutput``).

    Args:
        out: the module output.
        path: the element's path.
        new: the replacement.

    Returns:
        The new output (``out`` itself is not changed).
    """
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return type(out)(*(replace_element(o, rest, new) if i == head else o for i, o in enumerate(out)))
    if isinstance(out, (tuple, list)):
        return type(out)(replace_element(o, rest, new) if i == head else o for i, o in enumerate(out))
    copied = copy.copy(out)
    copied[head] = replace_element(out[head], rest, new)
    return copied


def decided_index(shape: Sequence[int]) -> tuple[int, ...]:
    """Return the leading indices of the decided vector of logits of ``shape``: the last position
    of the first row (``[V]``: ``()``; ``[T, V]``: ``(-1,)``; ``[B, T, V]``: ``(0, -1)``)."""
    return () if len(shape) <= 1 else (0,) * (len(shape) - 2) + (-1,)


def peak_numpy(a: np.ndarray, index: tuple[int, ...], token: int) -> np.ndarray:
    """Return a copy of ``a`` whose vector ``a[index]`` is -inf except at ``token``, which keeps
    its own logit (0 if it was not finite): numpy's twin of :func:`recorders.torch.peak_at`.

    Args:
        a: floating-point logits ``[..., V]``.
        index: leading indices of the vector (:func:`decided_index`).
        token: the id to force.

    Returns:
        The new array.
    """
    out = np.array(a, copy=True)
    keep = out[(*index, token)]
    out[index] = -np.inf
    out[(*index, token)] = keep if np.isfinite(keep) else 0
    return out
