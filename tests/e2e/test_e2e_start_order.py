"""A pool hit answers the create before its member runs again (the QMP ``cont`` is part of the
sandbox's start, after the answer, with the create message): what a client does right after
``Sandbox.create`` must still order after that start. The real E2B SDK against a real server:
create, then at once kill, pause (then resume) or a command."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator

import pytest
from cube_e2e import CubeServer
from e2b import Sandbox
from e2b import SandboxState as E2bState
from e2b.exceptions import NotFoundException

from cube_core.pool import POOL_TEAM
from cube_core.state import SandboxState
from cube_core.store import SqliteStore

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


def _pool_full(server: CubeServer, template_id: str = "base", timeout: float = 180.0) -> None:
    """Wait until the template's warm-pool member is ready (paused), so the next create is a hit."""
    store = SqliteStore(server.state_dir / "cube.db")
    try:
        deadline = time.monotonic() + timeout
        while not [m for m in store.list_sandboxes(team_id=POOL_TEAM, states=(SandboxState.PAUSED,))
                   if m.template_id == template_id]:
            assert time.monotonic() < deadline, "the warm pool did not refill"
            time.sleep(0.5)
    finally:
        store.close()


def _served_by(server: CubeServer, sandbox_id: str) -> str:
    for line in server.log.read_text().splitlines():
        if "sandbox ready" in line and sandbox_id in line:
            found = re.search(r'served_by\W+(\w+)', line)
            return found.group(1) if found else ""
    return ""


def _qemu_of(sandbox_id: str) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{sandbox_id}"], capture_output=True, text=True)
    return out.stdout.split()


@pytest.fixture
def pool_hit(e2b_env: CubeServer) -> Iterator[Sandbox]:
    _pool_full(e2b_env)
    sbx = Sandbox.create(template="base", timeout=120, envs={"FIRST": "yes"})
    yield sbx
    assert _served_by(e2b_env, sbx.sandbox_id) == "pool"
    failed = [line for line in e2b_env.log.read_text().splitlines()
              if sbx.sandbox_id in line and ("failed to start" in line or "[error" in line)]
    assert not failed, failed
    try:
        sbx.kill()
    except Exception:
        pass


def test_a_kill_right_after_create(pool_hit: Sandbox) -> None:
    pool_hit.kill()
    with pytest.raises(NotFoundException):
        pool_hit.get_info()
    deadline = time.monotonic() + 20
    while _qemu_of(pool_hit.sandbox_id):
        assert time.monotonic() < deadline, "the sandbox's QEMU outlived its kill"
        time.sleep(0.2)


def test_a_pause_right_after_create_then_resume(pool_hit: Sandbox) -> None:
    pool_hit.beta_pause()
    assert pool_hit.get_info().state == E2bState.PAUSED
    resumed = Sandbox.connect(pool_hit.sandbox_id, timeout=120)
    out = resumed.commands.run("echo $FIRST", timeout=60)
    assert out.exit_code == 0 and out.stdout.strip() == "yes"  # the create message was applied before the pause


def test_a_command_right_after_create(pool_hit: Sandbox) -> None:
    out = pool_hit.commands.run("echo $FIRST; cat /proc/sys/kernel/random/boot_id", timeout=60)
    assert out.exit_code == 0 and out.stdout.splitlines()[0] == "yes"
