"""differ: aligns and compares traces (never live models) — verdicts, first divergence, culprit."""
