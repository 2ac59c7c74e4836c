"""Rich rendering of ``trace info`` (the values come from tracefmt.validate.summarize)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def render_info(info: dict[str, Any], console: Console) -> None:
    """Print a trace summary: state and metadata first, then heads, tensors and parts.

    Args:
        info: the dict from :func:`tracefmt.validate.summarize`.
        console: where to print.
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
        f"{info['samples']:,} sample(s), {info['steps']:,} step(s) (longest {info['max_steps_per_sample']:,}), "
        f"{info['decisions']:,} decision(s), {info['tensors']:,} tensor record(s); {_mb(size)} on disk "
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
        t = Table(title="tensors", title_justify="left")
        for col in ("name", "dtype", "records", "with values", "NaN", "Inf"):
            t.add_column(col, justify="left" if col in ("name", "dtype") else "right")
        for r in info["tensor_names"]:
            bad = "red" if (r["nan"] or r["inf"]) else ""
            t.add_row(r["name"], r["dtype"], f"{r['records']:,}", f"{r['with_values']:,}",
                      Text(f"{r['nan']:,}", style=bad), Text(f"{r['inf']:,}", style=bad))
        console.print(t)
    if info["sample_ids"]:
        more = info["samples"] - len(info["sample_ids"])
        console.print("samples: " + ", ".join(info["sample_ids"]) + (f", … (+{more:,})" if more else ""),
                      highlight=False)
    if len(info["parts"]) > 1 or not info["complete"]:
        t = Table(title="parts", title_justify="left")
        for col in ("part", "status", "writer", "decisions", "tensors", "values"):
            t.add_column(col)
        for p in info["parts"]:
            alive = {True: "running", False: "gone", None: ""}[p["writer_alive"]]
            t.add_row(p["id"], p["status"] + (" (damaged tail dropped)" if p["damaged_tail"] else ""),
                      f"{p['host']}:{p['pid']} {alive}", str(p["decisions"]), str(p["tensors"]), str(p["values"]))
        console.print(t)
