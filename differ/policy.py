"""Tolerance policy: what counts as "the same" for decisions and tensors.

A policy has two halves. **Decisions**: the near-tie threshold ε (a token flip whose two tokens
are within ε of each other on both sides is a ``flip``, not a ``divergent`` step) and the logit
tolerance beyond which a step with the same token is ``drift``. **Tensors**: per-name rules
(fnmatch globs) and per-dtype defaults of elementwise ``atol``/``rtol`` and optional caps on
other metrics. Defaults come from the dtype's number grid; docs/differ.md justifies them.

Policies are read from TOML (``tomllib``, never executed) and can be overridden from the CLI.
"""

from __future__ import annotations

import fnmatch
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import PolicyError

#: Significand bits (with the implicit bit) of each floating dtype: the logit/tensor grid.
SIGNIFICAND_BITS = {"float64": 53, "float32": 24, "float16": 11, "bfloat16": 8}

#: Manifest ``precision`` strings -> the dtype whose grid their logits live on. Quantised
#: precisions use the bfloat16 grid: 8 significant bits, an 8-bit quantiser's resolution.
PRECISION_GRID = {
    "fp64": "float64", "float64": "float64", "double": "float64",
    "fp32": "float32", "float32": "float32", "float": "float32", "tf32": "float16",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "int8": "bfloat16", "q8": "bfloat16", "w8a8": "bfloat16", "w8a16": "bfloat16", "fp8": "bfloat16",
    "int4": "bfloat16", "q4": "bfloat16", "w4a16": "bfloat16", "nf4": "bfloat16",
}

#: Default near-tie threshold in units in the last place of the logits' dtype.
DEFAULT_EPSILON_ULPS = 4.0
#: A swap whose two gaps are both within this fraction of the step's logit scale is a coin toss
#: (0.5 %: about one bfloat16 ulp relative to the logits' magnitude).
DEFAULT_COIN_TOSS = 5e-3
#: The pair's logit noise is this percentile of the per-step noise on agreeing steps.
DEFAULT_NOISE_PERCENTILE = 90.0
#: No shift beyond this many logits (nats) is explained by noise, however noisy the pair.
DEFAULT_NOISE_CAP = 1.0
#: Agreeing steps a head needs before its measured noise counts as evidence.
MIN_NOISE_STEPS = 10
#: Default elementwise tensor tolerance, in ulps of 1.0 of the tensor's dtype (atol and rtol).
DEFAULT_TENSOR_ULPS = 32.0


def grid_dtype(precision: str | None, *dtypes: str | None) -> str:
    """Return the floating dtype whose grid a trace's logits were computed on.

    The grid comes from the precision of the computation, not from the container: it is the
    coarser of the manifest's ``precision`` (float32 when unknown) and every dtype given (the
    manifest's ``logits_dtype``, a recorded ``logits:<head>`` tensor's dtype). A float64
    container (JSON numbers, a widened copy) therefore never makes the grid finer than float32,
    and recording more tensors never changes it.

    Args:
        precision: the manifest's ``precision`` (``fp32``, ``fp16``, ``q8``, ...), or None.
        *dtypes: further evidence of the logits' dtype; None and non-float names are ignored.

    Returns:
        One of ``float32``, ``float16``, ``bfloat16``, or ``float64`` only when ``precision``
        says so and nothing coarser is known.
    """
    grid = PRECISION_GRID.get(precision.strip().lower(), "float32") if precision else "float32"
    for dt in dtypes:
        if dt in SIGNIFICAND_BITS:
            grid = coarser(grid, dt)
    return grid


def coarser(a: str, b: str) -> str:
    """Return whichever of two float dtypes has the coarser grid (fewer significand bits)."""
    return a if SIGNIFICAND_BITS.get(a, 24) <= SIGNIFICAND_BITS.get(b, 24) else b


def ulp(dtype: str, magnitude: np.ndarray | float) -> np.ndarray:
    """Return the spacing of ``dtype``'s grid at ``magnitude`` (floored at 1.0), vectorised.

    ``ulp("bfloat16", 16) == 0.125``, ``ulp("float16", 16) == 2**-6``, ``ulp("float32", 1) == 2**-23``.
    """
    p = SIGNIFICAND_BITS.get(dtype, 24)
    m = np.maximum(np.abs(np.asarray(magnitude, dtype=np.float64)), 1.0)
    m = np.where(np.isfinite(m), m, 1.0)
    return np.ldexp(1.0, (np.floor(np.log2(m)) - (p - 1)).astype(np.int64))


