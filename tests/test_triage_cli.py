"""`trace triage` on a plain torch decode script that never imports steptrace: a harmless drift
in an early layer and a real bug in a later one from step 4. `trace diff` names the early layer
(the first symptom); `trace triage` names the later one, restores the decision and shows that
transplanting the early one changes nothing. Then the failures: budget exhausted (exit 1), a
reference without values (exit 2, or re-recorded with --ref-script), a JSONL-only candidate, a
Core ML candidate off macOS and a non-deterministic script (exit 2)."""

from __future__ import annotations

import json
import os
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from steptrace.recorders import Recorder
from steptrace.tui.cli import EXIT_ERROR, EXIT_MISMATCH, EXIT_OK, main

SCRIPT = str(Path(__file__).resolve().parent / "scripts" / "triage_chain.py")
BUGGY = [SCRIPT, "--drift", "1e-3", "--bug-layer", "2", "--bug-from", "4"]
REC = ["--logits", "head", "--modules", "layers.*"]


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    d = tmp_path_factory.mktemp("triage")
    assert main(["record", "-o", str(d / "ref.trace"), *REC, "--tensors", "full", SCRIPT]) == EXIT_OK
    assert main(["record", "-o", str(d / "ref_stats.trace"), *REC, "--tensors", "stats", SCRIPT]) == EXIT_OK
    assert main(["record", "-o", str(d / "cand.trace"), *REC, "--tensors", "stats", *BUGGY]) == EXIT_OK
    return d


def test_triage_names_the_later_bug_where_diff_names_the_early_drift(traces, tmp_path, capsys):
    d = traces
    before = {p: _snapshot(d / p) for p in ("ref.trace", "cand.trace")}
    capsys.readouterr()
    assert main(["diff", str(d / "ref.trace"), str(d / "cand.trace"), "--json", str(tmp_path / "diff.json")]) != EXIT_OK
    capsys.readouterr()
    fd = json.loads((tmp_path / "diff.json").read_text())["first_divergence"]
    assert fd["step"] == 4 and fd["culprit"]["name"] == "ChainLM.layers.0"  # the first symptom
    out = tmp_path / "triage.json"
    code = main(["triage", str(d / "ref.trace"), "--candidate", str(d / "cand.trace"), *REC, "--json", str(out),
                 *BUGGY])
    captured = capsys.readouterr()
    assert code == EXIT_OK, captured.err
    rep = json.loads(out.read_text())
    assert rep["schema"] == "steptrace.triage/1"
    rc = rep["root_cause"]
    assert (rc["name"], rc["step"], rc["sample"]) == ("ChainLM.layers.2", 4, "0")
    assert rc["restores"] is True and rc["introduces"] is True
    assert rc["local_error"] > 1.0 > 1e-3 > rc["tolerance"]
    fs = rep["first_symptom"]
    assert fs["name"] == "ChainLM.layers.0" and fs["restores"] is False
    assert fs["logit_error_after"] == pytest.approx(rep["target"]["logit_error"], rel=0.01)  # changes nothing
    assert rep["target"]["ref_token"] != rep["target"]["cand_token"]
    for t in rep["trials"]:
        assert {"transplanted", "step", "restored", "logit_error_before", "logit_error_after"} <= set(t)
    bisect = [t for t in rep["trials"] if t["purpose"] == "bisect"]
    assert 1 < len(bisect) <= 1 + int(np.ceil(np.log2(rep["candidates"])))
    # the report's first screen says it in one sentence, the progress went to stderr
    assert captured.out.lstrip().splitlines()[1].count("ChainLM.layers.2 introduces the error at step 4")
    assert captured.err.count("triage: re-run") == len(rep["trials"])
    # the user's traces were only read
    assert {p: _snapshot(d / p) for p in ("ref.trace", "cand.trace")} == before


def test_first_divergence_of_a_plain_rerun_is_the_default_target(traces, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["triage", str(traces / "ref.trace"), *REC, "--json", str(out), *BUGGY]) == EXIT_OK
    rep = json.loads(out.read_text())
    assert rep["candidate"] is None and rep["root_cause"]["name"] == "ChainLM.layers.2"


