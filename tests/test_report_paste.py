"""Reports you can paste: plain full-width text off a terminal, markdown, the corpus figures the
seeds quote (flips by margin, KLD ± error, Δp RMS, same top-1 ± binomial error), gates, plain
progress lines, and "0 samples in common" for traces that share no sample id.

The corpus is a real torch GRU language model decoded greedily; candidates are teacher-forced
with the reference's tokens (every step is fresh). The planted differences are deliberate: an
exact rerun, a candidate whose two best logits are swapped wherever the reference's margin is
below ``TIE`` (near-tie flips, counted by the hook), and a free-running one whose argmax is
knocked out at step 2 of every 4th sample (divergent steps, different sequences).
"""

from __future__ import annotations

import argparse
import io
import json
import math

import numpy as np
import pytest
import torch
from rich.console import Console

from steptrace.differ import DiffOptions, Policy, diff
from steptrace.differ.corpusstats import MARGIN_BUCKETS, corpus_stats
from steptrace.differ.errors import IncompatibleTracesError, PolicyError
from steptrace.differ.gate import load_gate, parse_gate
from differ_models import StepLM, decode_torch, writer
from steptrace.tui import cli
from steptrace.tui.commands import diff as diffcmd
from steptrace.tui.render.progress import progress_bar
from steptrace.tui.render.text import format_report

N, STEPS, TIE = 40, 6, 0.05


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    tmp = tmp_path_factory.mktemp("paste")
    m = StepLM(seed=5)
    ref = tmp / "reference-run-with-a-long-name.fp32.trace"
    tokens = {}
    with writer(ref) as w:
        for i in range(N):
            tokens[f"u{i:03d}"] = decode_torch(m, w, f"u{i:03d}", i % 32, STEPS, stop_at_eos=False)
    swaps: list[tuple[str, int]] = []

    def tie(sample: str, step: int, mod: str, out: torch.Tensor) -> torch.Tensor | None:
        if mod != "head":
            return None
        top2 = torch.topk(out[0], 2)
        if float(top2.values[0] - top2.values[1]) >= TIE:
            return None
        out = out.clone()
        out[0, top2.indices[0]], out[0, top2.indices[1]] = top2.values[1], top2.values[0]
        swaps.append((sample, step))
        return out

    def bug(sample: str, step: int, mod: str, out: torch.Tensor) -> torch.Tensor | None:
        if mod == "head" and step == 2 and int(sample[1:]) % 4 == 0:
            out = out.clone()
            out[0, out[0].argmax()] -= 50.0
            return out
        return None

    paths = {"ref": ref}
    for name, hook in (("same", None), ("tie", tie), ("bug", bug)):
        p = tmp / f"{name}.trace"
        with writer(p) as w:
            for s, toks in tokens.items():
                decode_torch(m, w, s, int(s[1:]) % 32, STEPS, hook=hook, force=None if name == "bug" else toks,
                             stop_at_eos=False)
        paths[name] = p
    return {"paths": paths, "swaps": swaps}


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="trace")
    diffcmd.add_parser(p.add_subparsers())
    return p.parse_args(["diff", *map(str, argv)])


def _policy() -> Policy:
    return Policy().with_overrides(epsilon=TIE)


def test_corpus_figures_match_the_planted_flips(corpus):
    paths, swaps = corpus["paths"], corpus["swaps"]
    assert swaps, "the model has no step with a margin below TIE: pick another seed"
    r = diff(paths["ref"], [paths["same"], paths["tie"]], DiffOptions(policy=_policy()))
    same, tie = (corpus_stats(c.steps_table) for c in r.candidates)
    assert same.compared == N * STEPS and same.changes == 0 and same.kld.value == 0 and same.dp_rms.value == 0
    assert same.same_top1.value == 1 and same.same_top1.error == 0
    assert tie.compared == N * STEPS
    assert tie.changes == tie.near_ties == len(swaps) and tie.divergent == 0
    p = 1 - len(swaps) / (N * STEPS)
    assert tie.same_top1.value == pytest.approx(p)
    assert tie.same_top1.error == pytest.approx(math.sqrt(p * (1 - p) / (N * STEPS - 1)))
    assert tie.change_margin_max < TIE
    assert sum(b.steps for b in tie.buckets) == N * STEPS
    assert sum(b.changes for b in tie.buckets) == len(swaps)
    assert all(b.changes == 0 for b in tie.buckets if b.lo >= TIE)
    # KLD and Δp agree with the per-step columns they summarise
    kld = tie.kld
    col = tie_kld = r.candidates[1].steps_table["kld"].to_numpy()
    assert kld.n == col.size and kld.value == pytest.approx(tie_kld.mean())
    assert kld.error == pytest.approx(col.std(ddof=1) / math.sqrt(col.size))
    assert kld.max == pytest.approx(col.max()) and kld.p99 == pytest.approx(np.percentile(col, 99))
    assert kld.value > 0  # swapped logits move the distribution
    dp = r.candidates[1].steps_table["dp"].to_numpy()
    assert tie.dp_rms.value == pytest.approx(math.sqrt(np.mean(dp**2)))
    bound = next(b for b in MARGIN_BUCKETS if b > tie.change_margin_max)
    assert tie.headline().endswith(f"with reference margin < {bound:g}")
    js = tie.to_json()
    assert js["changes"] == len(swaps) and len(js["margin_buckets"]) == len(MARGIN_BUCKETS) - 1


