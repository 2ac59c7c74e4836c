"""Hugging Face GPT-2 built from a config (no hub, random weights): ``generate`` with the KV cache
(``use_cache=True``) vs full recompute (``use_cache=False``), both recorded with
:func:`recorders.hf.record_generate` — one sample per sequence of a left-padded batch, full
scores kept as ``logits:token`` — and diffed.

    pip install 'steptrace[hf]'
    python examples/hf_gpt2_cache.py --out /tmp/steptrace-gpt2
    trace diff /tmp/steptrace-gpt2/cache.trace /tmp/steptrace-gpt2/recompute.trace --atol 1e-4
    trace view /tmp/steptrace-gpt2/cache.trace /tmp/steptrace-gpt2/recompute.trace

Both paths should choose the same token at every step. Their logits are not bit-identical: the
cached attention sums in another order, so the default tolerance reports *drift* (logits moved
by ~1e-5, same tokens); with ``--atol 1e-4`` (fp32 reordering) the verdict is *equivalent*. Exit
status 0 when the tolerant diff is equivalent or identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from steptrace.differ import DiffOptions, Policy, diff
from steptrace.recorders.hf import record_generate


def build(*, layers: int, embd: int, heads: int, vocab: int, seed: int) -> GPT2LMHeadModel:
    """A GPT-2 of random weights from a config (init scale raised so it does not just repeat)."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=layers, n_embd=embd, n_head=heads, vocab_size=vocab, n_positions=128, bos_token_id=0,
                     eos_token_id=vocab - 1, pad_token_id=0, tie_word_embeddings=False, initializer_range=0.3)
    return GPT2LMHeadModel(cfg).eval()


def prompts(batch: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` prompts of 3.. tokens, left-padded with 0, and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3 + i % 4 for i in range(batch)]
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, vocab - 1, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def main(argv: list[str] | None = None) -> int:
    """Record both runs, diff them, print the verdict; return 0 if equivalent, else 1."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for cache.trace and recompute.trace")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--embd", type=int, default=64)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=100)
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--atol", type=float, default=1e-4, help="logits tolerance of the second diff (default 1e-4)")
    a = ap.parse_args(argv)
    model = build(layers=a.layers, embd=a.embd, heads=a.heads, vocab=a.vocab, seed=a.seed)
    ids, mask = prompts(a.batch, a.vocab, a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, use_cache in (("cache", True), ("recompute", False)):
        paths[name] = a.out / f"{name}.trace"
        rec = record_generate(model, paths[name], input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                              do_sample=False, use_cache=use_cache, prefix="prompt-",
                              recorder_options={"mode": "overwrite", "policy": {"logits:token": "full"}})
        print(f"{name:>9}: {rec.summary}")
    strict = diff(paths["cache"], [paths["recompute"]])
    print(f"default tolerance: {strict}")
    tolerant = diff(paths["cache"], [paths["recompute"]],
                    DiffOptions(policy=Policy().with_overrides(tensor={"atol": a.atol, "rtol": 0.0})))
    print(f"atol={a.atol:g}: {tolerant}")
    for sample in tolerant.worst.per_sample:
        print(f"  {sample}")
    print(f"full report: trace diff {paths['cache']} {paths['recompute']} --atol {a.atol:g}")
    return 1 if tolerant.mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
