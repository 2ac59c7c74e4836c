"""Greedy decoding of the committed tiny LM with numpy and ONNX Runtime only (no torch).

The assets (``assets/tiny_lm``) hold ``full.onnx`` (full recompute), ``step.onnx`` (KV cache)
and ``vocab.json``. :class:`OrtLM` decodes a prompt either way; its ``on_step`` hook sees every
step's logits and may force the token (teacher forcing), which is how a recorder plugs in.
:func:`quantized_copy` makes an int8 (``quantize_dynamic``) copy at run time; it needs the ``onnx``
package besides onnxruntime (``onnxruntime.quantization`` imports it).

    lm = OrtLM()
    out = lm.greedy(prompt_ids("The file"), 40, use_cache=True)
    print(decode(out.tokens))
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from steptrace.assets import TINY_LM

ASSETS = TINY_LM

#: Prompts the demo decodes (each is prefixed with the BOS/newline by :func:`prompt_ids`). With the
#: committed model on the machine they were chosen on, int8 keeps "Return the" identical for 100
#: steps, flips a near-tie at step 23 ("The file") and 74 ("Note that"), loses the fp32 run's EOS
#: ("Close the file") and ends early on an EOS fp32 never emits ("Return a list of").
DEMO_PROMPTS: tuple[str, ...] = ("Return the", "The file", "Note that", "Close the file", "Return a list of")
#: Steps the demo decodes per prompt (prompt + steps stay within the 128-character context).
DEMO_MAX_NEW = 100

OnStep = Callable[[int, np.ndarray, int], "int | None"]

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


@functools.lru_cache(maxsize=4)
def _vocab_file(path: Path) -> dict:
    return json.loads(path.read_text())


def load_vocab(assets: str | Path = ASSETS) -> dict:
    """The vocabulary record: ``tokens`` (id -> piece), ``eos_id``, ``config`` (the model shape).

    Raises:
        FileNotFoundError: ``assets`` has no ``vocab.json``.
    """
    return _vocab_file(Path(assets) / "vocab.json")


def encode(text: str, *, assets: str | Path = ASSETS) -> list[int]:
    """Character ids of ``text``.

    Raises:
        ValueError: a character outside the vocabulary (printable ASCII and newline).
    """
    index = {piece: i for i, piece in enumerate(load_vocab(assets)["tokens"])}
    missing = sorted({ch for ch in text if ch not in index})
    if missing:
        raise ValueError(f"characters {missing!r} are not in the tiny LM vocabulary (printable ASCII and newline)")
    return [index[ch] for ch in text]


def decode(ids: Sequence[int], *, assets: str | Path = ASSETS) -> str:
    """The text of ``ids`` (the EOS id decodes to a newline)."""
    tokens = load_vocab(assets)["tokens"]
    return "".join(tokens[int(i)] for i in ids)


def prompt_ids(text: str, *, assets: str | Path = ASSETS) -> list[int]:
    """A prompt as the model saw sentence starts in training: the EOS/newline id, then ``text``."""
    return [load_vocab(assets)["eos_id"], *encode(text, assets=assets)]


def quantized_copy(src: str | Path, dst: str | Path, *, per_channel: bool = False) -> Path:
    """Write an int8 copy of ``src`` with ``onnxruntime.quantization.quantize_dynamic``.

    MatMul weights become int8 (per tensor unless ``per_channel``); activations are quantized to
    uint8 at run time. Needs the ``onnx`` package.

    Returns:
        ``dst`` as a Path.

    Raises:
        ImportError: the ``onnx`` package is missing.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic warns on the root logger to run its pre-processing
    try:
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    finally:
        root.setLevel(level)
    return dst


def session(path: str | Path, *, optimization: str = "all", threads: int = 1) -> ort.InferenceSession:
    """A CPU ``InferenceSession`` for one of the tiny LM graphs.

    Args:
        path: the ``.onnx`` file.
        optimization: graph optimisation level, ``disable``/``basic``/``extended``/``all`` (fusions at
            ``extended`` and above remove intermediate node outputs).
        threads: intra-op threads (1 keeps runs reproducible and is fastest for this size).

    Raises:
        ValueError: an unknown optimisation level.
    """
    if optimization not in _LEVELS:
        raise ValueError(f"optimization must be one of {sorted(_LEVELS)}, not {optimization!r}")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = _LEVELS[optimization]
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class Generation:
    """One greedy decode.

    Attributes:
        prompt: the prompt ids.
        tokens: the ids fed back after each step (the chosen or forced one; EOS last if emitted).
        argmax: the model's own choice at each step.
        margins: top-1 minus top-2 logit at each step.
        forced: whether ``on_step`` returned the id fed at each step (teacher forcing; it may equal
            the argmax).
        logits: the last position's logits at each step, [steps, V] float32.
        stopped_at_eos: decoding ended on the EOS id (not on ``max_new``).
    """

    prompt: list[int]
    tokens: list[int] = field(default_factory=list)
    argmax: list[int] = field(default_factory=list)
    margins: list[float] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    logits: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    stopped_at_eos: bool = False


