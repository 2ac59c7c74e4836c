"""Golden v1 traces, committed once and read forever after (SPEC.md v1.0).

If a test here fails, the change broke readers of existing traces: fix the change, do not
regenerate the golden files. A new format version gets new golden files beside these.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from steptrace.tracefmt import TraceReader
from steptrace.tracefmt.validate import validate

GOLDEN = Path(__file__).parent / "golden"
BASIC = GOLDEN / "v1-basic"
INTERRUPTED = GOLDEN / "v1-interrupted"


def test_golden_files_are_unchanged():
    """The committed bytes themselves: regenerating or editing them is not allowed."""
    h = hashlib.sha256()
    for p in sorted(x for x in GOLDEN.glob("v1-*/**/*") if x.is_file()):
        h.update(p.relative_to(GOLDEN).as_posix().encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    assert h.hexdigest() == "71427ceaaa425134c8deb1080227717998934bc934c266779a7e8baf6d930e0c"


def test_basic_metadata():
    r = TraceReader(BASIC)
    m = r.metadata
    assert (m.model, m.runtime, m.runtime_version, m.precision, m.device) == ("golden-tiny", "golden", "1", "fp32", "cpu")
    assert m.watched == {"eos": 3} and m.tags == {"purpose": "golden"} and m.command == ["make_golden.py"]
    assert m.created == "2026-01-01T00:00:00.000000Z"
    assert r.vocab == ["<pad>", "<s>", "</s>", "<eos>", "▁the", "▁cat", "▁sat", "."]
    assert r.complete and validate(BASIC, deep=True).ok
    assert r.samples() == ["utt-a", "utt-b"] and r.heads() == ["duration", "token"]


def test_basic_token_decisions():
    d = TraceReader(BASIC).decisions(sample="utt-a", head="token").to_pylist()
    assert [r["chosen"] for r in d] == [1, 4, 7, 2]
    assert [r["topk_ids"] for r in d] == [[1, 2, 4, 5], [4, 5, 6, 7], [7, 0, 1, 2], [2, 3, 4, 5]]
    assert d[0]["topk_logits"] == [2.5, 2.0, 1.0, 0.5]
    assert all(r["margin"] == 0.5 and r["chosen_rank"] == 0 and r["chosen_logit"] == 2.5 for r in d)
    assert math.isclose(d[0]["logsumexp"], 3.2547433376312256, rel_tol=1e-7)
    assert [r["watched"] for r in d] == [
        [{"id": 3, "logit": -math.inf, "rank": 7}], [{"id": 3, "logit": -1.0, "rank": 7}],
        [{"id": 3, "logit": 0.5, "rank": 4}], [{"id": 3, "logit": 2.0, "rank": 1}]]
    assert [r["piece"] for r in d] == ["<s>", "▁the", ".", "</s>"]
    assert [(r["frame"], r["chunk"], r["position"]) for r in d] == [(0, 0, None), (1, 0, None), (2, 1, None), (3, 1, None)]
    assert d[2]["time"].isoformat() == "2026-01-01T00:00:00.002000+00:00"


def test_basic_duration_head():
    d = TraceReader(BASIC).decisions(sample="utt-b", head="duration").to_pylist()
    assert [(r["chosen"], r["forced"], r["margin"], r["logsumexp"], r["emission"]) for r in d] == [
        (0, False, 0.25, 2.0, 0), (1, False, 0.25, 2.0, 0), (0, False, 0.25, 2.0, 0), (1, True, 0.25, 2.0, 0)]


def test_basic_tensors():
    r = TraceReader(BASIC)
    t = r.tensors(sample="utt-b", step=1).to_pylist()
    assert [(x["name"], x["call"], x["order"], x["has_values"]) for x in t] == [
        ("encoder.out", 0, 0, True), ("decoder.state", 0, 1, False), ("encoder.out", 1, 2, True)]
    np.testing.assert_array_equal(r.tensor("utt-b", 1, "encoder.out"), np.arange(12, dtype=np.float32).reshape(3, 4) * 2 + 1)
    np.testing.assert_array_equal(r.tensor("utt-b", 1, "encoder.out", call=1), np.ones(2, np.float32))
    state = t[1]
    assert (state["min"], state["max"], state["mean"], state["numel"]) == (-1.0, 4.0, 1.5, 6)
    f16 = r.tensor("utt-a", 0, "special.f16")
    assert f16.dtype == np.float16 and f16.view(np.uint16).tolist() == [0x3C00, 0x7E00, 0x7C00, 0xFC00, 0x8000]
    assert r.tensor("utt-a", 0, "special.bf16", raw_bits=True).tolist() == [0x3F80, 0xC000, 0x7FC1, 0xFF80]
    assert r.tensor("utt-a", 0, "special.scalar").shape == () and r.tensor("utt-a", 0, "special.scalar") == 7
    assert r.tensor("utt-a", 0, "special.empty").shape == (0, 3)
    assert r.tensor("utt-a", 0, "special.bool").tolist() == [True, False, True]
    enc0 = r.tensors(sample="utt-b", step=0, name="encoder.out").to_pylist()[0]
    assert enc0["digest"].hex() == "b56f1bcea104206b3581af0c889000f7"
    assert (enc0["min"], enc0["max"], enc0["mean"], enc0["l2"]) == (1.0, 12.0, 6.5, math.sqrt(650.0))
    special = r.tensors(sample="utt-a", step=0, name="special.f16").to_pylist()[0]
    assert (special["nan_count"], special["inf_count"], special["min"], special["max"]) == (1, 2, -0.0, 1.0)
    assert r.tensor_names() == ["decoder.state", "encoder.out", "special.bf16", "special.bool", "special.empty",
                                "special.f16", "special.scalar"]


def test_interrupted_trace_reads_as_incomplete():
    r = TraceReader(INTERRUPTED)
    assert not r.complete and r.parts[0].status == "open" and r.parts[0].writer_alive is None
    d = r.decisions()
    assert d["step"].to_pylist() == list(range(10)) and d["chosen"].to_pylist() == [s % 5 for s in range(10)]
    assert r.tensor("killed", 9, "h").tolist() == [9.0] * 4
    report = validate(INTERRUPTED, deep=True)
    assert report.ok and not report.complete


@pytest.mark.parametrize("trace", [BASIC, INTERRUPTED], ids=["basic", "interrupted"])
def test_iteration_covers_every_step(trace):
    r = TraceReader(trace)
    steps = list(r.iter_steps())
    assert len(steps) == len({(s.sample, s.step) for s in steps})
    assert sum(s.decisions.num_rows for s in steps) == r.decisions().num_rows
    assert sum(s.tensors.num_rows for s in steps) == r.tensors().num_rows
