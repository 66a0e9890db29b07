"""Running the external tools (qemu-img, cp, mkfs.ext4, debootstrap, tar) from worker threads."""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import structlog
from cube_core import StorageError

log = structlog.get_logger(__name__)

TAIL_LINES = 60


class Cancelled(Exception):
    """The caller gave up on a build (its task was cancelled); internal, never leaves the plugin."""


def require_tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise StorageError(f"{name} not found on PATH (apt-get install {package})")
    return path


def run(argv: Sequence[str | Path], *, on_line: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None, env: dict[str, str] | None = None,
        cwd: Path | None = None) -> str:
    """Run ``argv`` to completion and return its combined output (stderr merged into stdout).

    ``on_line`` sees each output line as it comes; ``cancel`` kills the whole process group.
    A non-zero exit raises :class:`StorageError` carrying the tail of the output.
    """
    args = [str(a) for a in argv]
    out: list[str] = []
    try:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env, cwd=cwd, start_new_session=True,
                                stdin=subprocess.DEVNULL)
    except OSError as exc:
        raise StorageError(f"cannot run {args[0]}: {exc}", argv=args) from exc
    done = threading.Event()
    watcher = None
    if cancel is not None:
        watcher = threading.Thread(target=_kill_on_cancel, args=(proc, cancel, done), daemon=True)
        watcher.start()
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if on_line is not None:
                on_line(line.rstrip("\n"))
        code = proc.wait()
    finally:
        done.set()
        if proc.poll() is None:
            _killpg(proc)
            proc.wait()
        if watcher is not None:
            watcher.join()
        if proc.stdout is not None:
            proc.stdout.close()
    text = "".join(out)
    if cancel is not None and cancel.is_set():
        raise Cancelled(args[0])
    if code != 0:
        tail = "".join(collections.deque(out, maxlen=TAIL_LINES)).strip()
        raise StorageError(f"{' '.join(args[:3])} ... exited with {code}: {tail[-2000:]}",
                           argv=args, returncode=code, output=tail)
    return text


def _kill_on_cancel(proc: subprocess.Popen[str], cancel: threading.Event, done: threading.Event) -> None:
    while not done.is_set():
        if cancel.wait(0.2):
            log.info("killing cancelled command", pid=proc.pid)
            _killpg(proc)
            return


def _killpg(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
