"""Tiny deterministic traces for the viewer's tests, written with tracefmt.TraceWriter.

The reference ("fp32") and candidate ("fp16") runs of sample ``utt-001`` are built so that the
differ finds, on known steps:

- steps 0..9: identical (same logits, same tensor digests);
- steps 10..19: equivalent (``decoder.attn`` moves by 1e-7, within tolerance);
- steps 20..22: drift (``decoder.mlp`` moves by 0.05: the culprit, and the drift onset at 20);
- step 23 (``FLIP_STEP``): a near-tie flip (the two best logits 0.004 apart on both sides, in
  swapped order; epsilon on the fp16 grid is 0.0156);
- steps 24..: after the divergence (the candidate continues with its own tokens).

Low margins (< 0.5 logits) sit at ``LOW_STEPS`` on both sides; EOS (id 2) is watched and chosen
at the last step. Tensors carry values at even steps and statistics only at odd steps.
The corpus adds ``utt-000`` (identical), ``utt-002`` (divergent at step 5), ``utt-003`` (the
candidate emits EOS at step 29 and stops: divergent, then missing) and ``utt-004``, decoded with
teacher forcing on both sides, where every step of ``LOW_STEPS`` is a fresh near-tie flip.
"""

from __future__ import annotations

import asyncio
import functools
import shutil
import zlib
from pathlib import Path

import numpy as np

from steptrace.tracefmt import TraceWriter

V = 40
EOS = 2
VOCAB = ["<pad>", "<s>", "</s>"] + [
    "▁the", "▁cat", "▁sat", "▁on", "▁mat", "▁a", "▁dog", "▁ran", "▁to", "▁park", "▁and", "▁then",
    "▁slept", "▁in", "▁sun", "▁it", "▁was", "▁warm", "▁bright", "▁day", "▁for", "▁all", "▁of",
    "▁us", "▁we", "▁went", "▁home", "▁late", "▁at", "▁night", "<0xE4>", "<0xB8>", "<0xAD>", "▁end",
    ".", ",", "▁ok",
]
assert len(VOCAB) == V
STEPS = 48
FLIP_STEP = 23
DRIFT_STEP = 20
NOISE_STEP = 10
LOW_STEPS = (7, 15, FLIP_STEP, 31)
PAIR_SAMPLE = "utt-001"
CORPUS = ("utt-000", "utt-001", "utt-002", "utt-003", "utt-004")
FORCED_SAMPLE = "utt-004"
DIVERGENT_STEP = 5
SHORT_STEPS = 30


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _token(sample: str, step: int, side: str) -> tuple[int, int]:
    """The (best, runner-up) tokens a run picks at ``step`` (pure function of its arguments)."""
    r = _rng("tok", sample, step, side)
    a, b = r.choice(np.arange(3, V), size=2, replace=False)
    return int(a), int(b)


def _logits(sample: str, step: int, side: str, last: int) -> np.ndarray:
    """Full logits of one step; the candidate equals the reference except where a bug is planted."""
    own = side if step > FLIP_STEP and sample == PAIR_SAMPLE else "ref"
    if sample == "utt-002" and step >= DIVERGENT_STEP:
        own = side
    best, second = _token(sample, step, own)
    x = _rng("noise", sample, step, own).normal(0.0, 1.0, V).astype(np.float32)
    x[best] = 6.0
    margin = 0.3 if step in LOW_STEPS else 2.0 + (step % 5) * 0.5
    x[second] = 6.0 - margin
    near_tie = (sample == PAIR_SAMPLE and step == FLIP_STEP) or (sample == FORCED_SAMPLE and step in LOW_STEPS)
    if near_tie:
        x[second] = 6.0 - 0.004
        if side == "cand":  # near tie, swapped
            x[best], x[second] = x[second], x[best]
    if sample == "utt-002" and step == DIVERGENT_STEP and side == "cand":
        x[second] = 9.0  # not a near tie
    x[EOS] = 6.0 - 3.0 + 2.5 * step / STEPS  # EOS creeps up the ranks
    if step == last:
        x[EOS] = 7.5
    if side == "cand" and sample == PAIR_SAMPLE and DRIFT_STEP <= step < FLIP_STEP:
        x = x + np.float32(0.01) * (np.arange(V) % 3 == 0)  # logits drift, tokens do not change
    return x


