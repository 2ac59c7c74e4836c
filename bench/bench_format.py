#!/usr/bin/env python3
"""Benchmark of the steptrace trace format v1 against baselines measured in the same run.

Run from the repository root with the package installed (no network needed)::

    python bench/bench_format.py                      # full run (10-15 min on 2 shared cores)
    python bench/bench_format.py --quick              # smoke run, 10-20x smaller, < 1 min
    python bench/bench_format.py --json bench/out/bench_format.json --big-gb 2.0 --out DIR --keep

It prints ONE table and, with ``--json FILE``, writes the same figures as JSON. It asserts
nothing about time: it is a measurement, not a test. Every time is the best of N wall-clock runs
(``time.perf_counter``, N = ``--repeats``, at least 3); "spread" is median/best - 1 over those
runs, a measure of how noisy the machine was. Where a target compares a figure with a baseline,
their runs alternate (A B A B ...), so that both see the same load on a shared machine.
MB = 10^6 bytes; MB/s counts *raw tensor bytes* (numel x itemsize), whatever the bytes on disk.
A ratio is value / baseline, both measured in this run on the same bytes. PASS/MISS is printed
only where the format has a target.

Corpora (built once, before anything is timed)
    act-fp32   real activations: a 4-layer pre-LN transformer encoder (d_model 384, 6 heads,
               seq 128, batch 4; random init) runs real forward passes on random tokens; forward
               hooks copy every leaf module's and every block's output to numpy float32; one
               forward = one step (~58 MB, 38 tensors per step, 5 steps: ~290 MB).
    rand-fp32, rand-fp16
               standard-normal arrays of 3 MB each, the same total bytes as act-fp32.

Figures per corpus (section "tensors")
    memcpy                 np.copyto into a preallocated, reused buffer (fresh memory is slow to
                           touch the first time, so the buffer is touched before timing).
    zstd-1 compress / decompress
                           python-zstandard, level 1, one frame per tensor, one thread: the
                           floor of what a zstd-encoded payload costs.
    SHA-256                hashlib over each tensor: the digest every record carries.
    trace write, values    TraceWriter(...) -> add_tensor(values=True) for every tensor ->
                           close(), default encoding (zstd level 1), compaction included.
                           TARGET: >= 0.70 x zstd-1 compress throughput.
    trace size, values     bytes of the trace directory. TARGET: <= np.savez_compressed size.
    trace read, values     new TraceReader, then TraceReader.tensor() for every tensor (digest
                           verified, the default), against zstd-1 decompress.
    trace write/size, stats only
                           the same with values=False (statistics + digest only).
    np.savez, np.savez_compressed
                           write, read every array, file size.
    Polygraphy JSON        Polygraphy's encoding of saved outputs: JSON holding base64 of the
                           np.save bytes of every tensor. Write, read every tensor, size, and
                           the time to read ONE tensor (json.loads of the whole file + base64 +
                           np.load), against one tensor read from the trace (new TraceReader +
                           tensor()).

Decisions (section "decisions")
    1,000,000 rows (2,000 samples x 500 steps, k = 8) of LM-like top-k over a 32k vocabulary
    (see :func:`lm_topk`: the top-k, ranks and logsumexp follow SPEC.md §3.2, and a sample of
    rows is checked against tracefmt.decisions.decide on full 32k logit vectors), written with
    TraceWriter.add_decision one row at a time, without and with a watched EOS token.
    write rows/s           open -> add_decision x N -> close (compaction included), against
                           pyarrow writing the finished table in one call (zstd-6 buffers).
    bytes/row              sum of parts/*.decisions.arrow after close / rows, against the same
                           rows as an uncompressed Arrow file. TARGET (base row, no watched):
                           <= 64 bytes/row.
    read                   seconds of TraceReader(...).decisions() (all rows, sorted, chosen_*
                           derived), against pyarrow reading the same file (read_all).

Encoding study (section "encodings", act-fp32 only; the figures behind SPEC.md §1)
    compression ratio (raw / compressed) and compress MB/s of zstd-1 and of byte-shuffle +
    zstd-1 (tracefmt.payload.shuffle_bytes); an Arrow IPC file with zstd *buffer* compression
    (a large_binary column, one record batch per step): ratio, write MB/s, and the time to read
    ONE tensor from it (the whole batch holding it is inflated) against the trace, where each
    payload is its own zstd frame; np.savez_compressed one-tensor read for reference.

Random access (section "random access")
    A trace of >= --big-gb GB (default 2.0): 1 MB tensors of incompressible float32 (random
    bits, exponent kept finite), 4 names x N steps, default zstd encoding. Then 20 random
    (step, name) picks: cold = page cache of the trace's files dropped (fsync +
    posix_fadvise DONTNEED on those files only), new TraceReader + tensor(); warm = a second
    tensor() call on the same reader. Median of the 20. Baseline: open + pread of 1 MB at a
    random offset of the same values file, cold and warm the same way. The section title gives
    the device's kernel read-ahead: every cold page fault on a memory map reads that much.
    TARGET: < 50 ms cold and warm. Free disk is checked first; without room the rows say SKIP.
    The big trace is deleted at the end unless --keep.

``--quick`` shrinks everything 10-20x (50k decisions, ~13 MB corpora, a 0.2 GB big trace), a
smoke run of under a minute on an idle 2-core machine. Outputs go under ``--out`` (default: a
temporary directory, removed at the end unless ``--keep``). The table's caption and the JSON
name the git commit measured (taken at start, when tracefmt is imported) and the load average
before and after: on a shared machine, read the spread column before the ratios.
"""

from __future__ import annotations

import argparse
import base64
import gc
import hashlib
import importlib.metadata as md
import io
import json
import math
import operator
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import zstandard
from rich.console import Console
from rich.table import Table

from steptrace.tracefmt import TraceReader, TraceWriter
from steptrace.tracefmt.checksum import file_checksum
from steptrace.tracefmt.decisions import decide
from steptrace.tracefmt.payload import shuffle_bytes

MB = 1e6
SAMPLE = "s0"
EOS = 2  # watched token id (ids 0..2 are special tokens and never drawn as ordinary candidates)
LOG = Console(stderr=True, highlight=False)


# ---------------------------------------------------------------------------------------------
# configuration, timing, figures


@dataclass(frozen=True)
class Config:
    """Sizes of every workload; ``--quick`` divides them by about 10."""

    quick: bool
    repeats: int
    big_gb: float
    seed: int
    keep: bool
    batch: int = 4
    seq: int = 128
    d_model: int = 384
    heads: int = 6
    layers: int = 4
    token_vocab: int = 8192
    steps: int = 5
    rand_array_bytes: int = 3 << 20
    decision_rows: int = 1_000_000
    steps_per_sample: int = 500
    k: int = 8
    lm_vocab: int = 32_000
    big_tensor_bytes: int = 1_000_000
    big_names: int = 4
    picks: int = 20

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Config:
        """Return the configuration the command line asks for."""
        big = args.big_gb if args.big_gb is not None else (0.2 if args.quick else 2.0)
        common = {"quick": args.quick, "repeats": args.repeats, "big_gb": big, "seed": args.seed, "keep": args.keep}
        if args.quick:
            return cls(**common, batch=1, seq=64, steps=2, rand_array_bytes=1 << 20, decision_rows=50_000)
        return cls(**common)


