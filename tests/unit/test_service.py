from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from cube_core._host import PluginHost
from cube_core.embedded import Embedded
from cube_core.errors import (
    AuthError,
    InvalidStateError,
    SandboxNotFoundError,
    TemplateNotFoundError,
    VmmError,
)
from cube_core.models import Node, SandboxRuntime, SandboxSpec
from cube_core.state import SandboxState
from cube_core.store import SqliteStore


@pytest.fixture
async def cube(plugin_host: Callable[..., PluginHost], tmp_path: Path) -> AsyncIterator[Embedded]:
    pair = Embedded(plugin_host(), SqliteStore(tmp_path / "cube.db"))
    await pair.start()
    await pair.agent.ensure_templates(("base",))
    yield pair
    await pair.stop()


def spec(team: str, **kw: Any) -> SandboxSpec:
    return SandboxSpec(template_id="base", team_id=team, **kw)


async def test_create_list_get_kill(cube: Embedded) -> None:
    service, agent = cube.service, cube.agent
    sb = await service.create(spec("t1", metadata={"who": "me"}, env_vars={"A": "1"}))
    assert sb.state == SandboxState.RUNNING
    assert sb.sandbox_id.isalnum() and sb.sandbox_id == sb.sandbox_id.lower() and len(sb.sandbox_id) == 20
    assert sb.isolation == "none"
    assert agent.vmm.vms[sb.sandbox_id]["env"] == {"A": "1"}  # personalized through the guest call
    assert [s.sandbox_id for s in service.list("t1")] == [sb.sandbox_id]
    assert service.list("t1", metadata={"who": "other"}) == []
    await service.kill("t1", sb.sandbox_id)
    assert service.list("t1") == []
    assert sb.sandbox_id not in agent.vmm.vms
    assert agent.network.slots == {}
    assert not any((agent.storage.root / "disks").glob("*"))
    with pytest.raises(SandboxNotFoundError):
        service.get("t1", sb.sandbox_id)


async def test_teams_do_not_see_each_other(cube: Embedded) -> None:
    service = cube.service
    sb = await service.create(spec("t1"))
    assert service.list("t2") == []
    with pytest.raises(SandboxNotFoundError):
        service.get("t2", sb.sandbox_id)
    with pytest.raises(SandboxNotFoundError):
        await service.kill("t2", sb.sandbox_id)
    assert service.get("t1", sb.sandbox_id).state == SandboxState.RUNNING


async def test_pause_resume_connect_guards(cube: Embedded) -> None:
    service, agent = cube.service, cube.agent
    sb = await service.create(spec("t1"))
    with pytest.raises(InvalidStateError):
        await service.resume("t1", sb.sandbox_id)
    paused = await service.pause("t1", sb.sandbox_id)
    assert paused.state == SandboxState.PAUSED
    with pytest.raises(InvalidStateError):
        await service.pause("t1", sb.sandbox_id)
    vm_id = sb.runtime.vm.vm_id
    assert ("sync_clock", vm_id) not in agent.vmm.calls
    connected = await service.connect("t1", sb.sandbox_id, timeout_s=600)
    assert connected.state == SandboxState.RUNNING
    assert agent.vmm.calls[-1] == ("sync_clock", vm_id)  # the guest's clock stood still while paused
    assert connected.end_at > sb.end_at
    shorter = await service.connect("t1", sb.sandbox_id, timeout_s=1)
    assert shorter.end_at == connected.end_at  # connect never shortens the deadline


async def test_unknown_template(cube: Embedded) -> None:
    service = cube.service
    with pytest.raises(TemplateNotFoundError):
        await service.create(SandboxSpec(template_id="nope", team_id="t1"))


async def test_timeout_kills_or_pauses(cube: Embedded) -> None:
    service = cube.service
    killed = await service.create(spec("t1", timeout_s=0))
    paused = await service.create(spec("t1", timeout_s=0, auto_pause=True))
    kept = await service.create(spec("t1", timeout_s=60))
    await asyncio.sleep(0.01)
    assert await service.reap_expired() == 2
    assert service.store.get_sandbox(killed.sandbox_id).state == SandboxState.KILLED
    assert service.get("t1", paused.sandbox_id).state == SandboxState.PAUSED
    assert service.get("t1", kept.sandbox_id).state == SandboxState.RUNNING


async def test_failed_create_leaves_nothing(cube: Embedded, monkeypatch: pytest.MonkeyPatch) -> None:
    service, agent = cube.service, cube.agent

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise VmmError("restore exploded")

    monkeypatch.setattr(agent.vmm, "restore", broken)
    with pytest.raises(VmmError):
        await service.create(spec("t1"))
    assert agent.network.slots == {}
    assert not any((agent.storage.root / "disks").glob("*"))
    assert service.list("t1") == []


