"""Shared fixtures for the steptrace tests."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_trace(*args: str, cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `trace` command as a user would, in a fresh interpreter; returns the completed process."""
    return subprocess.run(
        [sys.executable, "-m", "steptrace.tui.cli", *args], capture_output=True, text=True, cwd=cwd or ROOT, timeout=300
    )


def run_trace_here(*args: str, cwd: str | os.PathLike[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `trace` command in this process (``steptrace.tui.cli.main``), its stdout and stderr captured;
    returns what :func:`run_trace` would. A traceback is not caught: it fails the test."""
    from steptrace.tui.cli import main

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        os.chdir(cwd or ROOT)
        with redirect_stdout(out), redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["trace", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def trace_cli():
    """The `trace` command runner, in-process (fast); :func:`run_trace` runs a fresh interpreter."""
    return run_trace_here
