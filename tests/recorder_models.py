"""Tiny real torch language models for the recorder tests and bench/bench_record.py.

- :class:`GRULM`: one decode step per call, ``(token, hidden) -> (logits, hidden)``; its GRU
  returns a tuple ``(output, h_n)``.
- :class:`TransformerLM`: a pre-norm decoder-only transformer, with named sub-modules
  ``blocks.N.attn.qkv`` etc.; ``tokens -> logits`` recomputes the whole sequence, and
  ``model(new_tokens, cache=[])`` decodes incrementally with a KV cache (the list holds one
  ``{"k", "v"}`` dict per layer and grows in place).

Both are deterministic for a seed; ``bias`` shifts one output logit to make a deliberately
different model.
"""

from __future__ import annotations

import math

import torch
from torch import nn

V = 64
EOS = 3


class GRULM(nn.Module):
    """Embedding -> GRU -> Linear head; one token per call."""

    def __init__(self, seed: int = 0, *, hidden: int = 32, vocab: int = V, bias: dict[int, float] | None = None):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.mid = nn.Linear(hidden, hidden)
        self.act = nn.Tanh()
        self.head = nn.Linear(hidden, vocab)
        with torch.no_grad():
            self.head.weight.mul_(4.0)
            for tok, b in (bias or {}).items():
                self.head.bias[tok] += b

    def forward(self, token: torch.Tensor, h: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, h = self.gru(self.emb(token.view(1, 1)), h)
        return self.head(self.act(self.mid(out[:, -1]))), h


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
            cache["k"], cache["v"] = k, v
        # one new token attends to the whole cache; a prompt (t > 1) attends causally
        y = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=cache is None or t > 1)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = Attention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = MLP(d)

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        h = self.ln1(x)
        x = x + (self.attn(h) if cache is None else self.attn(h, cache))  # (a None argument upsets jit.trace)
        return x + self.mlp(self.ln2(x))


class TransformerLM(nn.Module):
    """Decoder-only transformer LM; ``forward(tokens (1, T)) -> logits (1, T, vocab)``."""

    def __init__(self, seed: int = 0, *, d: int = 32, layers: int = 2, heads: int = 4, vocab: int = V,
                 context: int = 64, bias: dict[int, float] | None = None) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        with torch.no_grad():
            self.head.weight.mul_(4.0 / math.sqrt(d) * 4)
            for tok, b in (bias or {}).items():
                self.head.bias[tok] += b

    def forward(self, tokens: torch.Tensor, cache: list[dict] | None = None) -> torch.Tensor:
        """Logits of every position of ``tokens``; with ``cache`` (a list, empty at first),
        ``tokens`` continue the cached sequence and the cache is extended in place."""
        start = 0
        if cache is not None:
            if not cache:
                cache.extend({} for _ in self.blocks)
            start = cache[0]["k"].shape[2] if "k" in cache[0] else 0
        x = self.emb(tokens) + self.pos(torch.arange(start, start + tokens.shape[1], device=tokens.device))
        for i, block in enumerate(self.blocks):
            x = block(x) if cache is None else block(x, cache[i])
        return self.head(self.ln_f(x))


def greedy(model: TransformerLM, prompt: list[int], steps: int, decide=None) -> list[int]:
    """Decode ``steps`` tokens greedily (or with ``decide(logits_1d) -> int``); return them."""
    tokens = list(prompt)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor([tokens]))[0, -1]
            tok = int(logits.argmax()) if decide is None else decide(logits)
            tokens.append(tok)
            out.append(tok)
    return out
