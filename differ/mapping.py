"""Tensor-name mapping between runtimes (a torch module path vs an ONNX value name).

A mapping file (TOML) renames the candidate's tensor names to the reference's::

    [names]                                  # exact pairs: candidate name = reference name
    "/encoder/layers.0/Add_1_output_0" = "encoder.layers.0"

    [[rename]]                               # regular-expression rules, tried in order
    pattern = '^/decoder/(\\w+)/.*_output_0$'
    replace = 'decoder.\\1'

Without a file, :func:`guess_mapping` pairs names by execution order and (dtype, shape) at one
step; the report marks such a mapping as a guess, and ``--save-mapping`` writes it out for review.
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import MappingError
from .sequence import align


@dataclass
class NameMapping:
    """Renames candidate tensor names to reference names.

    Attributes:
        names: exact ``candidate -> reference`` pairs (checked first).
        rules: ``(pattern, replacement)`` regular expressions, first full match wins.
        guessed: the pairs were guessed from execution order and shapes, not given.
        source: the file it came from, ``"guess"``, or ``"identity"``.
    """

    names: dict[str, str] = field(default_factory=dict)
    rules: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    guessed: bool = False
    source: str = "identity"

    def rename(self, name: str) -> str:
        """Return the reference name for candidate tensor ``name``."""
        if name in self.names:
            return self.names[name]
        for pat, rep in self.rules:
            if pat.fullmatch(name):
                return pat.sub(rep, name)
        return name

    def __str__(self) -> str:
        kind = "guessed" if self.guessed else "given"
        return f"name mapping ({kind}, {self.source}): {len(self.names)} pairs, {len(self.rules)} rules"

    def to_json(self) -> dict[str, Any]:
        """Return the mapping as a JSON object."""
        return {
            "source": self.source,
            "guessed": self.guessed,
            "names": dict(sorted(self.names.items())),
            "rules": [{"pattern": p.pattern, "replace": r} for p, r in self.rules],
        }

    def to_toml(self) -> str:
        """Return the mapping as a TOML mapping file (what ``--save-mapping`` writes)."""
        lines = [f"# steptrace tensor-name mapping ({'guessed by execution order and shape: review it' if self.guessed else self.source})",
                 "[names]"]
        lines += [f"{json.dumps(b)} = {json.dumps(a)}" for b, a in sorted(self.names.items())]
        for p, r in self.rules:
            lines += ["", "[[rename]]", f"pattern = {json.dumps(p.pattern)}", f"replace = {json.dumps(r)}"]
        return "\n".join(lines) + "\n"


def load_mapping(path: str | Path) -> NameMapping:
    """Read a TOML mapping file.

    Raises:
        MappingError: the file is missing, not TOML, or malformed.
    """
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MappingError(f"mapping file {p} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MappingError(f"mapping file {p} cannot be read as TOML: {exc}") from None
    unknown = set(doc) - {"names", "rename"}
    if unknown:
        raise MappingError(f"{p}: unknown section(s) {', '.join(sorted(unknown))}; use [names] and [[rename]]")
    names = doc.get("names", {})
    if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
        raise MappingError(f"{p}: [names] must map candidate names to reference names (strings)")
    rules = []
    for i, r in enumerate(doc.get("rename", [])):
        if not isinstance(r, dict) or not isinstance(r.get("pattern"), str) or not isinstance(r.get("replace"), str):
            raise MappingError(f"{p}: [[rename]] #{i + 1} needs pattern = '...' and replace = '...'")
        try:
            rules.append((re.compile(r["pattern"]), r["replace"]))
        except re.error as exc:
            raise MappingError(f"{p}: [[rename]] #{i + 1}: bad pattern {r['pattern']!r} ({exc})") from None
    return NameMapping(dict(names), rules, False, str(p))


def guess_mapping(a: list[tuple[str, str, tuple[int, ...]]], b: list[tuple[str, str, tuple[int, ...]]]) -> NameMapping:
    """Guess candidate -> reference names from one step's tensors in execution order.

    The two lists of ``(name, dtype, shape)`` are aligned by edit distance over their
    ``(dtype, shape)`` signatures; aligned entries with equal signatures are paired.

    Args:
        a: reference tensors of one step, in execution order.
        b: candidate tensors of the same step, in execution order.

    Returns:
        A mapping with ``guessed = True`` (names already equal are not listed).
    """
    sigs: dict[tuple[str, tuple[int, ...]], int] = {}
    ca = np.array([sigs.setdefault((d, s), len(sigs)) for _, d, s in a], dtype=np.int64)
    cb = np.array([sigs.setdefault((d, s), len(sigs)) for _, d, s in b], dtype=np.int64)
    ia, ib, _ = align(ca, cb)
    names = {}
    for i, j in zip(ia.tolist(), ib.tolist()):
        if i >= 0 and j >= 0 and ca[i] == cb[j] and a[i][0] != b[j][0]:
            names[b[j][0]] = a[i][0]
    return NameMapping(names, [], True, "guess")
