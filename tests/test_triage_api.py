"""`steptrace.recorders.triage` driven from Python: an ONNX Runtime model with a planted bug in one node's
weights (through OrtRecorder, the graph cut at each transplanted value), and a two-component
torch model (encoder + predictor + joint, seed 003's shape) whose encoder drifts: the component
table shows the encoder decides it."""

from __future__ import annotations

import runpy
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from steptrace.differ import diff
from steptrace.recorders.onnxruntime import OrtRecorder, expose_intermediates
from steptrace.recorders.torch import TorchRecorder
from steptrace.recorders.triage import triage
from steptrace.recorders.triagerun import OrtRun, TorchRun

SCRIPT = Path(__file__).resolve().parent / "scripts" / "triage_chain.py"
PROMPT = [1, 2, 3]
STEPS = 8


def chain_model(layers: int = 4) -> nn.Module:
    saved = sys.argv
    sys.argv = [str(SCRIPT)]
    try:
        ns = runpy.run_path(str(SCRIPT), run_name="triage_chain")
    finally:
        sys.argv = saved
    return ns["ChainLM"](layers).eval()


def onnx_decode(rec: OrtRecorder) -> None:
    tokens = list(PROMPT)
    for _ in range(STEPS):
        rec.run(None, {"tokens": np.array([tokens], dtype=np.int64)})
        tokens.append(rec.token)


@pytest.fixture(scope="module")
def onnx_models(tmp_path_factory):
    d = tmp_path_factory.mktemp("onnx")
    model = chain_model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.tensor([PROMPT]),), str(d / "chain.onnx"), input_names=["tokens"],
                          output_names=["logits"], dynamic_axes={"tokens": {1: "T"}, "logits": {1: "T"}},
                          dynamo=False)
    proto = onnx.load(str(d / "chain.onnx"))
    node = next(n for n in proto.graph.node if n.name == "/layers.2/lin/Add")
    bias = next(t for t in proto.graph.initializer if t.name in node.input)
    head = model.head.weight.detach().numpy()[-1]
    b = onnx.numpy_helper.to_array(bias) + 10.0 * np.sign(head).astype(np.float32)  # the planted bug
    bias.CopyFrom(onnx.numpy_helper.from_array(b, bias.name))
    onnx.save(proto, str(d / "bug.onnx"))
    ref_path, _ = expose_intermediates(d / "chain.onnx", ["/layers.*"], d / "chain.exposed.onnx")
    bug_path, _ = expose_intermediates(d / "bug.onnx", ["/layers.*"], d / "bug.exposed.onnx")
    with OrtRecorder(d / "ref.trace", ref_path, logits="logits", optimization="disable",
                     tensors={"logits:*": "none", "*": "full"}) as rec:
        onnx_decode(rec)
    with OrtRecorder(d / "cand.trace", bug_path, logits="logits", optimization="disable") as rec:
        onnx_decode(rec)
    return d, Path(bug_path)


def test_onnx_planted_weight_bug_is_named_through_a_graph_cut(onnx_models, tmp_path):
    d, bug = onnx_models
    first = diff(str(d / "ref.trace"), [str(d / "cand.trace")]).to_json()["per_sample"][0]
    assert first["kind"] in ("flip", "divergent")
    lines: list[str] = []
    report = triage(d / "ref.trace", OrtRun(bug, onnx_decode, logits="logits"), candidate=d / "cand.trace",
                    progress=lines.append)
    assert report.found, report.sentence()
    rc = report.root_cause
    assert rc.name == "/layers.2/lin/Add_output_0"
    assert rc.source.startswith("/layers.2/lin/Add")
    assert rc.step == first["first_step"] and rc.restores and rc.introduces
    assert rc.logit_error_after < report.logit_error
    # the values before the bad node equal the reference's bit for bit: they are not searched
    assert report.candidates < sum(1 for _ in onnx.load(str(bug)).graph.output)
    # transplanting the values after it, one branch at a time, does not restore the decision
    tanh3 = [t for t in report.trials if t.transplanted == ["/layers.3/Tanh_output_0"]]
    assert all(not t.restored for t in tanh3)
    # the cut model feeds the reference's value: the re-run's trace records it transplanted
    assert rc.logit_error_after == 0.0
    assert len(lines) == report.reruns
    assert (tmp_path / "x").exists() is False  # nothing written outside the temporary work directory