@dataclass(frozen=True)
class DecisionTolerance:
    """Thresholds for comparing two decisions of one head.

    Attributes:
        epsilon: a fixed near-tie threshold in logits: when set, a flip is a near tie exactly
            when both gaps are within it (no other rule applies). None = the evidence rule of
            docs/differ.md §4: grid, coin toss, or the pair's measured noise.
        epsilon_ulps: the grid rule's threshold, in ulps of the logits' grid at the magnitude
            of the two competing logits (per step).
        coin_toss: the coin-toss rule's threshold, as a fraction of the step's logit scale.
        noise_percentile: which percentile of the per-step noise on agreeing steps is the
            pair's noise.
        noise_cap: the largest shift (logits) the noise rule may explain.
        logit_atol: largest change of a shared top-k logit (and of logsumexp) for a step with the
            same token to stay ``equivalent``; None = the grid's tensor default (32 ulps of 1.0).
        logit_rtol: plus ``logit_rtol * |logit|``; None = the same grid default.
    """

    epsilon: float | None = None
    epsilon_ulps: float = DEFAULT_EPSILON_ULPS
    logit_atol: float | None = None
    logit_rtol: float | None = None
    coin_toss: float = DEFAULT_COIN_TOSS
    noise_percentile: float = DEFAULT_NOISE_PERCENTILE
    noise_cap: float = DEFAULT_NOISE_CAP

    def logit_tolerance(self, dtype: str, magnitude: np.ndarray) -> np.ndarray:
        """Return the per-step logit drift tolerance ``atol + rtol * |logit|``."""
        d = default_tensor_tolerance(dtype)
        atol = d.atol if self.logit_atol is None else self.logit_atol
        rtol = d.rtol if self.logit_rtol is None else self.logit_rtol
        return atol + rtol * np.asarray(magnitude, dtype=np.float64)

    def epsilons(self, dtype: str, magnitude: np.ndarray) -> np.ndarray:
        """Return the per-step near-tie threshold for logits of ``magnitude`` on ``dtype``'s grid."""
        if self.epsilon is not None:
            return np.full(np.shape(magnitude), float(self.epsilon))
        return self.epsilon_ulps * ulp(dtype, magnitude)


@dataclass(frozen=True)
class TensorTolerance:
    """Thresholds for one tensor comparison.

    A tensor is within tolerance when at most ``bad_fraction`` of its elements break
    ``|a - b| <= atol + rtol * |a|`` (a = reference), NaN/Inf sit at the same places (and
    ``nan_equal`` allows NaN there), and every optional cap that is set holds.
    """

    atol: float = 0.0
    rtol: float = 0.0
    bad_fraction: float = 0.0
    max_abs: float | None = None
    mean_abs: float | None = None
    cosine_min: float | None = None
    sqnr_db_min: float | None = None
    nan_equal: bool = False
    skip: bool = False

    def to_json(self) -> dict[str, Any]:
        """Return the thresholds as a JSON object."""
        return asdict(self)


_TENSOR_KEYS = {f.name: f.type for f in fields(TensorTolerance)}
_DECISION_KEYS = {f.name for f in fields(DecisionTolerance)}


def default_tensor_tolerance(dtype: str) -> TensorTolerance:
    """Return the built-in tolerance for a tensor of ``dtype``.

    Floats: ``atol = rtol = 32 ulps of 1.0`` of the dtype (float32 3.8e-6, float16 0.031,
    bfloat16 0.25, float64 7.1e-15). Integers and bool: exact.
    """
    p = SIGNIFICAND_BITS.get(dtype)
    if p is None:
        return TensorTolerance()
    t = DEFAULT_TENSOR_ULPS * math.ldexp(1.0, -(p - 1))
    return TensorTolerance(atol=t, rtol=t)


