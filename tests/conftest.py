"""Shared fixtures for the steptrace tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_trace(*args: str, cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `trace` command as a user would, in a fresh interpreter; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "tui.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=300
    )


@pytest.fixture
def trace_cli():
    """The `trace` command runner."""
    return run_trace