class Encoder(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(x))


class Predictor(nn.Module):
    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.lin = nn.Linear(d, d)

    def forward(self, token: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.lin(self.emb(token)))


class Joint(nn.Module):
    def __init__(self, d: int, vocab: int) -> None:
        super().__init__()
        self.out = nn.Linear(d, vocab)

    def forward(self, enc: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(enc + pred))


class Transducer(nn.Module):
    """Seed 003's shape: an encoder frame and the predictor's state meet in a joint."""

    def __init__(self, vocab: int = 24, d: int = 16, drift: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.encoder = Encoder(d)
        self.predictor = Predictor(vocab, d)
        self.joint = Joint(d, vocab)
        with torch.no_grad():
            self.joint.out.weight.mul_(3.0)
            if drift:
                self.encoder.lin.weight.add_(drift * torch.randn(d, d, generator=torch.Generator().manual_seed(5)))

    def forward(self, frame: torch.Tensor, token: torch.Tensor) -> torch.Tensor:
        return self.joint(self.encoder(frame), self.predictor(token))


FRAMES = torch.randn(10, 16, generator=torch.Generator().manual_seed(11))


def transducer_decode(model: Transducer):
    def run(rec: TorchRecorder) -> None:
        token = 0
        with torch.no_grad():
            for t in range(FRAMES.shape[0]):
                with rec.step():
                    logits = model(FRAMES[t : t + 1], torch.tensor([token]))
                    token = rec.decide(logits[0])
    return run


def test_component_table_shows_the_encoder_decides(tmp_path):
    ref = Transducer()
    with TorchRecorder(tmp_path / "ref.trace", ref, modules={"*": "full"}) as rec:
        transducer_decode(ref)(rec)
    cand = Transducer(drift=0.6)
    with TorchRecorder(tmp_path / "cand.trace", cand, modules={"*": "stats"}) as rec:
        transducer_decode(cand)(rec)
    report = triage(tmp_path / "ref.trace", TorchRun(cand, transducer_decode(cand), modules=["*"], logits="joint"),
                    candidate=tmp_path / "cand.trace",
                    components={"encoder": "encoder*", "predictor": "predictor*"})
    rows = {tuple(r.from_reference): r for r in report.component_rows}
    assert set(rows) == {(), ("encoder",), ("predictor",), ("encoder", "predictor")}
    assert not rows[()].restored
    assert rows[("encoder",)].restored  # enc_ref + pred_cand -> restored
    assert not rows[("predictor",)].restored  # enc_cand + pred_ref -> not
    assert rows[("encoder", "predictor")].restored
    assert report.decided_by == ["encoder"]
    assert "encoder decides it" in report.sentence()
    assert report.root_cause is not None and report.root_cause.name.startswith("encoder")
    payload = report.to_json()
    assert payload["schema"] == "steptrace.triage/1"
    assert payload["components"]["decided_by"] == ["encoder"]
    assert all({"transplanted", "step", "restored", "logit_error_before", "logit_error_after"} <= set(t)
               for t in payload["trials"])


def test_trace_triage_cuts_the_graph_of_an_onnx_runtime_script(onnx_models, tmp_path, capsys):
    from steptrace.tui.cli import EXIT_OK, main

    d, bug = onnx_models
    script = str(Path(__file__).resolve().parent / "scripts" / "triage_onnx.py")
    # the same file name on both sides: a script's ONNX values are named STEM.value
    for side, src in (("ref", d / "chain.onnx"), ("bug", d / "bug.onnx")):
        expose_intermediates(src, ["/layers.*"], tmp_path / side / "model.onnx")
    rec = ["--logits", "logits", "--modules", "*/layers.*"]
    ref = tmp_path / "ref.trace"
    assert main(["record", "-o", str(ref), *rec, "--tensors", "full", script, str(tmp_path / "ref" / "model.onnx")]) == EXIT_OK
    out = tmp_path / "t.json"
    code = main(["triage", str(ref), *rec, "--json", str(out), script, str(tmp_path / "bug" / "model.onnx")])
    assert code == EXIT_OK, capsys.readouterr().err
    import json

    report = json.loads(out.read_text())
    assert report["root_cause"]["name"].endswith("/layers.2/lin/Add_output_0")
    assert report["root_cause"]["restores"] is True
