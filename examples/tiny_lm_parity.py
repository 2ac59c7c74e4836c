"""The demo's tiny transformer LM three ways: KV cache vs full recompute, torch vs ONNX Runtime,
fp32 vs int8 — each run recorded with steptrace and each pair diffed.

Runs (greedy, one sample per prompt, one step per generated character; the committed weights in
``assets/tiny_lm``, rebuilt in torch by ``examples/tiny_lm/model.load_from_onnx``):

- ``torch_kv``: torch with the KV cache (prefill the prompt, then one id per call), recorded by
  :class:`recorders.torch.TorchRecorder` (decisions and the ``logits:token`` vector);
- ``torch_full``: torch recomputing the whole sequence every step (same recorder);
- ``ort_fp32``: ``step.onnx`` (KV cache) in ONNX Runtime, recorded by
  :class:`recorders.onnxruntime.OrtRecorder` (one step per ``run()``, the ``logits`` output
  decided at the last position, plus the ``present_*`` caches' statistics);
- ``ort_int8``: the same graph quantized with ``quantize_dynamic`` (int8 weights, dynamic uint8
  activations; :func:`recorders.onnxruntime.quantize_dynamic_copy`), recorded the same way.

Pairs diffed with :func:`steptrace.differ.diff` and the default tolerance policy: ``kv-vs-full``
(torch_kv vs torch_full), ``torch-vs-ort`` (torch_kv vs ort_fp32), ``fp32-vs-int8`` (ort_fp32 vs
ort_int8). With ``--teacher-forcing`` every candidate is fed the reference's tokens
(``reference=``), so a pair stays aligned past its first flip and every step counts.

    python examples/tiny_lm_parity.py --out /tmp/steptrace-lm [--steps 40] [--teacher-forcing] [--atol 1e-4]
    trace view /tmp/steptrace-lm/ort_fp32.trace /tmp/steptrace-lm/ort_int8.trace

Measured (default 5 demo prompts, 40 steps; torch 2.13 CPU, onnxruntime 1.31.1, x86-64): KV vs
full and torch vs ORT choose the same token at all 200 steps with logits within 9.1e-6, which
the built-in fp32-grid tolerance calls *drift* and ``--atol 1e-4`` *equivalent*; fp32 vs int8 is
a *flip*: 3 near-tie flips, 0 divergent steps, first at "Return a list of" step 1 (fp32 's' by
0.011 vs int8 'a' by 0.056: both gaps within the 8-bit grid's ε 0.0625), and 2 of 5 prompts keep
identical text; teacher-forced, all 200 steps are compared and the 4 that flip are near ties
(each explained by the grid or by the pair's own noise, p90 0.28; docs/differ.md §4).

Prints one verdict line per pair. Exit status 0 when KV vs full and torch vs ORT choose the same
token at every step (int8 is expected to flip; see assets/tiny_lm/README.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steptrace.differ import DiffOptions, Policy, diff
from examples.parity import tolerance
from examples.tiny_lm import ortlm
from examples.tiny_lm.decode_torch import greedy
from examples.tiny_lm.model import load_from_onnx
from steptrace.recorders.onnxruntime import OrtRecorder, quantize_dynamic_copy
from steptrace.recorders.torch import TorchRecorder

ASSETS = ortlm.ASSETS
#: Runs in recording order.
RUNS = ("torch_kv", "torch_full", "ort_fp32", "ort_int8")
#: Pairs in the order they are diffed: (label, reference run, candidate run).
PAIRS = (("kv-vs-full", "torch_kv", "torch_full"), ("torch-vs-ort", "torch_kv", "ort_fp32"),
         ("fp32-vs-int8", "ort_fp32", "ort_int8"))
#: Reference of each candidate run (teacher forcing feeds its tokens).
REFERENCE = {"torch_full": "torch_kv", "ort_fp32": "torch_kv", "ort_int8": "ort_fp32"}


def _options(run: str, traces: dict[str, Path], teacher_forcing: bool) -> dict:
    vocab = ortlm.load_vocab()
    opts = {"vocab": vocab["tokens"], "watched": {"eos": vocab["eos_id"]},
            "metadata": {"model": "tiny_lm", "tags": {"tiny_lm.run": run}}}
    if teacher_forcing and run in REFERENCE:
        opts["reference"] = str(traces[REFERENCE[run]])
    return opts


def record_torch(trace: Path, prompts: list[str], steps: int, *, use_cache: bool, **options) -> None:
    """Greedy-decode every prompt in torch (KV cache or full recompute) under a TorchRecorder."""
    model = load_from_onnx(ASSETS / "full.onnx")
    with TorchRecorder(trace, model, modules={"logits:token": "full"}, **options) as rec:
        for prompt in prompts:
            def on_step(step: int, logits: torch.Tensor, _chosen: int, prompt: str = prompt) -> int:
                with rec.step(sample=prompt, index=step):
                    return rec.decide(logits)

            greedy(model, ortlm.prompt_ids(prompt), steps, use_cache=use_cache, on_step=on_step)


def record_ort(trace: Path, step_graph: Path, prompts: list[str], steps: int, **options) -> None:
    """Greedy-decode every prompt with the KV-cache graph in ONNX Runtime under an OrtRecorder."""
    session = ortlm.session(step_graph)
    policy = {"logits:token": "full", "present_*": "stats"}
    with OrtRecorder(trace, session, model=step_graph, logits="logits", tensors=policy, **options) as rec:
        lm = ortlm.OrtLM(full=ASSETS / "full.onnx", step=rec)
        for prompt in prompts:
            rec.set_sample(prompt)
            lm.greedy(ortlm.prompt_ids(prompt), steps, use_cache=True, on_step=lambda _s, _l, _c: rec.token)


def run(out: Path, prompts: list[str], steps: int, *, teacher_forcing: bool = False,
        policy: Policy | None = None) -> dict[str, object]:
    """Record the four runs into ``out`` and diff the three pairs.

    Args:
        out: an empty (or new) folder for ``<run>.trace`` and the int8 graph.
        prompts: the prompts (one sample each).
        steps: characters to generate at most per prompt (decoding also stops at EOS).
        teacher_forcing: feed each candidate its reference's tokens.
        policy: the diff's tolerance policy (default: the built-in one).

    Returns:
        ``{pair label: differ.DiffReport}``.

    Raises:
        FileExistsError: a trace already exists in ``out``.
    """
    for prompt in prompts:  # a prompt outside the vocabulary or the context fails before anything is written
        if len(ortlm.prompt_ids(prompt)) + steps > ortlm.load_vocab()["config"]["context"]:
            raise ValueError(f"prompt {prompt!r} plus {steps} steps exceeds the model's context")
    out.mkdir(parents=True, exist_ok=True)
    traces = {r: out / f"{r}.trace" for r in RUNS}
    for t in traces.values():
        if t.exists():
            raise FileExistsError(f"{t} exists; pick an empty --out folder")
    torch.set_num_threads(1)
    record_torch(traces["torch_kv"], prompts, steps, use_cache=True, **_options("torch_kv", traces, False))
    record_torch(traces["torch_full"], prompts, steps, use_cache=False,
                 **_options("torch_full", traces, teacher_forcing))
    record_ort(traces["ort_fp32"], ASSETS / "step.onnx", prompts, steps,
               **_options("ort_fp32", traces, teacher_forcing))
    int8 = quantize_dynamic_copy(ASSETS / "step.onnx", out / "step.int8.onnx")
    record_ort(traces["ort_int8"], int8, prompts, steps, **_options("ort_int8", traces, teacher_forcing))
    options = DiffOptions(policy=policy or Policy())
    return {label: diff(str(traces[a]), [str(traces[b])], options) for label, a, b in PAIRS}


def verdict_line(label: str, report) -> str:
    """One line: the pair, its verdict, identical sequences, flips and the first divergence."""
    pair = report.candidates[0]
    d = pair.decisions
    noise = d.get("logit_noise", {}).get("max")
    return (f"{label}: {pair.verdict}; identical sequences {pair.sequences.get('identical', 0)}/"
            f"{pair.samples.get('total', 0)}, steps {d.get('compared', 0)} compared, {d.get('flips', 0)} flip(s), "
            f"{d.get('divergent', 0)} divergent, max |logit change| {noise:.3g}; first divergence: "
            f"{pair.first_divergence or 'none'}")


def main(argv: list[str] | None = None) -> int:
    """Command line; returns 0 when KV vs full and torch vs ORT never choose different tokens."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="empty folder for the traces")
    ap.add_argument("--steps", type=int, default=40, help="characters generated per prompt at most (default 40)")
    ap.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                    help="a prompt (repeatable); default: the demo's prompts")
    ap.add_argument("--teacher-forcing", action="store_true", help="feed each candidate its reference's tokens")
    ap.add_argument("--atol", type=float, default=None, help="absolute tolerance for tensors and logits")
    ap.add_argument("--rtol", type=float, default=None, help="relative tolerance for tensors and logits")
    args = ap.parse_args(argv)
    prompts = args.prompts or list(ortlm.DEMO_PROMPTS)
    if args.steps < 1:
        ap.error("--steps must be at least 1")
    try:
        reports = run(args.out, prompts, args.steps, teacher_forcing=args.teacher_forcing,
                      policy=tolerance(args.atol, args.rtol))
    except (FileExistsError, ValueError) as exc:  # an existing trace, a prompt too long or outside the vocabulary
        print(f"tiny_lm_parity: {exc}", file=sys.stderr)
        return 2
    for label, report in reports.items():
        print(verdict_line(label, report))
    print(f"traces in {args.out}; explore with: trace view {args.out / 'ort_fp32.trace'} {args.out / 'ort_int8.trace'}")
    bad = [label for label in ("kv-vs-full", "torch-vs-ort")
           if reports[label].candidates[0].verdict in ("flip", "divergent", "missing")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
