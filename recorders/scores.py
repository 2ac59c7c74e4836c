"""What a decided vector holds, for ``trace record --scores``: logits, probabilities (decided as
their logarithm) or log-probabilities (decided as they are: logits shifted by a constant).
Torch tensors are handled duck-typed (no torch import here)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .decisions import is_torch_tensor

__all__ = ["SCORES", "log_probabilities", "looks_like_probabilities"]

#: What the decided vectors hold: logits, probabilities or log-probabilities.
SCORES = ("logits", "prob", "logprob")


def _host_row(row: Any) -> np.ndarray:
    if is_torch_tensor(row):
        row = row.detach().float().cpu().numpy()
    return np.asarray(row, dtype=np.float64)


def looks_like_probabilities(row: Any) -> bool:
    """Whether a decided vector of two or more values lies in [0, 1] and sums to 1 (to 1e-3).

    Args:
        row: a 1-D torch tensor or array-like.

    Returns:
        True for a probability vector.
    """
    a = _host_row(row)
    if a.size < 2 or not np.isfinite(a).all():
        return False
    return bool(a.min() >= 0.0 and a.max() <= 1.0 and math.isclose(float(a.sum()), 1.0, abs_tol=1e-3))


def log_probabilities(row: Any) -> Any:
    """Natural log of probabilities (0 -> -inf).

    Args:
        row: probabilities: a torch tensor (the log is taken on its device, in float32 or its
            own wider dtype) or an array (float64 stays float64, anything else float32).

    Returns:
        The log-probabilities, of the same kind as ``row``.
    """
    if is_torch_tensor(row):
        row = row.detach()
        return (row if row.is_floating_point() and row.element_size() >= 4 else row.float()).log()
    a = np.asarray(row)
    with np.errstate(divide="ignore"):
        return np.log(a if a.dtype == np.float64 else a.astype(np.float32))
