"""Export the tiny LM to the two ONNX graphs the demo decodes with, plus ``vocab.json``.

- ``full.onnx``: ``ids [B, T] -> logits [B, T, V]`` (full recompute; dynamic T).
- ``step.onnx``: ``ids [B, T]`` + ``past_key_{i}``/``past_value_{i}`` ``[B, H, P, Dh]`` per layer ->
  ``logits [B, T, V]`` + ``present_key_{i}``/``present_value_{i}`` ``[B, H, P + T, Dh]``. A zero-length
  past (P = 0) with the whole prompt is the prefill; then one id per call.

TorchScript-based export (``dynamo=False``), opset 17, constant folding on: node outputs keep
module-scoped names (``/layers.0/attn/MatMul_output_0``) and MatMul initializers keep the
parameter names, so :func:`model.load_from_onnx` can rebuild the torch model from either file.

    python examples/tiny_lm/export.py --from-onnx assets/tiny_lm/full.onnx --out /tmp/lm
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import onnx
import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.tiny_lm import data
from examples.tiny_lm.model import TinyLM, load_from_onnx

OPSET = 17


class FullGraph(TinyLM):
    """The LM with a logits-only forward (no cache outputs), for ``full.onnx``."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Logits for every position of ``ids``."""
        return super().forward(ids)[0]


class StepGraph(TinyLM):
    """The LM with a flat cache signature, for ``step.onnx``."""

    def forward(self, ids: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        """``(logits, present_key_0, present_value_0, ...)`` from ``ids`` and the flat past."""
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, present = super().forward(ids, pairs)
        return (logits, *[t for kv in present for t in kv])


def _as(cls: type[TinyLM], model: TinyLM) -> TinyLM:
    """A copy of ``model``'s weights in a graph-shaped subclass (same parameter names)."""
    graph = cls(model.cfg)
    graph.load_state_dict(model.state_dict())
    return graph.eval()


def _stamp(path: Path, model: TinyLM, graph: str) -> None:
    """Check the exported file and record the vocabulary and config in its metadata."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    meta = {"steptrace.tiny_lm.graph": graph, "steptrace.tiny_lm.config": json.dumps(model.cfg.to_dict()),
            "steptrace.tiny_lm.eos_id": str(data.EOS_ID)}
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    proto.producer_name = "steptrace examples/tiny_lm/export.py"
    onnx.save(proto, str(path))


def export_all(model: TinyLM, out: Path) -> dict[str, Path]:
    """Write ``full.onnx``, ``step.onnx`` and ``vocab.json`` for ``model`` into ``out``.

    Returns:
        The written paths by name.
    """
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    names = [f"{kind}_{i}" for i in range(cfg.n_layers) for kind in ("key", "value")]
    ids = torch.tensor([data.encode("\nThe ")], dtype=torch.int64)
    paths = {"full": out / "full.onnx", "step": out / "step.onnx", "vocab": out / "vocab.json"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            _as(FullGraph, model), (ids,), str(paths["full"]), dynamo=False, opset_version=OPSET,
            input_names=["ids"], output_names=["logits"],
            dynamic_axes={"ids": {0: "batch", 1: "T"}, "logits": {0: "batch", 1: "T"}},
        )
        past = [t for kv in model.empty_cache() for t in kv]
        torch.onnx.export(
            _as(StepGraph, model), (ids, *past), str(paths["step"]), dynamo=False, opset_version=OPSET,
            input_names=["ids", *[f"past_{n}" for n in names]],
            output_names=["logits", *[f"present_{n}" for n in names]],
            dynamic_axes={
                "ids": {0: "batch", 1: "T"}, "logits": {0: "batch", 1: "T"},
                **{f"past_{n}": {0: "batch", 2: "past"} for n in names},
                **{f"present_{n}": {0: "batch", 2: "total"} for n in names},
            },
        )
    _stamp(paths["full"], model, "full")
    _stamp(paths["step"], model, "step")
    vocab = {"tokens": data.VOCAB, "eos_id": data.EOS_ID, "eos_piece": data.EOS_CHAR, "config": cfg.to_dict(),
             "note": "character vocabulary: id 0 is newline (end of sentence, also the BOS a prompt starts with)"}
    paths["vocab"].write_text(json.dumps(vocab, indent=1) + "\n")
    return paths


def main(argv: list[str] | None = None) -> None:
    """Command line: re-export from an existing ONNX file's weights (no training, no pickle)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-onnx", type=Path, required=True, help="full.onnx or step.onnx to take the weights from")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    for name, path in export_all(load_from_onnx(args.from_onnx), args.out).items():
        print(f"{name}: {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
