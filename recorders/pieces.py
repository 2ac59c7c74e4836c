"""Token pieces from a Hugging Face tokenizer: the text of every id, and the joining of
characters whose bytes come one token at a time (byte-fallback ``<0xE7>`` pieces, byte-level
BPE). Imports no framework: the tokenizer is used through its own methods.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PieceJoiner", "token_pieces"]

_REPLACEMENT = "\ufffd"
#: Tokens one character may take at most when its bytes come one token at a time.
_MAX_PARTIAL = 8


def token_pieces(tokenizer: Any) -> tuple[list[str], frozenset[int]]:
    """Decoded text of every id of a Hugging Face tokenizer (one id at a time, as ``piece``),
    and the ids that decode to part of a character (byte-fallback pieces such as ``<0xE7>``, or
    byte-level BPE tokens holding part of a UTF-8 sequence), whose piece is their token string.

    Args:
        tokenizer: a Hugging Face tokenizer (``len``, ``batch_decode``, ``convert_ids_to_tokens``).

    Returns:
        ``(pieces indexed by id, ids that decode to part of a character)``.
    """
    n = len(tokenizer)
    texts = list(tokenizer.batch_decode([[i] for i in range(n)], skip_special_tokens=False,
                                        clean_up_tokenization_spaces=False))
    partial = frozenset(i for i, t in enumerate(texts) if _REPLACEMENT in t)
    if partial:
        ids = sorted(partial)
        for i, tok in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
            if tok:
                texts[i] = tok
    return texts, partial


class PieceJoiner:
    """Display pieces of one sample's tokens where a character spans several tokens: a token
    that decodes to part of a character shows its token string (``<0xE7>``) until the token
    completing the character, whose piece is the whole character (``篇``), decoded from them all.

    Args:
        tokenizer: the tokenizer that decodes the held ids.
        partial: the ids that decode to part of a character (:func:`token_pieces`).
    """

    def __init__(self, tokenizer: Any, partial: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.partial = partial
        self.held: list[int] = []

    def piece(self, token: int) -> str | None:
        """The piece to record for ``token`` (None: the vocabulary's)."""
        if token not in self.partial:
            self.held = []
            return None
        ids = [*self.held, token]
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if text.endswith(_REPLACEMENT):
            self.held = ids if len(ids) < _MAX_PARTIAL else []
            return None
        self.held = []
        return text
