"""The :class:`~recorders.capture.Recorder` that ``trace record`` writes through: it takes torch
tensors as well as numpy arrays, and hands dense CPU torch tensors to the writer's lane. Imports
no framework: :mod:`steptrace.recorders.torch` is imported when the first torch tensor arrives.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from .capture import HostCopy, Recorder
from .decisions import is_torch_tensor

__all__ = ["HostRecorder"]


class HostRecorder(Recorder):
    """A :class:`Recorder` that also takes torch tensors (through :mod:`steptrace.recorders.torch`)."""

    _cpu_view: Callable[[Any], tuple[str, np.ndarray] | None] | None = None

    def lane_row(self, name: str, value: Any, call: int, source: str | None, values: bool) -> bool:
        """Record a dense CPU torch tensor of a SPEC.md dtype at the open step through the writer's
        lane, as a numpy view the writer copies before returning (the checks of
        :meth:`Recorder.record` hold for a tensor's own view); return False, having done
        nothing, for any other value (or with a budget, or once closed): :meth:`Recorder.record`
        takes those.

        Args:
            name: the tensor's name.
            value: the tensor.
            call: its call index.
            source: what produced it.
            values: store the values too (``full``), else statistics only.

        Raises:
            TraceWriteError: the writer failed earlier.
        """
        cpu_view = self._cpu_view
        if cpu_view is None:
            if not is_torch_tensor(value):
                return False
            from .torch import cpu_view

            self._cpu_view = cpu_view
        if self._ring is not None or self._closed:
            return False
        view = cpu_view(value)
        if view is None:
            return False
        self._check()
        st = self._step or self._current()
        order = st.order
        st.order = order + 1
        key = st.key
        with self._lock:
            self.writer.lane.tensor_row(key.sample, key.index, name, call, order, source, view[0], view[1], values)
        return True

    def to_host(self, value: Any, dtype: str | None) -> tuple[np.ndarray | HostCopy, str | None]:
        if is_torch_tensor(value):
            from .torch import tensor_to_host

            return tensor_to_host(value)
        return super().to_host(value, dtype)
