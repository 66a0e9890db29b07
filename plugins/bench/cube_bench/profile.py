"""Sampling the server's Python stacks during a bench (``cube bench create --profile``), with
py-spy: which functions the server's threads were running while it served the creates.

py-spy samples another process from outside (it reads the target's memory; root or ptrace
rights), so the server runs unchanged. ``--format raw`` writes collapsed stacks, one line per
distinct stack (``frame;frame;... count``, outermost first): flamegraph tools draw them, and
:func:`summary` ranks the functions by the samples they were on the stack (inclusive) and on top
of it (self), which is what the bench reports.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

RATE_HZ = 200
"""Samples per second (py-spy's default is 100; the creates of one wave last a few seconds)."""


def py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextlib.contextmanager
def recording(pid: int, path: Path, *, rate_hz: int = RATE_HZ) -> Iterator[Path | None]:
    """Sample ``pid`` (all its threads, idle ones left out) into ``path`` while the block runs;
    yields None (and samples nothing) when py-spy is not installed."""
    exe = py_spy()
    if exe is None:
        log.warning("bench: py-spy is not installed; no profile (pip install cube-bench)")
        yield None
        return
    with path.with_suffix(".log").open("w") as out:
        proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate_hz),
                                 "--nonblocking", "--output", str(path)], stdout=out, stderr=subprocess.STDOUT)
    try:
        yield path
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Windows:
    """Sample ``pid`` only in windows (``start()`` .. ``stop()``, e.g. from a wave's first create to
    its last answer), each into a file of its own, then :meth:`merge` them into ``path`` (collapsed
    stacks add up). Both calls return at once (py-spy is stopped by a signal and waited for
    later), so they can run in the middle of the measured work; ``lead_s`` after each start lets
    py-spy attach before the work begins."""

    def __init__(self, pid: int, path: Path, *, rate_hz: int = RATE_HZ, lead_s: float = 0.5) -> None:
        self.pid, self.path, self.rate_hz, self.lead_s = pid, path, rate_hz, lead_s
        self.exe = py_spy()
        self.parts: list[Path] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._stopped: list[subprocess.Popen[bytes]] = []
        if self.exe is None:
            log.warning("bench: py-spy is not installed; no profile (pip install cube-bench)")

    def start(self) -> float:
        """Start a window; the seconds to wait before the work (py-spy attaching)."""
        if self.exe is None:
            return 0.0
        part = self.path.with_name(f"{self.path.stem}-w{len(self.parts)}{self.path.suffix}")
        self.parts.append(part)
        with part.with_suffix(".log").open("w") as out:
            self._proc = subprocess.Popen([self.exe, "record", "--pid", str(self.pid), "--format", "raw", "--rate",
                                           str(self.rate_hz), "--nonblocking", "--output", str(part)],
                                          stdout=out, stderr=subprocess.STDOUT)
        return self.lead_s

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
            self._stopped.append(self._proc)
            self._proc = None

    def merge(self) -> Path | None:
        """Wait for every window's py-spy; their stacks in ``path`` (None: nothing recorded)."""
        self.stop()
        for proc in self._stopped:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._stopped.clear()
        if not self.parts:
            return None
        with self.path.open("w") as merged:
            for part in self.parts:
                with contextlib.suppress(OSError):
                    merged.write(part.read_text(errors="replace"))
        return self.path


def _function(frame: str) -> str:
    """``name (path/to/module.py:line)`` -> ``name (module.py)``: one entry per function."""
    name, _, where = frame.partition(" (")
    file = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({file.rsplit('/', 1)[-1]})" if file else name


def summary(path: Path, top: int = 25) -> dict[str, object]:
    """The sample count and the ``top`` functions by inclusive and by self samples, in % of all."""
    inclusive: Counter[str] = Counter()
    self_: Counter[str] = Counter()
    total = 0
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not stack or not count_text.isdigit():
                continue
            count = int(count_text)
            frames = [_function(f) for f in stack.split(";")]
            total += count
            for name in set(frames):
                inclusive[name] += count
            self_[frames[-1]] += count

    def ranked(counter: Counter[str]) -> list[list[object]]:
        return [[name, round(100 * n / total, 1)] for name, n in counter.most_common(top)] if total else []

    return {"file": str(path), "samples": total, "rate_hz": RATE_HZ, "inclusive_pct": ranked(inclusive),
            "self_pct": ranked(self_)}
