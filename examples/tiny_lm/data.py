"""The tiny LM's training text and character vocabulary, built offline from the Python stdlib.

The corpus is the docstrings of the standard library's own ``.py`` files (read with ``ast``,
never imported), reflowed into one English sentence per line so that a newline is a natural
end-of-sequence token. Doctest lines, option tables and code-heavy paragraphs are dropped.

The vocabulary is fixed: newline (id 0, the EOS) followed by the 95 printable ASCII characters.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
from pathlib import Path

EOS_CHAR = "\n"
VOCAB: list[str] = [EOS_CHAR] + [chr(c) for c in range(32, 127)]
EOS_ID = 0

_SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "turtledemo", "__pycache__", "ensurepip"}
_SENTENCE_END = re.compile(r"(?<=[a-z0-9\)][.!?])\s+(?=[A-Z])")


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The stdlib ``.py`` files the corpus is read from, in a fixed (sorted) order.

    Args:
        root: the stdlib directory; defaults to this interpreter's.

    Returns:
        Sorted paths, excluding tests, IDLE, lib2to3, site-packages and demos.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_PARTS & set(p.relative_to(root).parts))


def _docstrings(path: Path) -> list[str]:
    """Every module, class and function docstring of one source file (unparseable files give none)."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = (n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)))
    return [d for d in (ast.get_docstring(n) for n in nodes) if d]


def _prose(paragraph: str) -> str | None:
    """Reflow one paragraph to a single line, or None when it is code, a table or too short."""
    lines = [ln.strip() for ln in paragraph.splitlines()]
    if any(ln.startswith((">>>", "...", "$", "%", "#", "-", "*", "+", "|", "=")) for ln in lines):
        return None
    text = " ".join(ln for ln in lines if ln)
    text = "".join(ch if ch in VOCAB[1:] else " " for ch in text.replace("\t", " "))
    text = re.sub(r"\s+", " ", text).strip()
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    if len(text) < 40 or letters < 0.9 * len(text) or "(" in text[:1]:
        return None
    return text


def sentences(files: list[Path] | None = None) -> list[str]:
    """The corpus as sentences, one per entry, in file order; duplicates removed (first kept).

    Args:
        files: source files to read; defaults to :func:`stdlib_files`.

    Returns:
        Sentences of 20 to 200 characters, each ending in ``.``, ``!`` or ``?``.
    """
    seen: set[str] = set()
    out: list[str] = []
    for path in files if files is not None else stdlib_files():
        for doc in _docstrings(path):
            for para in re.split(r"\n\s*\n", doc):
                text = _prose(para)
                if text is None:
                    continue
                for sent in _SENTENCE_END.split(text):
                    sent = sent.strip()
                    if 20 <= len(sent) <= 200 and sent[-1] in ".!?" and sent not in seen:
                        seen.add(sent)
                        out.append(sent)
    return out


def corpus_text() -> str:
    """The whole training text: sentences joined by the EOS character (newline), ending in one."""
    return EOS_CHAR.join(sentences()) + EOS_CHAR


def encode(text: str) -> list[int]:
    """Character ids of ``text``.

    Raises:
        ValueError: a character outside the vocabulary.
    """
    index = {ch: i for i, ch in enumerate(VOCAB)}
    try:
        return [index[ch] for ch in text]
    except KeyError as exc:
        raise ValueError(f"character {exc.args[0]!r} is not in the tiny LM vocabulary (printable ASCII and newline)") from None


def digest(text: str) -> str:
    """SHA-256 of the corpus text (UTF-8), recorded in the assets README for reproducibility."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