def test_an_unwritable_json_path_is_refused_before_any_rerun(traces, tmp_path, capsys):
    missing = tmp_path / "no" / "such" / "t.json"
    assert main(["triage", str(traces / "ref.trace"), *REC, "--json", str(missing), *BUGGY]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "cannot write the JSON report" in err and "does not exist" in err and "Traceback" not in err
    assert main(["triage", str(traces / "ref.trace"), *REC, "--json", str(tmp_path), *BUGGY]) == EXIT_ERROR
    assert "it is a folder" in capsys.readouterr().err


def test_budget_exhausted_says_what_was_tried_and_exits_1(traces, tmp_path, capsys):
    out = tmp_path / "t.json"
    code = main(["triage", str(traces / "ref.trace"), *REC, "--budget", "2", "--json", str(out), *BUGGY])
    captured = capsys.readouterr()
    assert code == EXIT_MISMATCH
    rep = json.loads(out.read_text())
    assert rep["budget"] == {"reruns": 2, "used": 2, "exhausted": True}
    assert rep["root_cause"] is None
    assert "budget of 2 transplant re-runs ran out" in rep["message"] and "--budget" in rep["message"]
    assert "ran out" in captured.out


def test_reference_without_values_names_the_command_or_is_rerecorded(traces, tmp_path, capsys):
    code = main(["triage", str(traces / "ref_stats.trace"), *REC, *BUGGY])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert "holds no values of ChainLM.layers." in err and "--tensors full" in err and "trace record" in err
    out = tmp_path / "t.json"
    code = main(["triage", str(traces / "ref_stats.trace"), "--ref-script", SCRIPT, *REC, "--json", str(out), *BUGGY])
    assert code == EXIT_OK, capsys.readouterr().err
    assert json.loads(out.read_text())["root_cause"]["name"] == "ChainLM.layers.2"


def test_jsonl_candidate_cannot_be_rerun(traces, tmp_path, capsys):
    exported = tmp_path / "cand.jsonl"
    assert main(["export", str(traces / "cand.trace"), "--format", "jsonl", "-o", str(exported)]) == EXIT_OK
    lines = exported.read_text().splitlines()
    # a C++ TensorRT runtime's own JSONL: its meta line knows nothing of steptrace's recorders
    meta = {"kind": "meta", "format": "steptrace", "version": "1.0", "runtime": {"name": "tensorrt", "version": "10.3"},
            "producer": {"name": "trt-asr-engine", "version": "0.4"}, "precision": "fp16"}
    foreign = tmp_path / "trt.jsonl"
    foreign.write_text("\n".join([json.dumps(meta), *lines[1:]]) + "\n")
    assert main(["import", "jsonl", str(foreign), str(tmp_path / "trt.trace")]) == EXIT_OK
    capsys.readouterr()
    code = main(["triage", str(traces / "ref.trace"), "--candidate", str(tmp_path / "trt.trace"), *REC])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR
    assert "imported" in err and "tensorrt" in err and "cannot re-run" in err
    assert "component swaps in your own runtime" in err


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML predict runs on macOS: the refusal is for other systems")
def test_coreml_candidate_off_macos_is_refused(traces, tmp_path, capsys):
    with Recorder(tmp_path / "coreml.trace", metadata={"runtime": "coreml"}) as rec:
        with rec.step():
            rec.decide(np.arange(8, dtype=np.float32))
    code = main(["triage", str(traces / "ref.trace"), "--candidate", str(tmp_path / "coreml.trace"), *REC, *BUGGY])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "Core ML" in err and "macOS" in err


def test_non_deterministic_candidate_stops_before_any_transplant(traces, tmp_path, capsys):
    noisy = tmp_path / "noisy.py"
    text = Path(SCRIPT).read_text().replace(
        "        return self.head(x)", "        return self.head(x + 1e-3 * torch.rand(x.shape, generator=NOISE))")
    noisy.write_text(text.replace("class Block(", "NOISE = torch.Generator().manual_seed(int.from_bytes(__import__('os').urandom(4), 'little'))\n\n\nclass Block("))
    code = main(["triage", str(traces / "ref.trace"), *REC, str(noisy)])
    err = capsys.readouterr().err
    assert code == EXIT_ERROR and "not deterministic" in err
    assert err.count("triage: re-run") == 2


def test_usage_errors(traces, capsys):
    assert main(["triage", str(traces / "ref.trace"), *REC]) == EXIT_ERROR
    assert "give the script that runs the candidate" in capsys.readouterr().err
    assert main(["triage", str(traces / "ref.trace"), "--logits", "head", "--components", "enc", SCRIPT]) == EXIT_ERROR
    assert "NAME=GLOB" in capsys.readouterr().err


def test_step_and_from_step_choose_the_target_and_the_transplanted_steps(traces, tmp_path, capsys):
    out = tmp_path / "t.json"
    code = main(["triage", str(traces / "ref.trace"), *REC, "--step", "6", "--from-step", "3", "--json", str(out),
                 *BUGGY])
    assert code == EXIT_OK, capsys.readouterr().err
    rep = json.loads(out.read_text())
    assert rep["target"]["step"] == 6 and rep["target"]["from_step"] == 3
    assert rep["root_cause"]["name"] == "ChainLM.layers.2" and rep["root_cause"]["step"] == 6
    assert all(t["steps"] == [3, 4, 5, 6] for t in rep["trials"] if t["transplanted"])
    assert main(["triage", str(traces / "ref.trace"), *REC, "--step", "6", "--from-step", "7", *BUGGY]) == EXIT_ERROR
    assert "--from-step 7 must lie between 0 and the target step 6" in capsys.readouterr().err


def test_viewer_marks_the_root_cause_in_the_tensors_pane(traces, tmp_path, capsys):
    pytest.importorskip("textual")
    import view_fixtures as vf

    from steptrace.tui.app.main import ViewApp
    from steptrace.tui.commands.view import load_triage
    from steptrace.tui.app.widgets import TensorsPane

    out = tmp_path / "t.json"
    assert main(["triage", str(traces / "ref.trace"), "--candidate", str(traces / "cand.trace"), *REC,
                 "--json", str(out), *BUGGY]) == EXIT_OK
    report = load_triage(str(out))

    async def check() -> None:
        app = ViewApp([traces / "ref.trace", traces / "cand.trace"], triage=report)
        async with app.run_test(size=(120, 32)) as pilot:
            await vf.settle(pilot)
            await pilot.press("t")
            pane = app.query_one(TensorsPane)
            for _ in range(50):  # the detail loads on a worker; a busy machine takes its time
                await vf.settle(pilot)
                if pane.lines:
                    break
            names = [ln.name for ln in pane.lines]
            assert "ChainLM.layers.2 ◆ root cause" in names
            assert [ln.name for ln in pane.lines if ln.culprit] == ["ChainLM.layers.0"]  # the first symptom stays marked
            assert app.table.row(app.table.cursor).step == 4  # the view opens at the root cause's step

    vf.run_async(check)()
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "steptrace.diff/1"}')
    assert main(["view", str(traces / "ref.trace"), str(traces / "cand.trace"), "--triage", str(bad)]) == EXIT_ERROR
    assert "not a `trace triage --json` report" in capsys.readouterr().err


