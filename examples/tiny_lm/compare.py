"""Compare greedy decodes of the tiny LM: fp32 vs int8, and KV cache vs full recompute (no torch).

    python examples/tiny_lm/compare.py                 # the DEMO_PROMPTS
    python examples/tiny_lm/compare.py "The file" "If the"

For every prompt it prints both texts, the first step where int8 chooses another token than fp32
(free-running), the fp32 and int8 top-1/top-2 margins there, and the smallest fp32 margin seen
(teacher-forced int8 run: how many of its argmaxes flip against the fp32 tokens).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from examples.tiny_lm import ortlm


@dataclass
class PromptComparison:
    """fp32 vs int8 on one prompt (all margins in logits, top-1 minus top-2)."""

    prompt: str
    fp32_text: str
    int8_text: str
    first_diff_step: int | None
    fp32_margin_at_diff: float | None
    int8_margin_at_diff: float | None
    fp32_piece: str | None
    int8_piece: str | None
    min_fp32_margin: float
    forced_flips: int
    cache_matches_full: bool
    cache_vs_full_max_abs: float

    def __str__(self) -> str:
        where = (f"first diff at step {self.first_diff_step}: fp32 {self.fp32_piece!r} (margin {self.fp32_margin_at_diff:.3f}) "
                 f"vs int8 {self.int8_piece!r} (margin {self.int8_margin_at_diff:.3f})"
                 if self.first_diff_step is not None else "int8 chooses the same tokens")
        return (f"{self.prompt!r}\n  fp32: {self.fp32_text!r}\n  int8: {self.int8_text!r}\n  {where}; "
                f"min fp32 margin {self.min_fp32_margin:.3f}; teacher-forced int8 flips {self.forced_flips}; "
                f"cache==full {self.cache_matches_full} (max |dlogit| {self.cache_vs_full_max_abs:.1e})")


def compare(prompt: str, fp32: ortlm.OrtLM, int8: ortlm.OrtLM, max_new: int = 60) -> PromptComparison:
    """Decode ``prompt`` with both models (cached), and fp32 with full recompute too."""
    ids = ortlm.prompt_ids(prompt)
    ref = fp32.greedy(ids, max_new, use_cache=True)
    full = fp32.greedy(ids, max_new, use_cache=False)
    free = int8.greedy(ids, max_new, use_cache=True)
    forced = int8.greedy(ids, len(ref.tokens), use_cache=True, on_step=lambda s, lg, c: ref.tokens[s])
    diff = next((i for i, (a, b) in enumerate(zip(ref.tokens, free.tokens)) if a != b), None)
    if diff is None and len(ref.tokens) != len(free.tokens):
        diff = min(len(ref.tokens), len(free.tokens))
    n = min(len(full.tokens), len(ref.tokens))
    vocab = ortlm.load_vocab()["tokens"]
    return PromptComparison(
        prompt=prompt, fp32_text=ortlm.decode(ref.tokens), int8_text=ortlm.decode(free.tokens),
        first_diff_step=diff,
        fp32_margin_at_diff=None if diff is None else ref.margins[diff],
        int8_margin_at_diff=None if diff is None else free.margins[diff],
        fp32_piece=None if diff is None else vocab[ref.tokens[diff]],
        int8_piece=None if diff is None else vocab[free.tokens[diff]],
        min_fp32_margin=float(min(ref.margins)),
        forced_flips=sum(a != b for a, b in zip(forced.argmax, ref.tokens)),
        cache_matches_full=full.tokens == ref.tokens,
        cache_vs_full_max_abs=float(np.abs(full.logits[:n] - ref.logits[:n]).max()),
    )


def main(argv: list[str] | None = None) -> None:
    """Command line: compare the given prompts (default: DEMO_PROMPTS); ``--json`` for values."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prompts", nargs="*")
    p.add_argument("--max-new", type=int, default=60)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    fp32 = ortlm.OrtLM()
    with tempfile.TemporaryDirectory() as tmp:
        int8 = ortlm.OrtLM.quantized(tmp)
        for prompt in args.prompts or ortlm.DEMO_PROMPTS:
            result = compare(prompt, fp32, int8, args.max_new)
            print(json.dumps(asdict(result)) if args.json else result)


if __name__ == "__main__":
    main()
