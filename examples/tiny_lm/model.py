"""The tiny decoder-only transformer LM of the steptrace demo (torch), with a KV-cache path.

Character-level, pre-LayerNorm, learned positions, explicit ``x @ W + b`` projections (weights
stored ``[in, out]`` so the ONNX export's MatMul initializers keep the parameter names, and an
ONNX file is enough to rebuild the torch model: :func:`load_from_onnx`). No dropout: the forward
pass is deterministic.

    logits, present = model(ids)                      # full recompute, ids [B, T]
    logits, present = model(ids[:, -1:], present)     # one incremental step
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

KV = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Config:
    """Model shape. The defaults are the committed model's."""

    vocab: int = 96
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    d_ff: int = 256
    context: int = 128

    def to_dict(self) -> dict[str, int]:
        """The config as a JSON-ready dict (written into vocab.json and the ONNX metadata)."""
        return asdict(self)


class Dense(nn.Module):
    """``x @ weight + bias`` with ``weight`` stored ``[d_in, d_out]`` (exports as MatMul + Add)."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) / math.sqrt(d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project the last axis."""
        return x @ self.weight + self.bias


class Attention(nn.Module):
    """Causal multi-head self-attention that appends its keys/values to a cache."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.d_head = cfg.d_model // cfg.n_heads
        self.qkv = Dense(cfg.d_model, 3 * cfg.d_model)
        self.out = Dense(cfg.d_model, cfg.d_model)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, H, T, Dh]."""
        b, t, _ = x.shape
        return x.reshape(b, t, self.n_heads, self.d_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """Attend from the new positions ``x`` [B, T, D] to the cache plus themselves.

        Returns:
            The output [B, T, D] and the present (keys, values), each [B, H, P + T, Dh].
        """
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = self._heads(q), self._heads(k), self._heads(v)
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        total = k.shape[2]
        scores = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(self.d_head))
        q_pos = torch.arange(t, device=x.device) + (total - t)
        k_pos = torch.arange(total, device=x.device)
        future = k_pos[None, :] > q_pos[:, None]
        scores = scores.masked_fill(future, float("-inf"))
        y = torch.softmax(scores, dim=-1) @ v
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.out(y), (k, v)


class Block(nn.Module):
    """Pre-LN transformer block: attention then a GELU MLP, each with a residual."""

    def __init__(self, cfg: Config) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff_in = Dense(cfg.d_model, cfg.d_ff)
        self.act = nn.GELU()
        self.ff_out = Dense(cfg.d_ff, cfg.d_model)

    def forward(self, x: torch.Tensor, past: KV | None) -> tuple[torch.Tensor, KV]:
        """One block over the new positions; returns the hidden state and the present cache."""
        a, present = self.attn(self.ln1(x), past)
        x = x + a
        x = x + self.ff_out(self.act(self.ff_in(self.ln2(x))))
        return x, present


class TinyLM(nn.Module):
    """Decoder-only character LM: ``forward(ids, past_kv=None) -> (logits, present_kv)``."""

    def __init__(self, cfg: Config | None = None) -> None:
        super().__init__()
        self.cfg = cfg or Config()
        c = self.cfg
        self.tok_emb = nn.Embedding(c.vocab, c.d_model)
        self.pos_emb = nn.Embedding(c.context, c.d_model)
        self.layers = nn.ModuleList(Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.d_model)
        self.head = Dense(c.d_model, c.vocab)
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    def forward(self, ids: torch.Tensor, past_kv: list[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Logits for every new position and the updated cache.

        Args:
            ids: token ids [B, T] (int64).
            past_kv: per layer (keys, values) [B, H, P, Dh] of the P earlier positions, or None.

        Returns:
            logits [B, T, V] and the present cache, per layer [B, H, P + T, Dh].
        """
        past_len = 0 if past_kv is None else past_kv[0][0].shape[2]
        pos = torch.arange(ids.shape[1], device=ids.device) + past_len
        x = self.tok_emb(ids) + self.pos_emb(pos)[None]
        present: list[KV] = []
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, None if past_kv is None else past_kv[i])
            present.append(kv)
        return self.head(self.ln_f(x)), present

    def empty_cache(self, batch: int = 1) -> list[KV]:
        """A zero-length cache (P = 0) for the first call of the step graph."""
        c = self.cfg
        z = torch.zeros(batch, c.n_heads, 0, c.d_model // c.n_heads)
        return [(z, z.clone()) for _ in range(c.n_layers)]


def load_from_onnx(path: str | Path, cfg: Config | None = None) -> TinyLM:
    """Rebuild the torch model from an exported ONNX file's initializers (no pickle, no .pt).

    Initializers are matched to parameters by name (the export keeps the state_dict names).

    Args:
        path: ``full.onnx`` or ``step.onnx``.
        cfg: the model shape; defaults to :class:`Config`.

    Returns:
        The model in eval mode.

    Raises:
        KeyError: a parameter has no initializer of its name.
        ValueError: an initializer's shape differs from its parameter's.
    """
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    model = TinyLM(cfg)
    state = {}
    for name, param in model.state_dict().items():
        if name not in inits:
            raise KeyError(f"{path}: no initializer named {name!r} (was it exported by examples/tiny_lm/export.py?)")
        array = inits[name]
        if tuple(array.shape) != tuple(param.shape):
            raise ValueError(f"{path}: initializer {name!r} has shape {array.shape}, the model wants {tuple(param.shape)}")
        state[name] = torch.from_numpy(array.copy())
    model.load_state_dict(state)
    return model.eval()
