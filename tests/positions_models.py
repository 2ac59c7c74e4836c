"""A small real CTC recognizer with per-position outputs, and the trace pairs it records.

:class:`CTCModel` is a conv encoder (``encoder.0`` Conv1d, ``encoder.1`` ReLU, ``encoder.2``
Conv1d, ``encoder.3`` ReLU) and a per-frame linear ``head``: ``features [1, F, T] -> logits
[1, T, V]`` with id 0 the CTC blank. Its weights are constructed (matched filters of class
prototypes), so its frame decisions are meaningful without training: on :func:`utterances`
(each token a noisy prototype held for 2-4 frames, blanks between) it labels most frames right,
by several logits, and is least sure at token boundaries.

:func:`plant_bug` returns a copy whose first Conv has a deliberate fault (one filter of each of
six classes sign-flipped): every utterance then decides some frames differently, by whole
logits, and the first recorded tensor beyond any tolerance is that Conv's output at step 0 of
each sample.

:func:`build_ctc_pair` records a reference and a candidate (ONNX Runtime with ``position="all"``,
or torch with ``decide_positions``), one step per frame, the encoder's tensors at step 0 of
each sample, the head declared open-loop in the manifest. The differ's tests call it::

    from positions_models import build_ctc_pair
    pair = build_ctc_pair(tmp_path, bug=True)            # fp32 ORT vs the planted-bug ORT copy
    pair = build_ctc_pair(tmp_path, bug=False)           # fp32 ORT at DISABLE_ALL vs ENABLE_ALL
    pair = build_ctc_pair(tmp_path, runtime="torch")     # torch reference vs ORT candidate (bug=True)
    diff(str(pair.ref), [str(pair.cand)], ...)
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

F = 16  # feature channels
V = 12  # classes; 0 is the CTC blank
BLANK = 0
SCALE = 12.0  # logits per unit of prototype correlation
#: classes whose filters plant_bug sign-flips
BUGGED = (1, 2, 3, 4, 5, 6)


class CTCModel(nn.Module):
    """Conv encoder + per-frame linear head: ``[1, F, T] -> [1, T, V]`` logits.

    The weights are constructed, not trained: ``encoder.0`` is a bank of matched filters (for each
    class c, the filter ``+p_c`` and the filter ``-p_c``, p_c its prototype scaled to unit
    response, over 3 frames), ``encoder.2`` smooths each channel over 3 frames, and the head scores
    class c as ``SCALE * (relu(+) - relu(-))`` = the smoothed correlation with p_c. Decisions are
    nearest-prototype decisions: right on clean frames, by several logits; close near token
    boundaries and on noisy frames.
    """

    def __init__(self) -> None:
        super().__init__()
        h = 2 * V
        self.encoder = nn.Sequential(nn.Conv1d(F, h, 5, padding=2), nn.ReLU(), nn.Conv1d(h, h, 5, padding=2), nn.ReLU())
        self.head = nn.Linear(h, V)
        proto = torch.from_numpy(_prototypes())
        unit = proto / (proto * proto).sum(1, keepdim=True)  # <unit_c, p_c> = 1
        taps = torch.tensor([0.0, 0.25, 1.0, 0.25, 0.0])
        with torch.no_grad():
            for m in (self.encoder[0], self.encoder[2], self.head):
                m.weight.zero_()
                m.bias.zero_()
            self.encoder[2].bias.fill_(-0.01)  # a small ReLU threshold (and no zero bias shared with encoder.0)
            self.encoder[0].weight[:V] = unit[:, :, None] * taps / taps.sum()
            self.encoder[0].weight[V:] = -self.encoder[0].weight[:V]
            self.encoder[2].weight[torch.arange(h), torch.arange(h)] = taps / taps.sum()
            self.head.weight[torch.arange(V), torch.arange(V)] = SCALE
            self.head.weight[torch.arange(V), V + torch.arange(V)] = -SCALE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).transpose(1, 2))


@dataclass(frozen=True)
class Utterance:
    """One synthetic utterance: its id, features ``[1, F, T]`` (float32), frame labels and tokens."""

    sample: str
    features: np.ndarray
    labels: np.ndarray
    tokens: list[int]


def _prototypes() -> np.ndarray:
    return np.random.default_rng(1234).standard_normal((V, F)).astype(np.float32) * 1.5


def utterances(n: int, *, seed: int = 0, frames: int = 48, noise: float = 0.5) -> list[Utterance]:
    """``n`` utterances of exactly ``frames`` frames: tokens 1..V-1 held 2-4 frames, 1-3 blank
    frames between them; features are the class prototype plus Gaussian noise.

    Args:
        n: how many.
        seed: numpy seed (the same seed gives the same utterances on any machine).
        frames: T.
        noise: standard deviation of the feature noise.

    Returns:
        The utterances, samples named ``utt00``, ``utt01``, ...
    """
    rng = np.random.default_rng(seed)
    proto = _prototypes()
    out = []
    for i in range(n):
        labels, tokens = [], []
        while len(labels) < frames:
            labels += [BLANK] * int(rng.integers(1, 4))
            tok = int(rng.integers(1, V))
            tokens.append(tok)
            labels += [tok] * int(rng.integers(2, 5))
        lab = np.array(labels[:frames], np.int64)
        x = proto[lab].T + noise * rng.standard_normal((F, frames)).astype(np.float32)
        out.append(Utterance(f"utt{i:02d}", x[None].astype(np.float32), lab, tokens))
    return out


def plant_bug(model: CTCModel) -> CTCModel:
    """A copy of ``model`` whose first Conv (``encoder.0``) has the ``+p_c`` filter of each class
    in :data:`BUGGED` sign-flipped: it then equals the ``-p_c`` filter, so those classes score 0
    (the head's difference of the two) and their frames go to other classes. The Conv's own
    output changes in value and in statistics (its mean is no longer 0), so it is the first
    tensor beyond tolerance whether values or statistics only are recorded.

    Args:
        model: the model (left unchanged).

    Returns:
        The faulty copy, in eval mode.
    """
    bad = CTCModel()
    bad.load_state_dict(model.state_dict())
    rows = torch.tensor(BUGGED)
    with torch.no_grad():
        bad.encoder[0].weight[rows] *= -1
    return bad.eval()


def export_onnx(model: CTCModel, path: Path) -> Path:
    """Export ``model`` to ONNX (opset 17, ``features [1, F, T]`` -> ``logits [1, T, V]``, T dynamic).

    Returns:
        ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, F, 8),), str(path), dynamo=False, input_names=["features"],
                          output_names=["logits"], opset_version=17,
                          dynamic_axes={"features": {2: "T"}, "logits": {1: "T"}})
    return path


