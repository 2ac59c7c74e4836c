"""The near-tie rule (docs/differ.md §4) on constructed pairs, open-loop heads, CTC collapse and
the culprit looked for at earlier steps.

Each pair is written through the real TraceWriter from logits built here, so every number the
rule uses (gaps, shift, the pair's noise, the grid) is known exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from steptrace.differ import DiffOptions, Policy, diff
from steptrace.tracefmt import TraceWriter

V = 16
EOS = 2


def _logits(rng: np.random.Generator, scale: float = 10.0) -> np.ndarray:
    """Logits with a clear winner spread over [-scale, scale] (well separated ranks)."""
    x = np.linspace(scale, -scale, V).astype(np.float64)
    rng.shuffle(x)
    return x


def _pair(tmp: Path, steps: list[tuple[np.ndarray, np.ndarray]], *, sample: str = "s", precision: str = "fp32",
          cand_precision: str | None = None, head: str = "token", open_loop: list[str] | None = None,
          logits_tensors: bool = False, tensors: dict[int, dict[str, tuple[np.ndarray, np.ndarray]]] | None = None,
          free_running: bool = True) -> tuple[Path, Path]:
    """Write a reference and a candidate trace, one decision per (ref, cand) logits pair."""
    paths = []
    for side, prec in ((0, precision), (1, cand_precision or precision)):
        p = tmp / f"{'ab'[side]}.trace"
        meta = {"precision": prec, "watched": {"eos": EOS}, "open_loop": list(open_loop or [])}
        with TraceWriter(p, metadata=meta) as w:
            for t, pair in enumerate(steps):
                x = pair[side].astype(np.float32)
                for name, vals in (tensors or {}).get(t, {}).items():
                    w.add_tensor(sample, t, name, vals[side])
                w.add_logits(sample, t, x, head=head, k=8)
                if logits_tensors:
                    w.add_tensor(sample, t, f"logits:{head}", x, source="decision")
        paths.append(p)
    return paths[0], paths[1]


def _first(a: Path, b: Path, **opts: object):
    rep = diff(a, [b], DiffOptions(**opts))
    return rep.candidates[0], rep.candidates[0].first_divergence


def _swap(x: np.ndarray, i: int, j: int, gap_i: float, gap_j: float) -> tuple[np.ndarray, np.ndarray]:
    """Make ids i and j the top two, i ahead by gap_i in the reference and j ahead by gap_j in
    the candidate (every other logit unchanged)."""
    a, b = x.copy(), x.copy()
    top = x.max() + 1.0
    a[i], a[j] = top, top - gap_i
    b[i], b[j] = top - gap_j, top
    return a, b


def test_swap_of_a_fraction_of_a_percent_is_a_coin_toss_flip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    steps = [(x, x.copy()) for x in (_logits(rng) for _ in range(12))]  # bit-identical elsewhere: noise 0
    x = _logits(rng)
    scale = x.max() + 1.0
    steps.append(_swap(x, 3, 5, 0.003 * scale, 0.003 * scale))  # gaps 0.3 % of the logit scale
    pair, fd = _first(*_pair(tmp_path, steps))
    assert fd.kind == "flip" and fd.step == 12 and pair.verdict == "flip"
    ev = fd.evidence
    assert ev.rule == "coin_toss" and ev.noise == 0.0 and ev.noise_steps == 12
    assert ev.shift == pytest.approx(0.006 * scale, rel=1e-5)
    assert fd.a_rank_of_b == 1 and fd.b_rank_of_a == 1
    assert ev.grid == "float32" and ev.a_gap_ulps > 1000  # far beyond the fp32 grid: not what explains it


def test_demo_case_is_explained_by_the_pairs_noise(tmp_path: Path) -> None:
    """The demo's step: margins 0.0724 and 0.0108, each token rank 1 in the other run, while the
    shared top-k logits move by up to ±0.06 on the steps where both agree (the demo's own int8
    pair moves them by more: a p90 of 0.28 relative to the chosen token)."""
    rng = np.random.default_rng(1)
    steps = []
    for _ in range(40):
        x = _logits(rng, 4.0)
        steps.append((x, x + rng.uniform(-0.06, 0.06, V)))
    x = _logits(rng, 2.0)  # top logit 3: bf16 ulp 1/64, grid ε 0.0625 < 0.0724
    steps.append(_swap(x, 4, 9, 0.0724, 0.0108))
    pair, fd = _first(*_pair(tmp_path, steps, cand_precision="int8"))
    ev = fd.evidence
    assert fd.kind == "flip", ev
    assert ev.rule == "noise" and ev.noise_steps == 40 and 0.0832 < ev.noise < 0.12
    assert ev.shift == pytest.approx(0.0832, abs=1e-6)
    # the same step with a fixed --epsilon below the gaps is divergent: --epsilon overrides
    policy = Policy().with_overrides(epsilon=0.05)
    _, fd2 = _first(*_pair(tmp_path / "e", steps, cand_precision="int8"), policy=policy)
    assert fd2.kind == "divergent" and fd2.evidence.rule is None


def test_token_ranked_five_by_three_logits_is_divergent(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    steps = []
    for _ in range(30):
        x = _logits(rng)
        steps.append((x, x + rng.uniform(-0.005, 0.005, V)))
    a = _logits(rng)
    order = np.argsort(-a)
    fifth = int(order[5])
    b = a.copy()
    b[fifth] = a.max() + 0.5  # the candidate picks the reference's rank-5 token
    steps.append((a, b))
    pair, fd = _first(*_pair(tmp_path, steps))
    assert fd.kind == "divergent" and pair.verdict == "divergent"
    assert fd.a_rank_of_b == 5 and fd.a_gap > 3.0
    ev = fd.evidence
    assert ev.rule is None and ev.noise < 0.011 and ev.shift > 3.0


def test_eos_lost_by_two_and_a_half_logits_is_divergent(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    steps = []
    for _ in range(20):
        x = _logits(rng)
        steps.append((x, x.copy()))
    x = _logits(rng)
    x[EOS] = x.max() + 1.0
    b = x.copy()
    other = int(np.argsort(-x)[1])
    b[EOS] = x[other] - 2.5 + 1e-3  # the candidate ranks EOS 2.5 logits behind its top (rank 2 here)
    b[other] = x[other] + 1e-3
    steps.append((x, b))
    pair, fd = _first(*_pair(tmp_path, steps))
    assert fd.kind == "divergent" and fd.a_token == EOS
    (w,) = [w for w in fd.watched if w.token == "eos"]
    assert w.b_rank == 2 and w.b_lost_by == pytest.approx(2.5, abs=1e-3)
    assert "bias +2.5 flips it" in str(w)


def test_recording_logits_tensors_never_changes_the_verdict(tmp_path: Path) -> None:
    """An int8 candidate: the grid is the coarser computation's (an 8-bit quantiser's), whether
    or not float32 ``logits:token`` tensors were recorded as well."""
    rng = np.random.default_rng(4)
    x = _logits(rng, 4.0)
    steps = [_swap(x, 1, 2, 0.05, 0.05)]
    verdicts = []
    for extra in (False, True):
        a, b = _pair(tmp_path / str(extra), steps, cand_precision="int8", logits_tensors=extra)
        pair, fd = _first(a, b)
        verdicts.append((fd.kind, fd.evidence.rule, fd.evidence.grid, fd.evidence.grid_epsilon))
    assert verdicts[0] == verdicts[1] and verdicts[0][:3] == ("flip", "grid", "bfloat16")


def test_logits_dtype_declared_by_a_jsonl_producer_sets_the_grid(tmp_path: Path) -> None:
    """A runtime dumps its logits as JSON numbers (imported as float64): the grid is float32
    unless the producer declares the dtype the logits were computed in (SPEC.md §2, §6)."""
    import json

    from steptrace.tracefmt import import_jsonl

    rng = np.random.default_rng(5)
    x = _logits(rng, 0.5)  # top logit 1.5: coin toss below 0.0075, a bf16 ulp 1/128
    ref, cand = _swap(x, 1, 2, 0.012, 0.012)
    kinds = {}
    for declared in (None, "bfloat16"):
        paths = []
        for name, logits in (("ref", ref), ("cand", cand)):
            src = tmp_path / f"{name}-{declared}.jsonl"
            meta = {"kind": "meta", "runtime": "tensorrt", **({"logits_dtype": declared} if declared else {})}
            line = {"kind": "decision", "sample": "s", "step": 0, "logits": logits.tolist()}
            src.write_text(json.dumps(meta) + "\n" + json.dumps(line) + "\n")
            dst = tmp_path / f"{name}-{declared}.trace"
            import_jsonl(src, dst, keep_logits=True)  # the float64 logits tensor is no evidence of float64
            paths.append(dst)
        _, fd = _first(*paths)
        kinds[declared] = (fd.kind, fd.evidence.grid, fd.evidence.rule)
    assert kinds[None] == ("divergent", "float32", None)
    assert kinds["bfloat16"] == ("flip", "bfloat16", "grid")


def test_cli_open_loop_and_ctc_options(tmp_path: Path) -> None:
    import json

    from steptrace.tui.cli import main

    rng = np.random.default_rng(8)
    steps = []
    for t in range(12):
        x = _logits(rng)
        b = x.copy()
        if t in (2, 7):
            b[int(np.argsort(-x)[3])] = x.max() + 2.0
        steps.append((x, b))
    a, b = _pair(tmp_path, steps, head="frame")
    out = tmp_path / "r.json"
    assert main(["diff", str(a), str(b), "--open-loop", "frame", "--json", str(out)]) == 1
    doc = json.loads(out.read_text())
    assert doc["per_sample"][0]["mismatches"] == 2 and doc["per_sample"][0]["after"] == 0
    assert doc["first_divergence"]["evidence"]["rule"] is None
    assert doc["candidates"][0]["decisions"]["gap_noise"]["frame"]["steps"] == 10
    assert main(["diff", str(a), str(b), "--ctc", "blank", "--json", str(out)]) == 2


def test_open_loop_head_is_compared_to_the_end(tmp_path: Path) -> None:
    """CTC-like frames: 40 frames, 4 of them decided differently (hard, not near ties); nothing
    is fed back, so every frame counts and none is 'after'."""
    rng = np.random.default_rng(6)
    steps = []
    differ_at = {5, 11, 12, 30}
    for t in range(40):
        x = _logits(rng)
        if t in differ_at:
            b = x.copy()
            b[int(np.argsort(-x)[3])] = x.max() + 2.0
            steps.append((x, b))
        else:
            steps.append((x, x.copy()))
    a, b = _pair(tmp_path, steps, head="frame")
    closed, _ = _first(a, b)
    # read closed-loop (the default), every frame after the first mismatch is "after"
    assert closed.steps["after_divergence"] == 34 and closed.per_sample[0].mismatches == 1
    for pair in (_first(a, b, open_loop=["frame"])[0],
                 _first(*_pair(tmp_path / "declared", steps, head="frame", open_loop=["frame"]))[0]):
        assert pair.steps["after_divergence"] == 0
        assert pair.per_sample[0].mismatches == 4 and pair.per_sample[0].after == 0
        assert pair.decisions["compared"] == 40 and pair.decisions["divergent"] == 4
        assert pair.decisions["top1_agreement"] == pytest.approx(36 / 40)
        assert pair.alignment["open_loop"] == ["frame"]
        assert pair.first_divergence.step == 5


def test_ctc_collapse_reports_frame_flips_that_leave_the_text_unchanged(tmp_path: Path) -> None:
    """Frames [7, 7, 0, 9] vs [7, 0, 0, 9] (blank 0): one frame differs, the text does not."""
    def onehot(i: int, j: int | None = None) -> np.ndarray:
        x = np.linspace(-1.0, -8.0, V)
        x[i] = 5.0
        if j is not None:
            x[j] = 4.99
        return x

    ref = [onehot(7), onehot(7, 0), onehot(0), onehot(9)]
    cand = [onehot(7), onehot(0, 7), onehot(0), onehot(9)]
    a, b = _pair(tmp_path, list(zip(ref, cand)))
    pair, _ = _first(a, b, ctc_blank=0)
    assert pair.decisions["compared"] == 4 and pair.decisions["flips"] == 1
    assert pair.sequences["identical"] == 1 and pair.per_sample[0].identical_sequence
    assert pair.sequences["token_error_rate"] == 0.0
    assert pair.alignment["ctc_blank"] == 0 and pair.alignment["open_loop"] == ["token"]
    plain, _ = _first(a, b)
    assert plain.sequences["identical"] == 0


def test_culprit_is_looked_for_at_the_step_that_fed_the_divergence(tmp_path: Path) -> None:
    """An encoder run once at step 0 of the sample; frames decided at steps 0..9; a bug in the
    encoder's second layer: the divergence at step 6 has no tensors, the culprit is at step 0."""
    rng = np.random.default_rng(7)
    enc0 = rng.standard_normal((8, 4)).astype(np.float32)
    enc1 = rng.standard_normal((8, 4)).astype(np.float32)
    tensors = {0: {"encoder.conv0": (enc0, enc0.copy()), "encoder.conv1": (enc1, enc1 + 0.5),
                   "encoder.out": (enc1, enc1 + 0.4)}}
    steps = []
    for t in range(10):
        x = _logits(rng)
        b = x.copy()
        if t == 6:
            b[int(np.argsort(-x)[2])] = x.max() + 1.5
        steps.append((x, b))
    pair, fd = _first(*_pair(tmp_path, steps, head="frame", open_loop=["frame"], tensors=tensors))
    assert fd.step == 6 and fd.kind == "divergent"
    assert fd.culprit is not None and fd.culprit.name == "encoder.conv1" and fd.culprit.step == 0
    assert pair.per_sample[0].culprit == "encoder.conv1"


def test_saved_report_loads_back_into_report_values(tmp_path: Path) -> None:
    import json

    from steptrace.differ import DiffReport
    from steptrace.differ.errors import DiffFormatError

    rng = np.random.default_rng(9)
    steps = [(x, x + rng.uniform(-0.01, 0.01, V)) for x in (_logits(rng) for _ in range(12))]
    steps.append(_swap(_logits(rng), 1, 2, 0.3, 0.4))
    a, b = _pair(tmp_path, steps)
    rep = diff(a, [b])
    saved = tmp_path / "r.json"
    saved.write_text(rep.dumps())
    back = DiffReport.load(saved)
    assert back.to_json() == json.loads(rep.dumps())
    fd = back.worst.first_divergence
    assert fd.evidence.shift == pytest.approx(0.7, abs=1e-5) and fd.kind == "divergent"
    (tmp_path / "bad.json").write_text(json.dumps({"schema": "other"}))
    with pytest.raises(DiffFormatError, match="not a steptrace diff report"):
        DiffReport.load(tmp_path / "bad.json")
