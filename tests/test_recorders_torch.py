"""TorchRecorder on real torch modules: hooks, steps, teacher forcing, transplant, budgeted
capture, decisions on torch tensors vs the numpy reference, bfloat16, device statistics, and a
recording killed mid-run."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from recorder_models import EOS, GRULM, TransformerLM
from torch import nn

from steptrace.recorders.capture import Budget
from steptrace.recorders.decisions import decide, decide_rows
from steptrace.recorders.errors import RecorderUsageError, ReferenceNotFoundError, StepOrderError, TransplantMismatchError
from steptrace.recorders.torch import TorchRecorder, decide_tensor
from steptrace.tracefmt import TraceReader
from steptrace.tracefmt.decisions import decide as decide_reference
from steptrace.tracefmt.errors import UnsupportedDtypeError
from steptrace.tracefmt.validate import validate

NO_CUDA = "no CUDA device on this machine; the device tool was not lent to this task"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
PROMPT = [1, 5, 9]


def rows(table, *cols):
    return [tuple(r[c] for c in cols) for r in table.select(list(cols)).to_pylist()]


def decode(model: TransformerLM, rec: TorchRecorder | None, steps: int, *, explicit: bool = True) -> list[int]:
    """Greedy decode with full recompute; one explicit step per token unless the recorder opens them."""
    tokens = list(PROMPT)
    with torch.no_grad():
        for t in range(steps):
            if rec is not None and explicit:
                with rec.step(index=t):
                    tok = rec.decide(model(torch.tensor([tokens]))[0, -1])
            elif rec is not None:
                tok = rec.decide(model(torch.tensor([tokens]))[0, -1])
            else:
                tok = int(model(torch.tensor([tokens]))[0, -1].argmax())
            tokens.append(tok)
    return tokens[len(PROMPT):]


# ---------------------------------------------------------------------- hooks, calls, tuples, steps
class Twice(nn.Module):
    """Applies one Linear twice per call, and returns a dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.lin = nn.Linear(4, 4)
        self.out = DictOut()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.out(self.lin(torch.relu(self.lin(x))))


class DictOut(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x * 2, "ids": x.argmax(-1), "note": None}


def test_hooks_record_in_execution_order_with_calls_and_dict_outputs(tmp_path):
    model = Twice()
    x = torch.randn(2, 4)
    with TorchRecorder(tmp_path / "t.trace", model, modules={"lin": "full", "out": "full"}) as rec, \
            rec.step(sample="s", index=0), torch.no_grad():
        out = model(x)
    t = TraceReader(tmp_path / "t.trace").tensors()
    assert rows(t, "name", "call", "order", "source", "dtype") == [
        ("lin", 0, 0, "Linear", "float32"), ("lin", 1, 1, "Linear", "float32"),
        ("out.y", 0, 2, "DictOut", "float32"), ("out.ids", 0, 3, "DictOut", "int64"),
    ]
    r = TraceReader(tmp_path / "t.trace")
    assert np.array_equal(r.tensor("s", 0, "out.y"), out["y"].numpy())
    assert np.array_equal(r.tensor("s", 0, "lin", call=1), (out["y"] / 2).numpy())
    assert not model.lin._forward_hooks and not model.out._forward_hooks, "hooks are removed at close"


