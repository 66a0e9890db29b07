"""Progress display for long work (kernel build, template build): rich bars on a terminal,
plain log lines elsewhere (CI, journald)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

import structlog
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from cube_core.storage import Progress as ProgressFn

log = structlog.get_logger(__name__)


@contextmanager
def progress_reporter(title: str) -> Iterator[ProgressFn]:
    if sys.stderr.isatty():
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), transient=False) as bar:
            task = bar.add_task(title, total=1.0)

            def update(step: str, fraction: float | None) -> None:
                bar.update(task, description=f"{title}: {step}",
                           completed=fraction if fraction is not None else bar.tasks[0].completed)

            yield update
            bar.update(task, completed=1.0)
        return
    last: list[str] = [""]
    last_pct: list[int] = [-10]

    def report(step: str, fraction: float | None) -> None:
        pct = int((fraction or 0) * 100)
        if step != last[0] or pct >= last_pct[0] + 10:
            last[0], last_pct[0] = step, pct
            log.info(title, step=step, percent=pct if fraction is not None else None)

    yield report
