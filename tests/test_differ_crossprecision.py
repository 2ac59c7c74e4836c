"""Tensors of runs computed at different precisions (fp32 vs fp16, a real torch module): each is
judged at the coarser run's grid relative to the reference's own scale, so the fp32 tensor at the
end of an fp16 run is not the culprit, and a planted bug is found from statistics alone."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="needs torch (pip install 'steptrace[torch]')")
from torch import nn  # noqa: E402

from steptrace.differ import DiffOptions, diff  # noqa: E402
from steptrace.recorders.torch import TorchRecorder  # noqa: E402


class Chain(nn.Module):
    """Eight Linear+GELU layers and a head whose log-softmax is taken in float32."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(64, 64) for _ in range(8)])
        self.acts = nn.ModuleList([nn.GELU() for _ in range(8)])
        self.head = nn.Linear(64, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for lin, act in zip(self.layers, self.acts):
            x = act(lin(x))
        return torch.log_softmax(self.head(x).float(), -1)


def _record(path: Path, *, half: bool, bug: bool, mode: str) -> Path:
    model = Chain().eval()
    if bug:  # a deliberate bug in the sixth layer: one output's bias moved by 0.5
        with torch.no_grad():
            model.layers[5].bias[3] += 0.5
    if half:
        model = model.half()
    torch.manual_seed(1)
    xs = [torch.randn(1, 64) for _ in range(4)]
    meta = {"precision": "fp16" if half else "fp32"}
    with TorchRecorder(path, model, modules={"*": mode}, metadata=meta) as rec, torch.no_grad():
        for t, x in enumerate(xs):
            with rec.step(index=t):
                rec.decide(model(x.half() if half else x)[0])
    return path


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("xprec")
    return {f"{name}-{mode}": _record(d / f"{name}-{mode}.trace", half=half, bug=bug, mode=mode)
            for name, half, bug in (("fp32", False, False), ("fp16", True, False), ("bug", True, True))
            for mode in ("stats", "full")}


@pytest.mark.parametrize("mode", ["stats", "full"])
def test_benign_fp16_copy_has_no_tensor_beyond_tolerance(traces: dict[str, Path], mode: str) -> None:
    pair = diff(traces[f"fp32-{mode}"], [traces[f"fp16-{mode}"]]).candidates[0]
    assert pair.tensors["beyond"] == 0, pair.tensors["beyond_by_name"]  # not even the fp32 logits at the end
    assert pair.alignment["grid"] == "float16"


@pytest.mark.parametrize("mode", ["stats", "full"])
def test_planted_bug_in_an_fp16_run_is_the_culprit(traces: dict[str, Path], mode: str) -> None:
    pair = diff(traces[f"fp32-{mode}"], [traces[f"bug-{mode}"]]).candidates[0]
    fd = pair.first_divergence
    assert fd is not None and fd.culprit is not None and fd.culprit.name == "layers.5"
    assert fd.culprit.metrics.basis == ("stats" if mode == "stats" else "values")
    assert {c["name"] for c in pair.culprits} == {"layers.5"}
    if mode == "stats":  # lower bounds: the report names what to record with values to confirm
        assert fd.confirm_with_values[-1] == "layers.5" and "layers.4" in fd.confirm_with_values
        assert len(fd.confirm_with_values) == 8
    else:
        assert fd.confirm_with_values == []


def test_same_precision_pairs_keep_the_tensor_dtype_tolerance(traces: dict[str, Path]) -> None:
    pair = diff(traces["fp16-stats"], [traces["bug-stats"]], DiffOptions()).candidates[0]
    assert pair.alignment["grid"] == "float16" and pair.first_divergence.culprit.name == "layers.5"
