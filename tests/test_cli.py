"""The `trace` command as a user runs it: help everywhere, exit codes, no tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from steptrace.tui.cli import EXIT_ERROR, EXIT_MISMATCH, EXIT_OK, Outcome, build_parser, exit_code
from steptrace.tracefmt import TraceFormatError

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

    code = ("import sys; from steptrace.tui.cli import main; main(['info', '--json', %r]); "
            "bad = [m for m in ('torch', 'onnxruntime', 'coremltools', 'textual', 'transformers') if m in sys.modules]; "
            "print('HEAVY', bad)") % str(GOLDEN)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in out.stdout, out.stdout[-500:] + out.stderr[-500:]


def test_help_of_info_validate_import_export_has_examples(trace_cli):
    for command in ("info", "validate", "import", "export", "diff"):
        res = trace_cli(command, "--help")
        assert "examples:" in res.stdout and f"trace {command} " in res.stdout.split("examples:")[1], command
        assert "docs/differ.md" not in res.stdout  # a path only a source checkout has
        assert "trace docs" in res.stdout, command


def test_docs_named_in_help_ship_with_the_package(trace_cli):
    from steptrace.tui.commands.docs import TOPICS, doc_text

    docs = Path(__file__).parent.parent / "docs"
    for topic, (name, _) in TOPICS.items():
        assert doc_text(topic) == ((docs / name) if (docs / name).exists() else docs.parent / name).read_text()
    shipped = {p.name for p in (Path(__file__).parent.parent / "tui" / "docs").glob("*.md")}
    assert {p.name for p in docs.glob("*.md")} <= shipped and {n for n, _ in TOPICS.values()} <= shipped
    res = trace_cli("docs", "differ")
    assert res.returncode == 0 and res.stdout.startswith("# The differ")
    assert trace_cli("docs").stdout.startswith("documents (trace docs TOPIC):")
    assert trace_cli("docs", "nope").returncode == 2


def test_info_lists_tensors_in_execution_order_and_folds_long_lists(tmp_path, trace_cli):
    import numpy as np

    from steptrace.tracefmt import TraceWriter
    from steptrace.tui.render.info import FOLD_OVER

    names = ["encoder.conv", *[f"layers.{i}.{part}" for i in range(12) for part in ("attn", "mlp")], "lm_head"]
    assert len(names) <= FOLD_OVER < 2 * len(names)
    with TraceWriter(tmp_path / "t.trace", vocab=["a", "b", "c"]) as w:
        for step in range(2):
            w.add_logits("s", step, np.array([0.0, 1.0, 2.0], np.float32))
            for i, n in enumerate(names):  # recorded in execution order; alphabetical would differ
                w.add_tensor("s", step, n, np.full(3, i, np.float32))
                if step == 0:
                    w.add_tensor("s", step, f"z.extra{i}", np.zeros(1, np.float32))
    res = trace_cli("info", str(tmp_path / "t.trace"), "--all")
    assert res.returncode == 0, res.stderr
    rows = [ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("│ ")]
    tensors = [r for r in rows if r in names or r.startswith("z.extra")]
    assert tensors[:4] == ["encoder.conv", "z.extra0", "layers.0.attn", "z.extra1"]
    assert "…" not in res.stdout and "names differing only in numbers" not in res.stdout
    res = trace_cli("info", str(tmp_path / "t.trace"))
    assert "names differing only in numbers folded" in res.stdout
    folded = [ln for ln in res.stdout.splitlines() if ln.startswith("│ ")]
    assert any("layers.#.attn" in ln and " 12 " in ln for ln in folded)
    assert any("z.extra#" in ln and f" {len(names)} " in ln for ln in folded)
    assert "2 steps" in res.stdout and "1 sample," in res.stdout


def test_each_command_runs_in_a_fresh_interpreter(tmp_path):
    """One subprocess smoke test per command (the rest of the suite calls the CLI in-process):
    the console entry point, exit codes and output as a user's shell sees them."""
    from conftest import run_trace

    jl = tmp_path / "g.jsonl"
    runs = {
        "info": (("info", str(GOLDEN)), 0, "decisions"),
        "validate": (("validate", str(GOLDEN)), 0, "valid"),
        "export": (("export", str(GOLDEN), "--format", "jsonl", "-o", str(jl)), 0, "wrote"),
        "import": (("import", "jsonl", str(jl), str(tmp_path / "g.trace")), 0, "imported"),
        "diff": (("diff", str(GOLDEN), str(tmp_path / "g.trace"), "--format", "text"), None, "Verdict"),
        "docs": (("docs", "differ", "--path"), 0, "differ.md"),
        "triage": (("triage", str(GOLDEN), str(tmp_path / "missing.py")), 2, ""),
    }
    for command, (argv, code, text) in runs.items():
        res = run_trace(*argv)
        assert "Traceback" not in res.stderr, (command, res.stderr)
        assert code is None or res.returncode == code, (command, res.returncode, res.stdout, res.stderr)
        assert text in res.stdout + res.stderr, (command, res.stdout, res.stderr)


def test_diff_refuses_an_unwritable_output_before_diffing(trace_cli, tmp_path):
    missing = tmp_path / "nowhere" / "r.json"
    res = trace_cli("diff", str(GOLDEN), str(GOLDEN), "--json", str(missing))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"cannot write the JSON report to {missing}: the folder" in res.stderr
    res = trace_cli("diff", str(GOLDEN), str(GOLDEN), "--save-mapping", str(tmp_path))
    assert res.returncode == 2 and "cannot write the name mapping" in res.stderr and "it is a folder" in res.stderr
    assert trace_cli("diff", str(GOLDEN), str(GOLDEN), "--json", str(tmp_path / "r.json")).returncode == 0
