"""Units of the differ: metrics, policy, sequence alignment, mapping, incompatible traces."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from steptrace.differ import (
    DiffOptions,
    IncompatibleTracesError,
    MappingError,
    PolicyError,
    compare_values,
    diff,
    guess_mapping,
    load_mapping,
    load_policy,
)
from steptrace.differ.policy import Policy, TensorTolerance, default_tensor_tolerance, parse_override, ulp
from steptrace.differ.sequence import align, edit_distance, pieces_to_text
from steptrace.tracefmt import TraceWriter
from steptrace.tracefmt.errors import TraceUsageError


def test_compare_values_metrics() -> None:
    rng = np.random.default_rng(0)
    a = rng.standard_normal(100_000).astype(np.float32)
    b = a.copy()
    b[7] += 0.5
    m = compare_values(a, b, TensorTolerance(atol=1e-3, rtol=0.0))
    d = np.abs(a.astype(np.float64) - b)
    assert m.max_abs == pytest.approx(d.max(), rel=1e-6) and m.mean_abs == pytest.approx(d.mean(), rel=1e-4)
    assert m.max_rel == pytest.approx((d / np.abs(a)).max(), rel=1e-5)
    cos = float(a.astype(np.float64) @ b / np.linalg.norm(a.astype(np.float64)) / np.linalg.norm(b.astype(np.float64)))
    assert m.cosine == pytest.approx(cos, abs=1e-9)
    assert m.sqnr_db == pytest.approx(10 * math.log10((a.astype(np.float64) ** 2).sum() / (d**2).sum()), rel=1e-4)
    assert m.bad == 1 and not m.within and m.reason == "elements" and m.basis == "values" and m.bitexact is False
    assert compare_values(a, b, TensorTolerance(atol=1e-3, bad_fraction=1e-4)).within
    assert compare_values(a, a.copy(), TensorTolerance()).bitexact
    assert str(compare_values(a, a.copy(), TensorTolerance())) == "bit-exact"


def test_compare_values_nan_inf_shape_dtype() -> None:
    a = np.array([1.0, np.nan, 3.0, np.inf], np.float32)
    b = np.array([1.0, np.nan, 3.0, np.inf], np.float32)
    b2 = b.copy()
    b2[1] = 2.0
    assert compare_values(a, b, TensorTolerance(), bitexact=False).reason == "nan"  # NaN != NaN by default
    m = compare_values(a, b, TensorTolerance(nan_equal=True), bitexact=False)
    assert m.within and m.max_abs == 0.0 and m.nan_mismatch == 0
    m2 = compare_values(a, b2, TensorTolerance(nan_equal=True))
    assert not m2.within and m2.nan_mismatch == 1 and m2.reason == "nan"
    c = a.copy()
    c[3] = -np.inf
    assert compare_values(a, c, TensorTolerance(nan_equal=True)).inf_mismatch == 2
    assert compare_values(np.zeros((1, 4)), np.zeros(4), TensorTolerance()).within  # size-1 dims ignored
    assert compare_values(np.zeros(4), np.zeros(5), TensorTolerance()).reason == "shape"
    h = compare_values(np.ones(8, np.float32), np.ones(8, np.float16), TensorTolerance())
    assert h.dtype_mismatch and h.within and not h.bitexact


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5000), st.floats(0, 1e3), st.integers(0, 2**31))
def test_compare_values_matches_numpy(n: int, scale: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal(n) * scale).astype(np.float32)
    b = (a + rng.standard_normal(n).astype(np.float32) * 1e-3).astype(np.float32)
    m = compare_values(a, b, TensorTolerance(atol=1e-4, rtol=1e-4))
    d = np.abs(a.astype(np.float64) - b)
    assert m.max_abs == pytest.approx(d.max(), rel=1e-6, abs=1e-12)
    expect = int((d > 1e-4 + 1e-4 * np.abs(a.astype(np.float64))).sum())
    assert abs(m.bad - expect) <= max(1, expect // 1000)  # float32 threshold rounding at the boundary


def test_epsilon_grid_defaults() -> None:
    assert ulp("bfloat16", 16) == 0.125 and ulp("float16", 16) == 2**-6 and ulp("float32", 1) == 2**-23
    assert Policy().for_head("token").epsilons("bfloat16", np.array([20.0]))[0] == 0.5
    assert default_tensor_tolerance("float16").atol == 2**-5 and default_tensor_tolerance("int8").atol == 0


def test_policy_file_rules_and_overrides(tmp_path: Path) -> None:
    f = tmp_path / "tol.toml"
    f.write_text("""
