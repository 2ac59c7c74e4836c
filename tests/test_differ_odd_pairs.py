"""Odd trace pairs the differ must handle without a traceback: disjoint samples, empty traces,
duplicates named by path."""

from __future__ import annotations

import json

import numpy as np
import pytest

from steptrace.tracefmt import TraceWriter
from steptrace.tui.cli import main


def _trace(path, samples, steps=3, tensors=True):
    with TraceWriter(path) as w:
        for s in samples:
            for step in range(steps):
                w.add_logits(s, step, np.arange(8, dtype=np.float32) + step)
                if tensors:
                    w.add_tensor(s, step, "x", np.arange(4, dtype=np.float32))
    return path


@pytest.mark.parametrize("ref, cand", [(["a"], ["c"]), (["c"], ["a"]), ([], ["a"]), (["a"], [])])
def test_disjoint_or_empty_sides_give_a_report(tmp_path, ref, cand, capsys):
    a = _trace(tmp_path / "ref.trace", ref)
    b = _trace(tmp_path / "cand.trace", cand)
    code = main(["diff", str(a), str(b), "--json", "-"])
    out = capsys.readouterr()
    if ref and cand and not set(ref) & set(cand):  # nothing to compare: a usage error that says so
        assert code == 2 and "0 samples in common" in out.err
        return
    assert code == 1, out.err  # samples on one side only are "missing": a mismatch
    report = json.loads(out.out)
    assert report["verdict"] == "missing" and report["mismatch"] is True


def test_duplicate_keys_are_named_by_path(tmp_path, capsys):
    a = _trace(tmp_path / "ref.trace", ["a"])
    b = _trace(tmp_path / "dup.trace", ["a"])
    # a second part recording the same sample: the writer cannot refuse what another process wrote
    with TraceWriter(b, mode="append") as w:
        w.add_logits("a", 0, np.arange(8, dtype=np.float32))
    code = main(["diff", str(a), str(b)])
    err = capsys.readouterr().err
    assert code == 2
    assert str(b) in err and "trace B" not in err
