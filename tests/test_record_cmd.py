"""`trace record` on plain scripts that never import steptrace: a torch GRU decoder and an ONNX
Runtime one (the model exported in the test) record the same decisions and tensors as the
TorchRecorder / OrtRecorder APIs; teacher forcing steers the script's own argmax; Ctrl-C,
exceptions and sys.exit leave a valid closed trace and the script's status is reported."""

from __future__ import annotations

import gc
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from steptrace.recorders.onnxruntime import OrtRecorder
from steptrace.recorders.torch import TorchRecorder
from steptrace.tracefmt import TraceReader
from steptrace.tracefmt.validate import validate
from steptrace.tui.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_MISMATCH, main

ROOT = Path(__file__).resolve().parent.parent
H = 24

GRU_SCRIPT = textwrap.dedent('''
    """A plain greedy GRU decoder: it knows nothing of steptrace."""
    import argparse
    import os
    import time

    import torch
    from torch import nn


    class GRULM(nn.Module):
        def __init__(self, seed=0, vocab=48, hidden=24, bias=0.0):
            super().__init__()
            torch.manual_seed(seed)
            self.emb = nn.Embedding(vocab, hidden)
            self.gru = nn.GRU(hidden, hidden, batch_first=True)
            self.head = nn.Linear(hidden, vocab)
            with torch.no_grad():
                self.head.weight.mul_(4.0)
                self.head.bias[7] += bias

        def forward(self, token, h=None):
            out, h = self.gru(self.emb(token.view(1, 1)), h)
            return self.head(out[:, -1]), h


    def main():
        ap = argparse.ArgumentParser()
        ap.add_argument("--steps", type=int, default=8)
        ap.add_argument("--bias", type=float, default=0.0)
        ap.add_argument("--sleep", type=float, default=0.0)
        ap.add_argument("--fail-at", type=int, default=-1)
        ap.add_argument("--exit", type=int, default=None)
        ap.add_argument("--samples", type=int, default=1)
        a = ap.parse_args()
        model = GRULM(bias=a.bias)
        with torch.no_grad():
            for s in range(a.samples):
                if a.samples > 1:
                    os.environ["STEPTRACE_SAMPLE"] = f"utt{s}"
                tok, h = 1 + s, None
                for t in range(a.steps):
                    if t == a.fail_at:
                        raise ValueError(f"boom at step {t}")
                    logits, h = model(torch.tensor([tok]), h)
                    tok = int(logits[0].argmax())
                    print(tok, flush=True)
                    time.sleep(a.sleep)
        if a.exit is not None:
            raise SystemExit(a.exit)


    if __name__ == "__main__":
        main()
''')

ORT_SCRIPT = textwrap.dedent('''
    import sys

    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
    tok, h = 1, np.zeros((1, 1, 24), np.float32)
    for _ in range(int(sys.argv[2])):
        logits, h = sess.run(["logits", "h_out"], {"token": np.array([tok]), "h": h})
        tok = int(logits[0].argmax())
        print(tok, flush=True)
''')


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    d = tmp_path_factory.mktemp("scripts")
    (d / "gru_decode.py").write_text(GRU_SCRIPT)
    (d / "ort_decode.py").write_text(ORT_SCRIPT)
    model = runpy.run_path(str(d / "gru_decode.py"), run_name="gru_model")["GRULM"]().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.tensor([1]), torch.zeros(1, 1, H)), str(d / "gru.onnx"), dynamo=False,
                          input_names=["token", "h"], output_names=["logits", "h_out"], opset_version=17)
    return d


def record(*argv: str) -> int:
    return main(["record", *argv])


def decisions(path: Path) -> list[dict]:
    cols = ["sample", "step", "chosen", "argmax", "forced", "topk_ids", "topk_logits", "margin", "logsumexp"]
    return sorted(TraceReader(path).decisions(columns=cols).to_pylist(), key=lambda r: (r["sample"], r["step"]))


def digests(path: Path, root: str = "") -> dict[tuple, bytes]:
    """(sample, step, name, call) -> digest; ``root``: names without that root label's prefix."""
    t = TraceReader(path).tensors(columns=["sample", "step", "name", "call", "digest"]).to_pylist()
    cut = len(root) + 1 if root else 0
    return {(r["sample"], r["step"], r["name"][cut:] if root and r["name"].startswith(root + ".") else r["name"],
             r["call"]): r["digest"] for r in t}