class Mixed(nn.Module):
    """A small output changed in place after its module returns (as ReLU(inplace=True) does),
    then a large output (>= 64 KB, recorded at once), then the small module again."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.small = nn.Linear(4, 4)
        self.big = nn.Linear(4, 8192)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.small(x)
        self.seen = y.clone()
        y.relu_()  # in place, after the hook ran
        z = self.big(y)
        return self.small(z[:, :4])


def test_hook_copies_are_taken_before_in_place_changes_and_keep_execution_order(tmp_path):
    """Small outputs are copied in the hook and counted at the end of the step, large ones go at
    once: values are those the modules returned, and order/call follow execution, explicit
    records and decisions included."""
    model = Mixed()
    with TorchRecorder(tmp_path / "t.trace", model, modules="full") as rec, torch.no_grad():
        for t in range(2):
            with rec.step(index=t):
                out = model(torch.randn(2, 4))
                rec.record("extra", np.arange(3.0))
                rec.decide(out[0])
    r = TraceReader(tmp_path / "t.trace")
    assert rows(r.tensors(step=1), "name", "call", "order") == [
        ("small", 0, 0), ("big", 0, 1), ("small", 1, 2), ("extra", 0, 3), ("logits:token", 0, 4)]
    np.testing.assert_array_equal(r.tensor("0", 1, "small", call=0), model.seen.numpy())  # not the ReLU'd one
    np.testing.assert_array_equal(r.tensor("0", 1, "small", call=1), out.numpy())
    assert r.decisions()["step"].to_pylist() == [0, 1]


def test_tuple_outputs_and_automatic_steps(tmp_path):
    model = GRULM()
    path = tmp_path / "gru.trace"
    h, tok, outs = None, torch.tensor(1), []
    with TorchRecorder(path, model, modules={"gru": "full", "head": "stats"}, step_module="") as rec, \
            torch.no_grad():
        for _ in range(4):  # each model() call opens the next step
            logits, h = model(tok, h)
            outs.append(h.clone())
            tok = torch.tensor(rec.decide(logits[0]))
    r = TraceReader(path)
    assert r.decisions()["step"].to_pylist() == [0, 1, 2, 3]
    assert rows(r.tensors(step=2), "name", "call", "order") == [("gru.0", 0, 0), ("gru.1", 0, 1), ("head", 0, 2)]
    for t in range(4):
        assert np.array_equal(r.tensor("0", t, "gru.1"), outs[t].numpy())
    assert r.metadata.runtime == "torch" and r.metadata.precision == "fp32"


def test_step_errors_are_clear(tmp_path):
    model = GRULM()
    with pytest.raises(RecorderUsageError, match="match no module"):
        TorchRecorder(tmp_path / "a.trace", model, modules={"grru*": "stats"})
    with pytest.raises(RecorderUsageError, match="needs the reference"):
        TorchRecorder(tmp_path / "b.trace", model, transplant=["gru"])
    with TorchRecorder(tmp_path / "c.trace", model) as rec:
        with rec.step(index=3):
            rec.decide(torch.randn(10))
            with pytest.raises(StepOrderError, match="already decided"):
                rec.decide(torch.randn(10))
        with pytest.raises(StepOrderError, match="increasing order"):
            rec.begin_step(index=2)


def test_unsupported_dtype_is_refused_with_advice(tmp_path):
    class Complex(nn.Module):
        def forward(self, x):
            return torch.view_as_complex(x)

    model = nn.Sequential(Complex())
    with TorchRecorder(tmp_path / "c.trace", model, modules="stats"), \
            pytest.raises(UnsupportedDtypeError, match=r"complex64 torch.strided tensor cannot be recorded"):
        model(torch.randn(3, 2))


# ---------------------------------------------------------------------- teacher forcing
def test_teacher_forcing_keeps_two_different_models_aligned(tmp_path):
    steps = 12
    ref_model, cand = TransformerLM(seed=0), TransformerLM(seed=0, bias={EOS: 3.0, 7: 2.5})
    ref_path, cand_path = tmp_path / "ref.trace", tmp_path / "cand.trace"
    with TorchRecorder(ref_path, ref_model, modules={"blocks.*": "stats"}) as rec:
        ref_tokens = decode(ref_model, rec, steps)
    assert decode(cand, None, steps) != ref_tokens, "the candidate must be a deliberately different model"

    with TorchRecorder(cand_path, cand, modules={"blocks.*": "stats"}, reference=ref_path) as rec:
        forced_tokens = decode(cand, rec, steps)
    assert forced_tokens == ref_tokens
    d = TraceReader(cand_path).decisions()
    assert d["forced"].to_pylist() == [True] * steps
    assert d["chosen"].to_pylist() == ref_tokens
    # argmax is the candidate's own choice on the reference's prefix
    with torch.no_grad():
        own = [int(cand(torch.tensor([PROMPT + ref_tokens[:t]]))[0, -1].argmax()) for t in range(steps)]
    assert d["argmax"].to_pylist() == own
    assert own != ref_tokens
    # every step of both traces holds the same tensors: comparable past the first flip
    names = lambda p: rows(TraceReader(p).tensors(), "step", "name", "call")
    assert names(cand_path) == names(ref_path)


def test_teacher_forcing_past_the_reference_says_so(tmp_path):
    model = GRULM()
    with TorchRecorder(tmp_path / "ref.trace", model) as rec:
        for t in range(3):
            with rec.step(sample="utt", index=t):
                rec.decide(torch.randn(10))
    with TorchRecorder(tmp_path / "c.trace", model, reference=tmp_path / "ref.trace", sample="utt") as rec:
        for t in range(3):
            rec.begin_step()
            rec.decide(torch.randn(10))
        rec.begin_step()
        with pytest.raises(ReferenceNotFoundError, match=r"records steps 0\.\.2; stop teacher-forced decoding after 3"):
            rec.decide(torch.randn(10))
        rec.set_sample("other")
        with pytest.raises(ReferenceNotFoundError, match="no 'token' decisions for sample 'other'"):
            rec.decide(torch.randn(10))


# ---------------------------------------------------------------------- transplant
def bugged(seed: int = 0) -> TransformerLM:
    model = TransformerLM(seed=seed)
    with torch.no_grad():
        model.blocks[0].mlp.fc2.weight.mul_(-1.5)  # the bug: one layer of block 0
    return model


def test_transplant_of_the_reference_tensor_removes_the_divergence(tmp_path):
    steps = 10
    good, bad = TransformerLM(seed=0), bugged()
    mods = {"blocks.0.mlp": "full", "blocks.1.*": "stats", "head": "stats"}
    ref, broken, fixed = tmp_path / "ref.trace", tmp_path / "bad.trace", tmp_path / "fixed.trace"
    with TorchRecorder(ref, good, modules=mods) as rec:
        ref_tokens = decode(good, rec, steps)
    with TorchRecorder(broken, bad, modules=mods) as rec:
        assert decode(bad, rec, steps) != ref_tokens
    with TorchRecorder(fixed, bad, modules=mods, reference=ref, teacher_forcing=False,
                       transplant=["blocks.0.mlp"]) as rec:
        assert decode(bad, rec, steps) == ref_tokens
    a, b, c = TraceReader(ref), TraceReader(broken), TraceReader(fixed)
    cols = ["step", "chosen", "argmax", "topk_ids", "topk_logits", "logsumexp", "forced"]
    assert c.decisions(columns=cols).equals(a.decisions(columns=cols))
    ta, tb, tc = (r.tensors() for r in (a, b, c))
    assert rows(tc, "step", "name", "call", "digest") == rows(ta, "step", "name", "call", "digest")
    assert rows(tb, "digest") != rows(ta, "digest")
    assert set(tc["source"].to_pylist()) >= {"MLP [transplanted]"}


def test_transplant_mismatch_and_stats_only_reference_are_clear(tmp_path):
    model = TransformerLM(seed=0)
    ref = tmp_path / "ref.trace"
    with TorchRecorder(ref, model, modules={"blocks.0.mlp": "full", "blocks.1": "stats"}) as rec:
        decode(model, rec, 2)
    wide = TransformerLM(seed=0).double()
    with TorchRecorder(tmp_path / "a.trace", wide, reference=ref, transplant=["blocks.0.mlp"]) as rec, \
            pytest.raises(TransplantMismatchError, match=r"holds float32\[1, 3, 32\] but this run produced float64"):
        decode(wide, rec, 1)
    with TorchRecorder(tmp_path / "b.trace", model, reference=ref, transplant=["blocks.1"]) as rec, \
            pytest.raises(ReferenceNotFoundError, match="as statistics only"):
        decode(model, rec, 1)


# ---------------------------------------------------------------------- budgeted capture
def value_steps(path: Path, name: str) -> list[int]:
    t = TraceReader(path).tensors(name=name)
    return [s for s, v in rows(t, "step", "has_values") if v]


def test_ring_buffer_writes_values_only_around_the_margin_trigger(tmp_path):
    steps, model = 14, TransformerLM(seed=3)
    with TorchRecorder(tmp_path / "free.trace", model) as rec:
        decode(model, rec, steps)
    margins = TraceReader(tmp_path / "free.trace").decisions()["margin"].to_numpy()
    low = int(np.argmin(margins[3:])) + 3  # the tightest decision after the first steps
    thr = float((margins[low] + np.sort(margins)[np.searchsorted(np.sort(margins), margins[low]) + 1]) / 2)
    assert (margins < thr).sum() == 1
    path = tmp_path / "ring.trace"
    mods = {"blocks.1.mlp": "full", "head": "full", "blocks.0.*": "stats"}
    with TorchRecorder(path, model, modules=mods, budget=Budget(steps=3, margin_below=thr)) as rec:
        decode(model, rec, steps)
    assert [t.step for t in rec.triggers] == [low]
    assert value_steps(path, "head") == value_steps(path, "blocks.1.mlp") == [low - 2, low - 1, low]
    t = TraceReader(path).tensors()
    keys = rows(t, "step", "name", "call")
    assert len(keys) == len(set(keys)), "no row is written twice"
    assert sorted({s for s, n, _ in keys if n == "head"}) == list(range(steps)), "stats for every step"
    assert not any(v for n, v in rows(t, "name", "has_values") if n.startswith("blocks.0"))
    free = TraceReader(tmp_path / "free.trace").decisions(columns=["chosen", "topk_logits"])
    assert TraceReader(path).decisions(columns=["chosen", "topk_logits"]).equals(free)


def test_chosen_step_with_after_and_close_keep_covered_values(tmp_path):
    model = TransformerLM(seed=1)
    path = tmp_path / "ring.trace"
    budget = Budget(steps=2, after=3, at_steps={2, 9}, nonfinite=False)
    with TorchRecorder(path, model, modules={"head": "full"}, budget=budget) as rec:
        decode(model, rec, 11)
    # step 2: steps 1-2 and 3 after; step 9: 8-9 and 10 (the recording ended before 11, 12)
    assert value_steps(path, "head") == [1, 2, 3, 4, 5, 8, 9, 10]
    assert len(TraceReader(path).tensors(name="head")) == 11


class NaNAt(nn.Module):
    """Identity that writes a NaN into its output when ``armed``."""

    armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed:
            x = x.clone()
            x[0, 0, 0] = float("nan")
        return x


@pytest.mark.parametrize("device_stats", [False, True], ids=["host", "device-path"])
def test_nan_trigger_keeps_the_steps_before_the_nan(tmp_path, device_stats):
    model = TransformerLM(seed=2)
    probe = NaNAt()
    model.blocks[0].mlp.act = nn.Sequential(model.blocks[0].mlp.act, probe)
    path = tmp_path / "nan.trace"
    tokens = list(PROMPT)
    with TorchRecorder(path, model, modules={"blocks.1": "full", "blocks.0.mlp.act.1": "stats"},
                       budget=Budget(steps=2), device_stats=device_stats) as rec, torch.no_grad():
        for t in range(8):
            probe.armed = t == 5
            with rec.step(index=t):
                tokens.append(rec.decide(model(torch.tensor([tokens]))[0, -1]))
    assert value_steps(path, "blocks.1") == [4, 5]
    assert {tr.step for tr in rec.triggers} == {5}
    assert "NaN/Inf in blocks.0.mlp.act.1" in [tr.reason for tr in rec.triggers]
    t = TraceReader(path).tensors(name="blocks.0.mlp.act.1")
    assert rows(t, "step", "nan_count")[5] == (5, 1)


# ---------------------------------------------------------------------- decisions on torch tensors
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.5, 1e-3, float("nan"), float("inf"), float("-inf")]
logit_lists = st.lists(st.one_of(st.sampled_from(SPECIAL), st.floats(-8, 8, width=16)), min_size=2, max_size=40)


def assert_same(a, b) -> None:
    assert np.array_equal(a.topk_ids, b.topk_ids) and a.argmax == b.argmax and a.chosen == b.chosen
    assert a.topk_logits.tobytes() == b.topk_logits.tobytes()
    assert np.float32(a.margin).tobytes() == np.float32(b.margin).tobytes()
    assert np.float32(a.logsumexp).tobytes() == np.float32(b.logsumexp).tobytes()
    assert a.chosen_rank == b.chosen_rank
    assert np.float32(a.chosen_logit).tobytes() == np.float32(b.chosen_logit).tobytes()
    assert [(w["id"], w["rank"], np.float32(w["logit"]).tobytes()) for w in a.watched] == [
        (w["id"], w["rank"], np.float32(w["logit"]).tobytes()) for w in b.watched]


@settings(max_examples=200, deadline=None)
@given(logit_lists, st.integers(2, 10), st.sampled_from(["float32", "float16", "bfloat16", "float64"]), st.data())
def test_torch_decisions_equal_the_numpy_reference_bit_for_bit(values, k, dtype, data):
    t = torch.tensor(values, dtype=getattr(torch, dtype))
    host = t.float().numpy() if dtype == "bfloat16" else t.numpy()
    v = len(values)
    chosen = data.draw(st.one_of(st.none(), st.integers(0, v - 1)))
    watched = data.draw(st.lists(st.integers(0, v - 1), max_size=3))
    expected = decide_reference(host, k=k, chosen=chosen, watched=watched)
    assert_same(decide_tensor(t, k=k, chosen=[chosen], watched=watched)[0], expected)  # the device path, on CPU
    assert_same(decide(t, k=k, chosen=chosen, watched=watched), expected)  # what recorders call


def test_decide_rows_batch_and_all_ties():
    x = torch.zeros(3, 12)
    x[1, 5] = float("nan")
    x[2] = float("-inf")
    x[2, 7] = float("nan")
    got = decide_tensor(x, k=4, chosen=[None, 11, 7], watched=[5, 7])
    for row, d in zip(x.numpy(), got):
        assert_same(d, decide_reference(row, k=4, chosen=d.chosen, watched=[5, 7]))
    assert got[0].topk_ids.tolist() == [0, 1, 2, 3]
    assert got[2].topk_ids.tolist() == [0, 1, 2, 3] and got[2].chosen_rank == 11
    assert [d.chosen for d in decide_rows(x.numpy(), k=4, chosen=[None, 11, 7])] == [0, 11, 7]


# ---------------------------------------------------------------------- dtypes, device statistics
def test_bfloat16_and_device_statistics(tmp_path):
    model = GRULM().to(torch.bfloat16)
    paths = {}
    for dev_stats in (False, True):
        paths[dev_stats] = p = tmp_path / f"bf16-{dev_stats}.trace"
        with TorchRecorder(p, model, modules={"gru": "stats", "head": "full"}, device_stats=dev_stats) as rec:
            tok, h = torch.tensor(2), None
            with torch.no_grad():
                for t in range(3):
                    with rec.step(index=t):
                        logits, h = model(tok, h)
                        tok = torch.tensor(rec.decide(logits[0]))
                        last = logits
    a, b = TraceReader(paths[False]), TraceReader(paths[True])
    assert set(a.tensors()["dtype"].to_pylist()) == {"bfloat16"}
    assert np.array_equal(a.tensor("0", 2, "head"), last.float().numpy())
    assert np.array_equal(b.tensor("0", 2, "head", raw_bits=True), last.view(torch.int16).numpy().view(np.uint16))
    ta, tb = a.tensors(), b.tensors()
    assert ta["digest"].equals(tb["digest"]) and ta["nan_count"].equals(tb["nan_count"])
    for col in ("min", "max", "mean", "std", "abs_max", "l2"):
        np.testing.assert_allclose(tb[col].to_numpy(), ta[col].to_numpy(), rtol=1e-12, atol=1e-12)


def test_device_statistics_of_odd_tensors_match_the_writer(tmp_path):
    tensors = {
        "nan": torch.tensor([[1.0, float("nan")], [float("-inf"), -2.0]]),
        "empty": torch.zeros(0, 3), "scalar": torch.tensor(3.5), "allnan": torch.full((3,), float("nan")),
        "ints": torch.arange(-5, 7, dtype=torch.int64), "bools": torch.tensor([True, False, True]),
        "big": torch.tensor([1e300, -3e300, 5.0], dtype=torch.float64), "half": torch.randn(5).half(),
    }
    out = {}
    for dev_stats in (False, True):
        path = tmp_path / f"odd-{dev_stats}.trace"
        with TorchRecorder(path, nn.Identity(), device_stats=dev_stats) as rec:
            for name, t in tensors.items():
                rec.record(name, t, mode="stats")
        out[dev_stats] = TraceReader(path).tensors().to_pylist()
    for host, dev in zip(out[False], out[True]):
        assert host["digest"] == dev["digest"] and host["shape"] == dev["shape"], host["name"]
        for col in ("numel", "nan_count", "inf_count", "min", "max", "abs_max"):
            assert host[col] == dev[col], (host["name"], col)
        for col in ("mean", "std", "l2"):
            assert (host[col] is None) == (dev[col] is None), (host["name"], col)
            if host[col] is not None:
                assert dev[col] == pytest.approx(host[col], rel=1e-12), (host["name"], col)


# ---------------------------------------------------------------------- CUDA (skipped without a GPU)
@cuda
def test_cuda_decisions_and_copies_match_the_cpu(tmp_path):
    x = torch.randn(4, 5000)
    x[1, :10] = 3.0
    x[2, 7] = float("nan")
    got = decide_rows(x.cuda(), k=8, watched=[3])
    for row, d in zip(x.numpy(), got):
        assert_same(d, decide_reference(row, k=8, watched=[3]))
    model = TransformerLM(seed=0)
    paths = [tmp_path / "cpu.trace", tmp_path / "gpu.trace"]
    for path, dev in zip(paths, ("cpu", "cuda")):
        with TorchRecorder(path, model.to(dev), modules={"blocks.*": "stats", "head": "full"}) as rec:
            tokens = list(PROMPT)
            with torch.no_grad():
                for t in range(4):
                    with rec.step(index=t):
                        tokens.append(rec.decide(model(torch.tensor([tokens], device=dev))[0, -1]))
    a, b = (TraceReader(p) for p in paths)
    assert a.decisions()["chosen"].equals(b.decisions()["chosen"])
    assert rows(a.tensors(), "name", "call", "order") == rows(b.tensors(), "name", "call", "order")


@cuda
def test_cuda_graph_replay_vs_eager_is_recorded(tmp_path):
    """Seed 001: the same decode step eager and replayed through torch.cuda.CUDAGraph."""
    model = GRULM().cuda().eval()
    static_tok, static_h = torch.tensor(1, device="cuda"), torch.zeros(1, 1, 32, device="cuda")
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            model(static_tok, static_h)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits, static_out = model(static_tok, static_h)
    paths = {"eager": tmp_path / "eager.trace", "graph": tmp_path / "graph.trace"}
    for mode, path in paths.items():
        with TorchRecorder(path, model) as rec, torch.no_grad():
            tok, h = torch.tensor(1, device="cuda"), torch.zeros(1, 1, 32, device="cuda")
            for t in range(6):
                with rec.step(index=t):
                    if mode == "eager":
                        logits, h = model(tok, h)
                    else:
                        static_tok.copy_(tok)
                        static_h.copy_(h)
                        graph.replay()
                        logits, h = static_logits, static_out.clone()
                    tok = torch.tensor(rec.decide(logits[0]), device="cuda")
    a, b = (TraceReader(p).decisions() for p in paths.values())
    assert a["chosen"].equals(b["chosen"])
    np.testing.assert_allclose(a["margin"].to_numpy(), b["margin"].to_numpy(), atol=1e-3)


# ---------------------------------------------------------------------- crash safety
CHILD = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from recorder_models import TransformerLM
    from steptrace.recorders.torch import TorchRecorder
    model = TransformerLM(seed=0, context=4096)
    rec = TorchRecorder(sys.argv[1], model, modules={"head": "full", "blocks.*": "stats"}, step_module="",
                        writer_options={"flush_steps": 2, "flush_ms": 20})
    tokens = [1, 2]
    with torch.no_grad():
        for t in range(4000):
            tokens.append(rec.decide(model(torch.tensor([tokens[-32:]]))[0, -1]))
            print(t, flush=True)
    """
)


