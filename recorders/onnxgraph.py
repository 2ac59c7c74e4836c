"""ONNX graph bookkeeping over protos the caller has loaded: execution (topological) order, the
node that produces each value, the values computed from constants alone, the values an exposure
pattern selects, graph cuts for transplant, and a model's precision.

Imports no onnx: it reads and edits the protos' fields, and the enum values it compares are the
ONNX IR's (``onnx.proto``: ``TensorProto.DataType``, ``AttributeProto.AttributeType``), fixed by
the format. :mod:`steptrace.recorders.onnxruntime` loads, infers types, saves and runs.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from steptrace.tracefmt.errors import UnsupportedDtypeError

from .errors import RecorderUsageError

__all__ = ["CUT_SUFFIX", "META_EXPOSED", "META_SKIPPED", "check_recordable", "constant_values", "cut_graph",
           "precision", "producers", "select_exposed", "set_metadata", "topological"]

#: ``TensorProto.DataType`` values (onnx.proto).
UNDEFINED, FLOAT, FLOAT16, DOUBLE, BFLOAT16 = 0, 1, 10, 11, 16
#: ``AttributeProto.AttributeType`` values of subgraph attributes (onnx.proto).
ATTR_GRAPH, ATTR_GRAPHS = 5, 10

#: ``metadata_props`` keys of an exposed model: the exposed names, and the skipped ones with why.
META_EXPOSED = "steptrace.exposed"
META_SKIPPED = "steptrace.exposure_skipped"
#: The suffix a cut gives the producing node's own output (computed, read by nobody).
CUT_SUFFIX = "/steptrace.own"

_QUANT_OPS = {"MatMulInteger", "ConvInteger", "QLinearMatMul", "QLinearConv", "DynamicQuantizeLinear",
              "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeMatMul", "MatMulNBits"}
_RANDOM = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial",
                     "Bernoulli", "Dropout"})
_PRECISIONS = {FLOAT: "fp32", FLOAT16: "fp16", BFLOAT16: "bf16", DOUBLE: "fp64"}


def topological(nodes: Sequence[Any], inputs: set[str]) -> list[Any]:
    """Return nodes in a topological order, stable for graphs already sorted (as ONNX requires).

    Args:
        nodes: ``NodeProto`` objects.
        inputs: the values available before any node runs (graph inputs, initializers).

    Returns:
        The nodes; those of a cycle keep the file's order, after the rest.
    """
    produced = {o for n in nodes for o in n.output if o}
    ready = set(inputs)
    pending, out = list(nodes), []
    while pending:
        rest = []
        for n in pending:
            if all(not i or i in ready or i not in produced for i in n.input):
                out.append(n)
                ready.update(o for o in n.output if o)
            else:
                rest.append(n)
        if len(rest) == len(pending):  # a cycle: keep the file's order for the rest
            out.extend(rest)
            break
        pending = rest
    return out


def producers(graph: Any) -> dict[str, tuple[int, str]]:
    """Return value name -> (topological index, source) for every node output and graph input.

    Args:
        graph: a ``GraphProto``.

    Returns:
        The mapping; graph inputs (``"graph input"``) and initializers (``"initializer"``) at
        index -1, node outputs as ``"<node name> (<op type>)"``.
    """
    found = {i.name: (-1, "graph input") for i in graph.input}
    found.update({t.name: (-1, "initializer") for t in graph.initializer})
    for idx, n in enumerate(topological(graph.node, set(found))):
        src = f"{n.name} ({n.op_type})" if n.name else n.op_type
        found.update({o: (idx, src) for o in n.output if o})
    return found


def constant_values(graph: Any) -> set[str]:
    """Return the names of the values a graph computes from constants alone: ``Constant`` node
    outputs and outputs of deterministic nodes (with at least one input and no subgraph) whose
    every input is an initializer (not overridable as a graph input) or one of these values.

    Args:
        graph: a ``GraphProto``.
    """
    known = {t.name for t in graph.initializer} - {i.name for i in graph.input}
    found: set[str] = set()
    for node in topological(graph.node, {i.name for i in graph.input} | known):
        ins = [i for i in node.input if i]
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            constant = True
        elif not ins or node.op_type in _RANDOM or any(a.type in (ATTR_GRAPH, ATTR_GRAPHS) for a in node.attribute):
            constant = False
        else:
            constant = all(i in known or i in found for i in ins)
        if constant:
            found.update(o for o in node.output if o)
    return found


def select_exposed(
    graph: Any, types: Mapping[str, Any], patterns: Sequence[str], *, constants: bool
) -> tuple[list[str], dict[str, str], set[str]]:
    """Append the node outputs ``patterns`` select to ``graph``'s outputs (the selection of
    :func:`recorders.onnxruntime.expose_intermediates`, whose docs give the rules).

    Args:
        graph: the ``GraphProto`` to edit.
        types: value name -> inferred ``ValueInfoProto``.
        patterns: globs over value names and node names.
        constants: select constant values too.

    Returns:
        ``(names, skipped, constants)``: the exposed names in topological order (graph outputs
        already there included), value name -> why it was not exposed, and the constant values
        left out (empty with ``constants=True``).

    Raises:
        RecorderUsageError: the patterns match nothing, or only constants.
    """
    outputs = {o.name for o in graph.output}
    names, skipped, seen = [], {}, set()
    fixed = set() if constants else constant_values(graph)
    for node in topological(graph.node, {i.name for i in graph.input} | {t.name for t in graph.initializer}):
        by_node = any(fnmatch.fnmatchcase(node.name, p) for p in patterns) if node.name else False
        for value in node.output:
            if not value or value in seen or not (by_node or any(fnmatch.fnmatchcase(value, p) for p in patterns)):
                continue
            seen.add(value)
            if value in outputs:
                names.append(value)
                continue
            if value in fixed:
                what = ("a Constant node's output" if node.op_type == "Constant"
                        else f"{node.op_type} of initializers or constants")
                skipped[value] = f"constant: {what} (constants=True exposes it)"
                continue
            vi = types.get(value)
            kind = vi.type.WhichOneof("value") if vi is not None else None
            if kind != "tensor_type" or vi.type.tensor_type.elem_type == UNDEFINED:
                skipped[value] = (f"{node.op_type} output is a {kind}, not a tensor" if kind and kind != "tensor_type"
                                  else f"no type could be inferred for this {node.op_type} output")
                continue
            graph.output.append(vi)
            names.append(value)
    if not names and not skipped:
        sample = [o for n in graph.node[:8] for o in n.output if o]
        raise RecorderUsageError(f"pattern(s) {', '.join(map(repr, patterns))} match no node output or node name; "
                                 f"values are named like {', '.join(sample[:6]) or '(empty graph)'}")
    if not names and all(k in fixed for k in skipped):
        raise RecorderUsageError(f"pattern(s) {', '.join(map(repr, patterns))} match only constants ({len(skipped)}: "
                                 f"{', '.join(list(skipped)[:6])}); pass constants=True to expose them")
    return names, skipped, fixed


def set_metadata(model: Any, items: Iterable[tuple[str, str]]) -> None:
    """Set ``metadata_props`` entries of a ``ModelProto`` (replacing those of the same key).

    Args:
        model: the ``ModelProto`` to edit.
        items: ``(key, value)`` pairs.
    """
    props = {p.key: p for p in model.metadata_props}
    for key, val in items:
        entry = props[key] if key in props else model.metadata_props.add()
        entry.key, entry.value = key, val


def cut_graph(graph: Any, types: Mapping[str, Any], names: Sequence[str]) -> None:
    """Cut ``graph`` at ``names`` (the cut of :func:`recorders.onnxruntime.cut_model`): each value
    becomes a graph input, and its producing node's output is renamed ``<name>/steptrace.own``.

    Args:
        graph: the ``GraphProto`` to edit.
        types: value name -> inferred ``ValueInfoProto``.
        names: the values to cut at.

    Raises:
        RecorderUsageError: a name that is not a node output of the graph, or whose type is unknown.
    """
    produced = {o: n for n in graph.node for o in n.output if o}
    inputs = {i.name for i in graph.input}
    for name in names:
        node = produced.get(name)
        if node is None:
            hint = "a graph input needs no cut: feed it" if name in inputs else "it is no node output of the graph"
            raise RecorderUsageError(f"cannot transplant ONNX value {name!r}: {hint}")
        vi = types.get(name)
        if vi is None or vi.type.WhichOneof("value") != "tensor_type":
            raise RecorderUsageError(f"cannot transplant ONNX value {name!r}: no tensor type can be inferred for it")
        node.output[list(node.output).index(name)] = name + CUT_SUFFIX
        new = graph.input.add()
        new.CopyFrom(vi)


def precision(graph: Any) -> str:
    """Return ``fp32`` / ``fp16`` / ``bf16`` / ``fp64`` / ``int8`` from a graph's ops and the
    element counts of its initializers' types.

    Args:
        graph: a ``GraphProto``.
    """
    if any(n.op_type in _QUANT_OPS for n in graph.node):
        return "int8"
    counts: dict[int, int] = {}
    for t in graph.initializer:
        if t.data_type in _PRECISIONS:
            counts[t.data_type] = counts.get(t.data_type, 0) + int(np.prod(t.dims, dtype=np.int64))
    return _PRECISIONS[max(counts, key=counts.__getitem__)] if counts else "fp32"


def check_recordable(name: str, value: np.ndarray) -> None:
    """Refuse an ONNX value of a dtype steptrace cannot record (strings, objects, complex).

    Args:
        name: the value's name, for the message.
        value: the value.

    Raises:
        UnsupportedDtypeError: such a dtype.
    """
    if value.dtype.kind in "OUSVc":
        raise UnsupportedDtypeError(f"ONNX value {name!r} is a {value.dtype} tensor, which steptrace cannot record; "
                                    f"leave it out of the capture policy (e.g. {{{name!r}: 'none', '*': 'stats'}})")
