"""differ: aligns and compares traces (never live models) — verdicts, first divergence, culprit.

Layer rule: differ imports tracefmt only (never recorders/ or tui/, never a framework).

    from steptrace.differ import diff, DiffOptions, load_policy
    report = diff("ref.trace", ["cand.trace"], DiffOptions(align="resync"))
    print(report.verdict, report.worst.first_divergence)
    json_text = report.dumps()
"""

from .corpus import diff, diff_paths
from .errors import AlignmentError, DiffFormatError, IncompatibleTracesError, MappingError, PolicyError
from .mapping import NameMapping, guess_mapping, load_mapping
from .metrics import TensorMetrics, compare_values
from .pair import DiffOptions
from .policy import DecisionTolerance, Policy, TensorTolerance, load_policy, parse_policy
from .report import (
    SCHEMA,
    CrossCheck,
    Culprit,
    DiffReport,
    DriftOnset,
    FirstDivergence,
    NearTieEvidence,
    PairReport,
    SampleResult,
    TraceInfo,
    WatchedToken,
)
from .reportjson import load_report, report_from_json
from .verdict import VERDICTS

__all__ = [
    "SCHEMA",
    "VERDICTS",
    "AlignmentError",
    "CrossCheck",
    "Culprit",
    "DecisionTolerance",
    "DiffFormatError",
    "DiffOptions",
    "DiffReport",
    "DriftOnset",
    "FirstDivergence",
    "IncompatibleTracesError",
    "MappingError",
    "NameMapping",
    "NearTieEvidence",
    "PairReport",
    "Policy",
    "PolicyError",
    "SampleResult",
    "TensorMetrics",
    "TensorTolerance",
    "TraceInfo",
    "WatchedToken",
    "compare_values",
    "diff",
    "diff_paths",
    "guess_mapping",
    "load_mapping",
    "load_policy",
    "load_report",
    "parse_policy",
    "report_from_json",
]