def record_ort(model_path: Path, trace: Path, utts: list[Utterance], *, optimization: str = "disable",
               tensors: dict[str, str] | None = None) -> Path:
    """Record ``utts`` through :class:`recorders.onnxruntime.OrtRecorder` with ``position="all"``:
    one run per sample (its inputs, exposed intermediates and logits at step 0), one step per frame.

    Args:
        model_path: an ONNX model (expose intermediates first to record them).
        trace: the trace to create.
        utts: the utterances.
        optimization: ORT graph optimisation level.
        tensors: capture policy (default: statistics and digest of every value).

    Returns:
        ``trace``.
    """
    from steptrace.recorders.onnxruntime import OrtRecorder

    with OrtRecorder(trace, model_path, logits="logits", position="all", optimization=optimization, tensors=tensors,
                     watched={"blank": BLANK}) as rec:
        for u in utts:
            rec.set_sample(u.sample)
            rec.run(["logits"], {"features": u.features})
    return trace


def record_torch(model: CTCModel, trace: Path, utts: list[Utterance], *, modules: str | dict = "stats") -> Path:
    """Record ``utts`` through :class:`recorders.torch.TorchRecorder`: the encoder's module outputs
    at step 0 of each sample, then ``decide_positions`` over the ``[T, V]`` logits.

    Returns:
        ``trace``.
    """
    from steptrace.recorders.torch import TorchRecorder

    with TorchRecorder(trace, model, modules={"encoder.*": modules, "head": modules} if isinstance(modules, str)
                       else modules, open_loop=["token"], watched={"blank": BLANK}) as rec, torch.no_grad():
        for u in utts:
            rec.set_sample(u.sample)
            rec.decide_positions(model(torch.from_numpy(u.features))[0])
    return trace


