"""A reference trace, read for teacher forcing (its tokens) and transplant (its tensors).

Teacher forcing: at each step the recorder uses the reference's chosen token for the same
(sample, step, head), so a candidate run stays aligned with the reference past its first flip.
Transplant: a module's output is replaced by the reference's recorded tensor of the same
(sample, step, name, call), which must have been recorded with values (capture ``"full"``).

Sample ids are the same in both runs unless ``samples`` maps a candidate sample to another
reference sample.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from steptrace.tracefmt.errors import TraceNotFoundError

from .errors import ReferenceNotFoundError

if TYPE_CHECKING:  # the reader (and pyarrow.compute) is imported by a recorder that has a reference
    from steptrace.tracefmt import TraceReader


class RefTensor(NamedTuple):
    """A reference tensor: values (bfloat16 as its uint16 bit patterns) and SPEC.md dtype."""

    values: np.ndarray
    dtype: str


class Reference:
    """A reference trace opened for teacher forcing and transplant.

    Args:
        trace: the trace directory, or an open :class:`steptrace.tracefmt.TraceReader`.
        samples: candidate sample id -> reference sample id, where they differ.

    Raises:
        TraceNotFoundError: no trace at ``trace``.
        TraceFormatError: not a steptrace trace.
    """

    def __init__(self, trace: str | os.PathLike[str] | TraceReader, *, samples: Mapping[str, str] | None = None) -> None:
        from steptrace.tracefmt import TraceReader

        self.reader = trace if isinstance(trace, TraceReader) else TraceReader(trace)
        self.samples = dict(samples or {})
        self._tokens: dict[tuple[str, str], np.ndarray] | None = None  # (sample, head) -> chosen by step (-1: none)
        self._tensors: dict[tuple[str, int, str, int], tuple[str, tuple[int, ...], bool]] | None = None

    @property
    def path(self) -> str:
        """The reference trace's directory."""
        return str(self.reader.path)

    def _sample(self, sample: str) -> str:
        return self.samples.get(sample, sample)

    def _token_index(self) -> dict[tuple[str, str], np.ndarray]:
        if self._tokens is None:
            t = self.reader.decisions(columns=["sample", "step", "head", "chosen"], derive=False).combine_chunks()
            index: dict[tuple[str, str], np.ndarray] = {}
            if t.num_rows:
                sample = t["sample"].chunk(0).dictionary_encode()
                head = t["head"].chunk(0).dictionary_encode()
                nh = len(head.dictionary)
                code = sample.indices.to_numpy().astype(np.int64) * nh + head.indices.to_numpy()
                steps, chosen = t["step"].to_numpy(), t["chosen"].to_numpy()
                order = np.argsort(code, kind="stable")
                bounds = np.flatnonzero(np.diff(code[order])) + 1
                for rows in np.split(order, bounds):
                    c = int(code[rows[0]])
                    key = (sample.dictionary[c // nh].as_py(), head.dictionary[c % nh].as_py())
                    arr = np.full(int(steps[rows].max()) + 1, -1, dtype=np.int64)
                    arr[steps[rows]] = chosen[rows]
                    index[key] = arr
            self._tokens = index
        return self._tokens

    def steps(self, sample: str, *, head: str = "token") -> int:
        """Return how many steps the reference decided for ``sample`` and ``head`` (last step + 1).

        Args:
            sample: candidate sample id (mapped through ``samples``).
            head: decision head.

        Returns:
            0 when the reference holds no decision of that sample and head.
        """
        arr = self._token_index().get((self._sample(sample), head))
        return 0 if arr is None else int(arr.size)

    def token(self, sample: str, step: int, *, head: str = "token") -> int:
        """Return the reference's chosen token at (sample, step, head).

        Args:
            sample: candidate sample id (mapped through ``samples``).
            step: decode step.
            head: decision head.

        Returns:
            The token id.

        Raises:
            ReferenceNotFoundError: the reference has no such sample or head, or the step is
                past its last step (or is a gap in it); the message gives the range it holds.
        """
        ref_sample = self._sample(sample)
        index = self._token_index()
        arr = index.get((ref_sample, head))
        if arr is None:
            known = sorted({s for s, h in index if h == head})
            shown = ", ".join(repr(s) for s in known[:8]) + (", ..." if len(known) > 8 else "")
            raise ReferenceNotFoundError(
                f"the reference trace {self.path} has no {head!r} decisions for sample {ref_sample!r} "
                f"(it has {shown or 'none'}); record the reference with the same sample ids or pass "
                "samples={candidate: reference} to map them"
            )
        if not 0 <= step < arr.size or arr[step] < 0:
            raise ReferenceNotFoundError(
                f"the reference trace {self.path} has no {head!r} decision for sample {ref_sample!r} "
                f"at step {step}: it records steps 0..{arr.size - 1}"
                + (" with gaps" if (arr < 0).any() else "")
                + f"; stop teacher-forced decoding after {arr.size} steps, or record a longer reference"
            )
        return int(arr[step])

    def tensor(self, sample: str, step: int, name: str, *, call: int = 0) -> RefTensor:
        """Return the reference's recorded values of tensor ``name`` at (sample, step, call).

        Args:
            sample: candidate sample id (mapped through ``samples``).
            step: decode step.
            name: tensor name (module path, ``module.0`` for a tuple element, ...).
            call: call index of the module within the step.

        Returns:
            The :class:`RefTensor` (values read-only; bfloat16 as uint16 bits).

        Raises:
            ReferenceNotFoundError: no such tensor, or it was recorded as statistics only.
            TraceCorruptError: the stored values are damaged.
        """
        ref_sample = self._sample(sample)
        meta = self._tensor_index().get((ref_sample, step, name, call))
        if meta is None:
            raise ReferenceNotFoundError(
                f"the reference trace {self.path} holds no tensor {name!r} (call {call}) at sample "
                f"{ref_sample!r} step {step}; record the reference with this module captured 'full' "
                "at every step you transplant"
            )
        if not meta[2]:
            raise ReferenceNotFoundError(
                f"the reference trace {self.path} recorded {name!r} at sample {ref_sample!r} step {step} "
                "as statistics only; record the reference with capture 'full' for it (and no Budget, "
                "or a Budget that fires at these steps) to transplant it"
            )
        try:
            values = self.reader.tensor(ref_sample, step, name, call=call, raw_bits=True)
        except TraceNotFoundError as exc:
            raise ReferenceNotFoundError(f"transplant of {name!r}: {exc}") from exc
        return RefTensor(values, meta[0])

    def _tensor_index(self) -> dict[tuple[str, int, str, int], tuple[str, tuple[int, ...], bool]]:
        if self._tensors is None:
            t = self.reader.tensors(columns=["sample", "step", "name", "call", "dtype", "shape", "has_values"])
            cols = [t[c].to_pylist() for c in ("sample", "step", "name", "call", "dtype", "shape", "has_values")]
            self._tensors = {(s, st, n, c): (d, tuple(sh), hv) for s, st, n, c, d, sh, hv in zip(*cols)}
        return self._tensors

    def close(self) -> None:
        """Release the reference trace's memory maps."""
        self.reader.close()