def test_gate_passes_near_ties_and_breaks_on_divergent_steps(corpus):
    paths = corpus["paths"]
    r = diff(paths["ref"], [paths["tie"], paths["bug"]], DiffOptions(policy=_policy()))
    g = parse_gate(f"flips_only_near_ties,change_margin_max<{TIE},same_top1>=0.5,kld_mean<=1e9")
    res = g.check(r)
    tie_checks = [c for c in res.checks if c.candidate == str(paths["tie"])]
    bug_checks = {str(c.term): c for c in res.checks if c.candidate == str(paths["bug"])}
    assert all(c.ok for c in tie_checks), [str(c) for c in tie_checks]
    assert not bug_checks["flips_only_near_ties"].ok and "divergent" in bug_checks["flips_only_near_ties"].detail
    assert not res.passed and {c.candidate for c in res.broken} == {str(paths["bug"])}
    # identical as a fraction and as a count
    r = diff(paths["ref"], [paths["bug"]])
    identical = r.candidates[0].sequences["identical"]
    assert identical == N - N // 4
    frac = identical / N
    assert parse_gate(f"identical>={frac - 0.01:.3f}").check(r).checks[0].ok
    assert not parse_gate(f"identical>={frac + 0.01:.3f}").check(r).checks[0].ok
    assert parse_gate(f"identical>={identical}").check(r).checks[0].ok
    assert not parse_gate(f"identical>={identical + 1}").check(r).checks[0].ok
    assert parse_gate(f"identical>={100 * frac - 1:.1f}%").check(r).checks[0].ok


def test_gate_syntax_errors_say_what_to_write(tmp_path):
    for bad, says in (("kld_mean<=", "FIGURE OP NUMBER"), ("klm_mean<=1", "unknown gate figure"),
                      ("kld_mean", "compare it with a limit"), ("kld_mean<=5%", "not a rate"), ("", "empty")):
        with pytest.raises(PolicyError, match=says):
            parse_gate(bad)
    f = tmp_path / "gate.toml"
    f.write_text('[gate]\nidentical = ">= 89%"\nkld_mean = "<= 0.0014"\nflips_only_near_ties = true\n')
    assert str(load_gate(str(f))) == "identical>=89%,kld_mean<=0.0014,flips_only_near_ties"
    f.write_text('[gate]\nkld_mean = 0.0014\n')
    with pytest.raises(PolicyError, match='write kld_mean = "<= NUMBER"'):
        load_gate(str(f))
    f.write_text('[decisions]\nepsilon = 0.5\n')
    with pytest.raises(PolicyError, match="no \\[gate\\] section"):
        load_gate(str(f))


def test_cli_gate_exit_codes_and_report(corpus, capsys, tmp_path):
    paths = corpus["paths"]
    gate = "flips_only_near_ties,kld_mean<=1e9"
    out = diffcmd.run(_args(paths["ref"], paths["tie"], "--epsilon", TIE, "--gate", gate))
    shown = capsys.readouterr()
    assert out.mismatch is False and cli.exit_code(out) == 0  # flips, but the budgets hold
    assert "gate: all 2 budgets held" in shown.out and "BROKEN" not in shown.out
    out = diffcmd.run(_args(paths["ref"], paths["tie"], "--epsilon", TIE, "--gate", gate, "--fail-on", "flip"))
    capsys.readouterr()
    assert cli.exit_code(out) == 1  # an explicit --fail-on still applies
    pol = tmp_path / "ci.toml"
    pol.write_text(f"[decisions]\nepsilon = {TIE}\n\n[gate]\nflips_only_near_ties = true\n")
    out = diffcmd.run(_args(paths["ref"], paths["bug"], "--policy", pol, "--json", tmp_path / "r.json"))
    shown = capsys.readouterr()
    assert cli.exit_code(out) == 1 and out.gate is not None and not out.gate.passed
    assert "BROKEN" in shown.out and "flips_only_near_ties" in shown.out
    assert "gate FAILED: 1 of 1 budget broken (flips_only_near_ties: " in shown.err
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["gate"]["passed"] is False and doc["gate"]["checks"][0]["term"] == "flips_only_near_ties"