def printed(out: str) -> list[int]:
    return [int(x) for x in out.split()]


# ---------------------------------------------------------------------- same as the APIs
def test_torch_script_records_what_the_torch_recorder_api_records(scripts, tmp_path, capsys):
    assert record("-o", str(tmp_path / "script.trace"), "--modules", "*", "--logits", "head",
                  str(scripts / "gru_decode.py"), "--steps", "8") == 0
    tokens = printed(capsys.readouterr().out)
    model = runpy.run_path(str(scripts / "gru_decode.py"), run_name="gru_api")["GRULM"]()
    api_tokens, tok, h = [], 1, None
    with TorchRecorder(tmp_path / "api.trace", model, modules=["*"]) as rec, torch.no_grad():
        for _ in range(8):
            with rec.step():
                logits, h = model(torch.tensor([tok]), h)
                tok = rec.decide(logits[0])
            api_tokens.append(tok)
    assert tokens == api_tokens
    assert torch.nn.Module.__call__ is torch.nn.Module._wrapped_call_impl  # unwrapped after the run
    assert gc.get_freeze_count() == 0  # the objects frozen while the script ran are unfrozen
    assert decisions(tmp_path / "script.trace") == decisions(tmp_path / "api.trace")
    script, api = digests(tmp_path / "script.trace", "GRULM"), digests(tmp_path / "api.trace")
    assert {k[2] for k in api} == {"emb", "gru.0", "gru.1", "head", "logits:token"}
    assert {k[2] for k in script} == {k[2] for k in api} | {"0", "1"}  # the root itself: GRULM.0, GRULM.1
    assert {k[2] for k in digests(tmp_path / "script.trace")} >= {"GRULM.emb", "GRULM.head", "GRULM.gru.0"}
    assert all(script[k] == v for k, v in api.items())  # same bits, same steps, same call indices
    meta = TraceReader(tmp_path / "script.trace").metadata
    assert meta.runtime == "torch" and meta.command[:2] == ["trace", "record"] and meta.command[-2:] == ["--steps", "8"]


def test_recording_imports_neither_the_reader_nor_pyarrow_compute(scripts, tmp_path):
    """Writing needs neither: pyarrow.compute alone is ~50 ms of every `trace record`'s start; and
    off a terminal (stderr is a pipe here) its notes and summary are plain lines, with no rich."""
    code = ("import sys; from steptrace.tui.cli import main; "
            "rc = main(['record', '-o', sys.argv[1], '--modules', '*', '--tensors', 'full', '--writer', 'thread', "
            "'--logits', 'head', sys.argv[2], '--steps', '3']); "
            "print('RC', rc, 'LOADED', [m for m in ('pyarrow.compute', 'steptrace.tracefmt.reader', 'rich') "
            "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "t.trace"), str(scripts / "gru_decode.py")],
                         check=False, capture_output=True, text=True, timeout=300)
    assert "RC 0 LOADED []" in out.stdout, out.stdout[-500:] + out.stderr[-1500:]
    assert [d["step"] for d in decisions(tmp_path / "t.trace")] == [0, 1, 2]
    assert "recorded 3 steps (3 decisions, " in out.stderr


def test_onnx_script_records_what_the_ort_recorder_api_records(scripts, tmp_path, capsys):
    import onnxruntime as ort

    run, init = ort.InferenceSession.run, ort.InferenceSession.__init__
    assert record("-o", str(tmp_path / "script.trace"), "--modules", "*", "--logits", "logits",
                  str(scripts / "ort_decode.py"), str(scripts / "gru.onnx"), "6") == 0
    tokens = printed(capsys.readouterr().out)
    assert (ort.InferenceSession.run, ort.InferenceSession.__init__) == (run, init)  # unpatched after the run
    api_tokens = []
    with OrtRecorder(tmp_path / "api.trace", str(scripts / "gru.onnx"), logits="logits", tensors=["*"]) as rec:
        tok, h = 1, np.zeros((1, 1, H), np.float32)
        for _ in range(6):
            _, h = rec.run(["logits", "h_out"], {"token": np.array([tok]), "h": h})
            tok = rec.token
            api_tokens.append(tok)
    assert tokens == api_tokens
    assert decisions(tmp_path / "script.trace") == decisions(tmp_path / "api.trace")
    script, api = digests(tmp_path / "script.trace", "gru"), digests(tmp_path / "api.trace")
    assert {k[2] for k in script} == {k[2] for k in api} == {"token", "h", "logits", "h_out", "logits:token"}
    assert script == api
    order = TraceReader(tmp_path / "script.trace").tensors(columns=["step", "name", "order"]).to_pylist()
    step0 = [r["name"] for r in sorted(order, key=lambda r: r["order"]) if r["step"] == 0]
    assert step0[:2] == ["gru.token", "gru.h"]  # inputs first, then outputs in topological order
    assert TraceReader(tmp_path / "script.trace").metadata.runtime == "onnxruntime"


