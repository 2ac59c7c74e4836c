"""Silero VAD parity on real speech: TorchScript vs ONNX, streaming vs sequence, fp32 vs int8.

silero-vad (PyPI) ships the same voice-activity detector several ways. This example streams a
16 kHz WAV through them in 512-sample chunks (32 ms), records each run with steptrace and diffs
the pairs:

(a) ``jit-vs-onnx``: ``silero_vad.jit`` (TorchScript, :class:`recorders.torch.TorchRecorder`)
    vs ``silero_vad.onnx`` (ONNX Runtime, :class:`recorders.onnxruntime.OrtRecorder`), both
    streaming one chunk per call with their recurrent state carried between calls;
(b) ``stream-vs-sequence``: the streaming ONNX run vs ``silero_vad_16k_sequence.onnx``, which
    takes every chunk of the file in one call (non-incremental) and returns one probability per
    chunk, recorded here per chunk (:class:`recorders.capture.Recorder`) so the two align;
(c) ``fp32-vs-int8``: ``silero_vad_16k_op15.onnx`` streamed in fp32 vs its int8
    ``quantize_dynamic`` copy (:func:`recorders.onnxruntime.quantize_dynamic_copy`), streamed the
    same way. The op15 graph is used because ``silero_vad.onnx`` holds its whole network inside
    an ``If`` node, whose branches ``quantize_dynamic`` does not enter: its "int8" copy is the
    fp32 model unchanged (bit-identical outputs), whereas op15's six Conv layers become
    ``ConvInteger``.

Steps: ``sample`` = the WAV's file name, ``step`` = the chunk index (also recorded as the
decision's ``chunk`` key, with ``time_us`` = the chunk's start time). The head is declared
open-loop in each trace's manifest (``open_loop: ["vad"]``).

Decision: the head ``"vad"`` has two classes, id 0 = silence and id 1 = speech, with logits
``[0, logit(p)]`` where ``p`` is the model's speech probability and
``logit(p) = log(p) - log(1 - p)`` (float64). The argmax is speech exactly when ``p > 0.5``
(silero's default threshold; ``p == 0.5`` ties to silence, the lower id), ``topk_ids`` is
``[1, 0]`` for speech and ``[0, 1]`` for silence, and the margin ``|logit(p)|`` is the
distance to the threshold in logits: a margin of 0.1 means ``p`` is within ~2.5 % of 0.5.
A flip is a chunk whose speech/silence call changes.

Tensors (statistics, digest and values): ``output`` (the probability, ``[1, 1]``) and
``stateN`` (the LSTM state after the chunk, ``[2, 1, 128]``; the sequence model returns its
state once per block, so its trace records ``stateN`` at each block's last chunk only).

    pip install silero-vad --no-deps       # its models; torch and onnxruntime already installed
    python examples/silero_vad_parity.py --out /tmp/steptrace-vad [--wav FILE] [--max-chunks N] [--atol A --rtol R]
    trace view /tmp/steptrace-vad/op15.trace /tmp/steptrace-vad/int8.trace

The default WAV (``examples/data/speech_16k.wav``) is 8.5 s of espeak-ng speech with pauses
(16 kHz mono 16-bit, 266 chunks). Measured on it (silero-vad 6.2.3, torch 2.13 CPU,
onnxruntime 1.31, x86-64):

- jit-vs-onnx: the same call on all 266 chunks (158 speech; smallest margin 0.108, no flip);
  ``p`` moves by up to 1.8e-5, the speech logit by up to 0.013 (at ``p`` = 0.999995, logit
  12.3) and ``stateN`` by up to 6.6e-6, so the built-in (fp32-grid) tolerance says *drift*;
  ``--atol 1e-4 --rtol 2e-3`` says *equivalent*.
- stream-vs-sequence: *identical* (bit-exact probabilities on every chunk).
- fp32-vs-int8: *divergent*: the call differs on 150 of 266 chunks (all 150 divergent, none a
  near tie: the shifts are several logits), the first at chunk 23 (speech, margin 6.9, vs
  silence). The ``vad`` head is declared open-loop (a VAD's calls are not fed back), so the
  differ compares every chunk to the end: no chunk is "after" the first divergence.

Prints one verdict line per pair; exit status 0 when (a) and (b) have no flip, divergent or
missing chunk, 1 otherwise ((c) is expected to diverge).
"""

