"""recorders: runtime hooks (PyTorch, ONNX Runtime, CoreML, Hugging Face, scripts) that write
traces through tracefmt. Each ML framework is imported in exactly one module of this package
(``steptrace.recorders.torch`` is the only one that imports torch); importing this package imports none.

The framework-agnostic core (:mod:`steptrace.recorders.capture`) is re-exported here::

    from steptrace.recorders import Budget, CapturePolicy, Recorder, Reference, decide
"""

from .capture import Budget, CapturePolicy, HostCopy, Recorder, Reference, RefTensor, StepKey, Trigger
from .decisions import decide, decide_rows, write_decision
from .errors import RecorderUsageError, ReferenceNotFoundError, StepOrderError, TransplantMismatchError

__all__ = [
    "Budget",
    "CapturePolicy",
    "HostCopy",
    "Recorder",
    "RecorderUsageError",
    "RefTensor",
    "Reference",
    "ReferenceNotFoundError",
    "StepKey",
    "StepOrderError",
    "TransplantMismatchError",
    "Trigger",
    "decide",
    "decide_rows",
    "write_decision",
]
