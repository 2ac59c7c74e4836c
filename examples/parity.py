"""What the parity examples share: the tolerance policy they diff with."""

from __future__ import annotations

from steptrace.differ import DecisionTolerance, Policy


def tolerance(atol: float | None = None, rtol: float | None = None) -> Policy:
    """The diff's tolerance policy: the built-in defaults (None), or ``atol``/``rtol`` applied to
    every tensor and to the logits of every decision head (``|a - b| <= atol + rtol * |a|``)."""
    if atol is None and rtol is None:
        return Policy()
    keys = {k: v for k, v in (("atol", atol), ("rtol", rtol)) if v is not None}
    policy = Policy(decisions=DecisionTolerance(logit_atol=atol, logit_rtol=rtol), source="command line")
    return policy.with_overrides(tensor=keys)
