"""The differ on traces of real torch and ONNX Runtime decodes with known ground truth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from steptrace.differ import DiffOptions, Policy, diff
from steptrace.differ.policy import DecisionTolerance
from differ_models import EOS, H, StepLM, decode_ort, decode_torch, export_onnx, writer
from steptrace.tracefmt import TraceReader

STEPS = 12


@pytest.fixture(scope="module")
def model() -> StepLM:
    return StepLM(seed=0)


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory, model: StepLM) -> Path:
    p = tmp_path_factory.mktemp("ref") / "ref.trace"
    with writer(p) as w:
        for s in range(3):
            decode_torch(model, w, f"s{s}", s + 4, STEPS)
    return p


def run(tmp: Path, name: str, model: StepLM, **kw: object) -> Path:
    p = tmp / f"{name}.trace"
    meta = kw.pop("meta", {})
    with writer(p, **meta) as w:
        for s in range(3):
            decode_torch(model, w, f"s{s}", s + 4, STEPS, **kw)
    return p


def test_bit_identical_rerun(tmp_path: Path, ref: Path, model: StepLM) -> None:
    r = diff(ref, [run(tmp_path, "again", model)])
    assert r.verdict == "identical" and not r.mismatch
    c = r.worst
    assert c.samples["identical"] == 3 and c.first_divergence is None and c.drift_onset is None
    assert c.tensors["bitexact"] == c.tensors["compared"] == 3 * STEPS * 5
    assert c.steps["identical"] == 3 * STEPS


def test_onnxruntime_fp_noise_is_equivalent_with_guessed_names(tmp_path: Path, ref: Path, model: StepLM) -> None:
    names = export_onnx(model, tmp_path / "m.onnx")
    p = tmp_path / "ort.trace"
    with writer(p, runtime="onnxruntime") as w:
        for s in range(3):
            decode_ort(tmp_path / "m.onnx", names, w, f"s{s}", s + 4, STEPS)
    r = diff(ref, [p])
    c = r.worst
    assert r.verdict == "equivalent" and not r.mismatch
    assert c.samples["equivalent"] == 3 and c.sequences["identical"] == 3
    assert c.tensors["mapping"]["guessed"] is True
    assert c.tensors["mapping"]["names"] == {v: k for k, v in names.items() if k != v}
    assert c.tensors["beyond"] == 0 and c.tensors["by_basis"]["values"] > 0
    assert c.decisions["top1_agreement"] == 1.0
    # the same with name guessing off: nothing matches, every tensor is reported unmatched
    r2 = diff(ref, [p], DiffOptions(auto_map=False))
    assert r2.worst.tensors["compared"] == 0 and len(r2.worst.tensors["unmatched_candidate"]) == 5


def test_bug_in_one_layer_from_step_s(tmp_path: Path, ref: Path, model: StepLM) -> None:
    s_bug = 5

    def bug(sample: str, step: int, name: str, out: torch.Tensor) -> torch.Tensor | None:
        return out + 2.0 if sample == "s1" and name == "mid" and step >= s_bug else None

    r = diff(ref, [run(tmp_path, "bug", model, hook=bug)])
    c = r.worst
    fd = c.first_divergence
    assert fd is not None and fd.sample == "s1" and fd.step == s_bug
    assert fd.kind in ("flip", "divergent") and fd.a_token != fd.b_token
    assert fd.culprit is not None and fd.culprit.name == "mid" and not fd.culprit.metrics.within
    assert fd.culprit.metrics.basis == "values" and fd.culprit.metrics.max_abs == pytest.approx(2.0, rel=1e-5)
    assert c.drift_onset is not None and c.drift_onset.step <= s_bug and c.drift_onset.culprit.name == "mid"
    by = {p.sample: p for p in c.per_sample}
    assert by["s0"].verdict == "identical" and by["s2"].verdict == "identical"
    assert by["s1"].verdict == fd.kind and by["s1"].mismatches == 1  # later steps are "after", not fresh
    assert by["s1"].after > 0
    assert r.mismatch


def test_drift_without_token_change(tmp_path: Path, ref: Path, model: StepLM) -> None:
    def nudge(sample: str, step: int, name: str, out: torch.Tensor) -> torch.Tensor | None:
        return out + 1e-3 if sample == "s0" and name == "cell" and step == 2 else None

    r = diff(ref, [run(tmp_path, "nudge", model, hook=nudge)])
    fd = r.worst.first_divergence
    assert r.verdict == "drift" and fd.kind == "drift" and fd.step == 2 and fd.culprit.name == "cell"
    assert r.worst.sequences["identical"] == 3
    assert diff(ref, [tmp_path / "nudge.trace"], DiffOptions(fail_on="flip")).mismatch is False


def test_near_tie_flip_vs_hard_divergence(tmp_path: Path, ref: Path, model: StepLM) -> None:
    with TraceReader(ref) as rd:
        d = rd.decisions(sample="s0").to_pylist()
    tight = min(d, key=lambda x: x["margin"])
    loose = max(d[:-1], key=lambda x: x["margin"])
    eps = tight["margin"] + 0.05
    assert loose["margin"] > eps + 0.2

    def bias_at(row: dict, extra: float):
        def fn(sample: str, step: int) -> np.ndarray | None:
            if sample != "s0" or step != row["step"]:
                return None
            b = np.zeros(32, np.float32)
            b[row["topk_ids"][1]] = row["margin"] + extra  # the runner-up overtakes by `extra`
            return b
        return fn

    policy = Policy(decisions=DecisionTolerance(epsilon=eps))
    flip = diff(ref, [run(tmp_path, "flip", model, logit_bias=bias_at(tight, 0.01))], DiffOptions(policy=policy))
    fd = flip.worst.first_divergence
    assert fd.kind == "flip" and fd.step == tight["step"] and fd.b_token == tight["topk_ids"][1]
    assert fd.a_rank_of_b == 1 and fd.b_rank_of_a == 1 and fd.a_gap == pytest.approx(tight["margin"], abs=1e-5)
    assert fd.b_gap == pytest.approx(0.01, abs=1e-4) and fd.culprit is None  # only the logits were biased
    hard = diff(ref, [run(tmp_path, "hard", model, logit_bias=bias_at(loose, 3.0))], DiffOptions(policy=policy))
    fd2 = hard.worst.first_divergence
    assert fd2.kind == "divergent" and fd2.step == loose["step"]
    assert flip.worst.decisions["margin_histogram"]["flipped"][0:3] != [0, 0, 0]


def test_over_generation_and_eos_lost(tmp_path: Path) -> None:
    m = StepLM(seed=0, eos_bias=1.0)
    ref = tmp_path / "ref.trace"
    with writer(ref) as w:
        toks = decode_torch(m, w, "u", 7, 40)
    assert toks[-1] == EOS and len(toks) == 4
    k = len(toks) - 1

    def lose_eos(sample: str, step: int) -> np.ndarray:
        b = np.zeros(32, np.float32)
        b[EOS] = -2.5  # like a q8 decoder losing EOS margin
        return b

    cand = tmp_path / "q8.trace"
    with writer(cand, precision="q8") as w:
        toks_b = decode_torch(m, w, "u", 7, k + 6, logit_bias=lose_eos)
    assert len(toks_b) > len(toks)
    r = diff(ref, [cand])
    fd = r.worst.first_divergence
    assert fd.step == k and fd.a_token == EOS and fd.kind in ("flip", "divergent")
    eos = next(x for x in fd.watched if x.token == "eos")
    assert eos.a_rank == 0 and eos.b_rank >= 1 and eos.b_bias == pytest.approx(eos.b_lost_by) and eos.b_bias > 0
    p = r.worst.per_sample[0]
    assert p.b_steps > p.a_steps and p.mismatches == 1 and p.after == p.b_steps - p.a_steps
    assert r.worst.watched["eos"]["lost"] == 1
    # a candidate that stops early: its missing steps are the first divergence
    short = tmp_path / "short.trace"
    with writer(short) as w:
        decode_torch(m, w, "u", 7, k - 2)
    r2 = diff(ref, [short])
    assert r2.verdict == "missing" and r2.worst.first_divergence.step == k - 2
    assert "ended early" in r2.worst.first_divergence.detail


def test_inserted_token_resync(tmp_path: Path, ref: Path, model: StepLM) -> None:
    with TraceReader(ref) as rd:
        toks = rd.decisions(sample="s0")["chosen"].to_pylist()
    ins = 5
    seq = toks[:ins] + [20] + toks[ins:]
    p = tmp_path / "ins.trace"
    with writer(p) as w:
        decode_torch(model, w, "s0", 4, len(seq), force=seq, stop_at_eos=False)
    opts = DiffOptions(align="resync", samples=["s0"])
    r = diff(ref, [p], opts)
    fd = r.worst.first_divergence
    assert fd.kind == "missing" and fd.detail == "inserted" and fd.b_step == ins and fd.a_step is None
    st = r.worst.steps_table.to_pylist()
    pairs = [(x["a_step"], x["b_step"]) for x in st]
    assert pairs[:ins] == [(i, i) for i in range(ins)]
    assert pairs[ins] == (-1, ins)
    assert pairs[ins + 1 :] == [(i, i + 1) for i in range(ins, len(toks))]
    assert r.worst.per_sample[0].token_edits == 1
    # aligned by step instead, everything after the insertion is "after" a divergence
    r2 = diff(ref, [p], DiffOptions(samples=["s0"]))
    assert r2.worst.first_divergence.step == ins and r2.worst.first_divergence.kind in ("flip", "divergent")


def test_teacher_forced_compared_to_the_end(tmp_path: Path, ref: Path) -> None:
    other = StepLM(seed=1)
    with TraceReader(ref) as rd:
        toks = rd.decisions(sample="s0")["chosen"].to_pylist()
    p = tmp_path / "tf.trace"
    with writer(p) as w:
        decode_torch(other, w, "s0", 4, len(toks), force=toks, stop_at_eos=False)
    r = diff(ref, [p], DiffOptions(samples=["s0"]))
    c = r.worst
    assert c.alignment["teacher_forced"] is True
    assert c.steps["after_divergence"] == 0  # forced tokens keep both runs comparable
    assert c.per_sample[0].mismatches == c.decisions["flips"] + c.decisions["divergent"] > 1
    assert c.decisions["top1_agreement"] < 1.0


def test_nan_in_one_side(tmp_path: Path, ref: Path, model: StepLM) -> None:
    def poison(sample: str, step: int, name: str, out: torch.Tensor) -> torch.Tensor | None:
        if sample == "s2" and name == "cell" and step == 3:
            out = out.clone()
            out[0, 0] = float("nan")
            return out
        return None

    r = diff(ref, [run(tmp_path, "nan", model, hook=poison)])
    by = {p.sample: p for p in r.worst.per_sample}
    assert by["s2"].verdict in ("flip", "divergent") and by["s2"].first_step == 3
    fd = r.worst.first_divergence
    assert fd.sample == "s2" and fd.culprit.name == "cell"
    assert fd.culprit.metrics.reason == "nan" and fd.culprit.metrics.nan_mismatch == 1


def test_transducer_duration_head_diverges_first(tmp_path: Path) -> None:
    """Seed 003: token and duration heads, encoder drift flips the duration argmax at step 0."""
    torch.manual_seed(3)
    T, D, Vt, Vd = 6, 8, 10, 5
    enc = torch.randn(T, D)
    wt, wd = torch.randn(Vt, D), torch.randn(Vd, D) * 2
    wt[:, D // 2 :] = 0  # the token head reads the first half of a frame, the duration head the second
    wd[:, : D // 2] = 0

    def decode(path: Path, enc_out: torch.Tensor) -> None:
        with writer(path, runtime="tensorrt" if path.stem == "trt" else "torch") as w:
            step, frame, emission = 0, 0, 0
            while frame < T and step < 20:
                w.add_tensor("utt", step, "encoder", enc_out[frame].numpy())
                tl, dl = (wt @ enc_out[frame]).numpy(), (wd @ enc_out[frame]).numpy()
                tok = w.add_logits("utt", step, tl, head="token", k=4, frame=frame, emission=emission)
                dur = w.add_logits("utt", step, dl, head="duration", k=4, frame=frame, emission=emission)
                emission = emission + 1 if dur == 0 else 0
                frame += max(dur, 1) if dur else 0
                if emission > 2:
                    frame, emission = frame + 1, 0
                step += 1

    decode(tmp_path / "pt.trace", enc)
    dl = (wd @ enc[0]).numpy()
    top2 = np.argsort(-dl)[:2]
    push = (wd[top2[1]] - wd[top2[0]]) / torch.linalg.norm(wd[top2[1]] - wd[top2[0]]) ** 2 * (dl[top2[0]] - dl[top2[1]] + 0.3)
    enc_b = enc.clone()
    enc_b[0] += push
    assert (wt @ enc_b[0]).argmax() == (wt @ enc[0]).argmax(), "precondition: the token head agrees at step 0"
    decode(tmp_path / "trt.trace", enc_b)
    r = diff(tmp_path / "pt.trace", [tmp_path / "trt.trace"], DiffOptions(align="frame,emission"))
    fd = r.worst.first_divergence
    assert fd.step == 0 and fd.head == "duration" and fd.kind in ("flip", "divergent")
    assert fd.a_token == top2[0] and fd.b_token == top2[1]
    assert fd.culprit is not None and fd.culprit.name == "encoder"
    assert r.worst.alignment["mode"] == "keys:frame,emission"
