"""KV cache vs full recompute through `trace record`: the differ compares the positions both runs
computed (docs/differ.md, "Incremental and full computations"). A GPT-2 built from a config,
generate with use_cache True vs False, is equivalent; a tiny hand-written transformer with a KV
cache is equivalent to its full recompute (a sliding-window cache too, on the overlapping
positions), and a bug planted in its history path is found at its step and layer."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from steptrace.differ import DiffOptions, NameMapping, diff
from steptrace.differ.policy import Policy
from steptrace.differ.tensors import compare_tensors, to_table
from steptrace.tracefmt import TraceReader
from steptrace.tui.cli import EXIT_MISMATCH, EXIT_OK, main

GPT2_SCRIPT = textwrap.dedent('''
    """Greedy GPT-2 (built from a config, no hub) through generate, with or without a KV cache."""
    import argparse

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=96, n_positions=64, initializer_range=0.3,
                     bos_token_id=0, eos_token_id=95, pad_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                             use_cache=a.cache)
    print(out[0, 4:].tolist())
''')

KV_SCRIPT = textwrap.dedent('''
    """A tiny transformer decoded greedily, by full recompute or with a KV cache (optionally a
    sliding window of W positions), with a bug to plant in one layer's history path."""
    import argparse
    import math

    import torch
    from torch import nn

    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", action="store_true")
    ap.add_argument("--window", type=int, default=0)
    ap.add_argument("--bug-layer", type=int, default=-1, help="scale this layer's cached keys (history path)")
    ap.add_argument("--steps", type=int, default=8)
    a = ap.parse_args()
    D, V = 32, 40


    class Attn(nn.Module):
        def __init__(self, index):
            super().__init__()
            self.index = index
            self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))

        def forward(self, x, past=None):
            q, k, v = self.q(x), self.k(x), self.v(x)
            if past is not None:
                pk, pv = past
                if self.index == a.bug_layer:
                    pk = pk * 1.5
                k, v = torch.cat([pk, k], 1), torch.cat([pv, v], 1)
            end = start_pos[0] + x.shape[1]  # absolute positions: keys end where queries end
            kpos = torch.arange(end - k.shape[1], end)
            qpos = torch.arange(end - x.shape[1], end)
            allowed = kpos[None, :] <= qpos[:, None]
            if a.window:
                allowed &= kpos[None, :] > qpos[:, None] - a.window
            att = (q @ k.transpose(1, 2)) / math.sqrt(D)
            att = att.masked_fill(~allowed, float("-inf")).softmax(-1)
            return self.o(att @ v), (k, v)


    class Block(nn.Module):
        def __init__(self, index):
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
            self.attn = Attn(index)
            self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

        def forward(self, x, past=None):
            h, kv = self.attn(self.ln1(x), past)
            x = x + h
            return x + self.mlp(self.ln2(x)), kv


    class TinyKV(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb, self.pos = nn.Embedding(V, D), nn.Embedding(64, D)
            self.blocks = nn.ModuleList([Block(i) for i in range(3)])
            self.head = nn.Linear(D, V)
            with torch.no_grad():
                self.head.weight.mul_(3.0)

        def forward(self, tokens, past=None):
            x = self.emb(tokens) + self.pos(torch.arange(start_pos[0], start_pos[0] + tokens.shape[1]))[None]
            kvs = []
            for i, block in enumerate(self.blocks):
                x, kv = block(x, None if past is None else past[i])
                kvs.append(kv)
            return self.head(x), kvs


    start_pos = [0]
    model = TinyKV().eval()
    ids = torch.tensor([[1, 7, 3, 9, 4]])
    past = None
    with torch.no_grad():
        for _ in range(a.steps):
            if a.cache and past is not None:
                start_pos[0] = ids.shape[1] - 1
                logits, kvs = model(ids[:, -1:], past)
            else:
                start_pos[0] = 0
                logits, kvs = model(ids)
            if a.cache:
                keep = a.window - 1 if a.window else None
                past = [(k[:, -keep:], v[:, -keep:]) if keep else (k, v) for k, v in kvs]
            tok = int(logits[0, -1].argmax())
            ids = torch.cat([ids, torch.tensor([[tok]])], 1)
            print(tok, flush=True)
''')

LOOSE = DiffOptions(policy=Policy().with_overrides(tensor={"atol": 1e-4}))


@pytest.fixture(scope="module")
def scripts(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("kv")
    (d / "gpt2_decode.py").write_text(GPT2_SCRIPT)
    (d / "kv_decode.py").write_text(KV_SCRIPT)
    return d


def record(out: Path, script: Path, *args: str, logits: str = "head") -> Path:
    assert main(["record", "-o", str(out), "--logits", logits, "--modules", "*", "--tensors", "full",
                 str(script), *args]) == EXIT_OK
    return out


def tensor_rows(ref: Path, cand: Path) -> list[dict]:
    """Every tensor pair of two traces whose steps pair by number, as dict rows."""
    ra, rb = TraceReader(ref), TraceReader(cand)
    samples = sorted(set(ra.samples()) | set(rb.samples()))
    empty = (np.zeros(0, np.int64),) * 3
    td = compare_tensors(ra, rb, samples, empty, (np.zeros(0, np.int64),) * 2, LOOSE.policy, NameMapping({}))
    return to_table(td, samples).to_pylist()


def test_gpt2_kv_cache_and_full_recompute_through_trace_record_are_equivalent(scripts, tmp_path, capsys):
    full = record(tmp_path / "full.trace", scripts / "gpt2_decode.py", logits="lm_head")
    cached = record(tmp_path / "cache.trace", scripts / "gpt2_decode.py", "--cache", logits="lm_head")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == out[1]  # the same tokens
    report = diff(full, [cached], LOOSE)
    assert report.worst.verdict == "equivalent", report.worst
    rows = [r for r in tensor_rows(full, cached) if r["name"] == "GPT2LMHeadModel.transformer.h.0.ln_1"]
    assert len(rows) == 6
    step0 = next(r for r in rows if r["a_step"] == 0)
    assert step0["positions"] == 0 and not step0["shape_mismatch"]  # the prefill: [1, 4, 64] on both sides
    later = [r for r in rows if r["a_step"] > 0]
    assert all(r["positions"] == 1 and r["basis"] == "values" and r["within"] and not r["shape_mismatch"]
               and r["numel"] == 64 for r in later)  # [1, 4 + t, 64] vs [1, 1, 64]: the last position
    capsys.readouterr()
    assert main(["diff", str(full), str(cached), "--atol", "1e-4"]) == EXIT_OK
    assert "shape" not in capsys.readouterr().out


def test_a_planted_history_path_bug_is_found_at_its_step_and_layer(scripts, tmp_path, capsys):
    script = scripts / "kv_decode.py"
    full = record(tmp_path / "full.trace", script)
    cached = record(tmp_path / "cache.trace", script, "--cache")
    buggy = record(tmp_path / "bug.trace", script, "--cache", "--bug-layer", "1")
    assert diff(full, [cached], LOOSE).worst.verdict == "equivalent"
    fd = diff(full, [buggy], LOOSE).worst.first_divergence
    assert fd is not None and fd.step == 1  # step 0 is the prefill: no history read yet
    assert fd.culprit is not None and fd.culprit.name == "TinyKV.blocks.1.attn.o"  # layers 0 agree
    assert fd.culprit.metrics.basis == "values" and not fd.culprit.metrics.within
    capsys.readouterr()
    assert main(["diff", str(full), str(buggy), "--atol", "1e-4"]) == EXIT_MISMATCH
    assert "TinyKV.blocks.1.attn.o" in capsys.readouterr().out


def test_a_sliding_window_cache_is_compared_on_the_positions_it_holds(scripts, tmp_path, capsys):
    script = scripts / "kv_decode.py"
    full = record(tmp_path / "full.trace", script, "--window", "4")
    cached = record(tmp_path / "win.trace", script, "--window", "4", "--cache")
    assert diff(full, [cached], LOOSE).worst.verdict == "equivalent"
    keys = [r for r in tensor_rows(full, cached) if r["name"] == "TinyKV.blocks.0.attn.1.0" and r["a_step"] >= 2]
    assert keys and all(r["positions"] == 4 and r["within"] for r in keys)  # [1, 5 + t, 32] vs [1, 4, 32]
    buggy = record(tmp_path / "winbug.trace", script, "--window", "4", "--cache", "--bug-layer", "0")
    fd = diff(full, [buggy], LOOSE).worst.first_divergence
    assert fd is not None and fd.step == 1 and fd.culprit.name == "TinyKV.blocks.0.attn.o"


def test_statistics_alone_keep_the_shape_mismatch(scripts, tmp_path, capsys):
    script = scripts / "kv_decode.py"
    for name, extra in (("full", []), ("cache", ["--cache"])):
        assert main(["record", "-o", str(tmp_path / f"{name}.trace"), "--logits", "head", "--modules", "*",
                     str(script), *extra]) == EXIT_OK
    rows = tensor_rows(tmp_path / "full.trace", tmp_path / "cache.trace")
    later = [r for r in rows if r["name"] == "TinyKV.blocks.0.ln1" and r["a_step"] > 0]
    assert later and all(r["shape_mismatch"] and r["reason"] == "shape" and r["positions"] == 0 for r in later)