@dataclass(frozen=True)
class Timing:
    """Wall-clock seconds of repeated runs of one operation."""

    runs: tuple[float, ...]

    @property
    def best(self) -> float:
        """The fastest run."""
        return min(self.runs)

    @property
    def spread(self) -> float:
        """median / best - 1: how much the machine's noise moved the runs."""
        return statistics.median(self.runs) / self.best - 1.0


def measure(fn: Callable[[], Any], repeats: int, *, setup: Callable[[], Any] | None = None) -> Timing:
    """Time ``fn`` ``repeats`` times (``setup`` runs untimed before each), collecting garbage first."""
    runs = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        gc.collect()
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return Timing(tuple(runs))


def measure_interleaved(runs: dict[str, tuple[Callable[[], Any], Callable[[], Any] | None]],
                        repeats: int) -> dict[str, Timing]:
    """Time several operations in alternation (A B C A B C ...), ``setup`` untimed before each.

    On a shared machine the load drifts from minute to minute; alternating the runs of a figure
    and of its baseline lets both see the same load, so their ratio stays meaningful.
    """
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for key, (fn, setup) in runs.items():
            if setup is not None:
                setup()
            gc.collect()
            t0 = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t0)
    return {k: Timing(tuple(v)) for k, v in times.items()}


_OPS = {"<=": operator.le, ">=": operator.ge, "<": operator.lt}
_SIGNS = {"<=": "≤", ">=": "≥", "<": "<"}


@dataclass(frozen=True)
class Target:
    """A target on a figure's ratio to its baseline (``of="ratio"``) or on its value."""

    of: str
    op: str
    limit: float
    unit: str = ""

    def holds(self, fig: Figure) -> bool:
        """Whether ``fig`` meets the target."""
        x = fig.ratio if self.of == "ratio" else fig.value
        return x is not None and _OPS[self.op](x, self.limit)

    def __str__(self) -> str:
        if self.of == "ratio":
            return f"ratio {_SIGNS[self.op]} {self.limit:.2f}"
        return f"{_SIGNS[self.op]} {self.limit:g} {self.unit}".strip()


@dataclass
class Figure:
    """One measured figure, with the baseline it is compared with and its target if any."""

    section: str
    name: str
    value: float | None
    unit: str
    baseline: str | None = None
    baseline_value: float | None = None
    target: Target | None = None
    timing: Timing | None = None
    skipped: str | None = None

    @property
    def ratio(self) -> float | None:
        """value / baseline value, or None without a baseline."""
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value

    @property
    def result(self) -> str:
        """PASS, MISS or SKIP where there is a target; empty otherwise."""
        if self.skipped:
            return "SKIP"
        if self.target is None:
            return ""
        return "PASS" if self.target.holds(self) else "MISS"

    def to_json(self) -> dict[str, Any]:
        """Return the figure as a JSON-serialisable dict."""
        return {
            "section": self.section,
            "figure": self.name,
            "value": self.value,
            "unit": self.unit,
            "baseline": self.baseline,
            "baseline_value": self.baseline_value,
            "ratio": self.ratio,
            "target": None if self.target is None else str(self.target),
            "result": self.result or None,
            "runs_s": None if self.timing is None else list(self.timing.runs),
            "spread": None if self.timing is None else self.timing.spread,
            "skipped": self.skipped,
        }


def rate(nbytes: float, t: Timing) -> float:
    """MB/s of ``nbytes`` raw bytes in the best run of ``t``."""
    return nbytes / MB / t.best


def step(msg: str) -> None:
    """Print a progress line on stderr (stdout carries only the table)."""
    LOG.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")


# ---------------------------------------------------------------------------------------------
# corpora


@dataclass(frozen=True)
class Item:
    """One tensor of a corpus, recorded at ``step`` under ``name``."""

    step: int
    name: str
    array: np.ndarray

    @property
    def key(self) -> str:
        """A flat key for npz and JSON files."""
        return f"{self.step:04d}.{self.name}"


@dataclass
class Corpus:
    """A list of tensors every method of a section reads or writes."""

    key: str
    title: str
    items: list[Item]

    @property
    def nbytes(self) -> int:
        """Raw bytes of all tensors."""
        return sum(it.array.nbytes for it in self.items)

    @property
    def pick(self) -> Item:
        """The tensor every one-tensor read reads: the middle tensor of the corpus."""
        return self.items[len(self.items) // 2]

    def by_step(self) -> Iterator[tuple[int, list[Item]]]:
        """Yield (step, items of that step) in step order."""
        steps = sorted({it.step for it in self.items})
        for s in steps:
            yield s, [it for it in self.items if it.step == s]


def raw(a: np.ndarray) -> memoryview:
    """The canonical bytes of a C-contiguous little-endian array, without copying."""
    return memoryview(a.reshape(-1).view(np.uint8))


def build_activations(cfg: Config) -> Corpus:
    """Run a small transformer encoder and capture its module outputs with forward hooks."""
    import torch  # the only torch use: building the activation corpus

    torch.manual_seed(cfg.seed)
    model = _encoder(cfg).eval()
    captured: list[tuple[str, np.ndarray]] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: Any, inputs: Any, output: Any) -> None:
            captured.append((name, output.detach().numpy().astype(np.float32, copy=True)))

        return record

    for name, module in model.named_modules():
        if name and (not list(module.children()) or name.count(".") == 1 and name.startswith("blocks.")):
            module.register_forward_hook(hook(name))
    items = []
    with torch.inference_mode():
        for s in range(cfg.steps):
            captured.clear()
            model(torch.randint(0, cfg.token_vocab, (cfg.batch, cfg.seq)))
            items += [Item(s, name, a) for name, a in captured]
    title = (
        f"real activations, {cfg.layers}-layer transformer d={cfg.d_model} seq={cfg.seq} batch={cfg.batch}, "
        f"{len(items)} tensors"
    )
    return Corpus("act-fp32", title, items)


