"""The mutation fuzzer (tests/fuzzing.py) over every file kind and every reading command.

The default run is bounded (a few hundred seeded cases in-process, two in subprocesses to see
signals); ``pytest -m fuzz`` runs the long one (docs/format_safety.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import fuzzing

QUICK_CASES = 1000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fuzzing.build_corpus(tmp_path_factory.mktemp("fuzz") / "corpus")


def test_quick_fuzz_no_traceback_no_silent_change(corpus, tmp_path):
    cases = []
    for seed in range(QUICK_CASES):
        work = tmp_path / f"c{seed}"
        work.mkdir()
        cases.append(fuzzing.run_case(seed, corpus, work))
    bad = [c for c in cases if c.outcome != "ok"]
    assert not bad, "\n\n".join(f"seed {c.seed} {c.base}/{c.file} {c.mutation} {c.command}: {c.outcome}\n{c.error}"
                                for c in bad)
    kinds = Counter(c.kind for c in cases)
    commands = Counter(c.command for c in cases)
    assert set(kinds) == set(fuzzing.TRACE_KINDS + fuzzing.JSONL_KINDS), kinds
    assert set(commands) == set(fuzzing.COMMANDS + ("import",)), commands
    changed = [c for c in cases if c.changed_closed]
    assert len(changed) > 50 and all(c.detected for c in changed)
    refused = sum(c.code == 2 for c in cases)
    assert 0 < refused < len(cases)  # the mutations both break files and leave some readable


def test_fuzz_workers_are_never_killed_by_a_signal(corpus, tmp_path):
    """Cases run in a worker process, as the long run does, so that a segfault would show."""
    vocab_info = next(s for s in range(10_000) if (c := fuzzing.draw(s)).kind == "vocab" and c.command == "info"
                      and c.mutation.startswith("flip"))
    export = next(s for s in range(10_000) if (c := fuzzing.draw(s)).command == "export_jsonl"
                  and c.kind in ("decisions", "tensors") and c.base == "interrupted")
    for seed in (vocab_info, export):
        out = subprocess.run([sys.executable, fuzzing.__file__, "--worker", "--start", str(seed), "--stop",
                              str(seed + 1), "--corpus", str(corpus), "--tmp", str(tmp_path / f"w{seed}")],
                             capture_output=True, text=True, timeout=120, check=False,
                             cwd=Path(fuzzing.__file__).parents[1])
        assert out.returncode == 0, (seed, out.returncode, out.stderr[-2000:])
        case = json.loads(out.stdout.splitlines()[-1])
        assert case["outcome"] == "ok", case


@pytest.mark.fuzz
def test_long_fuzz_run(tmp_path):
    cases = int(os.environ.get("STEPTRACE_FUZZ_CASES", "3000"))
    s = fuzzing.long_run(cases, workers=2, out=tmp_path / "fuzz-report.json",
                         seed0=int(os.environ.get("STEPTRACE_FUZZ_SEED", "100000")))
    assert s.cases >= cases
    assert (s.tracebacks, s.signals, s.silent) == (0, 0, 0), json.dumps(s.failures[:5], indent=1)
    assert s.detected == s.changed_closed
