"""The viewer fits the terminal: at 80×24 the panes stack and every footer key and help line is
on screen; from 140 columns the steps and the detail share the width; headers, metrics and
the ``#`` column are not cut; a space piece is drawn as ␣; rows after a free-running divergence
read "after". Real Textual apps under Pilot, on traces written with tracefmt.TraceWriter.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import view_fixtures as vf
from rich.console import Console

from steptrace.tracefmt import TraceWriter

pytest.importorskip("textual")

from textual.widgets import DataTable  # noqa: E402
from textual.widgets._footer import FooterKey  # noqa: E402

from steptrace.tui.app.main import ViewApp  # noqa: E402
from steptrace.tui.viewer.values import display_piece, row_verdict  # noqa: E402
from steptrace.tui.app.widgets import HelpScreen, StepDetailPane, TensorsPane  # noqa: E402
from steptrace.tui.app.widgets.stepdetail import render_detail  # noqa: E402

#: A vocabulary whose pieces include a space and a newline (character-level models have them).
VOCAB = [" ", "\n", "a", "b", "c", "d", "e", "f"]
#: Tensors at step 0: more than 1,000, so execution orders have four digits.
MANY = 1100


@pytest.fixture(scope="module")
def traces(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("layout")
    out = vf.traces(tmp)
    for side in ("ref", "cand"):
        p = tmp / f"spaces-{side}.trace"
        meta = {"runtime": "onnxruntime", "precision": "fp32" if side == "ref" else "int8", "model": "char-lm"}
        with TraceWriter(p, metadata=meta, vocab=VOCAB) as w:
            for step in range(6):
                x = np.array([5.0, 1.0, 4.0, 3.0, 2.0, 0.5, 0.2, 0.1], np.float32)  # " " wins, "a" second
                if side == "cand" and step == 3:
                    x[2] = 6.0  # "a" instead of " ": a real divergence at step 3
                w.add_logits("s", step, x, k=4, time_us=None)
                if step == 0:
                    for i in range(MANY):
                        w.add_tensor("s", 0, f"block.{i}.out", np.full(4, i, np.float32), values=False)
        out[f"space_{side}"] = p
    return out


def _on_screen(app: ViewApp, widget) -> bool:
    r = widget.region
    return r.x >= 0 and r.y >= 0 and r.right <= app.size.width and r.bottom <= app.size.height


def _text(renderable, width: int) -> str:
    con = Console(width=width, color_system=None, record=True, file=open("/dev/null", "w"))
    con.print(renderable)
    return con.export_text()


@vf.run_async
async def test_80x24_stacks_the_panes_and_every_key_is_on_screen(traces):
    app = ViewApp([traces["ca"], traces["cb"]])
    async with app.run_test(size=(80, 24)) as pilot:
        await vf.settle(pilot)
        main = app.query_one("#main")
        assert main.has_class("-narrow") and main.has_class("-short")
        center, right = app.query_one("#center"), app.query_one("#right")
        assert center.region.width == right.region.width == 80 and right.region.y > center.region.y
        assert app.table.region.height >= 5  # the steps keep rows: header and at least 3 steps
        keys = list(app.query(FooterKey))
        assert {k.key for k in keys} >= {"f", "n", "g", "slash", "l", "t", "question_mark", "q"}
        assert all(_on_screen(app, k) for k in keys), [(k.key, k.region) for k in keys if not _on_screen(app, k)]
        await pilot.press("question_mark")
        await vf.settle(pilot)
        assert isinstance(app.screen, HelpScreen)
        box = app.screen.query_one("VerticalScroll")
        assert box.region.width <= 80 and box.region.right <= 80 and box.region.bottom <= 24
        assert box.max_scroll_x == 0  # wrapped, not cut: nothing to scroll sideways


@pytest.mark.parametrize("size", [(120, 40), (160, 48), (200, 50)], ids=lambda s: f"{s[0]}x{s[1]}")
@vf.run_async
async def test_from_120_columns_panes_share_the_width_and_nothing_is_cut(traces, size):
    app = ViewApp([traces["a"], traces["b"]])
    async with app.run_test(size=size) as pilot:
        await vf.settle(pilot)
        center, right = app.query_one("#center").region, app.query_one("#right").region
        if size[0] >= ViewApp.WIDE:  # side by side, sharing the width
            assert not app.query_one("#main").has_class("-narrow")
            assert center.width + right.width == size[0] and min(center.width, right.width) >= 0.4 * size[0]
        else:  # stacked: each pane has the full width
            assert center.width == right.width == size[0]
        await pilot.press("f")
        await vf.settle(pilot)
        detail = app.query_one(StepDetailPane)
        width = detail.content_region.width
        shown = _text(render_detail(detail.detail, width), width)
        a_label, b_label = detail.detail.a_label, detail.detail.b_label
        assert a_label in shown and b_label in shown, shown  # pane headers whole
        assert "…" not in shown  # tensor names and metrics fit at this width
        assert "max|Δ|" in shown and "decoder.mlp" in shown and "◀ culprit" in shown
        await pilot.press("t")
        await vf.settle(pilot)
        table = app.query_one(TensorsPane).query_one(DataTable)
        labels = [str(c.label) for c in table.columns.values()]
        assert labels[:4] == ["#", "tensor", "", "max|Δ|"]
        name_col = list(table.columns.values())[1]
        assert name_col.width >= max(len(ln.name) for ln in detail.detail.tensors)


@vf.run_async
async def test_rows_after_a_free_running_divergence_read_after(traces):
    app = ViewApp([traces["a"], traces["b"]])
    async with app.run_test(size=(200, 50)) as pilot:
        await vf.settle(pilot)
        await pilot.press("f", "j")
        await vf.settle(pilot)
        t = app.table
        width = t.scrollable_content_region.width
        first = t.row(t.cursor - 1)
        after = t.row(t.cursor)
        assert first.step == vf.FLIP_STEP and not first.after and after.after
        assert " flip " in t._line(first, width).plain
        line = t._line(after, width).plain
        assert " after " in line and "divergent" not in line and "flip" not in line
        shown = _text(render_detail(app.query_one(StepDetailPane).detail, 90), 90)
        assert "after the divergence" in shown.splitlines()[0] and "divergent" not in shown.splitlines()[0]
    assert row_verdict("divergent", True) == "after" and row_verdict("flip", False) == "flip"


@vf.run_async
async def test_space_piece_and_four_digit_tensor_orders(traces):
    app = ViewApp([traces["space_ref"], traces["space_cand"]])
    async with app.run_test(size=(160, 48)) as pilot:
        await vf.settle(pilot)
        t = app.table
        width = t.scrollable_content_region.width
        line = t._line(t.row(0), width).plain
        assert "0 ␣" in line  # token 0 is a space
        await pilot.press("t")
        await vf.settle(pilot)
        pane = app.query_one(TensorsPane)
        assert len(pane.lines) == MANY and max(ln.order for ln in pane.lines) == MANY - 1
        num = list(pane.query_one(DataTable).columns.values())[0]
        assert num.width >= len(str(MANY - 1)) >= 4
        detail = app.query_one(StepDetailPane).detail
        shown = _text(render_detail(detail, 70), 70)
        assert "0 ␣" in shown and "1099" not in shown.split("tensors in execution order")[0]
    assert display_piece(" the") == "␣the" and display_piece("\n") == "⏎" and display_piece("▁x") == "▁x"
    assert display_piece("a\x01") == "a\\x01" and display_piece(None) == ""