@dataclass(frozen=True)
class CTCPair:
    """A recorded reference/candidate pair and what was planted.

    Attributes:
        ref: the reference trace.
        cand: the candidate trace.
        utts: the utterances recorded (the same in both).
        bug: whether the candidate has the planted fault in ``encoder.0``.
        culprit: the candidate's first tensor the fault changes (its name in ``cand``), or None.
    """

    ref: Path
    cand: Path
    utts: list[Utterance]
    bug: bool
    culprit: str | None


#: The ONNX value of ``encoder.0``'s output (torch.onnx.export's name for it).
ONNX_CONV0 = "/encoder/encoder.0/Conv_output_0"


def build_ctc_pair(out: Path, *, bug: bool = True, runtime: str = "onnx", samples: int = 8,
                   frames: int = 48) -> CTCPair:
    """Record a per-position CTC trace pair under ``out``.

    ``runtime="onnx"``: both sides are ONNX Runtime runs of the exported model with every
    intermediate exposed; the reference at ORT_DISABLE_ALL; the candidate the planted-bug copy
    at ORT_DISABLE_ALL (``bug=True``) or the same model at ORT_ENABLE_ALL (``bug=False``, a
    benign pair). ``runtime="torch"``: the reference is the torch model under TorchRecorder,
    the candidate the ONNX copy (bugged or not). Names differ between torch and ONNX sides.

    Args:
        out: a folder (created).
        bug: plant the fault in the candidate.
        runtime: ``"onnx"`` or ``"torch"`` for the reference.
        samples: utterances (one sample each).
        frames: frames per utterance (steps per sample).

    Returns:
        The :class:`CTCPair`.
    """
    from steptrace.recorders.onnxruntime import expose_intermediates

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model = CTCModel().eval()
    utts = utterances(samples, seed=7, frames=frames)
    good = export_onnx(model, out / "ctc.onnx")
    good_x = expose_intermediates(good, "*", out / "ctc.exposed.onnx").path
    if bug:
        bad = export_onnx(plant_bug(model), out / "ctc_bug.onnx")
        cand_model, level = expose_intermediates(bad, "*", out / "ctc_bug.exposed.onnx").path, "disable"
    else:
        cand_model, level = good_x, "all"
    if runtime == "torch":
        ref = record_torch(model, out / "ref_torch.trace", utts)
    elif runtime == "onnx":
        ref = record_ort(Path(good_x), out / "ref.trace", utts)
    else:
        raise ValueError(f"runtime must be 'onnx' or 'torch', got {runtime!r}")
    with warnings.catch_warnings():  # the benign candidate runs at ENABLE_ALL on purpose, exposed values and all
        warnings.filterwarnings("ignore", message="this session has .* exposed intermediates")
        cand = record_ort(Path(cand_model), out / ("cand_bug.trace" if bug else "cand.trace"), utts,
                          optimization=level)
    return CTCPair(ref, cand, utts, bug, ONNX_CONV0 if bug else None)


