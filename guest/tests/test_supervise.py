"""``python -m cube_guest.supervise`` restarts the agent when it is killed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import GUEST_DIR, free_port, http


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                         text=True).stdout
    return [int(x) for x in out.split()]


def _wait_health(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if http("GET", f"http://127.0.0.1:{port}/health")[0] == 204:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("agent did not come up")


def test_supervisor_restarts_killed_agent(tmp_path: Path, sandbox_user: object) -> None:
    port = free_port()
    args = [sys.executable, "-m", "cube_guest.supervise", "--envd-port", str(port),
            "--bind", "127.0.0.1", "--no-interpreter", "--ctl", "",
            "--state-dir", str(tmp_path / "state"), "--no-system-calls",
            "--system-root", str(tmp_path)]
    sup = subprocess.Popen(args, env=dict(os.environ, PYTHONPATH=str(GUEST_DIR)),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_health(port)
        first = _children(sup.pid)
        assert len(first) == 1
        os.kill(first[0], signal.SIGKILL)
        time.sleep(0.2)
        _wait_health(port)
        second = _children(sup.pid)
        assert len(second) == 1 and second != first
    finally:
        sup.terminate()
        sup.wait(20)
    assert _children(sup.pid) == []