def _tensors(w: TraceWriter, sample: str, step: int, side: str) -> None:
    r = _rng("tensor", sample, step)
    attn = r.normal(0.0, 1.0, (2, 4)).astype(np.float32)
    mlp = r.normal(0.0, 1.0, (8,)).astype(np.float32)
    if side == "cand" and sample == PAIR_SAMPLE:
        if step >= NOISE_STEP:
            attn = attn + np.float32(1e-7) * np.sign(attn)
        if step >= DRIFT_STEP:
            mlp = mlp + np.float32(0.05)
    values = step % 2 == 0
    w.add_tensor(sample, step, "decoder.attn", attn, values=values, source="Attention")
    w.add_tensor(sample, step, "decoder.mlp", mlp, values=values, source="MLP")


def write_run(path: Path, side: str, samples: tuple[str, ...] = (PAIR_SAMPLE,), *, tensors: bool = True) -> Path:
    """Write the reference (``side="ref"``) or candidate (``"cand"``) run of ``samples``.

    Returns:
        ``path``.
    """
    meta = {"runtime": "torch" if side == "ref" else "onnxruntime", "precision": "fp16", "model": "tiny-asr",
            "watched": {"eos": EOS}}
    with TraceWriter(path, metadata=meta, vocab=VOCAB) as w:
        for sample in samples:
            steps = SHORT_STEPS if sample == "utt-003" and side == "cand" else STEPS
            for step in range(steps):
                x = _logits(sample, step, side, steps - 1)
                if sample == FORCED_SAMPLE:  # teacher forcing: both sides are fed the reference's token
                    ref = int(np.argmax(_logits(sample, step, "ref", steps - 1)))
                    w.add_logits(sample, step, x, k=5, chosen=ref, forced=True, time_us=None)
                else:
                    w.add_logits(sample, step, x, k=5, time_us=None)
                if tensors:
                    _tensors(w, sample, step, side)
    return path


def pair(tmp: Path) -> tuple[Path, Path]:
    """Two runs of one sample: (reference, candidate)."""
    return write_run(tmp / "ref.trace", "ref"), write_run(tmp / "cand.trace", "cand")


def corpus(tmp: Path) -> tuple[Path, Path]:
    """Two runs of the five corpus samples (four different verdicts): (reference, candidate)."""
    return (write_run(tmp / "ref-corpus.trace", "ref", CORPUS),
            write_run(tmp / "cand-corpus.trace", "cand", CORPUS))


def traces(tmp: Path) -> dict[str, Path]:
    """The pair (``a``, ``b``) and the corpus (``ca``, ``cb``) written under ``tmp`` (``dir``)."""
    a, b = pair(tmp)
    ca, cb = corpus(tmp)
    return {"a": a, "b": b, "ca": ca, "cb": cb, "dir": tmp}


def interrupted(tmp: Path, steps: int = 12) -> Path:
    """A trace whose writer 'died': the part status stays ``open`` after a flush.

    The files are copied from a flushed, still-open writer, so they have no footer.
    """
    src = tmp / "live.trace"
    w = TraceWriter(src, metadata={"watched": {"eos": EOS}}, vocab=VOCAB, compact=False)
    for step in range(steps):
        w.add_logits(PAIR_SAMPLE, step, _logits(PAIR_SAMPLE, step, "ref", STEPS - 1), k=5, time_us=None)
    w.flush()
    dst = tmp / "interrupted.trace"
    shutil.copytree(src, dst)
    w.close()
    return dst


async def settle(pilot, rounds: int = 40) -> None:
    """Wait until the viewer is idle: no worker running and no step-table page pending."""
    app = pilot.app
    idle = 0
    for _ in range(rounds):
        await app.workers.wait_for_complete()
        await pilot.pause(0.02)
        busy = any(w.is_running for w in app.workers) or getattr(app.table, "_pending", None)
        idle = 0 if busy else idle + 1
        if idle >= 3:
            return


def run_async(fn):
    """Run an ``async def`` test with asyncio (the suite has no asyncio pytest plugin)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return asyncio.run(fn(*args, **kwargs))

    return wrapper
