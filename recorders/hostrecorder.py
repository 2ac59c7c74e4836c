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
from .steps import RepeatedRows

__all__ = ["HostRecorder"]


#: CPU tensors up to this size are copied by :meth:`HostRecorder.lane_row` and their rows made
#: when the step ends (as :class:`~recorders.modulehooks.ModuleRecorder`'s hooks do).
SMALL_BYTES = 64 << 10


class HostRecorder(Recorder):
    """A :class:`Recorder` that also takes torch tensors (through :mod:`steptrace.recorders.torch`)."""

    _cpu_view: Callable[[Any], tuple[str, np.ndarray] | None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # small tensors copied by lane_row (and recorders.torchcalls.lean_deferrer) whose rows are not
        # made yet: (step, name, call, source, SPEC.md dtype, copy, values). Copies, even with a
        # writer process: copying each into its ring as it comes cost the model's thread ~1.3 us
        # more per tensor than a.copy(); the step's copies go into the ring together.
        self._pending: list[tuple] = []
        self._repeats = RepeatedRows()  # steps whose rows repeat the last ones'

    def lane_row(self, name: str, value: Any, call: int, source: str | None, values: bool) -> bool:
        """Record a dense CPU torch tensor of a SPEC.md dtype at the open step through the writer's
        lane (the checks of :meth:`Recorder.record` hold for a tensor's own view): a small one
        (:data:`SMALL_BYTES`) is copied now and its row made when the step ends or anything else
        is recorded, a larger one handed over at once as a numpy view the writer copies before
        returning; return False, having done nothing, for any other value (or with a budget, or
        once closed): :meth:`Recorder.record` takes those.

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
        dt, a = view
        if a.nbytes <= SMALL_BYTES:
            # Called between the model's ops, with cold caches: copy and nothing more;
            # _finish_deferred makes the rows in one loop.
            st = self._step or self._current()
            self._pending.append((st, name, call, source, dt, a.copy(), values))
            return True
        self._check()
        st = self._step or self._current()
        order = st.order
        st.order = order + 1
        key = st.key
        with self._lock:
            self.writer.lane.tensor_row(key.sample, key.index, name, call, order, source, dt, a, values)
        return True

    def _finish_deferred(self) -> None:
        """Hand the writer the rows of the small tensors :meth:`lane_row` copied, in call order
        (before anything else is recorded, when a step ends, and at close)."""
        pending = self._pending  # one list for the recorder's life: recorders.torchcalls.lean_deferrer appends to it
        if not pending:
            return
        st = pending[0][0]
        lane = self.writer.lane
        one = pending[-1][0] is st  # (always, but for a step ended without ending its rows)
        if one:
            # the calls were counted as the tensors came: a template needs no calls of its own
            sig = [(name, call, source, dt, a.shape, values) for _, name, call, source, dt, a, values in pending]
            with self._lock:
                if self._repeats.repeat(lane, st, sig, [p[5] for p in pending]):
                    pending.clear()
                    return
        rows = []
        for st, name, call, source, dt, a, values in pending:
            order = st.order
            st.order = order + 1
            key = st.key
            rows.append((key.sample, key.index, name, call, order, source, dt, a, values))
        pending.clear()
        with self._lock:
            if one:
                self._repeats.saw(lane, rows[0][4], sig, rows)
            lane.tensor_rows(rows)

    def to_host(self, value: Any, dtype: str | None) -> tuple[np.ndarray | HostCopy, str | None]:
        if is_torch_tensor(value):
            from .torch import tensor_to_host

            return tensor_to_host(value)
        return super().to_host(value, dtype)
