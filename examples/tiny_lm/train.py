"""Train the demo's tiny character LM on the stdlib's docstrings (CPU, 2 threads, a few minutes).

    python examples/tiny_lm/train.py                       # train, export to assets/tiny_lm
    python examples/tiny_lm/train.py --steps 50 --out /tmp/lm   # a quick smoke run

Everything is seeded (torch, numpy, the batch order) and torch runs deterministic algorithms
with a fixed thread count, so a rerun on the same machine and library versions is expected to
give the same weights (checked bit for bit on short runs, not on the full 2,000 steps). Other
CPUs, torch builds or Python versions (a different stdlib gives a different corpus) may differ
in the last bits, which can move greedy near-ties (the very thing the demo shows), so the
committed ONNX files — not this script — define the demo. Exact bit reproducibility of the
committed weights is not promised.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from steptrace.assets import TINY_LM
from examples.tiny_lm import data, export
from examples.tiny_lm.model import Config, TinyLM

ASSETS = TINY_LM
SEED = 20240604


def split_corpus(ids: np.ndarray, holdout: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Split the id stream at a newline: the first 95 % trains, the rest validates."""
    cut = int(len(ids) * (1 - holdout))
    cut = int(np.flatnonzero(ids[cut:] == data.EOS_ID)[0]) + cut
    return ids[:cut], ids[cut:]


def batches(ids: np.ndarray, batch: int, length: int, rng: np.random.Generator):
    """Endless batches of ``length + 1`` ids, each window starting at a newline (the BOS at decode time)."""
    starts = np.flatnonzero(ids[: len(ids) - length - 1] == data.EOS_ID)
    while True:
        chosen = rng.choice(starts, size=batch)
        yield torch.from_numpy(np.stack([ids[s : s + length + 1] for s in chosen]).astype(np.int64))


def lm_loss(model: TinyLM, window: torch.Tensor) -> torch.Tensor:
    """Mean next-character cross-entropy (nats) over a batch of windows."""
    logits, _ = model(window[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model: TinyLM, ids: np.ndarray, length: int) -> float:
    """Mean loss over consecutive non-overlapping windows of the held-out ids."""
    length = min(length, len(ids) - 1)
    n = (len(ids) - 1) // length
    windows = torch.from_numpy(np.stack([ids[i * length : i * length + length + 1] for i in range(n)]).astype(np.int64))
    model.eval()
    loss = float(np.mean([lm_loss(model, w).item() for w in windows.split(64)]))
    model.train()
    return loss


def train(steps: int, batch: int, lr: float, *, text: str | None = None, log_every: int = 100) -> tuple[TinyLM, dict]:
    """Train from the seed.

    Args:
        steps: optimizer steps.
        batch: windows of ``context + 1`` characters per step.
        lr: peak learning rate (linear warm-up over 5 % of the steps, cosine decay to 10 %).
        text: the training text; defaults to :func:`data.corpus_text` (the stdlib docstrings).
        log_every: print the smoothed loss every this many steps.

    Returns:
        The model (eval mode) and a JSON-ready training record (losses, timing, corpus digest).
    """
    with _deterministic():
        return _train(steps, batch, lr, text, log_every)


@contextlib.contextmanager
def _deterministic():
    """Seeded, deterministic, 2-thread torch for the duration; the caller's settings restored after."""
    threads, strict = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(strict)


def _train(steps: int, batch: int, lr: float, text: str | None, log_every: int) -> tuple[TinyLM, dict]:
    """The training loop of :func:`train` (seeded by the caller)."""
    rng = np.random.default_rng(SEED)
    text = data.corpus_text() if text is None else text
    ids = np.asarray(data.encode(text), dtype=np.int64)
    train_ids, val_ids = split_corpus(ids)
    cfg = Config()
    model = TinyLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    )
    start, curve, ema = time.perf_counter(), [], None
    for step, window in zip(range(steps), batches(train_ids, batch, cfg.context, rng)):
        loss = lm_loss(model, window)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if (step + 1) % log_every == 0 or step + 1 == steps:
            curve.append({"step": step + 1, "train_loss_ema": round(ema, 4), "seconds": round(time.perf_counter() - start, 1)})
            print(f"step {step + 1:5d}  loss {ema:.3f}  {curve[-1]['seconds']:.0f}s", flush=True)
    seconds = time.perf_counter() - start
    val = evaluate(model, val_ids, cfg.context)
    record = {
        "seed": SEED, "steps": steps, "batch": batch, "lr": lr, "context": cfg.context,
        "train_seconds": round(seconds, 1), "final_train_loss_ema": round(ema, 4), "val_loss": round(val, 4),
        "corpus_chars": len(text), "corpus_sentences": text.count(data.EOS_CHAR), "corpus_sha256": data.digest(text),
        "train_chars": len(train_ids), "val_chars": len(val_ids),
        "python": sys.version.split()[0], "torch": torch.__version__, "curve": curve,
    }
    print(f"trained {steps} steps in {seconds:.0f}s; train loss (EMA) {ema:.3f}, held-out loss {val:.3f} nats/char")
    return model.eval(), record


def main(argv: list[str] | None = None) -> None:
    """Command line: train, then export the ONNX models, vocab.json and train_log.json to ``--out``."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--out", type=Path, default=ASSETS)
    args = p.parse_args(argv)
    model, record = train(args.steps, args.batch, args.lr)
    args.out.mkdir(parents=True, exist_ok=True)
    export.export_all(model, args.out)
    (args.out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
