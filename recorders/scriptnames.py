"""How ``trace record`` globs select names: a recorded name is ``ROOT.path`` (the root's label,
then the module path or ONNX value name), and a glob selects it when it matches the full name
or the path after the root's label (``head`` and ``GRULM.head`` both select ``GRULM.head``)."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

__all__ = ["any_match"]


def any_match(globs: Sequence[str], name: str, rel: str) -> bool:
    """Whether a glob matches a name.

    Args:
        globs: :func:`fnmatch.fnmatchcase` patterns.
        name: the full name (``Encoder.layers.0``).
        rel: the name after its root's label (``layers.0``); "" for a root itself.

    Returns:
        True when some glob matches ``name`` or (when given) ``rel``.
    """
    return any(fnmatch.fnmatchcase(name, g) or (bool(rel) and fnmatch.fnmatchcase(rel, g)) for g in globs)