# ---------------------------------------------------------------------- silero-vad, a whole file per call
@dataclass(frozen=True)
class VadPair:
    """silero-vad's sequence model over a WAV in one call, recorded with one step per chunk.

    Attributes:
        ref: the fp32 trace.
        cand: the trace of the copy with a planted fault (or None).
        probs: the reference's speech probability per chunk.
        culprit: the ONNX value of the faulty Conv's output (or None).
    """

    ref: Path
    cand: Path | None
    probs: np.ndarray
    culprit: str | None


def _silero():
    import sys

    root = str(Path(__file__).resolve().parent.parent)
    if root not in sys.path:
        sys.path.insert(0, root)
    from examples import silero_vad_parity

    return silero_vad_parity


def record_vad_sequence(model: Path, trace: Path, framed: np.ndarray, *, sample: str = "speech") -> np.ndarray:
    """Run silero's sequence model over every chunk in one call under an OrtRecorder (inputs,
    intermediates and outputs at step 0) and decide every chunk's ``vad`` head, one step each.

    Args:
        model: ``silero_vad_16k_sequence.onnx`` or a copy (with exposed intermediates).
        trace: the trace to create.
        framed: ``[n, 576]`` chunks with their 64 context samples.
        sample: the sample id.

    Returns:
        The speech probabilities, ``[n]``.
    """
    from steptrace.recorders.onnxruntime import OrtRecorder

    sv = _silero()
    with OrtRecorder(trace, model, optimization="disable", open_loop=["vad"], k=2, vocab=sv.VOCAB,
                     metadata={"vocab_head": "vad"}) as rec:
        rec.set_sample(sample)
        probs, _, _ = rec.run(["speech_probs", "hn", "cn"], {"input": framed, "h": np.zeros((1, 1, 128), np.float32),
                                                              "c": np.zeros((1, 1, 128), np.float32)})
        p = np.clip(probs.astype(np.float64), 1e-12, 1.0 - 1e-12)
        rec.decide_positions(np.stack([np.zeros_like(p), np.log(p) - np.log1p(-p)], axis=1), head="vad")
    return probs


def build_vad_pair(out: Path, *, bug: bool = True, max_chunks: int = 120) -> VadPair:
    """Record silero-vad's ``silero_vad_16k_sequence.onnx`` over the committed WAV (every
    intermediate exposed, ORT_DISABLE_ALL), and with ``bug`` a copy whose Conv ``encoder.1`` has
    4 of its 64 filters sign-flipped: the reference/candidate pair of a whole-file VAD, one step
    per 32 ms chunk, the network's tensors at step 0.

    Args:
        out: a folder (created).
        bug: also record the faulty copy.
        max_chunks: chunks of the WAV to use.

    Returns:
        The :class:`VadPair`.

    Raises:
        FileNotFoundError: silero-vad is not installed.
    """
    import onnx
    from onnx import numpy_helper

    from steptrace.recorders.onnxruntime import expose_intermediates

    sv = _silero()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src = sv.model_file("silero_vad_16k_sequence.onnx")
    framed = sv.with_context(sv.chunks_of(sv.read_wav(sv.DEFAULT_WAV), max_chunks))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        good = expose_intermediates(src, "*", out / "vad_seq.exposed.onnx").path
    probs = record_vad_sequence(Path(good), out / "vad_seq.trace", framed)
    if not bug:
        return VadPair(out / "vad_seq.trace", None, probs, None)
    proto = onnx.load(str(src))
    for t in proto.graph.initializer:
        if t.name == "encoder.1.weight":
            w = numpy_helper.to_array(t).copy()
            w[:4] *= -1
            t.CopyFrom(numpy_helper.from_array(w, t.name))
    conv = next(n.output[0] for n in proto.graph.node if n.op_type == "Conv" and "encoder.1.weight" in n.input)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = expose_intermediates(proto, "*", out / "vad_seq_bug.exposed.onnx").path
    record_vad_sequence(Path(bad), out / "vad_seq_bug.trace", framed)
    return VadPair(out / "vad_seq.trace", out / "vad_seq_bug.trace", probs, conv)
