"""Progress of ``trace diff`` on stderr: a rich bar on a terminal, plain periodic lines otherwise."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from steptrace.tui.render.wording import ratio

#: Seconds between plain progress lines off a terminal.
PLAIN_EVERY = 5.0


@contextmanager
def progress_bar(console: Console, *, enabled: bool,
                 every: float = PLAIN_EVERY) -> Iterator[Callable[[str, int, int], None] | None]:
    """Yield a ``progress(stage, done, total)`` callback for ``console`` (stderr), or None when
    disabled: a rich bar on a terminal, else plain lines (``diff: tensors 1,200 / 5,000 (24 %)``)
    when a stage starts and ends and at most every ``every`` seconds between, for CI logs."""
    if not enabled:
        yield None
        return
    if not console.is_terminal:
        last: dict[str, float] = {}

        def line(stage: str, done: int, total: int) -> None:
            now = time.monotonic()
            first = stage not in last
            if not (first or done >= total or now - last[stage] >= every):
                return
            if not first and done >= total and last[stage] == -1.0:
                return
            last[stage] = -1.0 if done >= total else now
            pct = f" ({100 * done / total:.0f} %)" if total else ""
            console.file.write(f"diff: {stage} {ratio(done, total)}{pct}\n")
            console.file.flush()

        yield line
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as prog:
        tasks: dict[str, int] = {}

        def cb(stage: str, done: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = prog.add_task(stage, total=total)
            prog.update(tasks[stage], completed=done, total=total)

        yield cb
