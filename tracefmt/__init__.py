"""tracefmt: the steptrace trace format v1 (see SPEC.md) — writer, reader, errors, interchange.

Layer rule: tracefmt imports no other steptrace layer.
"""

from .. import __version__  # noqa: E402  (the package version, one source: steptrace/__init__.py)

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .errors import (  # noqa: E402
    JsonlError,
    TraceCorruptError,
    TraceError,
    TraceExistsError,
    TraceFormatError,
    TraceNotFoundError,
    TraceUsageError,
    TraceVersionError,
    TraceWriteError,
    UnsupportedDtypeError,
    ValuesNotRecordedError,
)
from .schema import FORMAT_VERSION  # noqa: E402

# The rest is imported at first use (PEP 562), so a command that only writes (``trace record``)
# or only names an error does not import the reader, JSONL or pyarrow.compute.
_LAZY = {
    "DataFile": "arrowio",
    "ImportSummary": "jsonl", "export_jsonl": "jsonl", "import_jsonl": "jsonl",
    "TraceMetadata": "metadata",
    "TensorStats": "stats", "compute_stats": "stats", "digest": "payload",
    "PartInfo": "parts",
    "StepView": "reader", "TraceReader": "reader",
    "TraceWriter": "writer", "WriteSummary": "writer",
}

if TYPE_CHECKING:
    from .arrowio import DataFile
    from .jsonl import ImportSummary, export_jsonl, import_jsonl
    from .metadata import TraceMetadata
    from .parts import PartInfo
    from .payload import digest
    from .reader import StepView, TraceReader
    from .stats import TensorStats, compute_stats
    from .writer import TraceWriter, WriteSummary


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "DataFile",
    "FORMAT_VERSION",
    "ImportSummary",
    "JsonlError",
    "PartInfo",
    "StepView",
    "TensorStats",
    "TraceCorruptError",
    "TraceError",
    "TraceExistsError",
    "TraceFormatError",
    "TraceMetadata",
    "TraceNotFoundError",
    "TraceReader",
    "TraceUsageError",
    "TraceVersionError",
    "TraceWriteError",
    "TraceWriter",
    "UnsupportedDtypeError",
    "ValuesNotRecordedError",
    "WriteSummary",
    "compute_stats",
    "digest",
    "export_jsonl",
    "import_jsonl",
    "__version__",
]
