"""The packaged tiny language model of ``trace demo`` and ``examples/tiny_lm`` (data only, no code).

``TINY_LM`` is its folder: ``full.onnx``, ``step.onnx``, ``vocab.json``, ``train_log.json`` and a
README that says how it was trained and exported (``examples/tiny_lm/train.py``, ``export.py``).
"""

from pathlib import Path

#: The tiny LM's folder inside the installed package.
TINY_LM = Path(__file__).resolve().parent / "tiny_lm"

__all__ = ["TINY_LM"]
