"""Pilot tests of the viewer (`trace view`): navigation keys, search, goto, filter, panes, quit,
and bad or incomplete traces opening with a notice instead of a crash.

Expected steps are computed from the traces with tracefmt.TraceReader, not from the viewer.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import view_fixtures as vf

from steptrace.tracefmt import TraceReader, TraceWriter
from steptrace.tracefmt.errors import TraceNotFoundError, TraceUsageError

pytest.importorskip("textual")


from steptrace.tui.app.main import ViewApp
from steptrace.tui.viewer.data import ViewModel
from steptrace.tui.app.widgets import HelpScreen, Notices, SamplesPane, StepDetailPane, TensorsPane

SIZE = (120, 32)


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return vf.traces(tmp_path_factory.mktemp("view"))


def _step(app: ViewApp) -> int:
    row = app.table.row(app.table.cursor)
    assert row is not None, "cursor row not loaded"
    return row.step


def _argmax(path: Path, sample: str) -> np.ndarray:
    d = TraceReader(path).decisions(sample=sample, columns=["argmax"])
    return d["argmax"].to_numpy()


@vf.run_async
async def test_f_lands_on_first_divergence_and_detail_shows_it(traces):
    app = ViewApp([traces["a"], traces["b"]])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        assert app.rowmap.kind == "diff"
        assert _step(app) == 0
        await pilot.press("f")
        await vf.settle(pilot)
        assert _step(app) == vf.FLIP_STEP
        detail = app.query_one(StepDetailPane).detail
        assert detail.row.step == vf.FLIP_STEP and detail.row.verdict == "flip"
        assert detail.row.a.argmax != detail.row.b.argmax
        assert [ln.name for ln in detail.tensors if ln.culprit] == ["decoder.mlp"]
        await pilot.press("d")
        await vf.settle(pilot)
        assert _step(app) == vf.DRIFT_STEP


@vf.run_async
async def test_n_and_N_walk_fresh_mismatches(traces):
    app = ViewApp([traces["ca"], traces["cb"]], sample=vf.FORCED_SAMPLE)
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        assert app.sample == vf.FORCED_SAMPLE
        seen = []
        for _ in range(4):
            await pilot.press("n")
            await vf.settle(pilot)
            seen.append(_step(app))
        assert seen == list(vf.LOW_STEPS)
        await pilot.press("n")  # no further mismatch: the cursor stays
        await vf.settle(pilot)
        assert _step(app) == vf.LOW_STEPS[-1]
        await pilot.press("N", "N")
        await vf.settle(pilot)
        assert _step(app) == vf.LOW_STEPS[1]


@vf.run_async
async def test_search_token_piece_and_id_with_n_repeating(traces):
    a, b = _argmax(traces["a"], vf.PAIR_SAMPLE), _argmax(traces["b"], vf.PAIR_SAMPLE)
    went = vf.VOCAB.index("▁went")
    expected = [int(i) for i in np.flatnonzero((a == went) | (b == went))]
    assert len(expected) >= 2
    app = ViewApp([traces["a"], traces["b"]])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        await pilot.press("slash", *"went", "enter")
        await vf.settle(pilot)
        assert _step(app) == expected[0]
        await pilot.press("n")
        await vf.settle(pilot)
        assert _step(app) == expected[1]
        await pilot.press("N")
        await vf.settle(pilot)
        assert _step(app) == expected[0]
        await pilot.press("escape", "g", *"0", "enter", "slash", *str(went), "enter")  # by token id
        await vf.settle(pilot)
        assert _step(app) == expected[0]


@vf.run_async
async def test_goto_step_and_clamping(traces):
    app = ViewApp([traces["a"]])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        await pilot.press("g", "4", "0", "enter")
        await vf.settle(pilot)
        assert _step(app) == 40
        await pilot.press("g", *"999", "enter")
        await vf.settle(pilot)
        assert _step(app) == vf.STEPS - 1
        await pilot.press("home")
        await vf.settle(pilot)
        assert _step(app) == 0


@vf.run_async
async def test_low_margin_filter_toggles(traces):
    d = TraceReader(traces["a"]).decisions(sample=vf.PAIR_SAMPLE, columns=["step", "margin"])
    low = d.filter(pc.less(d["margin"], 1.0))["step"].to_pylist()
    app = ViewApp([traces["a"]])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        await pilot.press("l")
        await vf.settle(pilot)
        assert app.table.row_count == len(low)
        got = [app.table.row(i).step for i in range(len(low))]
        assert got == low and all(app.table.row(i).low for i in range(len(low)))
        await pilot.press("n")  # one trace: n goes to the next low margin
        await vf.settle(pilot)
        assert _step(app) == low[1]
        await pilot.press("l")
        await vf.settle(pilot)
        assert app.table.row_count == vf.STEPS
        assert _step(app) == low[1]  # the step under the cursor is kept


@vf.run_async
async def test_tensors_pane_lists_step_tensors_with_culprit_and_preview(traces):
    app = ViewApp([traces["a"], traces["b"]])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        pane = app.query_one(TensorsPane)
        assert not pane.display
        await pilot.press("t", "f")
        await vf.settle(pilot)
        assert pane.display
        assert [ln.name for ln in pane.lines] == ["decoder.attn", "decoder.mlp"]
        assert pane.lines[1].culprit and not pane.lines[1].compare.within
        preview = str(pane.query_one("#tensor-preview").render())
        assert "statistics only" in preview  # odd steps are stats-only
        await pilot.press("g", *"22", "enter")  # even step: values recorded on both sides
        await vf.settle(pilot)
        preview = str(pane.query_one("#tensor-preview").render())
        assert "A: " in preview and "B: " in preview and "statistics only" not in preview
        await pilot.press("t")
        assert not pane.display


@vf.run_async
async def test_help_opens_and_closes_and_q_quits(traces):
    app = ViewApp([traces["a"]])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)
        await pilot.press("q")
        await pilot.pause()
    assert app.return_code == 0


@vf.run_async
async def test_corpus_samples_pane_sort_enter_and_brackets(traces):
    app = ViewApp([traces["ca"], traces["cb"]])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        pane = app.query_one(SamplesPane)
        assert pane.display and pane.row_count == len(vf.CORPUS)
        assert app.sample == "utt-002"  # the report's first divergence (worst verdict, earliest step)
        order = [str(r.key.value) for r in pane.ordered_rows]
        assert order[:2] == ["utt-002", "utt-003"]  # divergent first
        pane.focus()
        await pilot.press("home", "down", "enter")
        await vf.settle(pilot)
        assert app.sample == order[1]
        await pilot.press("right_square_bracket")
        await vf.settle(pilot)
        assert app.sample == order[2]
        await pilot.press("f")
        await vf.settle(pilot)
        first = next(r.first_step for r in app.samples_rows if r.sample == app.sample)
        assert _step(app) == first


@vf.run_async
async def test_mouse_click_selects_row(traces):
    app = ViewApp([traces["a"]])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        await pilot.click("StepTable", offset=(10, 6))  # border + header, then rows 0, 1, 2, 3
        await vf.settle(pilot)
        assert _step(app) == 4


@vf.run_async
async def test_saved_report_is_reused(traces, tmp_path):
    from steptrace.differ import diff

    report = tmp_path / "r.json"
    report.write_text(diff(traces["ca"], [traces["cb"]]).dumps())
    app = ViewApp([traces["ca"], traces["cb"]], diff_json=str(report), sample="utt-001")
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        assert app.model.report is None  # not re-diffed as a whole
        verdicts = {r.sample: r.verdict for r in app.samples_rows}
        assert verdicts["utt-000"] == "identical" and verdicts["utt-002"] == "divergent"
        await pilot.press("f")
        await vf.settle(pilot)
        assert _step(app) == vf.FLIP_STEP and app.rowmap.kind == "diff"


@vf.run_async
async def test_incomplete_trace_opens_with_notice(traces, tmp_path):
    path = vf.interrupted(tmp_path)
    app = ViewApp([path])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        notices = app.query_one(Notices)
        assert notices.display and "INCOMPLETE" in notices.items[0] and "12 decisions" in notices.items[0]
        assert app.table.row_count == 12


def _damage(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (f,) = (dst / "parts").glob("*.decisions.arrow")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return dst


@vf.run_async
async def test_damaged_trace_shows_notice_not_crash(traces, tmp_path):
    bad = _damage(traces["a"], tmp_path / "bad.trace")
    app = ViewApp([bad])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        items = app.query_one(Notices).items
        assert any("damaged" in n for n in items), items
        await pilot.press("f", "n", "l", "t", "g", "1", "enter")  # keys on an empty view are harmless
        await vf.settle(pilot)
        assert app.is_running


@vf.run_async
async def test_damaged_candidate_falls_back_to_reference(traces, tmp_path):
    bad = _damage(traces["b"], tmp_path / "bad-cand.trace")
    app = ViewApp([traces["a"], bad])
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        assert any("showing ref.trace alone" in n for n in app.query_one(Notices).items)
        assert app.table.row_count == vf.STEPS and not app.model.pair


def test_bad_paths_and_options_raise_trace_errors(traces, tmp_path):
    with pytest.raises(TraceNotFoundError):
        ViewModel([tmp_path / "nope.trace"])
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(TraceUsageError):
        ViewModel([traces["a"], traces["b"]], diff_json=junk)
    with pytest.raises(TraceUsageError):
        ViewModel([traces["a"]], diff_json=junk)


def test_viewcmd_help_and_no_textual_import():
    code = ("import sys, argparse, steptrace.tui.commands.view as v; p = argparse.ArgumentParser(); "
            "v.add_parser(p.add_subparsers()); assert 'textual' not in sys.modules, 'textual imported'; "
            "p.parse_args(['view', '--help'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=vf_root(), timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert "--diff-json" in out.stdout and "first divergence" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "steptrace.tui.cli", "view", "/nonexistent.trace"], capture_output=True, text=True,
                         cwd=vf_root(), timeout=60, check=False)
    assert bad.returncode == 2 and "error:" in bad.stderr


def vf_root() -> Path:
    """The repository root."""
    return Path(__file__).resolve().parent.parent


@vf.run_async
async def test_traces_that_cannot_be_compared_show_a_notice_and_pair_by_step(traces, tmp_path):
    other = tmp_path / "other.trace"
    with TraceWriter(other, vocab=list(reversed(vf.VOCAB))) as w:
        for step in range(5):
            w.add_logits(vf.PAIR_SAMPLE, step, np.arange(vf.V, dtype=np.float32), k=3, time_us=None)
    app = ViewApp([traces["a"], other], sample="no-such-sample", step=3)
    async with app.run_test(size=SIZE) as pilot:
        await vf.settle(pilot)
        items = app.query_one(Notices).items
        assert any("no sample 'no-such-sample'" in n for n in items), items
        assert any(n.startswith("diff:") and "vocabular" in n for n in items), items
        assert app.rowmap.kind == "steps" and _step(app) == 3
        row = app.table.row(app.table.cursor)
        assert row.a is not None and row.b is not None and row.verdict is None
