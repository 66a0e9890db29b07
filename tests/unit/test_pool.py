from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from cube_core._host import PluginHost
from cube_core.config import LoadedConfig
from cube_core.models import SandboxSpec
from cube_core.pool import POOL_TEAM
from cube_core.service import SandboxService
from cube_core.state import SandboxState
from cube_core.store import SqliteStore


async def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _pooled(factory: Callable[..., LoadedConfig], size: int) -> LoadedConfig:
    cfg = factory()
    return factory(cfg.text.replace("pool = { size = 0 }", f"pool = {{ size = {size} }}"))


async def test_pool_fills_serves_and_refills(cube_config_factory: Callable[..., LoadedConfig],
                                             tmp_path: Path) -> None:
    host = PluginHost(_pooled(cube_config_factory, 2)).load()
    service = SandboxService(host, SqliteStore(tmp_path / "db"))
    await service.start()
    try:
        await service.ensure_templates(("base",))
        await _wait_for(lambda: service.pool.sizes() == {"base": 2})
        members = service.store.list_sandboxes(team_id=POOL_TEAM)
        assert len(members) == 2 and all(m.state == SandboxState.PAUSED for m in members)
        assert all(not service.vmm.vms[m.sandbox_id]["running"] for m in members)
        for m in members:  # warmed up while running, then paused
            ops = [op for op, vm in service.vmm.calls if vm == m.sandbox_id]
            assert ops == ["restore", "personalize", "warm_up"], ops

        sb = await service.create(SandboxSpec(template_id="base", team_id="t", env_vars={"X": "1"}))
        assert service.pool.hits == 1
        vm_id = sb.runtime["vm"]["vm_id"]
        assert vm_id in {m.sandbox_id for m in members}  # the sandbox runs in a pool member's VM
        assert service.vmm.vms[vm_id]["running"] and service.vmm.vms[vm_id]["env"] == {"X": "1"}
        await _wait_for(lambda: service.pool.sizes() == {"base": 2})  # refilled

        await service.kill("t", sb.sandbox_id)
        assert vm_id not in service.vmm.vms
    finally:
        await service.stop()
    assert service.store.list_sandboxes(team_id=POOL_TEAM) == []  # members destroyed on stop
    assert service.vmm.vms == {}


async def test_pool_members_of_a_crashed_run_are_destroyed(cube_config_factory: Callable[..., LoadedConfig],
                                                            tmp_path: Path) -> None:
    host = PluginHost(_pooled(cube_config_factory, 1)).load()
    first = SandboxService(host, SqliteStore(tmp_path / "db"))
    await first.start()
    await first.ensure_templates(("base",))
    await _wait_for(lambda: first.pool.sizes() == {"base": 1})
    first.pool._task.cancel()  # simulate a crash: nothing is cleaned up
    leftover = first.store.list_sandboxes(team_id=POOL_TEAM)[0]
    second = SandboxService(host, SqliteStore(tmp_path / "db"))
    await second.start()
    try:
        assert leftover.sandbox_id not in second.vmm.vms
        assert second.store.get_sandbox(leftover.sandbox_id) is None
        assert not (second.storage.root / "disks" / f"{leftover.sandbox_id}.qcow2").exists()
    finally:
        await second.stop()


async def test_pool_warm_up_can_be_turned_off(cube_config_factory: Callable[..., LoadedConfig],
                                              tmp_path: Path) -> None:
    cfg = cube_config_factory()
    host = PluginHost(cube_config_factory(cfg.text.replace(
        "pool = { size = 0 }", "pool = { size = 1, warm_up = false }"))).load()
    service = SandboxService(host, SqliteStore(tmp_path / "db"))
    await service.start()
    try:
        await service.ensure_templates(("base",))
        await _wait_for(lambda: service.pool.sizes() == {"base": 1})
        assert not [op for op, _ in service.vmm.calls if op == "warm_up"]
    finally:
        await service.stop()