class OrtLM:
    """Greedy decoder over the full-recompute and KV-cache graphs.

    Args:
        full: ``full.onnx`` path, or an object with ONNX Runtime's ``run(output_names, feeds)``
            (a recorder's wrapped session).
        step: ``step.onnx`` path, or such an object.
        assets: where ``vocab.json`` (EOS id, model shape) lives.
        optimization: graph optimisation level for sessions opened here (see :func:`session`).
    """

    def __init__(self, full: str | Path | object | None = None, step: str | Path | object | None = None, *,
                 assets: str | Path = ASSETS, optimization: str = "all") -> None:
        vocab = load_vocab(assets)
        self.eos_id: int = vocab["eos_id"]
        cfg = vocab["config"]
        self.context: int = cfg["context"]
        self.n_layers: int = cfg["n_layers"]
        self._kv_shape = (1, cfg["n_heads"], 0, cfg["d_model"] // cfg["n_heads"])
        self.full_session = self._open(full if full is not None else Path(assets) / "full.onnx", optimization)
        self.step_session = self._open(step if step is not None else Path(assets) / "step.onnx", optimization)
        self._kv_names = [f"{kind}_{i}" for i in range(self.n_layers) for kind in ("key", "value")]

    @staticmethod
    def _open(src: str | Path | object, optimization: str):
        return session(src, optimization=optimization) if isinstance(src, (str, Path)) else src

    @classmethod
    def quantized(cls, directory: str | Path, *, assets: str | Path = ASSETS, optimization: str = "all") -> OrtLM:
        """An int8 decoder: quantizes both committed graphs into ``directory`` and opens them."""
        directory = Path(directory)
        full = quantized_copy(Path(assets) / "full.onnx", directory / "full.int8.onnx")
        step = quantized_copy(Path(assets) / "step.onnx", directory / "step.int8.onnx")
        return cls(full, step, assets=assets, optimization=optimization)

    def full_logits(self, ids: Sequence[int]) -> np.ndarray:
        """Logits [T, V] of every position of ``ids`` from the full-recompute graph."""
        (logits,) = self.full_session.run(["logits"], {"ids": np.asarray([ids], dtype=np.int64)})
        return logits[0]

    def empty_cache(self) -> dict[str, np.ndarray]:
        """The zero-length past the first ``step.onnx`` call takes."""
        return {f"past_{n}": np.zeros(self._kv_shape, np.float32) for n in self._kv_names}

    def step_logits(self, ids: Sequence[int], past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Logits [T, V] of new ``ids`` after the cached positions, and the next call's past."""
        outs = self.step_session.run(
            ["logits", *[f"present_{n}" for n in self._kv_names]],
            {"ids": np.asarray([ids], dtype=np.int64), **past},
        )
        return outs[0][0], {f"past_{n}": t for n, t in zip(self._kv_names, outs[1:])}

    def greedy(self, prompt_ids: Sequence[int], max_new: int, *, use_cache: bool,
               on_step: OnStep | None = None, stop_at_eos: bool = True) -> Generation:
        """Decode greedily from ``prompt_ids`` for at most ``max_new`` steps.

        Args:
            prompt_ids: at least one id (start prompts with the EOS id: :func:`prompt_ids`).
            max_new: steps to decode at most.
            use_cache: prefill then one id per call through ``step.onnx``; otherwise rerun
                ``full.onnx`` on the whole sequence every step.
            on_step: ``on_step(step, logits, chosen)`` after each step's logits ([V] float32,
                ``chosen`` the argmax); returning an int feeds that id instead (teacher forcing).
            stop_at_eos: stop once the fed id is the EOS id.

        Returns:
            The :class:`Generation`.

        Raises:
            ValueError: empty prompt, or prompt plus ``max_new`` longer than the model's context.
        """
        prompt = [int(i) for i in prompt_ids]
        if not prompt:
            raise ValueError("the prompt needs at least one id (start it with the EOS id, see prompt_ids())")
        if len(prompt) + max_new > self.context:
            raise ValueError(f"prompt ({len(prompt)}) + max_new ({max_new}) exceeds the context of {self.context}")
        gen = Generation(prompt=prompt)
        rows: list[np.ndarray] = []
        past = self.empty_cache()
        pending = prompt
        for step in range(max_new):
            if use_cache:
                logits, past = self.step_logits(pending, past)
            else:
                logits = self.full_logits(prompt + gen.tokens)
            last = np.ascontiguousarray(logits[-1], dtype=np.float32)
            chosen = int(np.argmax(last))  # ties resolve to the lowest id, like torch.argmax
            second, first = np.partition(last, -2)[-2:]
            forced = on_step(step, last, chosen) if on_step is not None else None
            token = chosen if forced is None else int(forced)
            rows.append(last)
            gen.argmax.append(chosen)
            gen.margins.append(float(first - second))
            gen.forced.append(forced is not None)
            gen.tokens.append(token)
            pending = [token]
            if stop_at_eos and token == self.eos_id:
                gen.stopped_at_eos = True
                break
        gen.logits = np.stack(rows) if rows else np.zeros((0, 0), np.float32)
        return gen