def test_recording_killed_mid_run_stays_readable(tmp_path):
    path = tmp_path / "killed.trace"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(Path(__file__).parent)],
                            stdout=subprocess.PIPE, text=True)
    try:
        while int(proc.stdout.readline() or -1) < 25:
            assert proc.poll() is None, "the recording child died early"
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    report = validate(path, deep=True)
    assert report.ok, report.problems
    assert not report.complete
    r = TraceReader(path)
    steps = r.decisions()["step"].to_pylist()
    assert len(steps) >= 15 and steps == list(range(len(steps)))
    last = max(s for s, v in rows(r.tensors(name="head"), "step", "has_values") if v)
    assert r.tensor("0", last, "head").shape[-1] == 64


def test_outputs_that_require_grad_or_are_bfloat16_are_recorded_as_under_no_grad(tmp_path):
    """The hook's lean path lets numpy() refuse what it cannot view (a tensor that requires
    grad): those take the checked path, with the same rows and bits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    bf = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    x = torch.randn(2, 8)
    traces = {}
    for grad in (False, True):
        path = tmp_path / f"grad{grad}.trace"
        with TorchRecorder(path, model, modules="full") as rec, torch.set_grad_enabled(grad):
            for i in range(3):
                with rec.step(index=i):
                    out = model(x * (i + 1))
                    assert out.requires_grad == grad
        traces[grad] = path
    with TorchRecorder(tmp_path / "bf.trace", bf, modules="full") as rec, torch.no_grad(), rec.step(index=0):
        want = bf(x.to(torch.bfloat16))
    ra, rb = TraceReader(traces[False]), TraceReader(traces[True])
    ta, tb = ra.tensors(), rb.tensors()
    assert ta.num_rows == tb.num_rows == 9
    for c in ("step", "name", "call", "order", "digest", "min", "max", "mean"):
        assert ta[c].to_pylist() == tb[c].to_pylist(), c
    for r in ta.to_pylist():
        assert ra.tensor(r["sample"], r["step"], r["name"]).tobytes() == rb.tensor(r["sample"], r["step"], r["name"]).tobytes()
    got = TraceReader(tmp_path / "bf.trace")
    row = got.tensors().to_pylist()[0]
    assert row["dtype"] == "bfloat16"
    assert got.tensor(row["sample"], 0, row["name"]).tobytes() == want.float().numpy().tobytes()  # read widened, exactly


# ---------------------------------------------------------------------- steps that repeat their rows
class Repeating(nn.Module):
    """A step's outputs: 12-byte ones (padded in a writer process's ring), a module called
    twice on some steps (the rows change there), bfloat16, and logits."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.a = nn.Linear(4, 3)
        self.act = nn.ReLU()
        self.b = nn.Linear(3, 16)
        self.low = nn.Linear(3, 5).to(torch.bfloat16)

    def forward(self, x: torch.Tensor, twice: bool) -> torch.Tensor:
        y = self.act(self.a(x))
        if twice:
            y = self.act(y * 2)
        self.low(y.to(torch.bfloat16))
        return self.b(y)


