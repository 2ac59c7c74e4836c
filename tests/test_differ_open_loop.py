"""The differ on real per-position models recorded with every position decided (one step per
frame, tensors at the step they were computed at): a CTC recogniser built in torch and run in
ONNX Runtime, and silero-vad's sequence model from PyPI, each with a planted bug in one Conv."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch", reason="needs torch (pip install 'steptrace[torch]')")
pytest.importorskip("onnxruntime", reason="needs onnxruntime (pip install 'steptrace[onnx]')")

from steptrace.differ import diff  # noqa: E402
from positions_models import build_ctc_pair, build_vad_pair  # noqa: E402


@pytest.fixture(scope="module")
def ctc(tmp_path_factory: pytest.TempPathFactory):
    return build_ctc_pair(tmp_path_factory.mktemp("ctc"), bug=True)


def test_every_frame_is_compared_and_every_sample_gets_the_planted_conv(ctc) -> None:
    pair = diff(ctc.ref, [ctc.cand]).candidates[0]
    frames = sum(len(u.labels) for u in ctc.utts)
    assert pair.alignment["open_loop"] == ["token"]
    assert pair.decisions["compared"] == frames and pair.steps["after_divergence"] == 0
    differing = pair.decisions["flips"] + pair.decisions["divergent"]
    assert pair.decisions["top1_agreement"] == pytest.approx(1 - differing / frames)
    assert len(pair.per_sample) == len(ctc.utts)
    for s in pair.per_sample:  # every sample diverges at a frame without tensors; its encoder ran at step 0
        assert s.verdict == "divergent" and s.mismatches >= 3 and s.after == 0
        assert s.culprit == ctc.culprit
    assert sum(s.mismatches for s in pair.per_sample) == differing
    fd = pair.first_divergence
    assert fd.culprit.step == 0 and fd.step > 0
    # the bug moves agreeing frames by whole logits too: the noise cap keeps its flips divergent
    assert fd.evidence.rule is None and fd.evidence.shift > fd.evidence.noise_cap


def test_benign_optimisation_levels_stay_identical(tmp_path: Path) -> None:
    p = build_ctc_pair(tmp_path, bug=False)
    pair = diff(p.ref, [p.cand]).candidates[0]
    assert pair.verdict in ("identical", "equivalent") and pair.decisions["compared"] > 0


def test_silero_vad_sequence_chunks_with_a_planted_conv_bug(tmp_path: Path) -> None:
    pytest.importorskip("silero_vad", reason="needs silero-vad (pip install silero-vad)")
    v = build_vad_pair(tmp_path)
    pair = diff(v.ref, [v.cand]).candidates[0]
    assert pair.decisions["compared"] == len(v.probs) and pair.steps["after_divergence"] == 0
    assert pair.decisions["flips"] + pair.decisions["divergent"] == pair.per_sample[0].mismatches >= 1
    fd = pair.first_divergence
    assert fd.culprit is not None and fd.culprit.name == v.culprit and fd.culprit.step == 0


def test_viewer_points_a_divergence_without_tensors_to_its_culprit_step(ctc) -> None:
    pytest.importorskip("textual", reason="the viewer needs textual")
    from rich.console import Console

    from steptrace.tui.viewer.data import ViewModel
    from steptrace.tui.app.widgets.stepdetail import render_detail

    m = ViewModel([ctc.ref, ctc.cand])
    m.open()
    m.compute_diff()
    fd = m.report.worst.first_divergence
    sd = m.sample_diff(fd.sample)
    rm = m.rowmap(fd.sample, sd)
    row = rm.shown(rm.base_row_of_step(fd.step))
    d = m.detail(rm, row)
    assert d.row.verdict == "divergent" and d.tensors == ()
    assert d.pointer is not None and ctc.culprit in d.pointer and "step 0" in d.pointer
    assert d.evidence is not None and "not explained" in d.evidence and "shift" in d.evidence
    text = "".join(seg.text for seg in Console(width=100).render(render_detail(d, 100)))
    assert "recorded at step 0" in text and "shift" in text
