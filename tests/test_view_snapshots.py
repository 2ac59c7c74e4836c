"""SVG snapshots of the viewer's main screens at a fixed terminal size (pytest-textual-snapshot):
one trace, two traces at the first divergence with the tensors pane, and a corpus.

Update after a deliberate change with ``pytest tests/test_view_snapshots.py --snapshot-update``
and look at the SVGs under tests/__snapshots__/ before committing them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import view_fixtures as vf

pytest.importorskip("textual")
pytest.importorskip("pytest_textual_snapshot")

from tui.app import ViewApp

SIZE = (150, 42)


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return vf.traces(tmp_path_factory.mktemp("snap"))


def test_snapshot_one_trace(snap_compare, traces):
    async def before(pilot):
        await vf.settle(pilot)
        await pilot.press("g", *"23", "enter")
        await vf.settle(pilot)

    assert snap_compare(ViewApp([traces["a"]]), terminal_size=SIZE, run_before=before)


def test_snapshot_two_traces_first_divergence_tensors(snap_compare, traces):
    async def before(pilot):
        await vf.settle(pilot)
        await pilot.press("f", "t")
        await vf.settle(pilot)

    assert snap_compare(ViewApp([traces["a"], traces["b"]]), terminal_size=SIZE, run_before=before)


def test_snapshot_corpus(snap_compare, traces):
    async def before(pilot):
        await vf.settle(pilot)
        await pilot.press("f")
        await vf.settle(pilot)

    assert snap_compare(ViewApp([traces["ca"], traces["cb"]]), terminal_size=SIZE, run_before=before)