def template_rows_patches(repeated: list[tuple[str, int, int]]) -> list[tuple[str, object]]:
    """``RecorderLane.template_rows`` as it is, counting its calls (``(sample, step, order)`` into
    ``repeated``), and one writing the template's rows one by one, for recording a run twice."""
    from steptrace.tracefmt.lane import RecorderLane

    template_rows = RecorderLane.template_rows

    def counted(self, template, sample, step, order, arrays):
        repeated.append((sample, step, order))
        return template_rows(self, template, sample, step, order, arrays)

    def row_by_row(self, template, sample, step, order, arrays):
        self.tensor_rows(template.rows(sample, step, order, arrays))

    return [("template", counted), ("rows", row_by_row)]


@pytest.mark.parametrize("writer", ["thread", "process"])
def test_steps_that_repeat_their_rows_write_what_row_by_row_writes(tmp_path, writer, monkeypatch):
    from test_format_writer_process import assert_same_trace

    from steptrace.tracefmt.lane import RecorderLane

    model = Repeating().eval()
    x = torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    repeated: list[tuple[str, int, int]] = []
    for name, patch in template_rows_patches(repeated):
        monkeypatch.setattr(RecorderLane, "template_rows", patch)
        rec = TorchRecorder(tmp_path / f"{name}.trace", model, modules="full", writer_options={"process": writer == "process"})
        with torch.no_grad():
            for sample, steps in (("a", 10), ("b", 5)):
                for t in range(steps):
                    with rec.step(sample=sample, index=t):
                        rec.decide(model(x[t : t + 1], sample == "a" and t in (4, 5))[0])
        assert rec.close().tensors == 15 * 5 + 2  # four modules, the logits, act twice at two steps
    # a template from the second step of the same rows on; a step with other rows goes row by
    # row, and their second step makes a new template
    assert [r[:2] for r in repeated] == [("a", 2), ("a", 3), ("a", 8), ("a", 9), *(("b", t) for t in range(5))]
    assert_same_trace(tmp_path / "rows.trace", tmp_path / "template.trace")
    r = TraceReader(tmp_path / "template.trace")
    got = rows(r.tensors(), "sample", "step", "name", "call", "order", "dtype", "shape")
    assert ("a", 4, "act", 1, 2, "float32", [1, 3]) in got and ("b", 3, "low", 0, 2, "bfloat16", [1, 5]) in got
    np.testing.assert_array_equal(r.tensor("b", 3, "b").astype(np.float32), model(x[3:4], False).detach().numpy())


