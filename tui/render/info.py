"""Rich rendering of ``trace info`` (the values come from tracefmt.validate.summarize)."""

from __future__ import annotations

import re
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from steptrace.tui.render.wording import plural

#: Above this many tensor names, names that differ only in their numbers are folded.
FOLD_OVER = 40
#: At most this many rows of (folded) tensor names are listed without ``--all``.
SHOW_AT_MOST = 60
_DIGITS = re.compile(r"\d+")


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def fold(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fold tensor names that differ only in their numbers (``layers.0.attn`` … ``layers.11.attn``)
    into one row ``layers.#.attn`` with their count and summed counters, in the order the first
    of them ran.

    Args:
        rows: ``tensor_names`` entries of :func:`tracefmt.validate.summarize` (execution order).

    Returns:
        Rows with ``name`` (the pattern when several folded), ``names`` (how many), ``first`` and
        ``last`` (the first and last name folded), a ``dtype`` (``mixed`` when they differ) and the
        summed ``records``, ``with_values``, ``nan``, ``inf``.
    """
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = _DIGITS.sub("#", r["name"])
        f = out.get(key)
        if f is None:
            out[key] = {**r, "names": 1, "first": r["name"], "last": r["name"], "pattern": key}
            continue
        f["names"] += 1
        f["last"] = r["name"]
        f["dtype"] = f["dtype"] if f["dtype"] == r["dtype"] else "mixed"
        for k in ("records", "with_values", "nan", "inf"):
            f[k] += r[k]
    for f in out.values():
        if f["names"] > 1:
            f["name"] = f["pattern"]
    return list(out.values())


def tensor_table(rows: list[dict[str, Any]], *, every: bool = False) -> tuple[Table, str | None]:
    """The tensors in execution order; past :data:`FOLD_OVER` names, folded by :func:`fold`
    (and cut to :data:`SHOW_AT_MOST` rows) unless ``every``.

    Returns:
        The table and a note to print under it (what was folded or left out), or None.
    """
    folded = not every and len(rows) > FOLD_OVER
    shown = fold(rows) if folded else [{**r, "names": 1} for r in rows]
    more = 0
    if not every and len(shown) > SHOW_AT_MOST:
        more, shown = len(shown) - SHOW_AT_MOST, shown[:SHOW_AT_MOST]
    t = Table(title=f"tensors ({plural(len(rows), 'name')}, in execution order)", title_justify="left")
    cols = ("name", "names", "dtype", "records", "with values", "NaN", "Inf") if folded else \
        ("name", "dtype", "records", "with values", "NaN", "Inf")
    for col in cols:
        t.add_column(col, justify="left" if col in ("name", "dtype") else "right")
    for r in shown:
        bad = "red" if (r["nan"] or r["inf"]) else ""
        cells: list[str | Text] = [r["name"]]
        if folded:
            cells.append(f"{r['names']:,}" if r["names"] > 1 else "")
        cells += [r["dtype"], f"{r['records']:,}", f"{r['with_values']:,}", Text(f"{r['nan']:,}", style=bad),
                  Text(f"{r['inf']:,}", style=bad)]
        t.add_row(*cells)
    notes = []
    if folded:
        notes.append(f"names differing only in numbers folded into # ({plural(len(rows), 'name')} in "
                     f"{plural(len(shown) + more, 'row')})")
    if more:
        notes.append(f"… {plural(more, 'more row')} not shown")
    return t, ("; ".join(notes) + "; --all lists every tensor") if notes else None


def render_info(info: dict[str, Any], console: Console, *, every: bool = False) -> None:
    """Print a trace summary: state and metadata first, then heads, tensors and parts.

    Args:
        info: the dict from :func:`tracefmt.validate.summarize`.
        console: where to print.
        every: list every tensor name (no folding, no cut).
    """
    meta = info["metadata"]
    state = Text("complete", style="green") if info["complete"] else Text(
        "INCOMPLETE — interrupted or still being written; showing what was flushed", style="bold yellow"
    )
    console.print(Text.assemble((info["path"], "bold"), "  format ", info["format_version"] or "?", "  ", state))
    facts = [
        ("model", meta.get("model")),
        ("runtime", " ".join(x for x in (meta.get("runtime"), meta.get("runtime_version")) if x) or None),
        ("precision", meta.get("precision")),
        ("device", meta.get("device")),
        ("producer", f"{meta.get('producer')} {meta.get('producer_version')}"),
        ("created", meta.get("created")),
        ("command", " ".join(meta["command"]) if meta.get("command") else None),
        ("watched", ", ".join(f"{k}={v}" for k, v in meta.get("watched", {}).items()) or None),
        ("vocab", f"{info['vocab_size']:,} pieces" if info.get("vocab_size") is not None else None),
        ("tags", ", ".join(f"{k}={v}" for k, v in meta.get("tags", {}).items()) or None),
    ]
    grid = Table.grid(padding=(0, 2))
    for key, value in facts:
        if value:
            grid.add_row(Text(key, style="dim"), Text(str(value)))
    console.print(grid)
    size = sum(info["bytes"].values())
    console.print(
        f"{plural(info['samples'], 'sample')}, {plural(info['steps'], 'step')} (longest "
        f"{info['max_steps_per_sample']:,}), {plural(info['decisions'], 'decision')}, "
        f"{plural(info['tensors'], 'tensor record')}; {_mb(size)} on disk "
        + "(" + ", ".join(f"{k} {_mb(v)}" for k, v in sorted(info["bytes"].items())) + ")",
        highlight=False,
    )
    if info["heads"]:
        t = Table(title="decision heads", title_justify="left")
        t.add_column("head")
        t.add_column("decisions", justify="right")
        t.add_column("min margin", justify="right")
        for head, h in info["heads"].items():
            m = h["min_margin"]
            t.add_row(head, f"{h['decisions']:,}", "—" if m is None else f"{m:.4g}")
        console.print(t)
    if info["tensor_names"]:
        table, note = tensor_table(info["tensor_names"], every=every)
        console.print(table)
        if note:
            console.print(Text(note, style="dim"))
    if info["sample_ids"]:
        more = info["samples"] - len(info["sample_ids"])
        console.print("samples: " + ", ".join(info["sample_ids"]) + (f", … ({more:,} more)" if more else ""),
                      highlight=False)
    if len(info["parts"]) > 1 or not info["complete"]:
        t = Table(title="parts", title_justify="left")
        for col in ("part", "status", "writer", "decisions", "tensors", "values"):
            t.add_column(col)
        for p in info["parts"]:
            alive = {True: "running", False: "gone", None: ""}[p["writer_alive"]]
            t.add_row(p["id"], p["status"] + (" (damaged tail dropped)" if p["damaged_tail"] else ""),
                      f"{p['host']}:{p['pid']} {alive}", *(f"{p[k]:,}" if p[k] is not None else "–"
                                                           for k in ("decisions", "tensors", "values")))
        console.print(t)