def test_piped_report_is_full_width_plain_text(corpus, capsys, monkeypatch):
    paths = corpus["paths"]
    monkeypatch.setenv("COLUMNS", "60")
    diffcmd.run(_args(paths["ref"], paths["same"], paths["bug"], "--epsilon", TIE))
    text = capsys.readouterr().out
    assert "…" not in text and "\x1b[" not in text and "━" not in text
    assert str(paths["ref"]) in text and str(paths["bug"]) in text
    assert max(len(line) for line in text.splitlines()) > 60
    for needle in ("Corpus figures", "Same top-1: ", "KLD (top-k): mean ", "Δp RMS: ", "Token changes by reference "
                   "margin", "samples id/eq/drift/flip/div/miss", f"{N - N // 4} / {N}"):
        assert needle in text, needle
    # every row of a table has its columns at the header's offsets (aligned, not wrapped)
    lines = text.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.lstrip().startswith("candidate ") and "verdict" in ln)
    assert set(lines[head + 1].strip()) == {"-"}
    assert lines[head + 2].lstrip().startswith(str(paths["same"]))


def test_markdown_report_has_github_tables(corpus, capsys):
    paths = corpus["paths"]
    diffcmd.run(_args(paths["ref"], paths["bug"], "--format", "markdown"))
    md = capsys.readouterr().out
    assert md.startswith("### steptrace diff\n```text\nVerdict: ")
    assert "**Summary**\n\n| candidate " in md and "\n|---" in md and "**Corpus figures (" in md
    assert md.count("```") % 2 == 0 and "…" not in md
    r = diff(paths["ref"], [paths["bug"]])
    assert format_report(r, "text") != format_report(r, "markdown")


def test_progress_off_a_terminal_prints_plain_lines():
    buf = io.StringIO()
    con = Console(file=buf, force_terminal=False)
    with progress_bar(con, enabled=True, every=0.0) as cb:
        assert cb is not None
        for i in range(4):
            cb("tensor values", i, 3)
        cb("tensor values", 3, 3)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "diff: tensor values 0 / 3 (0 %)" and lines[-1] == "diff: tensor values 3 / 3 (100 %)"
    assert lines.count("diff: tensor values 3 / 3 (100 %)") == 1
    buf = io.StringIO()
    with progress_bar(Console(file=buf, force_terminal=False), enabled=True, every=3600.0) as cb:
        for i in range(1000):
            cb("tensor values", i, 1000)
        cb("tensor values", 1000, 1000)
    assert buf.getvalue().splitlines() == ["diff: tensor values 0 / 1,000 (0 %)", "diff: tensor values 1,000 / 1,000 (100 %)"]


def test_progress_flag_with_stderr_redirected(corpus, trace_cli):
    paths = corpus["paths"]
    res = trace_cli("diff", str(paths["ref"]), str(paths["same"]), "--progress")
    assert res.returncode == 0, res.stderr
    assert "diff: candidates 1 / 1 (100 %)" in res.stderr.splitlines()
    assert "IDENTICAL" in res.stdout and "…" not in res.stdout


def test_disjoint_sample_ids_are_a_usage_error(tmp_path, capsys):
    m = StepLM(seed=1)
    a, b = tmp_path / "a.trace", tmp_path / "b.trace"
    for path, names in ((a, ["u1", "u2"]), (b, ["utt-0001", "utt-0002"])):
        with writer(path) as w:
            for i, s in enumerate(names):
                decode_torch(m, w, s, i, 3, stop_at_eos=False)
    with pytest.raises(IncompatibleTracesError, match="0 samples in common: the reference .* has 'u1', 'u2', "):
        diff(a, [b])
    assert cli.main(["diff", str(a), str(b)]) == 2
    err = capsys.readouterr().err
    assert "0 samples in common" in err and "Traceback" not in err
