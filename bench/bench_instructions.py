#!/usr/bin/env python3
"""Instructions, not seconds: `trace record` of the script workload counted by callgrind.

    python bench/bench_instructions.py [--steps 100 300] [--compare PATH] [--modules]
    python bench/bench_instructions.py --workload kv [--steps 40 120] [--compare PATH]

On a shared VM the wall time of a decode step moves by more than the few per cent the recorder's
targets are about (``bench_record.py --workload script`` and ``--workload kv``); the number of
instructions a process executes does not. This bench runs ``bench_record.py``'s script workload
(a 12-block MLP, one-token steps) under ``valgrind --tool=callgrind --separate-threads=yes``,
plain and under ``trace record --logits head`` (``--modules``: also ``--modules '*'``), each at
two step counts, and prints per configuration

    per step    the main thread's instructions per step (the difference of the two runs over
                the difference of their steps), and the recorder's over plain;
    fixed       the whole process's instructions not proportional to steps (imports, the
                trace's open and close), over plain's;
    at N        the whole process's instructions at ``--at`` steps (1,500: the wall-time
                bench's), recorded over plain: the ratio the wall-time target reads on, with
                the writer's threads counted as if they ran on the model's core.

Caveats: valgrind runs the process ~50x slower and one thread at a time. The writer's
time-based batching (rows handed over every ``flush_ms / 2``) therefore fires ~50x more often
per step than in a real run, so the other threads' counts overstate their work; the main
thread's count is the model's thread's own. A writer process (``--modules '*'`` takes one) is
not traced: its work is not counted. GIL waits, cache misses and a second core are not
instructions: this counts work, and the wall-time benches stay the targets. ``--compare PATH``
adds the configurations of another steptrace checkout (``PATH/steptrace``, on ``PYTHONPATH``).

``--workload kv`` counts ``bench_record.py``'s KV-cache workload instead (its ``decode()``, in
process: the transformer LM, one token per step, 45 modules) under each of ``bench_record.py``'s
recorder configurations (``none``, ``floor``, ``decisions``, ``stats``, ``decisions/p``,
``stats/p``; ``--configs`` picks), and prints the model thread's instructions per step, over
``none``'s, and ``stats`` less the copy-only ``floor`` in points of ``none``: the figures the KV
targets (decisions <= 3 %, stats <= the floor + 15 points) read on, without the VM's noise. A
writer process runs outside valgrind, at full speed: its work is not counted, as it does not run
on the model's thread. A writer thread runs inside it, ~50x slower than the model's thread as
above, so its wake-ups (and the GIL hand-offs the model's thread makes for them) come ~50x more
often per step: the thread configurations' counts are upper bounds (a loop of decisions alone
counts ~100 K instructions per step, the KV ``decisions`` ~190 K).

Needs valgrind (Debian: ``apt-get install valgrind``); each run takes about a minute.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_record import SCRIPT  # the same script as the wall-time bench

CLI = "import sys; from steptrace.tui.cli import main; sys.exit(main(sys.argv[1:]))"
KV_CONFIGS = ("none", "floor", "decisions", "stats", "decisions/p", "stats/p")
# one KV decode of bench_record.py in this process: argv = bench dir, config, steps, context, out dir
KV_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import torch
from bench_record import TransformerLM, decode
torch.set_num_threads(1)
config, steps, context, out = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
model = TransformerLM(seed=0, d=256, layers=4, heads=4, vocab=4096, context=context).eval()
prompt = [int(i) for i in torch.randint(0, 4096, (32,), generator=torch.Generator().manual_seed(0))]
decode(model, prompt, 8, "kv", config, out)  # warm, as bench_record.py does
decode(model, prompt, steps, "kv", config, out)
"""


