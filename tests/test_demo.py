"""``trace demo``: the packaged tiny LM recorded in fp32 and int8 with ONNX Runtime, then diffed.

Real ONNX Runtime sessions on the committed model; the demo runs once per module in a fresh
interpreter (``python -X importtime -m steptrace.tui.cli demo``), as a user would run it.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="trace demo needs onnxruntime (pip install 'steptrace[onnx]')")
pytest.importorskip("onnx", reason="the demo's int8 copy needs the onnx package")

from steptrace.differ import DiffOptions, diff
from steptrace.tracefmt import TraceReader
from steptrace.tracefmt.validate import validate
from steptrace.tui.commands import demo as democmd
from steptrace.tui.cli import main

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One demo run: (out dir, completed process, top-level modules the process imported)."""
    out = tmp_path_factory.mktemp("demo") / "out"
    env = {**os.environ, "COLUMNS": "160"}  # rich wraps at 80 columns when stdout is not a terminal
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "steptrace.tui.cli", "demo", "--out", str(out),
                           "--steps", str(STEPS)], check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0]
                for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return out, proc, imported


def test_demo_exits_0_and_writes_two_valid_traces(demo):
    out, proc, _ = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("fp32", "int8"):
        report = validate(out / f"{name}.trace", deep=True)
        assert report.ok and report.complete, str(report)
    with TraceReader(out / "fp32.trace") as ref, TraceReader(out / "int8.trace") as cand:
        assert ref.samples() == cand.samples() == sorted(democmd.DEMO_PROMPTS)  # one sample per prompt
        assert ref.metadata.precision == "fp32" and cand.metadata.precision == "int8"
        assert ref.metadata.watched == {"eos": 0} and ref.piece(0) == "\n"
        assert ref.metadata.tags["onnxruntime.graph_optimization_level"] == "ORT_DISABLE_ALL"
        names = set(ref.tensor_names())
        assert "/layers.1/attn/out/Add_output_0" in names and "/layers.1/ff_out/Add_output_0" in names
        assert not any(n.startswith(("past_", "present_")) for n in names)
        steps = ref.decisions(sample="The file", columns=["step"])["step"].to_pylist()
        assert steps == list(range(STEPS))


def test_report_names_the_first_divergence_with_both_tokens(demo):
    out, proc, _ = demo
    m = re.search(r"First divergence: sample (.+?), step (\d+)", proc.stdout)
    assert m, proc.stdout
    fd = diff(str(out / "fp32.trace"), [str(out / "int8.trace")], DiffOptions(jobs=1)).worst.first_divergence
    assert fd is not None and fd.kind in ("flip", "divergent") and fd.a_token != fd.b_token
    assert (m.group(1), int(m.group(2))) == (fd.sample, fd.step)
    assert re.search(rf"reference\s+{fd.a_token} {re.escape(repr(fd.a_piece))}", proc.stdout), proc.stdout
    assert re.search(rf"candidate\s+{fd.b_token} {re.escape(repr(fd.b_piece))}", proc.stdout), proc.stdout
    assert f"trace view {out / 'fp32.trace'} {out / 'int8.trace'}" in proc.stdout
    assert "--json" in proc.stdout
    assert "quantize" in proc.stderr and "fp32  'The file'" in proc.stderr  # progress goes to stderr


def test_demo_imports_onnxruntime_but_not_torch_or_textual(demo):
    _, _, imported = demo
    assert "onnxruntime" in imported and "onnx" in imported  # the importtime parse sees real imports
    assert "torch" not in imported and "textual" not in imported


def test_rerun_replaces_a_previous_demo_but_refuses_other_folders(demo, tmp_path, capsys):
    out, _, _ = demo
    (out / "report.json").write_text("{}")
    assert main(["demo", "--out", str(out), "--steps", "3", "--prompt", "Return the"]) == 0
    assert not (out / "report.json").exists()
    with TraceReader(out / "int8.trace") as r:
        assert r.samples() == ["Return the"] and r.decisions().num_rows == 3
    (tmp_path / "mine.txt").write_text("keep me")
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not a previous demo" in capsys.readouterr().err
    assert (tmp_path / "mine.txt").read_text() == "keep me"
    assert main(["demo", "--out", str(tmp_path / "mine.txt")]) == 2


def test_bad_options_are_usage_errors(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "a"), "--steps", "500"]) == 2
    assert "--steps must be 1 to" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "a"), "--prompt", "café"]) == 2
    assert "outside the model's vocabulary" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_missing_runtime_or_onnx_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from steptrace import recorders

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    assert main(["demo", "--out", str(tmp_path / "a")]) == 2
    assert "trace demo needs onnxruntime: pip install 'steptrace[onnx]'" in capsys.readouterr().err
    monkeypatch.undo()

    monkeypatch.setitem(sys.modules, "onnx", None)
    monkeypatch.delitem(sys.modules, "steptrace.recorders.onnxruntime", raising=False)
    monkeypatch.delattr(recorders, "onnxruntime", raising=False)
    assert main(["demo", "--out", str(tmp_path / "b")]) == 2
    assert "needs the onnx package: pip install 'steptrace[onnx]'" in capsys.readouterr().err


def test_quantize_dynamic_copy_without_onnxruntime_quantization(tmp_path, monkeypatch):
    from steptrace.recorders.errors import RecorderUsageError
    from steptrace.recorders.onnxruntime import quantize_dynamic_copy

    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with pytest.raises(RecorderUsageError, match="needs the onnx package"):
        quantize_dynamic_copy(democmd.assets_dir() / "step.onnx", tmp_path / "q.onnx")


def test_help_says_the_demo_exits_0_and_prompts_match_the_assets(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "exit status is 0 even though the runs diverge" in " ".join(capsys.readouterr().out.split())
    readme = (democmd.assets_dir() / "README.md").read_text()
    assert f"DEMO_PROMPTS = {democmd.DEMO_PROMPTS!r}" in readme