class Wide(nn.Module):
    """A step's outputs of 16 KB and more: over a quarter of a 64 KB ring."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.up = nn.Linear(4, 4096)
        self.act = nn.ReLU()
        self.down = nn.Linear(4096, 8)

    def forward(self, x: torch.Tensor, twice: bool = False) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


@pytest.mark.parametrize("case", ["large", "many"])
def test_row_templates_a_writer_process_cannot_take_go_row_by_row(tmp_path, case, monkeypatch):
    # "large": a step's arrays over a quarter of the ring; "many": more templates than one
    # connection defines (here 1: the rows that come back after steps 4 and 5 make a second)
    from test_format_writer_process import assert_same_trace

    from steptrace.tracefmt import wire
    from steptrace.tracefmt.lane import RecorderLane

    model = (Wide() if case == "large" else Repeating()).eval()
    if case == "many":
        monkeypatch.setattr(wire, "MAX_TEMPLATES", 1)
    options = {"process": True, **({"ring_bytes": 64 << 10} if case == "large" else {})}
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(1))
    repeated: list[tuple[str, int, int]] = []
    for name, patch in template_rows_patches(repeated):
        monkeypatch.setattr(RecorderLane, "template_rows", patch)
        rec = TorchRecorder(tmp_path / f"{name}.trace", model, modules="full", writer_options=options)
        with torch.no_grad():
            for t in range(12):
                with rec.step(index=t):
                    rec.decide(model(x[t : t + 1], t in (4, 5))[0])
        rec.close()
    assert [r[1] for r in repeated] == ([*range(2, 12)] if case == "large" else [2, 3, 8, 9, 10, 11])
    assert_same_trace(tmp_path / "rows.trace", tmp_path / "template.trace")
    r = TraceReader(tmp_path / "template.trace")
    assert validate(tmp_path / "template.trace").ok
    first = model.up if case == "large" else model.a
    np.testing.assert_array_equal(r.tensor("0", 9, "up" if case == "large" else "a"), first(x[9:10]).detach().numpy())


def test_a_row_template_is_made_of_one_steps_rows_at_consecutive_orders(tmp_path):
    from steptrace.tracefmt import TraceWriter
    from steptrace.tracefmt.errors import TraceUsageError

    a = np.zeros(3, np.float32)
    with TraceWriter(tmp_path / "t.trace") as w:
        lane = w.lane
        t = lane.row_template([("s", 0, "x", 0, 0, None, "float32", a, False), ("s", 0, "y", 0, 1, None, "float32", a, True)])
        assert t.fields == [("x", 0, None, "float32", False), ("y", 0, None, "float32", True)] and t.nbytes == 24
        for bad in ([("s", 0, "x", 0, 0, None, "float32", a, False), ("s", 1, "y", 0, 1, None, "float32", a, False)],
                    [("s", 0, "x", 0, 0, None, "float32", a, False), ("s", 0, "y", 0, 2, None, "float32", a, False)],
                    [("s", 0, "x", 0, 0, None, "float32", np.zeros((3, 2), np.float32)[:, 0], False)]):
            with pytest.raises(TraceUsageError):
                lane.row_template(bad)
        with pytest.raises(UnsupportedDtypeError):
            lane.row_template([("s", 0, "x", 0, 0, None, "float16", a, False)])
        lane.template_rows(t, "s", 3, 5, [np.ones(3, np.float32), np.full(3, 2, np.float32)])
    r = TraceReader(tmp_path / "t.trace")
    assert rows(r.tensors(), "step", "name", "order", "has_values") == [(3, "x", 5, False), (3, "y", 6, True)]
    np.testing.assert_array_equal(r.tensor("s", 3, "y"), np.full(3, 2, np.float32))