from __future__ import annotations

import argparse
import sys
import wave
from importlib import resources
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steptrace.differ import DiffOptions, Policy, diff
from examples.parity import tolerance
from steptrace.recorders.capture import Recorder
from steptrace.recorders.onnxruntime import OrtRecorder, quantize_dynamic_copy
from steptrace.recorders.torch import TorchRecorder

RATE = 16000
CHUNK = 512  # samples per streaming call at 16 kHz
CONTEXT = 64  # samples of the previous chunk the ONNX models take in front of each chunk
DEFAULT_WAV = Path(__file__).resolve().parent / "data" / "speech_16k.wav"
VOCAB = ["silence", "speech"]
HEAD = "vad"
#: Pairs in the order they are diffed: (label, reference trace, candidate trace).
PAIRS = (("jit-vs-onnx", "jit", "onnx"), ("stream-vs-sequence", "onnx", "sequence"), ("fp32-vs-int8", "op15", "int8"))


def model_file(name: str) -> Path:
    """Path of a model file shipped in the silero-vad package (``silero_vad/data/NAME``).

    Raises:
        FileNotFoundError: silero-vad is not installed, or does not ship ``name``.
    """
    try:
        data = resources.files("silero_vad.data")
    except ModuleNotFoundError as exc:
        raise FileNotFoundError("silero-vad is not installed; pip install silero-vad --no-deps (it ships the "
                                "models; torch and onnxruntime are needed too)") from exc
    path = Path(str(data.joinpath(name)))
    if not path.is_file():
        raise FileNotFoundError(f"silero-vad ships no {name} (looked in {path.parent}); pip install -U silero-vad")
    return path


def read_wav(path: str | Path) -> np.ndarray:
    """Read a 16 kHz mono 16-bit PCM WAV into float32 samples in [-1, 1).

    Raises:
        ValueError: another rate, channel count or sample width (convert it with
            ``sox IN -r 16000 -c 1 -b 16 OUT.wav``).
    """
    with wave.open(str(path), "rb") as w:
        rate, channels, width, n = w.getframerate(), w.getnchannels(), w.getsampwidth(), w.getnframes()
        if (rate, channels, width) != (RATE, 1, 2):
            raise ValueError(f"{path}: {rate} Hz, {channels} channel(s), {8 * width}-bit; this example needs 16000 Hz "
                             "mono 16-bit PCM (sox IN -r 16000 -c 1 -b 16 OUT.wav)")
        raw = w.readframes(n)
    return np.frombuffer(raw, dtype="<i2").astype(np.float32) / 32768.0


