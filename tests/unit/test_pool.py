from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from cube_core._host import PluginHost
from cube_core.config import LoadedConfig
from cube_core.embedded import Embedded
from cube_core.models import SandboxSpec
from cube_core.pool import POOL_TEAM
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
    cube = Embedded(host, SqliteStore(tmp_path / "db"))
    service, agent = cube.service, cube.agent
    await cube.start()
    try:
        await agent.ensure_templates(("base",))
        await _wait_for(lambda: agent.pool.sizes() == {"base": 2})
        members = service.store.list_sandboxes(team_id=POOL_TEAM)
        assert len(members) == 2 and all(m.state == SandboxState.PAUSED for m in members)
        assert all(not agent.vmm.vms[m.sandbox_id]["running"] for m in members)
        for m in members:  # warmed up while running, then paused
            ops = [op for op, vm in agent.vmm.calls if vm == m.sandbox_id]
            assert ops == ["restore", "personalize", "warm_up"], ops

        sb = await service.create(SandboxSpec(template_id="base", team_id="t", env_vars={"X": "1"}))
        assert agent.pool.hits == 1
        vm_id = sb.runtime.vm.vm_id
        assert vm_id in {m.sandbox_id for m in members}  # the sandbox runs in a pool member's VM
        assert agent.vmm.vms[vm_id]["running"] and agent.vmm.vms[vm_id]["env"] == {"X": "1"}
        await _wait_for(lambda: agent.pool.sizes() == {"base": 2})  # refilled

        await service.kill("t", sb.sandbox_id)
        assert vm_id not in agent.vmm.vms
    finally:
        await cube.stop()
    assert cube.store.list_sandboxes(team_id=POOL_TEAM) == []  # members destroyed on stop
    assert agent.vmm.vms == {}


async def test_pool_members_of_a_crashed_run_are_destroyed(cube_config_factory: Callable[..., LoadedConfig],
                                                            tmp_path: Path) -> None:
    host = PluginHost(_pooled(cube_config_factory, 1)).load()
    first = Embedded(host, SqliteStore(tmp_path / "db"))
    await first.start()
    await first.agent.ensure_templates(("base",))
    await _wait_for(lambda: first.agent.pool.sizes() == {"base": 1})
    first.agent.pool._task.cancel()  # simulate a crash: nothing is cleaned up
    leftover = first.store.list_sandboxes(team_id=POOL_TEAM)[0]
    second = Embedded(host, SqliteStore(tmp_path / "db"))
    await second.start()
    try:
        assert leftover.sandbox_id not in second.agent.vmm.vms
        assert second.store.get_sandbox(leftover.sandbox_id) is None
        assert not (second.agent.storage.root / "disks" / f"{leftover.sandbox_id}.qcow2").exists()
    finally:
        await second.stop()


async def test_pool_warm_up_can_be_turned_off(cube_config_factory: Callable[..., LoadedConfig],
                                              tmp_path: Path) -> None:
    cfg = cube_config_factory()
    host = PluginHost(cube_config_factory(cfg.text.replace(
        "pool = { size = 0 }", "pool = { size = 1, warm_up = false }"))).load()
    cube = Embedded(host, SqliteStore(tmp_path / "db"))
    agent = cube.agent
    await cube.start()
    try:
        await agent.ensure_templates(("base",))
        await _wait_for(lambda: agent.pool.sizes() == {"base": 1})
        assert not [op for op, _ in agent.vmm.calls if op == "warm_up"]
    finally:
        await cube.stop()