def test_the_script_sets_its_samples_and_tuple_elements_can_be_the_logits(scripts, tmp_path, capsys):
    assert record("-o", str(tmp_path / "s.trace"), "--logits", "GRULM.0", str(scripts / "gru_decode.py"),
                  "--steps", "3", "--samples", "2") == 0
    rows = decisions(tmp_path / "s.trace")
    assert [(r["sample"], r["step"]) for r in rows] == [("utt0", 0), ("utt0", 1), ("utt0", 2),
                                                        ("utt1", 0), ("utt1", 1), ("utt1", 2)]
    cap = capsys.readouterr()
    assert [r["chosen"] for r in rows] == printed(cap.out) and "decided nothing" not in cap.err
    assert "STEPTRACE_SAMPLE" not in os.environ  # the script's setting does not outlive its run


# ---------------------------------------------------------------------- teacher forcing
def test_teacher_forcing_steers_the_scripts_own_argmax(scripts, tmp_path, capsys):
    script = str(scripts / "gru_decode.py")
    assert record("-o", str(tmp_path / "ref.trace"), "--logits", "head", script, "--steps", "6") == 0
    ref_tokens = printed(capsys.readouterr().out)
    assert record("-o", str(tmp_path / "free.trace"), "--logits", "head", script, "--steps", "6", "--bias", "6") == 0
    assert printed(capsys.readouterr().out) != ref_tokens  # the biased model decodes otherwise
    assert record("-o", str(tmp_path / "forced.trace"), "--teacher", str(tmp_path / "ref.trace"), "--logits", "head",
                  script, "--steps", "6", "--bias", "6") == 0
    assert printed(capsys.readouterr().out) == ref_tokens  # the script took the reference's tokens
    rows = decisions(tmp_path / "forced.trace")
    assert [r["chosen"] for r in rows] == ref_tokens and all(r["forced"] for r in rows)
    assert any(r["argmax"] != r["chosen"] for r in rows)  # and the run's own argmax is kept
    # past the reference's end: a clear error (exit 2), the trace still closed
    assert record("-o", str(tmp_path / "long.trace"), "--teacher", str(tmp_path / "ref.trace"), "--logits", "head",
                  script, "--steps", "8") == EXIT_ERROR
    assert "records steps 0..5" in capsys.readouterr().err
    assert validate(tmp_path / "long.trace").complete


def test_teacher_forcing_steers_an_onnx_script_too(scripts, tmp_path, capsys):
    assert record("-o", str(tmp_path / "ref.trace"), "--logits", "head", str(scripts / "gru_decode.py"),
                  "--steps", "5", "--bias", "6") == 0  # the reference: a different (torch) model
    ref_tokens = printed(capsys.readouterr().out)
    assert record("-o", str(tmp_path / "ort.trace"), "--teacher", str(tmp_path / "ref.trace"), "--logits", "logits",
                  str(scripts / "ort_decode.py"), str(scripts / "gru.onnx"), "5") == 0
    assert printed(capsys.readouterr().out) == ref_tokens
    rows = decisions(tmp_path / "ort.trace")
    assert [r["chosen"] for r in rows] == ref_tokens and all(r["forced"] for r in rows)
    assert [r["argmax"] for r in rows] != ref_tokens


# ---------------------------------------------------------------------- endings
def test_script_exception_is_reported_and_the_trace_closed(scripts, tmp_path, capsys):
    code = record("-o", str(tmp_path / "f.trace"), "--logits", "head", str(scripts / "gru_decode.py"),
                  "--steps", "9", "--fail-at", "3")
    err = capsys.readouterr().err
    assert code == EXIT_MISMATCH  # the script failed
    assert "ValueError: boom at step 3" in err and "gru_decode.py" in err and "exited with status 1" in err
    assert "runpy" not in err  # the traceback starts in the script
    assert gc.get_freeze_count() == 0
    report = validate(tmp_path / "f.trace")
    assert report.ok and report.complete
    assert [r["step"] for r in decisions(tmp_path / "f.trace")] == [0, 1, 2]