def chunks_of(audio: np.ndarray, max_chunks: int | None = None) -> np.ndarray:
    """Split audio into ``[n, 512]`` chunks, the last zero-padded (as silero's ``audio_forward``)."""
    n = -(-audio.size // CHUNK)
    if max_chunks is not None:
        n = min(n, max_chunks)
    out = np.zeros((n, CHUNK), np.float32)
    flat = audio[: n * CHUNK]
    out.reshape(-1)[: flat.size] = flat
    return out


def with_context(chunks: np.ndarray) -> np.ndarray:
    """``[n, 576]``: each chunk preceded by the last 64 samples of the previous one (zeros first)."""
    ctx = np.zeros((chunks.shape[0], CONTEXT), np.float32)
    ctx[1:] = chunks[:-1, -CONTEXT:]
    return np.concatenate([ctx, chunks], axis=1)


def vad_logits(p: float) -> np.ndarray:
    """The ``vad`` head's logits for speech probability ``p``: ``[0, logit(p)]`` (float64)."""
    p = min(max(float(p), 1e-12), 1.0 - 1e-12)
    return np.array([0.0, np.log(p) - np.log1p(-p)])


def _decide(rec: Recorder, p: float, index: int) -> None:
    rec.decide(vad_logits(p), head=HEAD, chunk=index, time_us=index * CHUNK * 1_000_000 // RATE)


def _metadata(model: Path, **extra: str) -> dict:
    # a VAD's calls are not fed back into the model: the head is open-loop (every chunk compared)
    return {"vocab_head": HEAD, "model": model.name, "open_loop": [HEAD],
            "tags": {"silero_vad.chunk": str(CHUNK), **extra}}


def record_jit(trace: Path, chunks: np.ndarray, sample: str) -> None:
    """Stream the chunks through ``silero_vad.jit`` under a :class:`TorchRecorder`."""
    path = model_file("silero_vad.jit")
    model = torch.jit.load(str(path)).eval()
    model.reset_states()
    with torch.no_grad(), TorchRecorder(trace, model, k=2, vocab=VOCAB, metadata=_metadata(path)) as rec:
        for i, chunk in enumerate(chunks):
            with rec.step(sample=sample, index=i):
                prob = model(torch.from_numpy(chunk)[None], RATE)
                rec.record("output", prob, source="silero_vad.jit", mode="full")
                rec.record("stateN", model._state, source="silero_vad.jit state", mode="full")
                _decide(rec, float(prob[0, 0]), i)


def record_stream(trace: Path, model: Path, chunks: np.ndarray, sample: str) -> None:
    """Stream the chunks through an ONNX model (input + state -> output + stateN) under an :class:`OrtRecorder`."""
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.log_severity_level = 3  # silero's graphs carry unused initializers ORT warns about on load
    session = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
    state = np.zeros((2, 1, 128), np.float32)
    sr = np.array(RATE, dtype=np.int64)
    framed = with_context(chunks)
    with OrtRecorder(trace, session, model=model, tensors={"output": "full", "stateN": "full"}, k=2, vocab=VOCAB,
                     metadata=_metadata(model)) as rec:
        for i, x in enumerate(framed):
            with rec.step(sample=sample, index=i):
                prob, state = rec.run(["output", "stateN"], {"input": x[None], "state": state, "sr": sr})
                _decide(rec, float(prob[0, 0]), i)


def record_sequence(trace: Path, chunks: np.ndarray, sample: str, *, max_frames: int = 512) -> None:
    """Run ``silero_vad_16k_sequence.onnx`` on blocks of up to ``max_frames`` chunks (one call each,
    h/c carried between blocks, as silero's ``SileroVADSequence``) and record one step per chunk."""
    path = model_file("silero_vad_16k_sequence.onnx")
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    so.log_severity_level = 3  # silero's graphs carry unused initializers ORT warns about on load
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    framed = with_context(chunks)
    h = np.zeros((1, 1, 128), np.float32)
    c = np.zeros((1, 1, 128), np.float32)
    defaults = {"runtime": "onnxruntime", "runtime_version": ort.__version__, "device": "cpu", "precision": "fp32"}
    with Recorder(trace, k=2, vocab=VOCAB, defaults=defaults, metadata=_metadata(path, mode="sequence")) as rec:
        for first in range(0, len(framed), max_frames):
            probs, h, c = session.run(["speech_probs", "hn", "cn"], {"input": framed[first:first + max_frames],
                                                                        "h": h, "c": c})
            for j, p in enumerate(probs):
                i = first + j
                with rec.step(sample=sample, index=i):
                    rec.record("output", np.array([[p]], np.float32), source="speech_probs", mode="full")
                    if j == len(probs) - 1:
                        rec.record("stateN", np.concatenate([h, c]), source="hn, cn", mode="full")
                    _decide(rec, float(p), i)


def run(out: Path, wav: Path, *, max_chunks: int | None = None, int8: bool = True,
        policy: Policy | None = None) -> dict[str, object]:
    """Record every run into ``out`` and diff the pairs.

    Args:
        out: folder for the traces (``jit``, ``onnx``, ``sequence``, ``op15``, ``int8`` ``.trace``) and
            the int8 graph.
        wav: 16 kHz mono 16-bit WAV.
        max_chunks: stream at most this many chunks.
        int8: also record and diff the int8 copy.
        policy: the diff's tolerance policy (default: the built-in one).

    Returns:
        ``{pair label: differ.DiffReport}``.

    Raises:
        FileNotFoundError: silero-vad or one of its models is missing.
        FileExistsError: a trace already exists in ``out``.
        ValueError: the WAV is not 16 kHz mono 16-bit, or holds no audio.
    """
    out.mkdir(parents=True, exist_ok=True)
    chunks = chunks_of(read_wav(wav), max_chunks)
    if not len(chunks):
        raise ValueError(f"{wav} holds no audio")
    sample = wav.name
    torch.set_num_threads(1)
    traces = {name: out / f"{name}.trace" for name in ("jit", "onnx", "sequence", "op15", "int8")}
    for t in traces.values():
        if t.exists():
            raise FileExistsError(f"{t} exists; pick an empty --out folder")
    record_jit(traces["jit"], chunks, sample)
    fp32 = model_file("silero_vad.onnx")
    record_stream(traces["onnx"], fp32, chunks, sample)
    record_sequence(traces["sequence"], chunks, sample)
    if int8:
        op15 = model_file("silero_vad_16k_op15.onnx")
        record_stream(traces["op15"], op15, chunks, sample)
        q = quantize_dynamic_copy(op15, out / "silero_vad_16k_op15.int8.onnx")
        record_stream(traces["int8"], q, chunks, sample)
    reports = {}
    for label, ref, cand in PAIRS:
        if cand == "int8" and not int8:
            continue
        reports[label] = diff(str(traces[ref]), [str(traces[cand])], DiffOptions(policy=policy or Policy()))
    return reports


def disagreements(report) -> int:
    """Chunks whose speech/silence call differs between the pair (the head is open-loop, so the
    differ compares every chunk and counts each differing one)."""
    d = report.candidates[0].decisions
    return int(d.get("flips", 0) + d.get("divergent", 0))


def verdict_line(label: str, report) -> str:
    """One line: the pair, its verdict, chunks called differently, row verdicts, largest speech-logit
    change and the first divergence."""
    pair = report.candidates[0]
    steps = pair.steps
    counts = ", ".join(f"{k} {v}" for k, v in steps.items() if v and k != "rows")
    noise = pair.decisions.get("logit_noise", {}).get("max")
    fd = pair.first_divergence
    return (f"{label}: {pair.verdict}; speech/silence differs on {disagreements(report)}/{steps.get('rows', 0)} chunks "
            f"({counts}); max |logit change| {noise:.3g}; first divergence: {fd or 'none'}")


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0 when JIT vs ONNX and streaming vs sequence have no flip."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="empty folder for the traces")
    ap.add_argument("--wav", type=Path, default=DEFAULT_WAV, help="16 kHz mono 16-bit WAV (default: %(default)s)")
    ap.add_argument("--max-chunks", type=int, default=None, help="stream at most N chunks of 512 samples")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 quantize_dynamic copy")
    ap.add_argument("--atol", type=float, default=None, help="absolute tolerance for tensors and the vad logit")
    ap.add_argument("--rtol", type=float, default=None, help="relative tolerance for tensors and the vad logit")
    args = ap.parse_args(argv)
    if args.max_chunks is not None and args.max_chunks < 1:
        ap.error("--max-chunks must be at least 1")
    try:
        reports = run(args.out, args.wav, max_chunks=args.max_chunks, int8=not args.no_int8,
                      policy=tolerance(args.atol, args.rtol))
    except (FileNotFoundError, FileExistsError, ValueError, wave.Error) as exc:
        print(f"silero_vad_parity: {exc}", file=sys.stderr)
        return 2
    for label, report in reports.items():
        print(verdict_line(label, report))
    bad = [label for label in ("jit-vs-onnx", "stream-vs-sequence")
           if reports[label].candidates[0].verdict in ("flip", "divergent", "missing")]
    print(f"traces in {args.out}; explore with: trace view {args.out / 'op15.trace'} {args.out / 'int8.trace'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