def test_logit_error_is_the_differs_logit_noise_on_agreeing_steps(traces, tmp_path):
    from steptrace.differ import diff
    from steptrace.recorders.triagejudge import is_restored, logit_errors, Noise, read_rows
    from steptrace.tracefmt import TraceReader

    forced = tmp_path / "forced.trace"
    assert main(["record", "-o", str(forced), *REC, "--teacher", str(traces / "ref.trace"), *BUGGY]) == EXIT_OK
    rep = diff(str(traces / "ref.trace"), [str(forced)]).to_json()
    noise = rep["candidates"][0]["decisions"]["logit_noise"]["max"]
    a = read_rows(TraceReader(traces / "ref.trace"), "0", "token")
    b = read_rows(TraceReader(forced), "0", "token")
    agree = np.flatnonzero(a.chosen == b.argmax)
    assert agree.size and agree.size < a.step.size  # some steps agree, the bug's do not
    errs = logit_errors(a, agree, b, agree)
    assert errs.max() == pytest.approx(noise, rel=1e-6)
    # restored: the reference's token and a logit error within the noise bound, both needed
    bound = Noise(float(errs.max()), 1e-6)
    assert is_restored(3, 3, float(errs.max()), bound)
    assert not is_restored(3, 31, 0.0, bound)
    assert not is_restored(3, 3, 2 * float(errs.max()), bound)


def test_no_transplant_restores_a_bug_after_the_searched_tensors(traces, tmp_path, capsys):
    out = tmp_path / "t.json"
    code = main(["triage", str(traces / "ref.trace"), *REC, "--json", str(out), SCRIPT, "--head-bug-from", "2"])
    assert code == EXIT_MISMATCH
    rep = json.loads(out.read_text())
    assert rep["root_cause"] is None and rep["target"]["step"] == 2 and not rep["budget"]["exhausted"]
    assert "equals the reference's bit for bit" in rep["message"] and "decided logits" in rep["message"]
    code = main(["triage", str(traces / "ref.trace"), *REC, "--json", str(out), SCRIPT, "--drift", "1e-3",
                 "--head-bug-from", "2"])
    assert code == EXIT_MISMATCH
    rep = json.loads(out.read_text())
    assert "no transplant restores token" in rep["message"] and rep["candidates"] > 0
    assert [t["purpose"] for t in rep["trials"]] == ["plain", "determinism", "bisect", "single"]  # + the symptom


def test_local_all_measures_every_searched_tensor(traces, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["triage", str(traces / "ref.trace"), *REC, "--local", "all", "--json", str(out), *BUGGY]) == EXIT_OK
    rep = json.loads(out.read_text())
    mods = {m["name"]: m for m in rep["modules"]}
    assert len(mods) == rep["candidates"] and all(m["local_error"] is not None for m in mods.values())
    assert mods["ChainLM.layers.2"]["role"] == "root cause" and mods["ChainLM.layers.0"]["role"] == "harmless drift"
    # after the root cause the layers only carry its error: their own is within tolerance
    assert mods["ChainLM.layers.3"]["local_within"] is True and mods["ChainLM.layers.3"]["propagated_error"] > 1.0
    assert mods["ChainLM.layers.3"]["role"] in ("carries upstream error", "amplifies upstream error")
