"""The `trace` command as a user runs it: help everywhere, exit codes, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tui.cli import EXIT_ERROR, EXIT_MISMATCH, EXIT_OK, Outcome, build_parser, exit_code
from tracefmt import TraceFormatError

GOLDEN = Path(__file__).parent / "golden" / "v1-basic"


def _commands():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize("command", [None, *_commands()])
def test_every_command_has_help(trace_cli, command):
    res = trace_cli(*([command] if command else []), "--help")
    assert res.returncode == 0
    assert "usage: trace" in res.stdout and len(res.stdout) > 200


def test_exit_codes_are_decided_in_one_place():
    assert exit_code(Outcome()) == EXIT_OK == 0
    assert exit_code(Outcome(mismatch=True)) == EXIT_MISMATCH == 1
    assert exit_code(error=TraceFormatError("x")) == EXIT_ERROR == 2
    assert exit_code(error=KeyboardInterrupt()) == 130


def test_info_json_describes_the_trace(trace_cli):
    res = trace_cli("info", "--json", str(GOLDEN))
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["complete"] is True and info["samples"] == 2 and info["decisions"] == 16
    assert info["heads"]["token"]["decisions"] == 8 and info["vocab_size"] == 8
    assert {t["name"] for t in info["tensor_names"]} >= {"encoder.out", "decoder.state"}
    assert info["metadata"]["model"] == "golden-tiny" and info["bytes"]["values"] > 0


def test_info_tables(trace_cli):
    res = trace_cli("info", str(GOLDEN))
    assert res.returncode == 0
    for text in ("golden-tiny", "complete", "decision heads", "encoder.out", "eos=3"):
        assert text in res.stdout


def test_usage_errors_exit_2(trace_cli):
    assert trace_cli("info").returncode == 2
    assert trace_cli("frobnicate").returncode == 2
    res = trace_cli("export", str(GOLDEN), "--format", "xml", "-o", "x")
    assert res.returncode == 2 and "invalid choice" in res.stderr


def test_trace_info_does_not_import_heavy_modules(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from tui.cli import main; main(['info', '--json', %r]); "
            "bad = [m for m in ('torch', 'onnxruntime', 'coremltools', 'textual', 'transformers') if m in sys.modules]; "
            "print('HEAVY', bad)") % str(GOLDEN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]