def counts(cmd: list[str], env: dict[str, str], work: Path, tag: str) -> tuple[int, int]:
    """Run ``cmd`` under callgrind; return (main thread's instructions, all threads')."""
    out = work / f"cg.{tag}"
    res = subprocess.run(["valgrind", "--tool=callgrind", "--separate-threads=yes", f"--callgrind-out-file={out}",
                          *cmd], env=env, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{tag}: exit {res.returncode}\n{res.stderr[-2000:]}")
    threads = {}
    for f in work.glob(f"cg.{tag}-*"):
        m = re.search(r"^(?:summary|totals): (\d+)", f.read_text(errors="replace"), re.MULTILINE)
        if m:
            threads[int(f.name.rsplit("-", 1)[1])] = int(m.group(1))
    if not threads:
        raise SystemExit(f"{tag}: callgrind wrote no counts in {work}")
    return threads[min(threads)], sum(threads.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=("script", "kv"), default="script")
    ap.add_argument("--steps", type=int, nargs=2, default=None, metavar=("A", "B"),
                    help="the two step counts (default 100 300; kv: 40 120)")
    ap.add_argument("--configs", nargs="+", choices=KV_CONFIGS, default=list(KV_CONFIGS),
                    help="kv: the recorder configurations to count")
    ap.add_argument("--at", type=int, default=1500, help="steps of the whole-process ratio")
    ap.add_argument("--compare", metavar="PATH", help="a folder holding another steptrace checkout as steptrace/")
    ap.add_argument("--modules", action="store_true", help="also --modules '*' (stats, the default writer)")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("bench_instructions.py needs valgrind on PATH (Debian: apt-get install valgrind)")
    a, b = args.steps or ((40, 120) if args.workload == "kv" else (100, 300))
    if not 0 < a < b:
        raise SystemExit("--steps A B needs 0 < A < B")
    # torch's modules have their bytecode cached (pip compiles it at install); give steptrace's the
    # same (as bench_record.py does), or under PYTHONDONTWRITEBYTECODE every run compiles it
    for root in [Path(__file__).resolve().parent.parent, *([Path(args.compare) / "steptrace"] if args.compare else [])]:
        subprocess.run([sys.executable, "-m", "compileall", "-q", "-x", r"/(tests|bench|examples)/", str(root)],
                       check=False, capture_output=True)
    work = Path(tempfile.mkdtemp(prefix="steptrace-instr-"))
    if args.workload == "kv":
        kv(args, a, b, work)
        shutil.rmtree(work, ignore_errors=True)
        return
    script = work / "mlp_decode.py"
    script.write_text(SCRIPT)
    python = os.path.realpath(sys.executable)  # not a shim script: valgrind follows no exec
    env = dict(os.environ)
    configs: dict[str, tuple[list[str], dict[str, str]]] = {"plain": ([], env)}
    sides = [("", env)]
    if args.compare:
        sides.append(("compare ", {**env, "PYTHONPATH": os.pathsep.join([args.compare, env.get("PYTHONPATH", "")])}))
    for prefix, e in sides:
        configs[f"{prefix}--logits"] = (["--logits", "head"], e)
        if args.modules:
            configs[f"{prefix}--modules '*'"] = (["--modules", "*", "--logits", "head"], e)
    print(f"callgrind instructions of the script workload at {a} and {b} steps (python {sys.version.split()[0]}); "
          f"load {os.getloadavg()[0]:.2f} (counts do not depend on it)", flush=True)
    got: dict[str, dict[int, tuple[int, int]]] = {}
    for name, (opts, e) in configs.items():
        got[name] = {}
        for n in (a, b):
            trace = work / f"t{len(got)}-{n}.trace"
            cmd = [python, str(script), str(n)] if name == "plain" else [
                python, "-c", CLI, "record", "-o", str(trace), *opts, str(script), str(n)]
            got[name][n] = counts(cmd, e, work, f"{len(got)}-{n}")
            print(f"  {name:<22} {n:>5} steps: main thread {got[name][n][0] / 1e9:7.3f} G, all {got[name][n][1] / 1e9:7.3f} G",
                  flush=True)
    pa_main = (got["plain"][b][0] - got["plain"][a][0]) / (b - a)
    pa_all = (got["plain"][b][1] - got["plain"][a][1]) / (b - a)
    p_fixed = got["plain"][a][1] - a * pa_all
    print(f"\n{'config':<22} {'per step (main)':>16} {'ratio':>7} {'fixed (all)':>12} {'over plain':>11} "
          f"{'at ' + format(args.at, ','):>9} ratio")
    for name, c in got.items():
        per_main = (c[b][0] - c[a][0]) / (b - a)
        per_all = (c[b][1] - c[a][1]) / (b - a)
        fixed = c[a][1] - a * per_all
        whole = fixed + args.at * per_all
        plain_whole = p_fixed + args.at * pa_all
        print(f"{name:<22} {per_main / 1e3:13.1f} K {per_main / pa_main:7.3f} {fixed / 1e6:9.1f} M {(fixed - p_fixed) / 1e6:+9.1f} M "
              f"{whole / plain_whole:9.3f}")
    shutil.rmtree(work, ignore_errors=True)


def kv(args: argparse.Namespace, a: int, b: int, work: Path) -> None:
    """Count the KV workload's configurations: the model thread's instructions per step."""
    python = os.path.realpath(sys.executable)
    bench_dir = str(Path(__file__).resolve().parent)
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # the same dict and set orders in every run
    sides = [("", env)]
    if args.compare:
        sides.append(("compare ", {**env, "PYTHONPATH": os.pathsep.join([args.compare, env.get("PYTHONPATH", "")])}))
    configs = ["none", *(c for c in args.configs if c != "none")]
    print(f"callgrind instructions of bench_record.py's KV workload at {a} and {b} steps (python "
          f"{sys.version.split()[0]}); load {os.getloadavg()[0]:.2f} (counts do not depend on it)", flush=True)
    per: dict[str, float] = {}
    for prefix, env in sides:
        for config in configs:
            if prefix and config in ("none", "floor"):
                continue  # neither records: the same in both checkouts
            name = f"{prefix}{config}"
            got = []
            for n in (a, b):
                tag = f"kv{len(per)}-{n}"
                out = work / tag
                out.mkdir()
                cmd = [python, "-c", KV_CHILD, bench_dir, config, str(n), str(32 + b + 9), str(out)]
                got.append(counts(cmd, env, work, tag)[0])
                print(f"  {name:<22} {n:>5} steps: main thread {got[-1] / 1e9:7.3f} G", flush=True)
            per[name] = (got[1] - got[0]) / (b - a)
    print(f"\n{'config':<22} {'per step (main)':>16} {'over none':>10}  target")
    for name, v in per.items():
        base = per["none"]
        over = v / base - 1
        config = name.removeprefix("compare ")
        note = ""
        if config.startswith("decisions"):
            note = f"<= 3 %: {'PASS' if over <= 0.03 else 'MISS'}"
        elif config.startswith("stats") and "floor" in per:
            floor = per["floor"] / base - 1
            points = (over - floor) * 100
            note = f"floor {floor:.1%} + {points:.1f} points (<= 15: {'PASS' if points <= 15 else 'MISS'})"
        print(f"{name:<22} {v / 1e3:13.1f} K {over:+10.1%}  {note}")


if __name__ == "__main__":
    main()