def test_sys_exit_status_is_the_commands(scripts, tmp_path, capsys):
    code = record("-o", str(tmp_path / "x.trace"), "--logits", "head", str(scripts / "gru_decode.py"),
                  "--steps", "2", "--exit", "3")
    assert code == 3 and validate(tmp_path / "x.trace").complete


def test_sys_exit_zero_is_success_and_nonzero_is_reported(scripts, tmp_path, capsys):
    script = str(scripts / "gru_decode.py")
    assert record("-o", str(tmp_path / "a.trace"), "--logits", "head", script, "--steps", "2", "--exit", "0") == 0
    assert record("-o", str(tmp_path / "b.trace"), "--logits", "head", script, "--steps", "2", "--exit", "3") != 0
    assert "exited with status 3" in capsys.readouterr().err
    assert len(decisions(tmp_path / "b.trace")) == 2


def test_ctrl_c_leaves_a_valid_closed_trace(scripts, tmp_path):
    out = tmp_path / "int.trace"
    proc = subprocess.Popen(
        [sys.executable, "-m", "steptrace.tui.cli", "record", "-o", str(out), "--modules", "*", "--logits", "head",
         str(scripts / "gru_decode.py"), "--steps", "100000", "--sleep", "0.005"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = [proc.stdout.readline() for _ in range(20)]  # the script printed 20 tokens
        assert all(s.strip().isdigit() for s in seen)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == EXIT_INTERRUPTED, err
    assert "interrupted" in err and "recorded" in err
    report = validate(out)
    assert report.ok and report.complete, report
    rows = decisions(out)
    assert len(rows) >= 20 and [r["step"] for r in rows] == list(range(len(rows)))
    tensors = TraceReader(out).tensors(columns=["step"])["step"].to_numpy()
    assert set(np.unique(tensors)) <= set(range(len(rows) + 1))


# ---------------------------------------------------------------------- usage
def test_module_mode_and_usage_errors(scripts, tmp_path, capsys, monkeypatch):
    pkg = tmp_path / "decoders"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "gru.py").write_text(GRU_SCRIPT)
    monkeypatch.chdir(tmp_path)
    assert record("-o", "m.trace", "--logits", "head", "-m", "decoders.gru", "--steps", "4") == 0
    assert len(decisions(tmp_path / "m.trace")) == 4
    capsys.readouterr()
    assert record("-o", "m.trace", "--logits", "head", "-m", "decoders.gru") == EXIT_ERROR  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert record("-o", "n.trace", "--logits", "head", "-m", "decoders.nope") == EXIT_ERROR
    assert "no module named 'decoders.nope'" in capsys.readouterr().err
    assert record("-o", "n.trace", "--logits", "head", "missing.py") == EXIT_ERROR
    assert "no script at missing.py" in capsys.readouterr().err
    assert record("-o", "n.trace", "--logits", "lm_head", str(scripts / "gru_decode.py"), "--steps", "2") == EXIT_ERROR
    err = capsys.readouterr().err
    assert "--logits lm_head matched no" in err and "GRULM" in err and "head" in err


def test_record_help(trace_cli):
    res = trace_cli("record", "--help")
    assert res.returncode == 0
    for word in ("--logits", "--modules", "--tensors", "--teacher", "-m MODULE", "STEPTRACE_SAMPLE", "Ctrl-C",
                 "--sample-per", "--sample-from", "--scores", "ROOT.path"):
        assert word in res.stdout


def test_notes_off_a_terminal_stay_on_one_line(scripts, tmp_path, capsys):
    """stderr is a pipe or a log here: a long path must not be wrapped (it is searched for)."""
    deep = tmp_path / ("a-long-folder-name-" * 4) / ("and-another-one-" * 3)
    deep.mkdir(parents=True)
    out = deep / "f.trace"
    assert record("-o", str(out), "--logits", "head", str(scripts / "gru_decode.py"), "--steps", "2") == 0
    lines = capsys.readouterr().err.splitlines()
    assert any(str(out) in line and line.startswith("recorded 2 steps") for line in lines), lines