async def test_restart_keeps_sandboxes(plugin_host: Callable[..., PluginHost], tmp_path: Path) -> None:
    host = plugin_host()
    first = Embedded(host, SqliteStore(tmp_path / "cube.db"))
    await first.start()
    await first.agent.ensure_templates(("base",))
    sb = await first.service.create(spec("t1"))
    gone = await first.service.create(spec("t1"))
    await first.stop()
    first.agent.vmm.vms.pop(gone.sandbox_id)  # this VM died while the node agent was down
    second = Embedded(host, SqliteStore(tmp_path / "cube.db"))
    await second.start()
    try:
        assert [s.sandbox_id for s in second.service.list("t1")] == [sb.sandbox_id]
        lost = second.store.get_sandbox(gone.sandbox_id)
        assert lost is not None and lost.state == SandboxState.ERROR
        assert lost.error == "its VM was lost while the node agent was down"
        assert second.agent._live[sb.sandbox_id].vm == sb.runtime.vm  # re-attached by the agent
        await second.service.pause("t1", sb.sandbox_id)
    finally:
        await second.stop()


async def test_api_keys(cube: Embedded) -> None:
    service = cube.service
    key, secret = service.create_api_key("acme")
    assert secret.startswith("e2b_") and len(secret) == 44
    assert key.key_hash != secret and secret not in key.model_dump_json()
    assert service.authenticate(secret).name == "acme"
    _, other = service.create_api_key("acme")
    assert service.authenticate(other).team_id == service.authenticate(secret).team_id
    for bad in (None, "", "nope", "e2b_" + "0" * 40):
        with pytest.raises(AuthError):
            service.authenticate(bad)
    service.revoke_api_key(key.key_id)
    with pytest.raises(AuthError):
        service.authenticate(secret)


async def test_pool_misses_queue_for_vm_starts_in_arrival_order(
        plugin_host: Callable[..., PluginHost], cube_config_factory: Callable[..., Any], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cube_config_factory()
    text = cfg.text.replace("pool = { size = 0 }", "pool = { size = 0 }\nmax_parallel_starts = 2")
    cube = Embedded(plugin_host(cube_config_factory(text)), SqliteStore(tmp_path / "gate.db"))
    await cube.start()
    await cube.agent.ensure_templates(("base",))
    running, peak, order = 0, 0, []
    real_start = cube.agent._start_vm

    async def slow_start(sandbox: Any, *args: Any) -> SandboxRuntime:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        order.append(sandbox.metadata["n"])
        await asyncio.sleep(0.02)
        runtime = await real_start(sandbox, *args)
        running -= 1
        return runtime

    monkeypatch.setattr(cube.agent, "_start_vm", slow_start)
    try:
        made = await asyncio.gather(*(cube.service.create(spec("t1", metadata={"n": str(i)})) for i in range(8)))
        assert all(sb.state == SandboxState.RUNNING for sb in made)
        assert peak == 2  # never more than max_parallel_starts at once, and the gate was used
        assert order == [str(i) for i in range(8)]  # first come, first served
    finally:
        await cube.stop()


async def test_node_usage_is_kept_true(cube: Embedded) -> None:
    """The node record the scheduler reads (the agent's report, written by each heartbeat)
    counts the live sandboxes, at the template's size (what a client puts in the spec does not
    change the VM, so it does not count either)."""
    service, agent = cube.service, cube.agent

    def record() -> Node:
        written = agent.beat()  # a heartbeat
        assert service.list_nodes() == [written]  # what the control plane places from
        return written

    template = service.get_template("base")
    node = record()
    assert (node.cpu_used, node.memory_mb_used, node.sandboxes, node.sandboxes_paused) == (0, 0, 0, 0)
    assert node.templates == (template.template_id,)
    a = await service.create(spec("t1", memory_mb=4096, cpu_count=8))
    assert (a.memory_mb, a.cpu_count) == (template.memory_mb, template.cpu_count)
    b = await service.create(spec("t2"))
    node = record()
    assert (node.cpu_used, node.memory_mb_used, node.sandboxes, node.sandboxes_paused) == (
        2 * template.cpu_count, 2 * template.memory_mb, 2, 0)
    await service.pause("t1", a.sandbox_id)  # a paused sandbox keeps its memory, uses no vCPU
    await service.create(spec("t3"))
    await service.kill("t3", service.list("t3")[0].sandbox_id)
    node = record()
    assert (node.cpu_used, node.memory_mb_used, node.sandboxes, node.sandboxes_paused) == (
        template.cpu_count, 2 * template.memory_mb, 2, 1)
    await service.kill("t1", a.sandbox_id)
    await service.kill("t2", b.sandbox_id)
    node = record()
    assert (node.cpu_used, node.memory_mb_used, node.sandboxes, node.sandboxes_paused) == (0, 0, 0, 0)
