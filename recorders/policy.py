"""Capture policy: which tensors a recorder keeps, and how much of each.

A policy is an ordered list of ``(glob, mode)`` rules over tensor names (module paths, ONNX
value names, CoreML op outputs, ``logits:<head>``); the first rule whose glob matches decides.
Modes:

- ``"stats"``: statistics and the bitwise digest (SPEC.md §4.4–4.5), no values;
- ``"full"``: values too (with a :class:`recorders.ring.Budget`, values only around triggers);
- ``"none"``: not recorded.

Globs are :func:`fnmatch.fnmatchcase` patterns: ``*`` also matches dots, so ``decoder.*``
covers ``decoder.layers.0.attn``. Names no rule matches get the policy's default (``"none"``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Union

from .errors import RecorderUsageError

MODES = ("stats", "full", "none")
_CACHE_LIMIT = 1 << 16

PolicyLike = Union["CapturePolicy", str, Mapping[str, str], Iterable[str | tuple[str, str]], None]


def _check_mode(mode: object, where: str) -> str:
    if mode not in MODES:
        raise RecorderUsageError(f"capture mode {mode!r} for {where} is unknown; use one of {', '.join(MODES)}")
    return mode  # type: ignore[return-value]


class CapturePolicy:
    """Per-name capture modes from glob rules; the first matching rule wins; results cached.

    Args:
        rules: the rules, as any of:
            a mode string (``"stats"``: every name in that mode);
            a mapping ``{"encoder.layers.*": "stats", "decoder.*": "full"}`` (insertion order);
            an iterable of globs (each in ``"stats"`` mode) and/or ``(glob, mode)`` pairs.
        default: the mode of names no rule matches.

    Raises:
        RecorderUsageError: an unknown mode or a rule that is not a string glob.
    """

    def __init__(self, rules: PolicyLike = None, *, default: str = "none") -> None:
        self.default = _check_mode(default, "the default")
        if isinstance(rules, CapturePolicy):
            parsed = list(rules.rules)
        elif rules is None:
            parsed = []
        elif isinstance(rules, str):
            parsed = [("*", _check_mode(rules, "every name"))]
        elif isinstance(rules, Mapping):
            parsed = [(g, m) for g, m in rules.items()]
        else:
            parsed = [(r, "stats") if isinstance(r, str) else tuple(r) for r in rules]
        for rule in parsed:
            if len(rule) != 2 or not isinstance(rule[0], str) or not rule[0]:
                raise RecorderUsageError(f"capture rule {rule!r} is not a (glob, mode) pair")
            _check_mode(rule[1], f"pattern {rule[0]!r}")
        self.rules: tuple[tuple[str, str], ...] = tuple((g, m) for g, m in parsed)
        self._cache: dict[str, str] = {}

    @classmethod
    def coerce(cls, value: PolicyLike) -> CapturePolicy:
        """Return ``value`` as a policy (a policy is returned as is).

        Args:
            value: anything :class:`CapturePolicy` accepts as ``rules``.

        Returns:
            The policy.
        """
        return value if isinstance(value, CapturePolicy) else cls(value)

    def mode(self, name: str) -> str:
        """Return the capture mode of tensor ``name``: ``"stats"``, ``"full"`` or ``"none"``.

        Args:
            name: the tensor name.

        Returns:
            The mode of the first rule whose glob matches, else the default.
        """
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        mode = self.default
        for glob, m in self.rules:
            if fnmatch.fnmatchcase(name, glob):
                mode = m
                break
        if len(self._cache) >= _CACHE_LIMIT:
            self._cache.clear()
        self._cache[name] = mode
        return mode

    __call__ = mode

    def unmatched(self, names: Iterable[str]) -> list[str]:
        """Return the globs that match none of ``names`` (to report typos in module patterns).

        Args:
            names: candidate names (e.g. every module path of a model).

        Returns:
            The globs of the rules that matched nothing, in rule order.
        """
        names = list(names)
        return [g for g, _ in self.rules if not any(fnmatch.fnmatchcase(n, g) for n in names)]

    @property
    def records_anything(self) -> bool:
        """Whether some name can be recorded (a rule or the default is not ``"none"``)."""
        return self.default != "none" or any(m != "none" for _, m in self.rules)

    def __str__(self) -> str:
        rules = ",".join(f"{g}={m}" for g, m in self.rules) or "-"
        return rules if self.default == "none" else f"{rules};default={self.default}"

    def __repr__(self) -> str:
        return f"CapturePolicy({list(self.rules)!r}, default={self.default!r})"