def _check_tensor_keys(d: Mapping[str, Any], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if k == "name":
            continue
        if k not in _TENSOR_KEYS:
            raise PolicyError(f"{where}: unknown key {k!r}; tensor keys are {', '.join(sorted(_TENSOR_KEYS))}")
        if k in ("nan_equal", "skip"):
            if not isinstance(v, bool):
                raise PolicyError(f"{where}: {k} must be true or false, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            raise PolicyError(f"{where}: {k} must be a number, got {v!r}")
        elif k in ("atol", "rtol", "bad_fraction", "max_abs", "mean_abs") and v < 0:
            raise PolicyError(f"{where}: {k} must be >= 0, got {v!r}")
        out[k] = float(v) if not isinstance(v, bool) else v
    return out


def _decision_tolerance(d: Mapping[str, Any], where: str, base: DecisionTolerance) -> DecisionTolerance:
    kw: dict[str, Any] = {}
    for k, v in d.items():
        if k == "heads":
            continue
        if k not in _DECISION_KEYS:
            raise PolicyError(f"{where}: unknown key {k!r}; decision keys are {', '.join(sorted(_DECISION_KEYS))}")
        if v == "auto" and k in ("epsilon", "logit_atol", "logit_rtol"):
            kw[k] = None
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise PolicyError(f"{where}: {k} must be a number >= 0 (or \"auto\"), got {v!r}")
        if k == "noise_percentile" and v > 100:
            raise PolicyError(f"{where}: noise_percentile must be between 0 and 100, got {v!r}")
        kw[k] = float(v)
    return replace(base, **kw)


@dataclass
class Policy:
    """A complete tolerance policy.

    Attributes:
        decisions: thresholds for every head without its own entry.
        heads: per-head decision thresholds (``{"duration": DecisionTolerance(epsilon=0.5)}``).
        dtype_defaults: per-dtype tensor keys overriding the built-in defaults.
        rules: ``(glob, keys)`` pairs, applied in order; a later rule's keys override earlier ones.
        source: where the policy came from (a path, or ``"built-in"``).
    """

    decisions: DecisionTolerance = field(default_factory=DecisionTolerance)
    heads: dict[str, DecisionTolerance] = field(default_factory=dict)
    dtype_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    rules: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    source: str = "built-in"

    def __post_init__(self) -> None:
        self._cache: dict[tuple[str, str], TensorTolerance] = {}

    def for_head(self, head: str) -> DecisionTolerance:
        """Return the decision thresholds of ``head``."""
        return self.heads.get(head, self.decisions)

    def tensor(self, name: str, dtype: str) -> TensorTolerance:
        """Return the tolerance for tensor ``name`` of ``dtype`` (cached).

        Built-in dtype default, then ``[tensors.dtype.<dtype>]``, then every matching rule in
        order.
        """
        key = (name, dtype)
        tol = self._cache.get(key)
        if tol is None:
            kw = dict(self.dtype_defaults.get(dtype, {}))
            for glob, keys in self.rules:
                if fnmatch.fnmatchcase(name, glob):
                    kw.update(keys)
            tol = replace(default_tensor_tolerance(dtype), **kw)
            self._cache[key] = tol
        return tol

    def with_overrides(
        self,
        *,
        epsilon: float | None = None,
        tensor: Mapping[str, Any] | None = None,
        rules: list[tuple[str, dict[str, Any]]] | None = None,
    ) -> Policy:
        """Return a copy with command-line overrides on top.

        Args:
            epsilon: near-tie threshold for every head.
            tensor: tensor keys applied to every tensor, above every rule (``{"atol": 1e-3}``).
            rules: extra ``(glob, keys)`` rules appended after the file's rules.

        Raises:
            PolicyError: a key or value is invalid.
        """
        new_rules = list(self.rules)
        for glob, keys in rules or []:
            new_rules.append((glob, _check_tensor_keys(keys, f"override {glob!r}")))
        if tensor:
            new_rules.append(("*", _check_tensor_keys(tensor, "command-line tolerance")))
        decisions, heads = self.decisions, dict(self.heads)
        if epsilon is not None:
            if not math.isfinite(epsilon) or epsilon < 0:
                raise PolicyError(f"--epsilon must be a number >= 0, got {epsilon!r}")
            decisions = replace(decisions, epsilon=float(epsilon))
            heads = {h: replace(t, epsilon=float(epsilon)) for h, t in heads.items()}
        return Policy(decisions, heads, dict(self.dtype_defaults), new_rules, self.source)

    def to_json(self) -> dict[str, Any]:
        """Return the policy as a JSON object (the report records which policy judged it)."""
        return {
            "source": self.source,
            "decisions": asdict(self.decisions),
            "heads": {h: asdict(t) for h, t in sorted(self.heads.items())},
            "dtype_defaults": self.dtype_defaults,
            "rules": [{"name": g, **k} for g, k in self.rules],
        }


def parse_policy(doc: Mapping[str, Any], source: str = "<policy>") -> Policy:
    """Build a :class:`Policy` from a parsed TOML document (layout in docs/differ.md).

    Raises:
        PolicyError: unknown sections or keys, or values of the wrong type.
    """
    unknown = set(doc) - {"decisions", "tensors"}
    if unknown:
        raise PolicyError(f"{source}: unknown section(s) {', '.join(sorted(unknown))}; use [decisions] and [tensors]")
    dsec = doc.get("decisions", {})
    if not isinstance(dsec, Mapping):
        raise PolicyError(f"{source}: [decisions] must be a table")
    decisions = _decision_tolerance(dsec, f"{source} [decisions]", DecisionTolerance())
    heads_doc = dsec.get("heads", {})
    if not isinstance(heads_doc, Mapping):
        raise PolicyError(f"{source}: [decisions.heads] must be a table of tables")
    heads = {}
    for h, hd in heads_doc.items():
        if not isinstance(hd, Mapping):
            raise PolicyError(f"{source}: [decisions.heads.{h}] must be a table")
        heads[h] = _decision_tolerance(hd, f"{source} [decisions.heads.{h}]", decisions)
    tsec = doc.get("tensors", {})
    if not isinstance(tsec, Mapping):
        raise PolicyError(f"{source}: [tensors] must be a table")
    rules: list[tuple[str, dict[str, Any]]] = []
    top = {k: v for k, v in tsec.items() if k not in ("dtype", "rule")}
    if top:
        rules.append(("*", _check_tensor_keys(top, f"{source} [tensors]")))
    dtype_defaults = {}
    dsec2 = tsec.get("dtype", {})
    if not isinstance(dsec2, Mapping):
        raise PolicyError(f"{source}: [tensors.dtype] must be a table of tables")
    for dt, keys in dsec2.items():
        if not isinstance(keys, Mapping):
            raise PolicyError(f"{source}: [tensors.dtype.{dt}] must be a table")
        dtype_defaults[dt] = _check_tensor_keys(keys, f"{source} [tensors.dtype.{dt}]")
    rule_list = tsec.get("rule", [])
    if not isinstance(rule_list, list):
        raise PolicyError(f"{source}: rules are written [[tensors.rule]] (an array of tables)")
    for i, r in enumerate(rule_list):
        where = f"{source} [[tensors.rule]] #{i + 1}"
        if not isinstance(r, Mapping) or not isinstance(r.get("name"), str) or not r["name"]:
            raise PolicyError(f"{where}: every rule needs name = \"GLOB\"")
        rules.append((r["name"], _check_tensor_keys(r, where)))
    return Policy(decisions, heads, dtype_defaults, rules, source)


def load_policy(path: str | Path) -> Policy:
    """Read a TOML tolerance policy.

    Raises:
        PolicyError: the file cannot be read, is not TOML, or holds unknown keys.
    """
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PolicyError(f"policy file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"policy file {p} cannot be read ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"policy file {p} is not valid TOML: {exc}") from None
    return parse_policy(doc, str(p))


def parse_override(text: str) -> tuple[str, dict[str, Any]]:
    """Parse a command-line rule ``GLOB:key=value[,key=value...]`` (``"encoder.*:atol=1e-3"``).

    Raises:
        PolicyError: malformed text.
    """
    glob, sep, rest = text.rpartition(":")
    if not sep or not glob or not rest:
        raise PolicyError(f"--tol {text!r}: write GLOB:key=value[,key=value], e.g. 'encoder.*:atol=1e-3,rtol=1e-3'")
    keys: dict[str, Any] = {}
    for item in rest.split(","):
        k, eq, v = item.partition("=")
        k = k.strip()
        if not eq:
            raise PolicyError(f"--tol {text!r}: {item!r} is not key=value")
        v = v.strip()
        if v.lower() in ("true", "false"):
            keys[k] = v.lower() == "true"
        else:
            try:
                keys[k] = float(v)
            except ValueError:
                raise PolicyError(f"--tol {text!r}: {v!r} is not a number") from None
    return glob, _check_tensor_keys(keys, f"--tol {text!r}")
