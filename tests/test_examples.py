"""The real-model examples, each run in a subprocess with small sizes, their verdicts asserted.

``examples/silero_vad_parity.py`` (silero-vad's own models on the committed espeak-ng WAV) and
``examples/tiny_lm_parity.py`` (the demo's tiny LM in torch and ONNX Runtime). Verdicts are the
ones measured on those models; the traces each example leaves are diffed again here so the
counts come from the differ's values, not only from the printed lines.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import wave
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WAV = ROOT / "examples" / "data" / "speech_16k.wav"

needs_torch_ort = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or importlib.util.find_spec("onnxruntime") is None
    or importlib.util.find_spec("onnx") is None,
    reason="the examples need torch, onnxruntime and onnx (pip install 'steptrace[torch,onnx]')",
)
needs_silero = pytest.mark.skipif(
    importlib.util.find_spec("silero_vad") is None,
    reason="silero-vad is not installed (pip install silero-vad --no-deps): it ships the VAD models the example "
           "compares",
)


def _run(script: str, *args: str, timeout: float = 50) -> tuple[str, dict[str, str]]:
    """Run an example; return its stdout and ``{pair label: the rest of its verdict line}``."""
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)
    assert proc.returncode == 0, f"{script} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    lines = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^([a-z0-9-]+): (.*)$", line)
        if m:
            lines[m.group(1)] = m.group(2)
    return proc.stdout, lines


def _pair(ref: Path, cand: Path, **policy: float):
    from steptrace.differ import DiffOptions, diff
    from steptrace.differ.policy import DecisionTolerance, Policy

    pol = Policy()
    if policy:
        pol = Policy(decisions=DecisionTolerance(logit_atol=policy.get("atol"), logit_rtol=policy.get("rtol")))
        pol = pol.with_overrides(tensor=policy)
    return diff(str(ref), [str(cand)], DiffOptions(policy=pol)).candidates[0]


def test_committed_wav_is_short_16k_mono_speech():
    assert WAV.stat().st_size <= 300_000
    with wave.open(str(WAV), "rb") as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        assert 3.0 <= w.getnframes() / 16000 <= 9.5


@needs_torch_ort
@needs_silero
def test_silero_vad_parity(tmp_path):
    out = tmp_path / "vad"
    stdout, lines = _run("silero_vad_parity.py", "--out", str(out), "--max-chunks", "120", "--atol", "1e-4",
                         "--rtol", "2e-3")
    assert set(lines) >= {"jit-vs-onnx", "stream-vs-sequence", "fp32-vs-int8"}, stdout
    # (a) TorchScript vs ONNX: same call on every chunk, numbers within the stated tolerance
    assert re.match(r"equivalent; speech/silence differs on 0/120 chunks", lines["jit-vs-onnx"]), stdout
    # (b) streaming vs the sequence model: bit-identical probabilities
    assert re.match(r"identical; speech/silence differs on 0/120 chunks", lines["stream-vs-sequence"]), stdout
    # (c) int8 quantize_dynamic copy: broken, many chunks called differently
    m = re.match(r"(flip|divergent); speech/silence differs on (\d+)/120 chunks", lines["fp32-vs-int8"])
    assert m and int(m.group(2)) >= 20, stdout

    strict = _pair(out / "jit.trace", out / "onnx.trace")  # built-in tolerance: drift at most, never a flip
    assert strict.verdict in ("identical", "equivalent", "drift")
    assert strict.decisions["flips"] == 0 and strict.decisions["divergent"] == 0
    assert all(s.verdict in ("identical", "equivalent", "drift") for s in strict.per_sample)
    seq = _pair(out / "onnx.trace", out / "sequence.trace")
    assert seq.verdict == "identical" and seq.decisions["compared"] == 120
    q = _pair(out / "op15.trace", out / "int8.trace")
    assert q.verdict in ("flip", "divergent") and q.first_divergence is not None
    assert q.first_divergence.head == "vad" and q.sequences["token_edits"] >= 20
    # the vad head is open-loop: every chunk is compared, none is "after" the first divergence
    assert q.alignment["open_loop"] == ["vad"] and q.steps["after_divergence"] == 0
    assert q.decisions["compared"] == 120
    assert q.decisions["flips"] + q.decisions["divergent"] == int(m.group(2))
    assert q.per_sample[0].mismatches == int(m.group(2))


@needs_torch_ort
def test_tiny_lm_parity(tmp_path):
    out = tmp_path / "lm"
    stdout, lines = _run("tiny_lm_parity.py", "--out", str(out), "--steps", "12", "--atol", "1e-4")
    assert set(lines) >= {"kv-vs-full", "torch-vs-ort", "fp32-vs-int8"}, stdout
    for label in ("kv-vs-full", "torch-vs-ort"):
        assert re.match(r"(identical|equivalent); identical sequences 5/5, steps 60 compared, 0 flip\(s\), "
                        r"0 divergent", lines[label]), stdout
    assert re.match(r"(flip|divergent);", lines["fp32-vs-int8"]), stdout

    kv = _pair(out / "torch_kv.trace", out / "torch_full.trace")  # built-in tolerance: same tokens
    assert kv.verdict in ("identical", "equivalent", "drift") and kv.sequences["identical"] == 5
    q = _pair(out / "ort_fp32.trace", out / "ort_int8.trace")
    assert q.verdict in ("flip", "divergent") and q.decisions["flips"] + q.decisions["divergent"] >= 1
    # which tokens an int8 kernel flips depends on the CPU; what is checked is that the verdict
    # follows the evidence the report shows (docs/differ.md §4)
    fd = q.first_divergence
    assert fd.evidence is not None and (fd.kind == "flip") == (fd.evidence.rule is not None)


@needs_torch_ort
def test_tiny_lm_parity_teacher_forcing_keeps_int8_aligned(tmp_path):
    out = tmp_path / "lm-tf"
    stdout, lines = _run("tiny_lm_parity.py", "--out", str(out), "--steps", "12", "--teacher-forcing",
                         "--prompt", "Return a list of", "--prompt", "Close the file")
    m = re.match(r"(flip|divergent); identical sequences 2/2, steps 24 compared, (\d+) flip\(s\), (\d+) divergent",
                 lines["fp32-vs-int8"])
    assert m and int(m.group(2)) + int(m.group(3)) >= 2, stdout  # every step compared, not just the first
