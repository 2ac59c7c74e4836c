"""JSON-safe values for the ``to_json`` methods of the report values."""

from __future__ import annotations

from typing import Any

from .metrics import json_float


def jsonable(v: Any) -> Any:
    """Return ``v`` made JSON-safe: non-finite floats become strings, containers are converted
    item by item, objects with a ``to_json`` method become what it returns."""
    if isinstance(v, float):
        return json_float(v)
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if hasattr(v, "to_json"):
        return v.to_json()
    return v
