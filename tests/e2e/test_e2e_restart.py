"""A restart of `cube serve` (the node agent) while sandboxes run or are paused: they are all still
usable after; one whose deadline passed while Cube was down is cleaned up."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import httpx
import pytest
from cube_e2e import CubeServer
from e2b import Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import NotFoundException

from cube_core.store import SqliteStore

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


def test_sandboxes_survive_a_restart(cube_server: CubeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in cube_server.env().items():
        monkeypatch.setenv(name, value)
    sandboxes = [Sandbox.create(template="base", timeout=600) for _ in range(5)]
    try:
        for i, sbx in enumerate(sandboxes):
            sbx.files.write("/home/user/who.txt", str(i))
            sbx.commands.run("sleep 3600", background=True)
        boot_ids = [s.commands.run("cat /proc/sys/kernel/random/boot_id").stdout for s in sandboxes]
        sandboxes[0].pause()
        short = Sandbox.create(template="base", timeout=5)
        sandboxes.append(short)
        short_pid = _qemu_pid(cube_server, short.sandbox_id)

        cube_server.stop(signal.SIGTERM)
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{cube_server.url}/health", timeout=2)
        time.sleep(6)  # the short one's deadline passes while Cube is down
        cube_server.start()

        paused = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert sandboxes[0].sandbox_id in [s.sandbox_id for s in paused]  # still paused, not resumed
        with pytest.raises(NotFoundException):
            Sandbox.connect(short.sandbox_id)
        assert not _alive(short_pid), "the expired sandbox's VM is still running"
        sandboxes.pop()
        for i, sbx in enumerate(sandboxes):
            again = Sandbox.connect(sbx.sandbox_id)
            assert again.files.read("/home/user/who.txt") == str(i)
            assert again.commands.run("cat /proc/sys/kernel/random/boot_id").stdout == boot_ids[i]
            assert "sleep 3600" in again.commands.run("ps -eo args").stdout
    finally:
        for sbx in sandboxes:
            try:
                sbx.kill()
            except Exception:
                pass


def _qemu_pid(server: CubeServer, sandbox_id: str) -> int:
    store = SqliteStore(server.state_dir / "cube.db")
    try:
        record = store.get_sandbox(sandbox_id)
    finally:
        store.close()
    assert record is not None
    assert record.runtime.vm is not None and record.runtime.vm.pid is not None
    return record.runtime.vm.pid


def _alive(pid: int) -> bool:
    """Running, a few seconds after it was told to stop (an exited QEMU no longer has a parent
    that waits for it, so it may linger as a zombie until init reaps it: that counts as gone)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state in ("Z", "X"):
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.1)
