"""Numbers and plurals in what the ``trace`` command prints: ``2,338 / 2,620``, ``1 sample``,
``2,620 samples`` (one way everywhere)."""

from __future__ import annotations


def plural(n: int, word: str, many: str | None = None) -> str:
    """``n`` with thousands separators and ``word`` in the singular or plural.

    Args:
        n: the count.
        word: the singular (``sample``; the last word takes the ``s``: ``first divergence``).
        many: the plural when it is not ``word + "s"`` (``"entries"``).

    Returns:
        ``"1 sample"``, ``"2,620 samples"``.
    """
    return f"{n:,} {word if n == 1 else (many or word + ('es' if word.endswith(('s', 'x', 'ch', 'sh')) else 's'))}"


def ratio(part: int, whole: int) -> str:
    """``"2,338 / 2,620"``: a part of a whole, both with thousands separators."""
    return f"{part:,} / {whole:,}"


__all__ = ["plural", "ratio"]