[decisions]
epsilon = 0.25
[decisions.heads.duration]
epsilon = 1.0
[tensors]
nan_equal = true
[tensors.dtype.float16]
atol = 0.01
[[tensors.rule]]
name = "encoder.*"
atol = 0.1
cosine_min = 0.999
[[tensors.rule]]
name = "encoder.layers.3*"
skip = true
""")
    p = load_policy(f)
    assert p.for_head("token").epsilon == 0.25 and p.for_head("duration").epsilon == 1.0
    t = p.tensor("encoder.layers.0", "float32")
    assert t.atol == 0.1 and t.cosine_min == 0.999 and t.nan_equal and not t.skip
    assert p.tensor("encoder.layers.3", "float16").skip and p.tensor("decoder", "float16").atol == 0.01
    q = p.with_overrides(epsilon=0.5, tensor={"atol": 1.0}, rules=[parse_override("dec*:rtol=0.5")])
    assert q.for_head("duration").epsilon == 0.5 and q.tensor("encoder.x", "float32").atol == 1.0
    assert q.tensor("decoder", "float32").rtol == 0.5
    f.write_text("[tensors]\nattol = 1\n")
    with pytest.raises(PolicyError, match="attol"):
        load_policy(f)
    f.write_text("[tensors\n")
    with pytest.raises(PolicyError, match="not valid TOML"):
        load_policy(f)
    with pytest.raises(PolicyError):
        parse_override("no-colon")


def test_sequence_alignment_and_text() -> None:
    a = np.array([1, 2, 3, 4, 5, 6])
    ia, ib, exact = align(a, np.array([1, 2, 9, 3, 4, 5, 6]))
    assert exact and list(zip(ia, ib))[2] == (-1, 2) and list(zip(ia, ib))[3] == (2, 3)
    ia, ib, _ = align(a, np.array([1, 2, 4, 5, 6]))
    assert (2, -1) in list(zip(ia.tolist(), ib.tolist()))
    assert edit_distance(a, a) == 0 and edit_distance(a, np.array([1, 7, 3, 4, 5])) == 2
    assert pieces_to_text(["▁he", "llo", "▁", "<0xE4>", "<0xB8>", "<0x96>", "Ġx"]) == "hello 世 x"


def test_guess_mapping_by_order_and_shape(tmp_path: Path) -> None:
    a = [("emb", "float32", (1, 4)), ("mid", "float32", (1, 8)), ("head", "float32", (1, 16))]
    b = [("/emb/Gather", "float32", (1, 4)), ("/x/Extra", "float32", (2,)), ("/mid/Gemm", "float32", (1, 8)),
         ("logits", "float32", (1, 16))]
    g = guess_mapping(a, b)
    assert g.guessed and g.names == {"/emb/Gather": "emb", "/mid/Gemm": "mid", "logits": "head"}
    f = tmp_path / "m.toml"
    f.write_text(g.to_toml() + '\n[[rename]]\npattern = "^/dec/(\\\\w+)$"\nreplace = "decoder.\\\\1"\n')
    m = load_mapping(f)
    assert m.rename("logits") == "head" and m.rename("/dec/attn") == "decoder.attn" and m.rename("z") == "z"
    f.write_text("[names]\nx = 1\n")
    with pytest.raises(MappingError):
        load_mapping(f)


def _tiny(path: Path, vocab: list[str], head: str = "token", watched: dict | None = None) -> Path:
    with TraceWriter(path, metadata={"watched": watched or {}}, vocab=vocab) as w:
        w.add_logits("s", 0, np.arange(len(vocab), dtype=np.float32), head=head)
    return path


def test_incompatible_traces_say_what_differs(tmp_path: Path) -> None:
    a = _tiny(tmp_path / "a", ["x", "y", "z"])
    with pytest.raises(IncompatibleTracesError, match="token 1 is 'y' in the reference and 'q'"):
        diff(a, [_tiny(tmp_path / "b", ["x", "q", "z"])])
    with pytest.raises(IncompatibleTracesError, match="different decision heads"):
        diff(a, [_tiny(tmp_path / "c", ["x", "y", "z"], head="duration")])
    with pytest.raises(IncompatibleTracesError, match="watched token 'eos'"):
        diff(_tiny(tmp_path / "d", ["x", "y", "z"], watched={"eos": 1}),
             [_tiny(tmp_path / "e", ["x", "y", "z"], watched={"eos": 2})])
    with pytest.raises(TraceUsageError, match="alignment keys"):
        diff(a, [a], DiffOptions(align="bogus"))
    with pytest.raises(TraceUsageError, match="without a 'frame'"):
        diff(a, [a], DiffOptions(align="frame"))
