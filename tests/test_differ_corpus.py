"""A 3-way corpus diff (reference vs two candidates) with known counts, and the CLI command."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from steptrace.differ import DiffOptions, diff
from steptrace.differ import tensors as tensors_mod
from differ_models import StepLM, decode_torch, writer
from steptrace.tui.commands import diff as diffcmd

N, STEPS = 200, 6


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """ref; cand_a = exact rerun; cand_b = the head's argmax knocked out at step 2 on every 4th
    sample (50 samples: a different token), plus a layer nudge (drift only) at step 1 on every
    10th sample that is not a multiple of 4 (10 samples)."""
    tmp = tmp_path_factory.mktemp("corpus")
    m = StepLM(seed=2)
    paths = []
    for name in ("ref", "a", "b"):
        p = tmp / f"{name}.trace"

        def nudge(sample: str, step: int, mod: str, out: torch.Tensor, name: str = name) -> torch.Tensor | None:
            i = int(sample[1:])
            if name != "b":
                return None
            if i % 4 == 0 and mod == "head" and step == 2:  # knock out the argmax: a different token
                out = out.clone()
                out[0, out[0].argmax()] -= 50.0
                return out
            return out + 0.01 if i % 10 == 0 and i % 4 and mod == "mid" and step == 1 else None

        with writer(p) as w:
            for i in range(N):
                decode_torch(m, w, f"u{i:03d}", i % 32, STEPS, hook=nudge, stop_at_eos=False)
        paths.append(p)
    return paths[0], paths[1], paths[2]


def test_three_way_known_counts(corpus: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    ref, a, b = corpus
    monkeypatch.setattr(tensors_mod, "POOL_MIN_ELEMENTS", 0)  # exercise the process pool
    seen: list[tuple[str, int, int]] = []
    r = diff(ref, [a, b], DiffOptions(jobs=2), progress=lambda *x: seen.append(x))
    ca, cb = r.candidates
    assert ca.verdict == "identical" and ca.samples["identical"] == N and ca.sequences["identical"] == N
    assert cb.samples["total"] == N
    changed = [i for i in range(N) if i % 4 == 0]
    drifted = [i for i in range(N) if i % 10 == 0 and i % 4]
    assert cb.sequences["identical"] == N - len(changed)
    assert cb.samples["flip"] + cb.samples["divergent"] == len(changed)
    assert cb.samples["drift"] == len(drifted)
    assert cb.samples["identical"] == N - len(changed) - len(drifted)
    assert cb.first_divergence_histogram["counts"] and sum(cb.first_divergence_histogram["counts"]) == len(changed)
    assert {p.first_step for p in cb.per_sample if p.kind in ("flip", "divergent")} == {2}
    assert {p.drift_step for p in cb.per_sample if p.verdict == "drift"} == {1}
    assert cb.culprits == [{"name": "head", "samples": len(changed)}, {"name": "mid", "samples": len(drifted)}]
    assert cb.sequences["token_error_rate"] == pytest.approx(
        sum(p.token_edits for p in cb.per_sample) / (N * STEPS))
    assert 0 < cb.sequences["wer"] <= 1 and 0 < cb.sequences["cer"] <= 1
    assert r.verdict == cb.verdict and r.to_json()["worst_candidate"] == 1
    (x,) = r.cross
    assert x.samples == N and x.identical_sequences == N - len(changed) and not x.identical
    assert any(s[0] == "tensor values" for s in seen) and ("candidates", 2, 2) in seen
    doc = json.loads(r.dumps())
    assert doc["schema"] == "steptrace.diff/1" and len(doc["per_sample"]) == N
    assert doc["samples"]["total"] == N and doc["first_divergence"]["step"] == 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="trace")
    diffcmd.add_parser(p.add_subparsers())
    return p


def test_cli_outcomes_and_json(corpus: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ref, a, b = corpus
    out = diffcmd.run(_parser().parse_args(["diff", str(ref), str(a), "--samples", "u00*"]))
    assert out.mismatch is False and out.report.verdict == "identical"
    shown = capsys.readouterr().out
    assert "IDENTICAL" in shown and "Identical sequences on 10 / 10" in shown
    out = diffcmd.run(_parser().parse_args(["diff", str(ref), str(b), "--json", "-", "--samples", "u00*"]))
    doc = json.loads(capsys.readouterr().out)
    assert out.mismatch is True and doc["verdict"] in ("flip", "divergent") and doc["mismatch"] is True
    assert set(doc["first_divergence"]) >= {"sample", "step", "head", "kind", "a_token", "b_token", "a_margin",
                                            "b_margin", "culprit"}
    out = diffcmd.run(_parser().parse_args(["diff", str(ref), str(b), "--fail-on", "missing", "--json",
                                            str(tmp_path / "r.json"), "--samples", "u00*"]))
    assert out.mismatch is False and json.loads((tmp_path / "r.json").read_text())["fail_on"] == "missing"


def test_cli_import_time_has_no_frameworks() -> None:
    code = "import steptrace.tui.commands.diff, steptrace.tui.render.diff, steptrace.differ, sys; print(sorted(m for m in ('torch', 'onnxruntime', 'textual') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    assert not any(f"| {m}" in res.stderr for m in ("torch", "onnxruntime", "textual"))
