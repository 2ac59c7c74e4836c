"""Real tiny models that write traces through tracefmt.TraceWriter, for the differ's tests.

A GRU-cell language model decoded greedily in torch (forward hooks record module outputs per
step), the same model exported to ONNX and decoded in ONNX Runtime (intermediates exposed as
graph outputs, recorded under their ONNX names), and bug injection through hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from steptrace.tracefmt import TraceWriter

V, H, EOS = 32, 16, 3
VOCAB = [f"▁w{i}" for i in range(V)]
VOCAB[EOS] = "</s>"
MODULES = ("emb", "cell", "mid", "act", "head")


class StepLM(nn.Module):
    """One decode step: token, hidden -> logits, hidden."""

    def __init__(self, seed: int = 0, eos_bias: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(V, H)
        self.cell = nn.GRUCell(H, H)
        self.mid = nn.Linear(H, H)
        self.act = nn.Tanh()
        self.head = nn.Linear(H, V)
        with torch.no_grad():
            self.head.weight.mul_(3.0)
            self.head.bias[EOS] += eos_bias

    def forward(self, tok: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h2 = self.cell(self.emb(tok), h)
        return self.head(self.act(self.mid(h2))), h2


Hook = Callable[[str, int, str, torch.Tensor], torch.Tensor | None]


def decode_torch(model: StepLM, w: TraceWriter, sample: str, prompt: int, steps: int, *,
                 hook: Hook | None = None, logit_bias: Callable[[str, int], np.ndarray | None] | None = None,
                 force: list[int] | None = None, stop_at_eos: bool = True, record_tensors: bool = True) -> list[int]:
    """Greedy decode; record decisions (k=8, watched eos) and module outputs per step.

    Args:
        hook: ``hook(sample, step, module, output)`` may return a replacement output (a bug).
        logit_bias: ``logit_bias(sample, step)`` added to the logits before deciding.
        force: tokens to feed instead of the argmax (teacher forcing; recorded as forced).
    """
    state = {"step": 0}
    handles = []
    for name in MODULES:
        mod = getattr(model, name)

        def fn(m: nn.Module, inp: tuple, out: torch.Tensor, name: str = name) -> torch.Tensor | None:
            new = hook(sample, state["step"], name, out) if hook else None
            out2 = out if new is None else new
            if record_tensors:
                w.add_tensor(sample, state["step"], name, out2.detach().numpy(), source=type(m).__name__)
            return new

        handles.append(mod.register_forward_hook(fn))
    toks = []
    try:
        tok, h = torch.tensor([prompt]), torch.zeros(1, H)
        with torch.no_grad():
            for step in range(steps):
                state["step"] = step
                logits, h = model(tok, h)
                x = logits[0].numpy().astype(np.float32)
                if logit_bias is not None:
                    b = logit_bias(sample, step)
                    if b is not None:
                        x = (x + b).astype(np.float32)
                forced = force is not None and step < len(force)
                chosen = w.add_logits(sample, step, x, k=8, chosen=force[step] if forced else None, forced=forced,
                                      piece=None)
                toks.append(chosen)
                if stop_at_eos and chosen == EOS:
                    break
                tok = torch.tensor([chosen])
    finally:
        for hd in handles:
            hd.remove()
    return toks


def writer(path: Path, **meta: object) -> TraceWriter:
    """A writer with the test vocabulary and eos watched."""
    md = {"runtime": "torch", "precision": "fp32", "watched": {"eos": EOS}}
    md.update(meta)
    return TraceWriter(path, metadata=md, vocab=VOCAB)


def export_onnx(model: StepLM, path: Path) -> dict[str, str]:
    """Export the step to ONNX with every node output exposed; return module -> ONNX value name."""
    import onnx

    tok, h = torch.tensor([1]), torch.zeros(1, H)
    torch.onnx.export(model, (tok, h), str(path), input_names=["tok", "h"], output_names=["logits", "h_out"],
                      dynamo=False, opset_version=17)
    m = onnx.load(str(path))
    names = {}
    for node in m.graph.node:
        if node.op_type == "Gather" and "emb" in node.name:
            names["emb"] = node.output[0]
        if node.op_type == "Gemm" and "mid" in node.name:
            names["mid"] = node.output[0]
        if node.op_type == "Tanh" and "act" in node.name:
            names["act"] = node.output[0]
    names["cell"], names["head"] = "h_out", "logits"
    m = onnx.shape_inference.infer_shapes(m)
    have = {o.name for o in m.graph.output}
    for vi in m.graph.value_info:
        if vi.name in names.values() and vi.name not in have:
            m.graph.output.append(vi)
    onnx.save(m, str(path))
    return names


def decode_ort(onnx_path: Path, names: dict[str, str], w: TraceWriter, sample: str, prompt: int, steps: int) -> list[int]:
    """Greedy decode in ONNX Runtime; record the exposed values under their ONNX names."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    outs = [o.name for o in sess.get_outputs()]
    tok, h = np.array([prompt], np.int64), np.zeros((1, H), np.float32)
    toks = []
    for step in range(steps):
        res = dict(zip(outs, sess.run(None, {"tok": tok, "h": h})))
        for mod in MODULES:
            w.add_tensor(sample, step, names[mod], res[names[mod]], source="onnx")
        chosen = w.add_logits(sample, step, res["logits"][0], k=8)
        toks.append(chosen)
        if chosen == EOS:
            break
        tok, h = np.array([chosen], np.int64), res["h_out"]
    return toks
