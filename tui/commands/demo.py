"""``trace demo``: record the packaged tiny LM greedily in fp32 and int8, diff the two runs.

The demo needs the core install plus ``steptrace[onnx]`` (onnxruntime, onnx): no torch, no
network. It quantizes the committed KV-cache graph (``assets/tiny_lm/step.onnx``) with
``quantize_dynamic``, exposes a few intermediates of each layer in both graphs, decodes the demo
prompts twice through :class:`recorders.onnxruntime.OrtRecorder` (one sample per prompt), runs
the differ with fp32 as the reference and prints its report. ``tui/cli.py`` registers the command
with :func:`add_parser`; onnxruntime is imported (through ``steptrace.recorders.onnxruntime``, the only
module that imports it) only when the demo runs.

    trace demo [--out DIR] [--steps N] [--prompt TEXT ...]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from steptrace.assets import TINY_LM
from steptrace.differ import DiffOptions, DiffReport, diff
from steptrace.tracefmt.errors import TraceUsageError
from steptrace.tui.render.console import stderr_console

#: Prompts the demo decodes, each after the BOS (newline) id; the same as
#: ``examples/tiny_lm/ortlm.py`` and the assets' README (see there what each one shows).
DEMO_PROMPTS: tuple[str, ...] = ("Return the", "The file", "Note that", "Close the file", "Return a list of")
#: Steps decoded per prompt by default.
DEMO_MAX_NEW = 100
#: Where the demo writes when ``--out`` is not given (relative to the working directory).
DEFAULT_OUT = "steptrace-demo"
#: The file that marks a folder as the demo's own (so a rerun may replace what it wrote).
MARKER = "steptrace-demo.json"
#: Every name the demo writes in its folder.
OWNED = (MARKER, "fp32.trace", "int8.trace", "step.int8.onnx", "step.fp32.exposed.onnx", "step.int8.exposed.onnx",
         "report.json")

_POLICY = {"past_*": "none", "present_*": "none", "logits:*": "none", "*": "stats"}

HELP = "record a tiny LM in fp32 and int8 (ONNX Runtime) and diff the runs: a guided first run"
DESCRIPTION = """\
Decode the packaged tiny character-level language model greedily with its KV cache, once in
fp32 and once as an int8 quantize_dynamic copy, recording both runs (one sample per prompt,
decisions from the logits, statistics of each layer's attention and MLP outputs) into
DIR/fp32.trace and DIR/int8.trace; then diff them (fp32 is the reference) and print the report
and the commands to explore it.

Needs onnxruntime and onnx (pip install 'steptrace[onnx]'); no torch, no network. The exit
status is 0 even though the runs diverge: finding that divergence is what the demo shows
(`trace diff` on the same traces exits 1).
"""
EPILOG = f"""\
examples:
  trace demo
  trace demo --out /tmp/demo --steps 40
  trace demo --prompt 'Open the file' --prompt 'Return True if'
DIR (default ./{DEFAULT_OUT}) must be empty, missing, or a previous demo's folder (it is then replaced).
"""


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo`` on ``subparsers``; returns the new parser (its ``func`` is :func:`run`)."""
    p = subparsers.add_parser("demo", help=HELP, description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", metavar="DIR", default=DEFAULT_OUT, help=f"folder to write into (default ./{DEFAULT_OUT})")
    p.add_argument("--steps", metavar="N", type=int, default=DEMO_MAX_NEW,
                   help=f"steps decoded per prompt at most (default {DEMO_MAX_NEW}; decoding also stops at a newline)")
    p.add_argument("--prompt", metavar="TEXT", action="append",
                   help="a prompt to decode instead of the built-in ones (repeatable; printable ASCII)")
    p.set_defaults(func=run)
    return p


@dataclass
class DemoOutcome:
    """What ``trace demo`` did. ``mismatch`` is always False: the demo exits 0 on a divergence.

    Attributes:
        report: the differ's report (fp32 reference, int8 candidate).
        fp32: the reference trace.
        int8: the candidate trace.
        texts: prompt -> (fp32 continuation, int8 continuation).
    """

    report: DiffReport
    fp32: Path
    int8: Path
    texts: dict[str, tuple[str, str]] = field(default_factory=dict)
    mismatch: bool = False


def assets_dir() -> Path:
    """The packaged tiny LM's folder (``full.onnx``, ``step.onnx``, ``vocab.json``).

    Raises:
        TraceUsageError: the package was installed without its assets.
    """
    if not (TINY_LM / "step.onnx").is_file() or not (TINY_LM / "vocab.json").is_file():
        raise TraceUsageError(f"the demo model is missing from {TINY_LM} (step.onnx, vocab.json); reinstall steptrace")
    return TINY_LM


def _runtime() -> ModuleType:
    """Import ``steptrace.recorders.onnxruntime``, turning a missing runtime into an actionable error."""
    if importlib.util.find_spec("onnxruntime") is None:
        raise TraceUsageError("trace demo needs onnxruntime: pip install 'steptrace[onnx]'")
    try:
        from steptrace.recorders import onnxruntime as ortrec
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "onnx":
            raise TraceUsageError("the demo's int8 run needs the onnx package: pip install 'steptrace[onnx]'") from exc
        raise
    return ortrec


def _prepare_out(out: Path) -> None:
    """Create ``out``, or clear what a previous demo wrote there.

    Raises:
        TraceUsageError: ``out`` is a file, or a non-empty folder without the demo's marker.
    """
    if out.exists() and not out.is_dir():
        raise TraceUsageError(f"--out {out} is a file; give a folder (missing, empty, or a previous demo's)")
    if out.is_dir() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise TraceUsageError(f"{out} is not empty and is not a previous demo's folder (no {MARKER}); "
                                  "give another --out DIR, or empty this one")
        for name in OWNED:  # only what the demo wrote; anything else in the folder stays
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _prompt_ids(text: str, index: dict[str, int], eos_id: int) -> list[int]:
    missing = sorted({ch for ch in text if ch not in index})
    if not text or missing:
        why = "is empty" if not text else f"has characters {missing!r} outside the model's vocabulary"
        raise TraceUsageError(f"prompt {text!r} {why}; use printable ASCII")
    return [eos_id, *(index[ch] for ch in text)]


def _decode(ortrec: ModuleType, model: Path, trace: Path, prompts: dict[str, list[int]], steps: int,
            vocab: dict[str, Any], label: str, log: Any) -> dict[str, str]:
    """Greedy KV-cache decode of every prompt through one OrtRecorder; returns prompt -> text."""
    cfg = vocab["config"]
    kv = [f"{kind}_{i}" for i in range(cfg["n_layers"]) for kind in ("key", "value")]
    empty = np.zeros((1, cfg["n_heads"], 0, cfg["d_model"] // cfg["n_heads"]), np.float32)
    pieces, eos = vocab["tokens"], vocab["eos_id"]
    texts = {}
    with ortrec.OrtRecorder(trace, model, logits="logits", optimization="disable", tensors=_POLICY, vocab=pieces,
                            watched={"eos": eos}, mode="overwrite", tags={"steptrace.demo": label}) as rec:
        for prompt, ids in prompts.items():
            t0 = time.perf_counter()
            rec.set_sample(prompt)
            past = {f"past_{n}": empty for n in kv}
            feed, out = ids, []
            for _ in range(steps):  # the first call is the prefill (whole prompt, empty past)
                values = rec.run(["logits", *[f"present_{n}" for n in kv]],
                                 {"ids": np.asarray([feed], np.int64), **past})
                past = {f"past_{n}": v for n, v in zip(kv, values[1:])}
                token = int(rec.token)
                out.append(token)
                feed = [token]
                if token == eos:
                    break
            texts[prompt] = "".join(pieces[t] for t in out)
            log(f"  {label}  {prompt!r}: {len(out)} steps in {time.perf_counter() - t0:.2f} s  "
                f"→ {texts[prompt].rstrip(chr(10))[:60]!r}{' + EOS' if out[-1] == eos else ''}")
    return texts


def run(args: argparse.Namespace) -> DemoOutcome:
    """Run the demo: quantize, record fp32 and int8, diff, print the report and what to do next.

    Returns:
        A :class:`DemoOutcome` (``mismatch`` False: the demo exits 0 even when the runs diverge).

    Raises:
        TraceUsageError: onnxruntime or onnx missing, a bad ``--steps`` or ``--prompt``, or an
            ``--out`` folder that is not empty and not a previous demo's.
        TraceError: any failure recording or diffing the traces.
    """
    from rich.console import Console
    from steptrace.tui.render.diff import progress_bar, render

    err = stderr_console()
    def log(message: str) -> None:
        err.print(message, soft_wrap=True)

    assets = assets_dir()
    vocab = json.loads((assets / "vocab.json").read_text(encoding="utf-8"))
    index = {piece: i for i, piece in enumerate(vocab["tokens"])}
    prompts = {p: _prompt_ids(p, index, vocab["eos_id"]) for p in (args.prompt or DEMO_PROMPTS)}
    longest = max(len(ids) for ids in prompts.values())
    if args.steps < 1 or longest + args.steps > vocab["config"]["context"]:
        raise TraceUsageError(f"--steps must be 1 to {vocab['config']['context'] - longest} (the model's context is "
                              f"{vocab['config']['context']} characters, the longest prompt takes {longest})")
    ortrec = _runtime()
    out = Path(args.out)
    _prepare_out(out)
    (out / MARKER).write_text(json.dumps({"demo": "steptrace tiny LM, fp32 vs int8", "prompts": list(prompts),
                                          "steps": args.steps}, indent=2) + "\n", encoding="utf-8")
    t0 = time.perf_counter()
    log(f"[bold]steptrace demo[/]: tiny LM ({assets}), {len(prompts)} prompts × up to {args.steps} steps → {out}")
    int8_model = ortrec.quantize_dynamic_copy(assets / "step.onnx", out / "step.int8.onnx")
    log(f"  quantized step.onnx to int8 (quantize_dynamic) → {int8_model}")
    names = [f"/layers.{i}/{v}" for i in range(vocab["config"]["n_layers"])
             for v in ("attn/out/Add_output_0", "Add_output_0", "ff_out/Add_output_0", "Add_1_output_0")]
    names.append("/ln_f/LayerNormalization_output_0")
    fp32_model = ortrec.expose_intermediates(assets / "step.onnx", names, out / "step.fp32.exposed.onnx").path
    int8_exposed = ortrec.expose_intermediates(int8_model, names, out / "step.int8.exposed.onnx").path
    log(f"  exposed {len(names)} intermediates (attention and MLP outputs of each layer); sessions at ORT_DISABLE_ALL")
    runs = {}
    for label, model in (("fp32", fp32_model), ("int8", int8_exposed)):
        runs[label] = _decode(ortrec, Path(model), out / f"{label}.trace", prompts, args.steps, vocab, label, log)
    log(f"  recorded {out / 'fp32.trace'} and {out / 'int8.trace'} in {time.perf_counter() - t0:.1f} s; diffing")
    with progress_bar(err, enabled=err.is_terminal) as cb:
        report = diff(str(out / "fp32.trace"), [str(out / "int8.trace")], DiffOptions(jobs=1), progress=cb)
    console = Console()
    render(report, console, rows=len(prompts))
    fp32, int8 = out / "fp32.trace", out / "int8.trace"
    console.print()
    console.print("[bold]Next[/] (the demo exits 0 although the runs diverge; `trace diff` exits 1 on them):",
                  soft_wrap=True)
    console.print(f"  trace view {fp32} {int8}", soft_wrap=True, highlight=False)
    console.print(f"  trace diff {fp32} {int8} --json {out / 'report.json'}", soft_wrap=True, highlight=False)
    return DemoOutcome(report, fp32, int8, {p: (runs["fp32"][p], runs["int8"][p]) for p in prompts})
