"""Benchmark of ``trace triage``'s search: re-runs and wall time of the bisection over execution
order against a linear scan, on chains of 8, 32 and 128 modules.

Each chain is a decode loop over residual blocks (``x + tanh(x W + b)``, one module each, so n
modules are n searched tensors) with a harmless drift in block 0 and a real bug in the block at
60 % of the chain from step 3 on. The reference is recorded once with values; then
:func:`recorders.triage.triage` runs twice on the same candidate, in the same process:
``search="bisect"`` (the default) and ``search="linear"`` (prefix trials 0, 1, 2, ... until one
restores the decision: the same predicate, tried in order). Both find the same root cause (the
benchmark checks it). Re-runs count every re-run (the two plain ones, the search, the single and
local trials); wall time is the whole ``triage()`` call. The machine is shared: the load average
is printed before and after.

    python bench/bench_triage.py [--chains 8,32,128] [--steps 6] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from steptrace.recorders.torch import TorchRecorder  # noqa: E402
from steptrace.recorders.triage import triage  # noqa: E402
from steptrace.recorders.triagerun import TorchRun  # noqa: E402

D, VOCAB, PROMPT = 16, 32, [1, 2, 3]


class Block(nn.Module):
    """One residual block, a single module (no sub-modules): one searched tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(D, D) / D**0.5)
        self.bias = nn.Parameter(torch.zeros(D))
        self.scale = 1.0
        self.bug: torch.Tensor | None = None
        self.bug_from = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x + torch.tanh((x @ self.weight + self.bias) * self.scale)
        if self.bug is not None and x.shape[1] >= self.bug_from:
            y = y.clone()
            y[:, -1] = y[:, -1] + self.bug
        return y


class Chain(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        for layer in self.layers:
            x = layer(x) / 1.05
        return self.head(x)


def decode(model: Chain, steps: int):
    def run(rec: TorchRecorder) -> None:
        tokens = list(PROMPT)
        with torch.no_grad():
            for _ in range(steps):
                with rec.step():
                    tokens.append(rec.decide(model(torch.tensor([tokens]))[0, -1]))
    return run


def one_chain(n: int, steps: int, work: Path) -> dict:
    ref = Chain(n).eval()
    with TorchRecorder(work / f"ref{n}.trace", ref, modules={"layers.*": "full"}) as rec:
        decode(ref, steps)(rec)
    cand = Chain(n).eval()
    bug = int(0.6 * n)
    cand.layers[0].scale = 1.0 + 1e-3
    cand.layers[bug].bug = 40.0 * cand.head.weight[-1].detach() / cand.head.weight[-1].detach().norm()
    cand.layers[bug].bug_from = len(PROMPT) + 3
    out = {"modules": n, "bug": f"layers.{bug}"}
    for search in ("bisect", "linear"):
        t0 = time.perf_counter()
        rep = triage(work / f"ref{n}.trace", TorchRun(cand, decode(cand, steps), modules=["layers.*"]),
                     search=search, budget=4 * n)
        secs = time.perf_counter() - t0
        found = rep.root_cause.name if rep.root_cause else None
        if found != out["bug"]:
            raise SystemExit(f"{search} on {n} modules found {found}, not {out['bug']}: {rep.sentence()}")
        out[search] = {"reruns": rep.reruns, "search_reruns": sum(t.purpose in ("bisect", "scan") for t in rep.trials),
                       "seconds": secs}
    out["ratio_reruns"] = out["bisect"]["reruns"] / out["linear"]["reruns"]
    out["ratio_seconds"] = out["bisect"]["seconds"] / out["linear"]["seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chains", default="8,32,128", help="chain lengths (comma-separated)")
    ap.add_argument("--steps", type=int, default=6, help="decode steps per run (the bug fires from step 3)")
    ap.add_argument("--json", help="write the figures as JSON")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load0 = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-triage-") as d:
        for n in (int(x) for x in args.chains.split(",")):
            rows.append(one_chain(n, args.steps, Path(d)))
            r = rows[-1]
            print(f"{n:4d} modules ({r['bug']}): bisect {r['bisect']['reruns']:3d} re-runs "
                  f"({r['bisect']['search_reruns']} searching) {r['bisect']['seconds']:6.2f} s | linear "
                  f"{r['linear']['reruns']:3d} re-runs ({r['linear']['search_reruns']} searching) "
                  f"{r['linear']['seconds']:6.2f} s | ratio re-runs {r['ratio_reruns']:.2f}, "
                  f"time {r['ratio_seconds']:.2f}", flush=True)
    load1 = os.getloadavg()
    print(f"load average before {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f}, after {load1[0]:.2f} {load1[1]:.2f} "
          f"{load1[2]:.2f} ({os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps({"chains": rows, "load_before": load0, "load_after": load1}, indent=2))


if __name__ == "__main__":
    main()