def _encoder(cfg: Config) -> Any:
    """A pre-LN transformer encoder whose every step is a named module (so hooks see it)."""
    from torch import nn

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
            self.softmax = nn.Softmax(dim=-1)
            self.proj = nn.Linear(cfg.d_model, cfg.d_model)

        def forward(self, x: Any) -> Any:
            b, s, d = x.shape
            h = cfg.heads
            q, k, v = self.qkv(x).view(b, s, 3, h, d // h).permute(2, 0, 3, 1, 4)
            p = self.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // h))
            return self.proj((p @ v).transpose(1, 2).reshape(b, s, d))

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln1 = nn.LayerNorm(cfg.d_model)
            self.attn = Attention()
            self.ln2 = nn.LayerNorm(cfg.d_model)
            self.fc1 = nn.Linear(cfg.d_model, 4 * cfg.d_model)
            self.act = nn.GELU()
            self.fc2 = nn.Linear(4 * cfg.d_model, cfg.d_model)

        def forward(self, x: Any) -> Any:
            x = x + self.attn(self.ln1(x))
            return x + self.fc2(self.act(self.fc1(self.ln2(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(cfg.token_vocab, cfg.d_model)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.layers))
            self.ln_f = nn.LayerNorm(cfg.d_model)

        def forward(self, tokens: Any) -> Any:
            x = self.embed(tokens)
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x)

    return Encoder()


def build_random(cfg: Config, dtype: type, total: int, rng: np.random.Generator) -> Corpus:
    """Standard-normal arrays of ``cfg.rand_array_bytes`` each, ``total`` bytes in all."""
    itemsize = np.dtype(dtype).itemsize
    n = max(1, round(total / cfg.rand_array_bytes))
    cols = 768
    rows = cfg.rand_array_bytes // (itemsize * cols)
    per_step = max(1, math.ceil(n / cfg.steps))
    items = [
        Item(i // per_step, f"rand.{i % per_step}", rng.standard_normal((rows, cols), dtype=np.float32).astype(dtype))
        for i in range(n)
    ]
    name = np.dtype(dtype).name
    return Corpus(f"rand-{name.replace('float', 'fp')}", f"standard normal {name}, {n} arrays of {rows}x{cols}", items)


# ---------------------------------------------------------------------------------------------
# tensors: baselines and the trace


def _rmtree(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def memcpy_op(c: Corpus) -> Callable[[], None]:
    """np.copyto of every tensor into one preallocated, already touched buffer."""
    buf = np.ones(max(it.array.nbytes for it in c.items), np.uint8)
    views = [buf[: it.array.nbytes].view(it.array.dtype).reshape(it.array.shape) for it in c.items]

    def run() -> None:
        for v, it in zip(views, c.items, strict=True):
            np.copyto(v, it.array)

    return run


class Zstd1:
    """zstd level 1, one frame per tensor, one thread; keeps the frames of the last compress."""

    def __init__(self, c: Corpus) -> None:
        self.corpus = c
        self.frames: list[bytes] = []
        self._cctx = zstandard.ZstdCompressor(level=1, write_content_size=True)
        self._dctx = zstandard.ZstdDecompressor()

    def compress(self) -> None:
        """Compress every tensor."""
        self.frames = [self._cctx.compress(raw(it.array)) for it in self.corpus.items]

    def compress_shuffled(self) -> int:
        """Byte-shuffle then compress every tensor; returns the compressed bytes."""
        return sum(len(self._cctx.compress(shuffle_bytes(raw(it.array), it.array.itemsize)))
                   for it in self.corpus.items)

    def decompress(self) -> None:
        """Decompress the frames of the last :meth:`compress`."""
        for f in self.frames:
            self._dctx.decompress(f)

    @property
    def size(self) -> int:
        """Compressed bytes of the last :meth:`compress`."""
        return sum(len(f) for f in self.frames)


def sha256_op(c: Corpus) -> Callable[[], None]:
    """hashlib.sha256 of every tensor's bytes."""
    return lambda: [hashlib.sha256(raw(it.array)).digest() for it in c.items]


def write_trace(path: Path, c: Corpus, *, values: bool, encoding: str = "zstd") -> None:
    """Open a TraceWriter, add every tensor, close (compaction included)."""
    with TraceWriter(path, metadata={"model": "bench", "tags": {"corpus": c.key}}, encoding=encoding) as w:
        for it in c.items:
            w.add_tensor(SAMPLE, it.step, it.name, it.array, values=values)


def write_trace_no_checksums(path: Path, c: Corpus) -> None:
    """:func:`write_trace` with values, by a writer that records no file checksums at close (the
    baseline of the checksums' write-path cost)."""
    saved = TraceWriter._checksums
    TraceWriter._checksums = lambda self: {}  # type: ignore[method-assign]
    try:
        write_trace(path, c, values=True)
    finally:
        TraceWriter._checksums = saved  # type: ignore[method-assign]


def read_trace(path: Path, c: Corpus) -> None:
    """A new TraceReader reads every tensor of the corpus back."""
    with TraceReader(path) as r:
        for it in c.items:
            r.tensor(SAMPLE, it.step, it.name)


def read_trace_one(path: Path, it: Item) -> np.ndarray:
    """A new TraceReader reads one tensor."""
    with TraceReader(path) as r:
        return r.tensor(SAMPLE, it.step, it.name)


def write_npz(path: Path, c: Corpus, *, compressed: bool) -> None:
    """np.savez / np.savez_compressed of every tensor."""
    save = np.savez_compressed if compressed else np.savez
    save(path, **{it.key: it.array for it in c.items})


def read_npz(path: Path, keys: list[str]) -> None:
    """np.load and materialise the arrays ``keys``."""
    with np.load(path, allow_pickle=False) as z:
        for k in keys:
            z[k]


def _npy_b64(a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return base64.b64encode(buf.getvalue()).decode()


def write_polygraphy(path: Path, c: Corpus) -> None:
    """Polygraphy's RunResults layout: one iteration per step, arrays as base64 of np.save bytes."""
    iterations = [
        {"polygraphy_class": "IterationResult", "runner_name": "bench",
         "outputs": {it.name: {"polygraphy_class": "ndarray", "array": _npy_b64(it.array)} for it in items}}
        for _, items in c.by_step()
    ]
    doc = {"polygraphy_class": "RunResults", "lst": [["bench", iterations]]}
    path.write_text(json.dumps(doc, indent=4), encoding="utf-8")


def read_polygraphy(path: Path, c: Corpus, only: Item | None = None) -> None:
    """Parse the whole JSON file, then decode every tensor (or only ``only``)."""
    iterations = json.loads(path.read_bytes())["lst"][0][1]
    steps = sorted({it.step for it in c.items})
    for it in c.items if only is None else [only]:
        enc = iterations[steps.index(it.step)]["outputs"][it.name]["array"]
        np.load(io.BytesIO(base64.b64decode(enc, validate=True)), allow_pickle=False)


@dataclass
class FileMethod:
    """A way of storing a corpus in one file or directory, timed end to end."""

    label: str
    path: Path
    write: Callable[[], None]
    read_all: Callable[[], None] | None = None
    read_one: Callable[[], None] | None = None
    write_t: Timing | None = None
    read_t: Timing | None = None
    one_t: Timing | None = None
    size: int = 0

    def run(self, repeats: int) -> FileMethod:
        """Time write and read of everything (unless already timed) and read of one tensor;
        record the size of what the last write left."""
        if self.write_t is None:
            self.write_t = measure(self.write, repeats, setup=lambda: _rmtree(self.path))
        self.size = _dir_bytes(self.path) if self.path.is_dir() else self.path.stat().st_size
        if self.read_all is not None and self.read_t is None:
            self.read_t = measure(self.read_all, repeats)
        if self.read_one is not None:
            self.one_t = measure(self.read_one, max(repeats, 5))
        return self


def file_methods(c: Corpus, out: Path) -> dict[str, FileMethod]:
    """The trace (values and stats only), npz, npz compressed and Polygraphy JSON for ``c``."""
    pick = c.pick
    keys = [it.key for it in c.items]
    full, stats = out / f"{c.key}.trace", out / f"{c.key}-stats.trace"
    npz, npzc, pjson = out / f"{c.key}.npz", out / f"{c.key}-c.npz", out / f"{c.key}.polygraphy.json"
    return {
        "trace": FileMethod("trace, values (zstd-1)", full, lambda: write_trace(full, c, values=True),
                            lambda: read_trace(full, c), lambda: read_trace_one(full, pick)),
        "stats": FileMethod("trace, stats only", stats, lambda: write_trace(stats, c, values=False)),
        "npz": FileMethod("np.savez", npz, lambda: write_npz(npz, c, compressed=False),
                          lambda: read_npz(npz, keys), lambda: read_npz(npz, [pick.key])),
        "npzc": FileMethod("np.savez_compressed", npzc, lambda: write_npz(npzc, c, compressed=True),
                           lambda: read_npz(npzc, keys), lambda: read_npz(npzc, [pick.key])),
        "poly": FileMethod("Polygraphy JSON (base64 np.save)", pjson, lambda: write_polygraphy(pjson, c),
                           lambda: read_polygraphy(pjson, c), lambda: read_polygraphy(pjson, c, pick)),
    }


def bench_tensors(c: Corpus, cfg: Config, out: Path) -> tuple[list[Figure], dict[str, Any]]:
    """Every tensor figure of one corpus; also returns what the encoding study reuses."""
    n = cfg.repeats
    nb = c.nbytes
    z = Zstd1(c)
    methods = file_methods(c, out)
    tr, st, npz, npzc, poly = (methods[k] for k in ("trace", "stats", "npz", "npzc", "poly"))
    step(f"{c.key} ({nb / MB:.0f} MB): trace writes alternating with memcpy, zstd-1, SHA-256")
    t = measure_interleaved({
        "memcpy": (memcpy_op(c), None), "zstd": (z.compress, None), "sha": (sha256_op(c), None),
        "nosum": (lambda: write_trace_no_checksums(out / "nosum.trace", c), lambda: _rmtree(out / "nosum.trace")),
        "trace": (tr.write, lambda: _rmtree(tr.path)), "stats": (st.write, lambda: _rmtree(st.path)),
    }, n)
    t_copy, t_zc, t_sha, tr.write_t, st.write_t = (t[k] for k in ("memcpy", "zstd", "sha", "trace", "stats"))
    t_nosum = t["nosum"]
    _rmtree(out / "nosum.trace")
    _rmtree(tr.path)
    write_trace(tr.path, c, values=True)
    t_hash = measure(lambda: [file_checksum(f) for f in (tr.path / "parts").glob("*.arrow")], n)
    zsize = z.size
    step(f"{c.key}: trace reads alternating with zstd-1 decompress")
    t = measure_interleaved({"zstd": (z.decompress, None), "trace": (tr.read_all, None)}, n)
    t_zd, tr.read_t = t["zstd"], t["trace"]
    for m in methods.values():
        step(f"{c.key}: {m.label}")
        m.run(n)
    sec = f"tensors — {c.key}: {c.title}, {nb / MB:.0f} MB"
    copy_mbs, zc_mbs, zd_mbs = rate(nb, t_copy), rate(nb, t_zc), rate(nb, t_zd)

    def fig(name: str, value: float, unit: str, base: str | None = None, base_v: float | None = None,
            target: Target | None = None, timing: Timing | None = None) -> Figure:
        return Figure(sec, name, value, unit, base, base_v, target, timing)

    figures = [
        fig("memcpy (np.copyto, reused buffer)", copy_mbs, "MB/s", timing=t_copy),
        fig("zstd-1 compress", zc_mbs, "MB/s", "memcpy", copy_mbs, timing=t_zc),
        fig("zstd-1 decompress", zd_mbs, "MB/s", "memcpy", copy_mbs, timing=t_zd),
        fig("zstd-1 size", zsize / MB, "MB", "raw bytes", nb / MB),
        fig("SHA-256", rate(nb, t_sha), "MB/s", "memcpy", copy_mbs, timing=t_sha),
        fig("trace write, values", rate(nb, tr.write_t), "MB/s", "zstd-1 compress", zc_mbs,
            Target("ratio", ">=", 0.70), tr.write_t),
        fig("trace write, values: seconds with file checksums at close", tr.write_t.best, "s",
            "the same writer without checksums", t_nosum.best, timing=tr.write_t),
        fig("file checksums at close alone (hashing the part's files)", t_hash.best, "s",
            "trace write, values", tr.write_t.best, timing=t_hash),
        fig("trace size, values", tr.size / MB, "MB", "np.savez_compressed size", npzc.size / MB,
            Target("ratio", "<=", 1.0)),
        fig("trace read, values (every tensor)", rate(nb, tr.read_t), "MB/s", "zstd-1 decompress", zd_mbs,
            timing=tr.read_t),
        fig("trace write, stats only", rate(nb, st.write_t), "MB/s", "SHA-256", rate(nb, t_sha), timing=st.write_t),
        fig("trace size, stats only", st.size / len(c.items), "B/tensor", "raw bytes per tensor", nb / len(c.items)),
    ]
    for m in (npz, npzc, poly):
        figures += [
            fig(f"{m.label} write", rate(nb, m.write_t), "MB/s", "trace write, values", rate(nb, tr.write_t),
                timing=m.write_t),
            fig(f"{m.label} read (every tensor)", rate(nb, m.read_t), "MB/s", "trace read, values",
                rate(nb, tr.read_t), timing=m.read_t),
            fig(f"{m.label} size", m.size / MB, "MB", "trace size, values", tr.size / MB),
        ]
    figures += [
        fig("trace, one tensor (new reader)", tr.one_t.best * 1e3, "ms", timing=tr.one_t),
        fig("Polygraphy JSON, one tensor (whole file parsed)", poly.one_t.best * 1e3, "ms",
            "trace, one tensor", tr.one_t.best * 1e3, timing=poly.one_t),
    ]
    reuse = {"trace_one": tr.one_t, "npzc_one": npzc.one_t}
    if not cfg.keep:
        for m in methods.values():
            _rmtree(m.path)
    return figures, reuse


# ---------------------------------------------------------------------------------------------
# encoding study


def write_ipc(path: Path, c: Corpus) -> None:
    """Tensors as a large_binary column of an Arrow IPC file with zstd buffer compression,
    one record batch per step."""
    schema = pa.schema([("step", pa.int32()), ("name", pa.utf8()), ("data", pa.large_binary())])
    options = pa.ipc.IpcWriteOptions(compression="zstd")
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema, options=options) as w:
        for s, items in c.by_step():
            w.write_batch(pa.record_batch([
                pa.array([s] * len(items), pa.int32()),
                pa.array([it.name for it in items], pa.utf8()),
                pa.array([raw(it.array) for it in items], pa.large_binary()),
            ], schema=schema))


def read_ipc_one(path: Path, c: Corpus, it: Item) -> np.ndarray:
    """Read one tensor from :func:`write_ipc`'s file (its batch is inflated whole)."""
    steps = sorted({x.step for x in c.items})
    with pa.memory_map(str(path)) as mm:
        batch = pa.ipc.open_file(mm).get_batch(steps.index(it.step))
        j = batch.column("name").to_pylist().index(it.name)
        return np.frombuffer(batch.column("data")[j].as_buffer(), it.array.dtype).reshape(it.array.shape)


def bench_encodings(c: Corpus, cfg: Config, out: Path, reuse: dict[str, Any]) -> list[Figure]:
    """zstd-1 vs byte-shuffle + zstd-1 vs Arrow IPC buffer compression on the activations."""
    step(f"{c.key}: encoding study (shuffle, Arrow IPC zstd buffers)")
    n, nb = cfg.repeats, c.nbytes
    sec = f"encodings — {c.key} (SPEC.md §1)"
    z = Zstd1(c)
    shuffled: list[int] = []
    ipc = out / f"{c.key}.ipc-zstd.arrow"
    t = measure_interleaved({
        "zstd": (z.compress, None),
        "shuffle": (lambda: shuffled.append(z.compress_shuffled()), None),
        "ipc": (lambda: write_ipc(ipc, c), lambda: _rmtree(ipc)),
    }, n)
    t_z, t_s, t_ipc = t["zstd"], t["shuffle"], t["ipc"]
    zsize, ipc_size = z.size, ipc.stat().st_size
    t_ipc_one = measure(lambda: read_ipc_one(ipc, c, c.pick), max(n, 5))
    if not cfg.keep:
        _rmtree(ipc)
    one = reuse["trace_one"].best * 1e3
    z_ratio = nb / zsize
    return [
        Figure(sec, "zstd-1 compression ratio (raw/compressed)", z_ratio, "x"),
        Figure(sec, "shuffle + zstd-1 compression ratio", nb / shuffled[-1], "x", "zstd-1 ratio", z_ratio),
        Figure(sec, "shuffle + zstd-1 compress", rate(nb, t_s), "MB/s", "zstd-1 compress", rate(nb, t_z),
               timing=t_s),
        Figure(sec, "Arrow IPC zstd buffers, compression ratio", nb / ipc_size, "x", "zstd-1 ratio", z_ratio),
        Figure(sec, "Arrow IPC zstd buffers, write", rate(nb, t_ipc), "MB/s", "zstd-1 compress",
               rate(nb, t_z), timing=t_ipc),
        Figure(sec, "Arrow IPC zstd buffers, one tensor (batch inflated)", t_ipc_one.best * 1e3, "ms",
               "trace, one tensor", one, timing=t_ipc_one),
        Figure(sec, "np.savez_compressed, one tensor", reuse["npzc_one"].best * 1e3, "ms",
               "trace, one tensor", one, timing=reuse["npzc_one"]),
    ]


# ---------------------------------------------------------------------------------------------
# decisions


@dataclass
class DecisionRows:
    """Pre-built decision rows (plain Python values where add_decision takes scalars)."""

    samples: list[str]
    steps: list[int]
    ids: np.ndarray  # (n, k) int32, best first
    logits: np.ndarray  # (n, k) float32
    chosen: list[int]
    lse: list[float]
    eos_logit: list[float]
    eos_rank: list[int]


def _zipf_ranks(shape: tuple[int, int], n_ranks: int, rng: np.random.Generator) -> np.ndarray:
    """Frequency ranks in [0, n_ranks) drawn with P(rank r) ~ 1/(r+1), distinct within a row."""
    def draw(size: Any) -> np.ndarray:
        return (np.exp(rng.random(size) * math.log(n_ranks + 1)) - 1).astype(np.int64).clip(0, n_ranks - 1)

    r = draw(shape)
    while True:
        s = np.sort(r, axis=1)
        dup = np.zeros(s.shape, bool)
        dup[:, 1:] = s[:, 1:] == s[:, :-1]
        rows = np.flatnonzero(dup.any(axis=1))
        if rows.size == 0:
            return r
        s, d = s[rows], dup[rows]
        s[d] = draw(int(d.sum()))
        r[rows] = s


def lm_topk(n: int, k: int, vocab: int, rng: np.random.Generator, *, live: int = 64) -> dict[str, np.ndarray]:
    """LM-like top-k rows over ``vocab`` ids, following SPEC.md §3.2.

    Each row has ``live`` candidate tokens (Zipf-frequent ids, plus EOS) whose float32 logits are
    normal around a per-row level (frequent ids slightly favoured, EOS usually lower); all the
    other ``vocab - live`` tokens lie below every candidate: ``bg - Exp(1)`` with ``bg`` = the
    lowest candidate - 2. So the top-k and EOS's rank over the whole vocabulary are those among
    the candidates, ordered by logit then smaller id; logsumexp adds the background's expected
    mass ``(vocab - live) * exp(bg) / 2`` in float64.

    Returns:
        ids (n, k) int32, logits (n, k) float32, lse (n,), eos_logit (n,), eos_rank (n,), and
        for checking: cand_ids (n, live), cand_logits (n, live).
    """
    perm = (3 + rng.permutation(vocab - 3)).astype(np.int32)  # frequency rank -> id; 0..2 special
    ranks = _zipf_ranks((n, live - 1), vocab - 3, rng)
    cand_ids = np.concatenate([perm[ranks], np.full((n, 1), EOS, np.int32)], axis=1)
    level = rng.normal(14.0, 2.0, (n, 1))
    width = rng.uniform(1.0, 3.0, (n, 1))
    logits = level + width * rng.standard_normal((n, live)) - 0.25 * np.log1p(np.concatenate(
        [ranks, np.zeros((n, 1))], axis=1))
    logits[:, -1] -= 3.0 * width[:, 0]  # EOS: usually well down the list, sometimes on top
    cand_logits = logits.astype(np.float32)
    order = np.lexsort((cand_ids, -cand_logits), axis=-1)
    top = order[:, :k]
    x = cand_logits.astype(np.float64)
    m = x.max(axis=1)
    bg = x.min(axis=1) - 2.0
    lse = np.logaddexp(m + np.log(np.exp(x - m[:, None]).sum(axis=1)), math.log((vocab - live) / 2) + bg)
    return {
        "ids": np.take_along_axis(cand_ids, top, axis=1),
        "logits": np.take_along_axis(cand_logits, top, axis=1),
        "lse": lse.astype(np.float32),
        "eos_logit": cand_logits[:, -1],
        "eos_rank": np.argmax(order == live - 1, axis=1).astype(np.int32),
        "cand_ids": cand_ids,
        "cand_logits": cand_logits,
    }


def check_topk(rows: dict[str, np.ndarray], k: int, vocab: int, rng: np.random.Generator, count: int = 32) -> None:
    """Rebuild full logit vectors for ``count`` rows and compare with tracefmt.decisions.decide.

    Raises:
        RuntimeError: the generator does not follow SPEC.md §3.2 (a bug in this benchmark).
    """
    for i in rng.choice(len(rows["ids"]), size=min(count, len(rows["ids"])), replace=False):
        cand_ids, cand = rows["cand_ids"][i], rows["cand_logits"][i]
        full = (cand.min() - 2.0 - rng.exponential(size=vocab)).astype(np.float32)
        full[cand_ids] = cand
        d = decide(full, k=k, watched=[EOS])
        if not (np.array_equal(d.topk_ids, rows["ids"][i]) and np.array_equal(d.topk_logits, rows["logits"][i])
                and d.watched[0]["rank"] == rows["eos_rank"][i]):
            raise RuntimeError(f"bench bug: row {i} of the decision generator disagrees with SPEC.md §3.2")


def build_decisions(cfg: Config, rng: np.random.Generator) -> DecisionRows:
    """Generate ``cfg.decision_rows`` rows in chunks and check a sample against decide()."""
    n, chunk = cfg.decision_rows, 100_000
    parts = [lm_topk(min(chunk, n - i), cfg.k, cfg.lm_vocab, rng) for i in range(0, n, chunk)]
    check_topk(parts[0], cfg.k, cfg.lm_vocab, rng)
    cat = {key: np.concatenate([p[key] for p in parts]) for key in ("ids", "logits", "lse", "eos_logit", "eos_rank")}
    per = cfg.steps_per_sample
    names = [f"utt-{i:06d}" for i in range(math.ceil(n / per))]
    return DecisionRows(
        samples=[names[i // per] for i in range(n)],
        steps=[i % per for i in range(n)],
        ids=cat["ids"],
        logits=cat["logits"],
        chosen=cat["ids"][:, 0].tolist(),  # greedy decoding: chosen = argmax
        lse=cat["lse"].tolist(),
        eos_logit=cat["eos_logit"].tolist(),
        eos_rank=cat["eos_rank"].tolist(),
    )


def write_decisions(path: Path, d: DecisionRows, *, watched: bool) -> None:
    """Open a TraceWriter, add every row with add_decision, close (compaction included)."""
    meta = {"model": "bench-lm", "watched": {"eos": EOS} if watched else {}}
    with TraceWriter(path, metadata=meta) as w:
        add = w.add_decision
        for i in range(len(d.chosen)):
            add(d.samples[i], d.steps[i], chosen=d.chosen[i], topk_ids=d.ids[i], topk_logits=d.logits[i],
                logsumexp=d.lse[i],
                watched=[{"id": EOS, "logit": d.eos_logit[i], "rank": d.eos_rank[i]}] if watched else None)


def _decision_files(path: Path) -> list[Path]:
    return sorted((path / "parts").glob("*.decisions.arrow"))


def _arrow_write(path: Path, table: pa.Table, level: int | None) -> None:
    options = pa.ipc.IpcWriteOptions(compression=None if level is None else pa.Codec("zstd", compression_level=level))
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema, options=options) as w:
        w.write_table(table, max_chunksize=1 << 16)


def _arrow_read(files: list[Path]) -> None:
    for f in files:
        with pa.memory_map(str(f)) as mm:
            pa.ipc.open_file(mm).read_all()


def bench_decisions(cfg: Config, out: Path, rng: np.random.Generator) -> list[Figure]:
    """Write rows/s, bytes/row and read time of decisions, without and with a watched EOS."""
    n = cfg.decision_rows
    step(f"decisions: generating {n:,} LM-like rows (k={cfg.k}, vocab {cfg.lm_vocab:,})")
    d = build_decisions(cfg, rng)
    sec = f"decisions — {n:,} rows, k={cfg.k}, {cfg.lm_vocab // 1000}k vocab, add_decision per row"
    return decision_figures(sec, d, cfg, out, watched=False) + decision_figures(sec, d, cfg, out, watched=True)


def decision_figures(sec: str, d: DecisionRows, cfg: Config, out: Path, *, watched: bool) -> list[Figure]:
    """The figures of one decisions trace and its pyarrow baselines on the same rows."""
    n = len(d.chosen)
    label = "watched EOS" if watched else "base row"
    path = out / f"decisions-{'eos' if watched else 'base'}.trace"
    step(f"decisions: {label}: writing x{cfg.repeats}")
    t_w = measure(lambda: write_decisions(path, d, watched=watched), cfg.repeats, setup=lambda: _rmtree(path))
    files = _decision_files(path)
    per_row = sum(f.stat().st_size for f in files) / n
    t_r = measure(lambda: TraceReader(path).decisions(), cfg.repeats)
    t_ar = measure(lambda: _arrow_read(files), cfg.repeats)
    table = pa.concat_tables(pa.ipc.open_file(pa.memory_map(str(f))).read_all() for f in files)
    plain = out / "decisions-plain.arrow"
    _arrow_write(plain, table, None)
    plain_per_row = plain.stat().st_size / n
    t_aw = measure(lambda: _arrow_write(plain, table, 6), cfg.repeats)
    _rmtree(plain)
    if not cfg.keep:
        _rmtree(path)
    return [
        Figure(sec, f"{label}: write", n / t_w.best, "rows/s", "pyarrow write of the table (zstd-6)",
               n / t_aw.best, timing=t_w),
        Figure(sec, f"{label}: bytes/row on disk", per_row, "B/row", "uncompressed Arrow, same rows",
               plain_per_row, None if watched else Target("value", "<=", 64, "B/row")),
        Figure(sec, f"{label}: read, TraceReader.decisions()", t_r.best, "s",
               "pyarrow read_all of the same file", t_ar.best, timing=t_r),
    ]


# ---------------------------------------------------------------------------------------------
# random access


def _evict(files: list[Path]) -> None:
    """Drop ``files`` (only these) from the OS page cache: fsync, then POSIX_FADV_DONTNEED."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _incompressible(n: int, rng: np.random.Generator) -> np.ndarray:
    """float32 of random bits, with exponent bit 30 cleared so every value is finite (|x| < 2)."""
    bits = rng.integers(0, 1 << 32, size=n, dtype=np.uint32) & np.uint32(0xBFFFFFFF)
    return bits.view(np.float32)


def write_big(path: Path, cfg: Config, rng: np.random.Generator) -> tuple[int, int, float]:
    """Write the big trace; returns (tensors, steps, seconds)."""
    numel = cfg.big_tensor_bytes // 4
    count = math.ceil(cfg.big_gb * 1e9 / (numel * 4))
    steps = math.ceil(count / cfg.big_names)
    pool = [_incompressible(numel, rng) for _ in range(8)]
    t0 = time.perf_counter()
    with TraceWriter(path, metadata={"model": "bench-big"}) as w:
        for i in range(steps * cfg.big_names):
            a = pool[i % len(pool)]
            a[0] = np.float32(i)  # distinct digests
            w.add_tensor(SAMPLE, i // cfg.big_names, f"layer.{i % cfg.big_names}", a)
    return steps * cfg.big_names, steps, time.perf_counter() - t0


def _pread(path: Path, offset: int, size: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.pread(fd, size, offset)
    finally:
        os.close(fd)


def _pick_times(path: Path, picks: list[tuple[int, str]], files: list[Path]) -> tuple[list[float], list[float]]:
    cold, warm = [], []
    for s, name in picks:
        gc.collect()  # no reader of an earlier pick may still map the files
        _evict(files)
        t0 = time.perf_counter()
        r = TraceReader(path)
        r.tensor(SAMPLE, s, name)
        t1 = time.perf_counter()
        r.tensor(SAMPLE, s, name)
        t2 = time.perf_counter()
        r.close()
        del r
        cold.append(t1 - t0)
        warm.append(t2 - t1)
    return cold, warm


def _pread_times(values: Path, count: int, size: int, rng: np.random.Generator) -> tuple[list[float], list[float]]:
    cold, warm = [], []
    top = values.stat().st_size - size
    for off in rng.integers(0, top, size=count) // 4096 * 4096:
        _evict([values])
        t0 = time.perf_counter()
        _pread(values, int(off), size)
        t1 = time.perf_counter()
        _pread(values, int(off), size)
        t2 = time.perf_counter()
        cold.append(t1 - t0)
        warm.append(t2 - t1)
    return cold, warm


def readahead_kb(path: Path) -> int | None:
    """The kernel read-ahead of the block device holding ``path`` (Linux; None if unknown).

    Every cold page fault on a memory map reads this much, so it drives cold-read times.
    """
    st = os.stat(path)
    dev = Path(f"/sys/dev/block/{os.major(st.st_dev)}:{os.minor(st.st_dev)}")
    for queue in (dev / "queue", dev / ".." / "queue"):  # a whole disk, or a partition of one
        try:
            return int((queue / "read_ahead_kb").read_text())
        except (OSError, ValueError):
            continue
    return None


def _skipped(sec: str, reason: str) -> list[Figure]:
    target = Target("value", "<", 50, "ms")
    return [Figure(sec, f"one tensor, {kind} (median)", None, "ms", target=target, skipped=reason)
            for kind in ("cold", "warm")]


def bench_random_access(cfg: Config, out: Path, rng: np.random.Generator) -> list[Figure]:
    """Build a big trace and time reading one tensor at one step, cold and warm."""
    ra = readahead_kb(out)
    sec = (f"random access — {cfg.big_gb:g} GB trace of {cfg.big_tensor_bytes / MB:g} MB tensors "
           f"(device read-ahead {'unknown' if ra is None else f'{ra} KB'})")
    need = cfg.big_gb * 1e9 * 1.05 + 1e9
    free = shutil.disk_usage(out).free
    if free < need:
        reason = f"only {free / 1e9:.1f} GB free under {out}; the big trace needs {need / 1e9:.1f} GB"
        LOG.print(f"[bold red]random access skipped: {reason}[/]")
        return _skipped(sec, reason)
    path = out / "big.trace"
    _rmtree(path)
    step(f"random access: writing a {cfg.big_gb:g} GB trace ({free / 1e9:.0f} GB free)")
    try:
        count, steps, secs = write_big(path, cfg, rng)
        files = sorted((path / "parts").glob("*.arrow"))
        values = next(f for f in files if f.name.endswith(".values.arrow"))
        size = _dir_bytes(path)
        step(f"random access: {cfg.picks} picks of {count} tensors over {steps} steps")
        names = [f"layer.{i}" for i in range(cfg.big_names)]
        picks = [(int(rng.integers(steps)), names[int(rng.integers(len(names)))]) for _ in range(cfg.picks)]
        cold, warm = _pick_times(path, picks, files)
        p_cold, p_warm = _pread_times(values, cfg.picks, cfg.big_tensor_bytes, rng)
        step("random access: checksums on open and in full, against reading every tensor")
        sums = _checksum_times(path, names, steps, cfg.repeats)
    finally:
        if not cfg.keep:
            _rmtree(path)
    target = Target("value", "<", 50, "ms")
    raw_bytes = count * cfg.big_tensor_bytes
    med = statistics.median
    return [
        Figure(sec, f"write ({count} tensors, {steps} steps; once)", raw_bytes / MB / secs, "MB/s"),
        Figure(sec, "trace size", size / 1e9, "GB", "raw bytes", raw_bytes / 1e9),
        Figure(sec, "one tensor, cold (median): new TraceReader + tensor()", med(cold) * 1e3, "ms",
               "pread 1 MB, cold", med(p_cold) * 1e3, target, Timing(tuple(cold))),
        Figure(sec, "one tensor, warm (median): second tensor() call", med(warm) * 1e3, "ms",
               "pread 1 MB, warm", med(p_warm) * 1e3, target, Timing(tuple(warm))),
        Figure(sec, "checksums verified on open (decisions, tensors; warm)", sums["open"].best * 1e3, "ms",
               "read every tensor, warm", sums["read"].best * 1e3, timing=sums["open"]),
        Figure(sec, "every file's checksum, values included (validate; warm)", sums["all"].best * 1e3, "ms",
               "read every tensor, warm", sums["read"].best * 1e3, timing=sums["all"]),
    ]


def _checksum_times(path: Path, names: list[str], steps: int, repeats: int) -> dict[str, Timing]:
    """Warm timings: what opening verifies, every checksum, and reading every tensor back."""
    def on_open() -> None:
        with TraceReader(path) as r:
            r.part_files("decisions")
            r.part_files("tensors")

    def verify_all() -> None:
        with TraceReader(path) as r:
            assert not r.verify()

    def read_all() -> None:
        with TraceReader(path) as r:
            for s in range(steps):
                for name in names:
                    r.tensor(SAMPLE, s, name)

    return {"open": measure(on_open, repeats), "all": measure(verify_all, repeats), "read": measure(read_all, repeats)}


# ---------------------------------------------------------------------------------------------
# report


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "—"
    a = abs(v)
    s = f"{v:,.0f}" if a >= 100 else f"{v:.1f}" if a >= 10 else f"{v:.2f}" if a >= 0.1 else f"{v:.3f}"
    return f"{s} {unit}".strip()


_STYLE = {"PASS": "bold green", "MISS": "bold red", "SKIP": "bold yellow"}


def render(figures: list[Figure], title: str, caption: str) -> Table:
    """The one table: a section header row, then one row per figure."""
    table = Table(title=title, caption=caption, show_lines=False, header_style="bold")
    for col, just in (("Figure", "left"), ("Value", "right"), ("Baseline (same run, same bytes)", "left"),
                      ("Ratio", "right"), ("Target", "left"), ("Result", "center"), ("Spread", "right")):
        table.add_column(col, justify=just)
    section = None
    for f in figures:
        if f.section != section:
            if section is not None:
                table.add_section()
            section = f.section
            table.add_row(f"[bold cyan]{section}[/]")
        base = "" if f.baseline is None else f"{f.baseline}: {_num(f.baseline_value, f.unit)}"
        ratio = "" if f.ratio is None else f"{f.ratio:.2f}×"
        res = f.result
        value = _num(f.value, f.unit) if not f.skipped else f"[yellow]{f.skipped}[/]"
        spread = "" if f.timing is None or len(f.timing.runs) < 2 else f"{f.timing.spread:+.0%}"
        table.add_row("  " + f.name, value, base, ratio, "" if f.target is None else str(f.target),
                      f"[{_STYLE[res]}]{res}[/]" if res else "", spread)
    return table


def git_state() -> dict[str, Any]:
    """The commit measured, and whether tracefmt/ differs from it (None outside a git checkout)."""
    root = Path(__file__).resolve().parents[1]

    def git(*cmd: str) -> str | None:
        try:
            done = subprocess.run(["git", *cmd], check=False, cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "--short", "HEAD")
    changes = git("status", "--porcelain", "--", "tracefmt")
    return {"commit": commit, "tracefmt_modified": None if changes is None else bool(changes)}


def machine_info() -> dict[str, Any]:
    """What ran the benchmark."""
    versions = {}
    for pkg in ("numpy", "pyarrow", "zstandard", "torch", "steptrace"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "git": git_state(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "versions": versions,
    }


# ---------------------------------------------------------------------------------------------
# main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10-20x smaller everything; big trace 0.2 GB")
    p.add_argument("--big-gb", type=float, default=None, help="size of the random-access trace (default 2.0)")
    p.add_argument("--out", type=Path, default=None, help="where outputs go (default: a temporary directory)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    p.add_argument("--repeats", type=int, default=3, help="best of N runs (N >= 3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the traces and files written under --out")
    p.add_argument("--skip", action="append", default=[], choices=("decisions", "tensors", "random"),
                   help="leave a workload out (repeatable)")
    args = p.parse_args(argv)
    if args.repeats < 3:
        p.error("--repeats must be at least 3 (best of N needs N >= 3)")
    if args.big_gb is not None and args.big_gb <= 0:
        p.error("--big-gb must be positive")
    return args


def run(cfg: Config, out: Path, skip: list[str]) -> tuple[list[Figure], dict[str, Any]]:
    """Every workload in order; returns the figures and a description of the corpora."""
    rng = np.random.default_rng(cfg.seed)
    figures: list[Figure] = []
    corpora_info: dict[str, Any] = {}
    if "decisions" not in skip:
        figures += bench_decisions(cfg, out, rng)
    if "tensors" not in skip:
        step("building the activation corpus (torch forward passes with hooks)")
        act = build_activations(cfg)
        corpora = [act, build_random(cfg, np.float32, act.nbytes, rng), build_random(cfg, np.float16, act.nbytes, rng)]
        reuse_act = None
        for c in corpora:
            corpora_info[c.key] = {"title": c.title, "tensors": len(c.items), "bytes": c.nbytes}
            figs, reuse = bench_tensors(c, cfg, out)
            figures += figs
            reuse_act = reuse_act or reuse
        figures += bench_encodings(act, cfg, out, reuse_act)
    if "random" not in skip:
        figures += bench_random_access(cfg, out, rng)
    return figures, corpora_info


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    args = parse_args(argv)
    cfg = Config.from_args(args)
    temp = args.out is None
    out = Path(tempfile.mkdtemp(prefix="steptrace-bench-")) if temp else args.out
    out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out).free
    need = (0.2e9 if cfg.quick else 2e9) * (3 if cfg.keep else 1)  # tensor files of one corpus (all with --keep)
    if free < need:
        LOG.print(f"[bold red]not enough disk: {free / 1e9:.1f} GB free under {out}; the tensor files need "
                  f"{need / 1e9:.1f} GB[/]")
        return 2
    info = machine_info()  # before anything runs: the code measured is the code imported now
    info["readahead_kb"] = readahead_kb(out)
    load0, t0 = os.getloadavg(), time.perf_counter()
    step(f"output under {out}; best of {cfg.repeats}; {'quick' if cfg.quick else 'full'} run")
    try:
        figures, corpora = run(cfg, out, args.skip)
    finally:
        if temp and not cfg.keep:
            shutil.rmtree(out, ignore_errors=True)
    elapsed, load1 = time.perf_counter() - t0, os.getloadavg()
    title = f"steptrace format v1 benchmark ({'quick' if cfg.quick else 'full'}, best of {cfg.repeats})"
    git = info["git"]
    caption = (
        f"steptrace {git['commit']}{' + modified tracefmt/' if git['tracefmt_modified'] else ''}; "
        f"{info['cpus_usable']} CPUs, {info['platform']}; load avg {load0[0]:.1f} → {load1[0]:.1f}; "
        f"{elapsed:.0f} s. MB = 10^6 raw tensor bytes; ratio = value / baseline; "
        "spread = median/best − 1 (machine noise)."
    )
    width = None if sys.stdout.isatty() else 180
    Console(width=width, highlight=False).print(render(figures, title, caption))
    counts = {r: sum(f.result == r for f in figures) for r in ("PASS", "MISS", "SKIP")}
    if args.json:
        doc = {
            "benchmark": "steptrace bench_format", "argv": sys.argv, "quick": cfg.quick, "repeats": cfg.repeats,
            "big_gb": cfg.big_gb, "seed": cfg.seed, "machine": info, "loadavg_start": load0, "loadavg_end": load1,
            "seconds": elapsed, "corpora": corpora, "summary": counts, "figures": [f.to_json() for f in figures],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
        step(f"figures written to {args.json}")
    step(f"{counts['PASS']} PASS, {counts['MISS']} MISS, {counts['SKIP']} SKIP")
    return 0


if __name__ == "__main__":
    sys.exit(main())
