"""Greedy decoding of the tiny LM in torch, with and without the KV cache.

The weights come from the committed ONNX file (:func:`model.load_from_onnx`), so this runs the
same model as ``ortlm.py`` does in ONNX Runtime:

    python examples/tiny_lm/decode_torch.py "The file" --steps 60
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from steptrace.assets import TINY_LM
from examples.tiny_lm import data
from examples.tiny_lm.model import TinyLM, load_from_onnx

ASSETS = TINY_LM


@dataclass
class TorchGeneration:
    """One greedy decode: fed ids, the model's argmax and the last-position logits [steps, V] per step."""

    tokens: list[int]
    argmax: list[int]
    logits: torch.Tensor
    stopped_at_eos: bool


@torch.no_grad()
def greedy(model: TinyLM, prompt_ids: Sequence[int], max_new: int, *, use_cache: bool,
           on_step: Callable[[int, torch.Tensor, int], int | None] | None = None) -> TorchGeneration:
    """Decode greedily, stopping after the EOS id.

    Args:
        model: the LM (eval mode).
        prompt_ids: at least one id; start with ``data.EOS_ID`` as the demo does.
        max_new: steps at most; prompt plus steps must fit the model's context.
        use_cache: prefill once, then one id per call with the cache; otherwise recompute the
            whole sequence every step.
        on_step: ``on_step(step, logits [V], chosen)``; an int it returns is fed instead.

    Raises:
        ValueError: empty prompt or too long a decode for the context.
    """
    prompt = [int(i) for i in prompt_ids]
    if not prompt or len(prompt) + max_new > model.cfg.context:
        raise ValueError(f"need 1 <= len(prompt) and len(prompt) + max_new <= {model.cfg.context}")
    tokens: list[int] = []
    argmax: list[int] = []
    rows: list[torch.Tensor] = []
    past, pending = None, prompt
    for step in range(max_new):
        if use_cache:
            logits, past = model(torch.tensor([pending]), past if past is not None else model.empty_cache())
        else:
            logits, _ = model(torch.tensor([prompt + tokens]))
        last = logits[0, -1]
        chosen = int(torch.argmax(last))
        forced = on_step(step, last, chosen) if on_step is not None else None
        token = chosen if forced is None else int(forced)
        rows.append(last)
        argmax.append(chosen)
        tokens.append(token)
        pending = [token]
        if token == data.EOS_ID:
            return TorchGeneration(tokens, argmax, torch.stack(rows), True)
    return TorchGeneration(tokens, argmax, torch.stack(rows) if rows else torch.zeros(0, model.cfg.vocab), False)


def main(argv: list[str] | None = None) -> None:
    """Command line: decode one prompt both ways and print the texts and the largest logit gap."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompt")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--onnx", type=Path, default=ASSETS / "full.onnx", help="ONNX file to take the weights from")
    args = p.parse_args(argv)
    model = load_from_onnx(args.onnx)
    ids = [data.EOS_ID, *data.encode(args.prompt)]
    cached = greedy(model, ids, args.steps, use_cache=True)
    full = greedy(model, ids, args.steps, use_cache=False)
    vocab = data.VOCAB
    for name, gen in (("kv-cache", cached), ("full", full)):
        print(f"{name:9s}{args.prompt}{''.join(vocab[t] for t in gen.tokens)!r}")
    n = min(len(cached.tokens), len(full.tokens))
    gap = float((cached.logits[:n] - full.logits[:n]).abs().max()) if n else 0.0
    print(f"same tokens: {cached.tokens == full.tokens}; max |logit gap| over {n} steps: {gap:.2e}")


if __name__ == "__main__":
    main()
