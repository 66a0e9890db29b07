"""Progress display for long work (kernel build, template builds): one lane per job that runs at
the same time, rich bars with the time left on a terminal, progress events elsewhere (CI, journald,
pipes): log lines with ``event="progress"``, ``task``, ``job``, ``step``, ``percent``,
``elapsed_s`` and ``eta_s``, JSON objects when the log format is JSON (the default off a terminal).

A lane is a :data:`cube_core.storage.Progress` function (``(step, fraction or None)``); a board
hands out lanes by name, so work that overlaps (the kernel build beside a template's debootstrap)
shows side by side instead of overwriting one bar.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import structlog
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cube_core.storage import Progress as ProgressFn

log = structlog.get_logger(__name__)

LaneFactory = Callable[[str], ProgressFn]
"""``lane(name)`` -> the progress function of the job ``name`` (one bar, or log lines)."""


def seconds_left(started: float, fraction: float | None, now: float | None = None) -> int | None:
    """Linear estimate of the seconds left for a job ``fraction`` done that started at ``started``
    (``time.monotonic()``); None while nothing can be said (no fraction yet, or under 2 %)."""
    if fraction is None or fraction < 0.02:
        return None
    if fraction >= 1.0:
        return 0
    elapsed = (now if now is not None else time.monotonic()) - started
    return max(0, round(elapsed * (1.0 - fraction) / fraction))


@contextmanager
def progress_board(title: str) -> Iterator[LaneFactory]:
    """Yield ``lane(name)``: a bar per lane on a terminal, log lines (with ``eta_s``) elsewhere."""
    if sys.stderr.isatty():
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                      TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
                      transient=False) as bar:
            lock = threading.Lock()

            def tty_lane(name: str) -> ProgressFn:
                label = f"{title} {name}".strip()
                with lock:
                    task = bar.add_task(label, total=1.0)

                def update(step: str, fraction: float | None) -> None:
                    with lock:
                        bar.update(task, description=f"{label}: {step}",
                                   completed=fraction if fraction is not None else bar.tasks[task].completed)

                return update

            yield tty_lane
        return

    def log_lane(name: str) -> ProgressFn:
        started = time.monotonic()
        last_phase, last_pct, last_at = [""], [-10], [0.0]

        def report(step: str, fraction: float | None) -> None:
            # a line per phase ("debootstrap", not each package it unpacks), per 10 %, or per 30 s
            pct, phase, now = int((fraction or 0) * 100), step.split(":", 1)[0], time.monotonic()
            if phase != last_phase[0] or pct >= last_pct[0] + 10 or now - last_at[0] >= 30 or pct >= 100:
                last_phase[0], last_pct[0], last_at[0] = phase, pct, now
                log.info("progress", task=title, **({"job": name} if name else {}), step=step,
                         percent=pct if fraction is not None else None,
                         elapsed_s=round(time.monotonic() - started), eta_s=seconds_left(started, fraction))

        return report

    yield log_lane


@contextmanager
def progress_reporter(title: str) -> Iterator[ProgressFn]:
    """One job's progress (a board with a single lane)."""
    with progress_board(title) as lane:
        yield lane("")
