"""tracefmt: the steptrace trace format v1 (see SPEC.md) — writer, reader, errors, interchange.

Layer rule: tracefmt imports no other steptrace layer.
"""

from .. import __version__  # noqa: E402  (the package version, one source: steptrace/__init__.py)

from .arrowio import DataFile  # noqa: E402
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
from .jsonl import ImportSummary, export_jsonl, import_jsonl  # noqa: E402
from .metadata import TraceMetadata  # noqa: E402
from .payload import digest  # noqa: E402
from .parts import PartInfo  # noqa: E402
from .reader import StepView, TraceReader  # noqa: E402
from .schema import FORMAT_VERSION  # noqa: E402
from .stats import TensorStats, compute_stats  # noqa: E402
from .writer import TraceWriter, WriteSummary  # noqa: E402

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
