"""Record a tiny numpy language model decoded greedily twice — fp32 and fp16 — as two traces.

Needs only the core install (numpy). Each decode step records the decision (top-8, margin,
EOS rank) and the step's tensors (embedding, hidden state: stats + values; logits: stats).

    python examples/numpy_lm.py --out /tmp/steptrace-example
    trace info /tmp/steptrace-example/fp16.trace
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from steptrace.tracefmt import TraceWriter

VOCAB = ["<pad>", "<s>", "<eos>"] + [f"▁{w}" for w in "the a cat dog sat ran on in mat log big small red".split()] + list(
    "abcdefghijklmnopqrstuvwxyz.,"
)
EOS = 2
PROMPTS = {"prompt-0": [1, 3, 5], "prompt-1": [1, 4, 6], "prompt-2": [1, 3, 12, 5]}


def weights(dtype: type) -> dict[str, np.ndarray]:
    """Deterministic weights of a one-layer tanh RNN LM, cast to ``dtype``."""
    rng = np.random.default_rng(1234)
    v, d = len(VOCAB), 48
    w = {
        "emb": rng.standard_normal((v, d)) * 0.8,
        "wx": rng.standard_normal((d, d)) / np.sqrt(d),
        "wh": rng.standard_normal((d, d)) / np.sqrt(d) * 0.9,
        "out": rng.standard_normal((d, v)) / np.sqrt(d) * 3.0,
    }
    w["bias"] = np.zeros(v)
    w["bias"][EOS] = -6.0  # EOS late: sequences long enough to show precision drift
    return {k: x.astype(dtype) for k, x in w.items()}


def decode(path: Path, dtype: type, steps: int) -> None:
    """Decode every prompt greedily with weights of ``dtype`` and record the run to ``path``."""
    w = weights(dtype)
    meta = {"runtime": "numpy", "runtime_version": np.__version__, "model": "numpy-rnn-lm",
            "precision": np.dtype(dtype).name, "device": "cpu", "watched": {"eos": EOS}}
    with TraceWriter(path, metadata=meta, vocab=VOCAB, mode="overwrite") as rec:
        for sample, prompt in PROMPTS.items():
            h = np.zeros(w["wh"].shape[0], dtype)
            tokens = list(prompt)
            for t in prompt[:-1]:  # prefill
                h = np.tanh(w["emb"][t] @ w["wx"] + h @ w["wh"])
            for step in range(steps):
                x = w["emb"][tokens[-1]]
                h = np.tanh(x @ w["wx"] + h @ w["wh"])
                logits = h @ w["out"] + w["bias"]
                rec.add_tensor(sample, step, "embed", x, source="lookup")
                rec.add_tensor(sample, step, "rnn.h", h, source="tanh-rnn")
                rec.add_tensor(sample, step, "lm_head", logits, source="matmul", values=False)
                token = rec.add_logits(sample, step, logits, piece=VOCAB[int(np.argmax(logits))], position=len(tokens))
                tokens.append(token)
                if token == EOS:
                    break
    print(f"wrote {path}")


def main() -> None:
    """Command line entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="steptrace-example", help="folder for the two traces")
    ap.add_argument("--steps", type=int, default=40, help="decode steps per prompt")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    decode(out / "fp32.trace", np.float32, args.steps)
    decode(out / "fp16.trace", np.float16, args.steps)


if __name__ == "__main__":
    main()
