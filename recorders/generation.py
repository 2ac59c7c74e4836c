"""What the Hugging Face recorder reads from ``generate``'s options and model configuration: the
decoding modes it refuses (their score rows are not one sequence each), the EOS ids, and the
simple options kept in the trace's tags. Imports no framework.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from .errors import GenerationModeError

__all__ = ["REFUSED", "check_mode", "eos_ids", "simple_options"]

#: ``generate`` options whose decoding scores several tokens per step -> what they are called.
REFUSED = {"assistant_model": "assisted decoding", "prompt_lookup_num_tokens": "prompt-lookup decoding",
           "assistant_early_exit": "self-speculative decoding"}


def eos_ids(model: Any) -> list[int]:
    """Return the EOS ids of a generating model (``generation_config``, else ``config``).

    Args:
        model: a ``transformers`` model, or anything with those attributes.

    Returns:
        The ids, in the configuration's order (empty when it names none).
    """
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is None:
        eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def check_mode(model: Any, kwargs: Mapping[str, Any]) -> None:
    """Refuse decoding modes whose score rows are not one sequence each.

    Args:
        model: the generating model (its ``generation_config``).
        kwargs: the options given to ``generate``.

    Raises:
        GenerationModeError: beam search, assisted or prompt-lookup decoding.
    """
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
    if beams > 1:
        raise GenerationModeError(
            f"beam search (num_beams={beams}) cannot be recorded: beams are reordered at every step, so a row "
            "of the scores is not one sequence. Record greedy or sampled decoding (num_beams=1), or record "
            "the chosen beam's tokens with a TorchRecorder and teacher forcing"
        )
    for key, what in REFUSED.items():
        if kwargs.get(key) is not None or getattr(config, key, None) is not None:
            raise GenerationModeError(f"{what} ({key}) cannot be recorded: it scores several tokens per step; "
                                      "record plain greedy or sampled decoding")


def simple_options(kwargs: Mapping[str, Any]) -> str:
    """Return the JSON-simple generate options (flags, lengths, temperatures) for the trace's tags.

    Args:
        kwargs: the options given to ``generate``.

    Returns:
        A JSON object with sorted keys.
    """
    simple = {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str)) or v is None}
    return json.dumps(simple, sort_keys=True)
