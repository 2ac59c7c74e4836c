"""SVG snapshots of the viewer's main screens at 80×24 (stacked panes, no plots) and 200×50 (side
by side) with pytest-textual-snapshot: one trace, two traces at the first divergence with the
tensors pane, a corpus, and the help screen at 80×24.

Update after a deliberate change with ``pytest tests/test_view_snapshots.py --snapshot-update``
and look at the SVGs under tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import view_fixtures as vf

pytest.importorskip("textual")
pytest.importorskip("pytest_textual_snapshot")

from steptrace.tui.app.main import ViewApp

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((200, 50), id="200x50")]


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return vf.traces(tmp_path_factory.mktemp("snap"))


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_one_trace(snap_compare, traces, size):
    async def before(pilot):
        await vf.settle(pilot)
        await pilot.press("g", *"23", "enter")
        await vf.settle(pilot)

    assert snap_compare(ViewApp([traces["a"]]), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_two_traces_first_divergence_tensors(snap_compare, traces, size):
    async def before(pilot):
        await vf.settle(pilot)
        await pilot.press("f", "t")
        await vf.settle(pilot)

    assert snap_compare(ViewApp([traces["a"], traces["b"]]), terminal_size=size, run_before=before)


@pytest.mark.parametrize("size", SIZES)
def test_snapshot_corpus(snap_compare, traces, size):
    async def before(pilot):
        await vf.settle(pilot)
        await pilot.press("f")
        await vf.settle(pilot)

    assert snap_compare(ViewApp([traces["ca"], traces["cb"]]), terminal_size=size, run_before=before)


def test_snapshot_help_80x24(snap_compare, traces):
    async def before(pilot):
        await vf.settle(pilot)
        await pilot.press("question_mark")
        await vf.settle(pilot)

    assert snap_compare(ViewApp([traces["a"], traces["b"]]), terminal_size=(80, 24), run_before=before)
