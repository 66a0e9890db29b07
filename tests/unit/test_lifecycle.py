"""Lifecycle on the fakes: resume by traffic (auto-resume), pause to disk and back, across restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from cube_core._host import PluginHost
from cube_core.embedded import Embedded
from cube_core.errors import UnsupportedOperation
from cube_core.models import Sandbox, SandboxSpec, utcnow
from cube_core.state import SandboxState
from cube_core.store import SqliteStore


@pytest.fixture(autouse=True)
def plenty_of_memory(cube: Embedded) -> None:
    """The host's available memory as the node reports it: well above pause_to_disk_below_mb."""
    cube.agent.memory_probe = lambda: 8192
    cube.agent.beat()


def spec(**kw: Any) -> SandboxSpec:
    return SandboxSpec(template_id="base", team_id="t1", **kw)


def to_disk_after(cube: Embedded, seconds: float) -> None:
    cube.service.settings = cube.service.settings.model_copy(update={"pause_to_disk_after_s": seconds})


def saved_dir(cube: Embedded, sb: Sandbox) -> Path:
    assert sb.runtime.saved is not None
    return cube.agent.storage.root / "snapshots" / sb.runtime.saved.state_id


async def paused_long_ago(cube: Embedded, sb: Sandbox) -> Sandbox:
    """Pause ``sb`` and date the pause an hour back."""
    paused = await cube.service.pause("t1", sb.sandbox_id)
    earlier = paused.evolve(paused_at=utcnow() - timedelta(hours=1))
    cube.store.put_sandbox(earlier)
    return earlier


async def test_concurrent_traffic_resumes_once(cube: Embedded) -> None:
    service, agent = cube.service, cube.agent
    sb = await service.create(spec(timeout_s=90, auto_pause=True, auto_resume=True))
    await service.set_timeout("t1", sb.sandbox_id, 0)
    await asyncio.sleep(0.01)
    assert await service.reap_expired() == 1
    assert service.find(sb.sandbox_id).state == SandboxState.PAUSED
    syncs = agent.vmm.calls.count(("sync_clock", sb.sandbox_id))
    woken = await asyncio.gather(*(service.wake(sb.sandbox_id) for _ in range(6)))
    assert {w.state for w in woken} == {SandboxState.RUNNING}
    assert agent.vmm.calls.count(("sync_clock", sb.sandbox_id)) == syncs + 1  # one resume for all six
    left = (service.find(sb.sandbox_id).end_at - utcnow()).total_seconds()
    assert 80 < left <= 90  # the timeout it was created with, from the resume


async def test_without_auto_resume_traffic_does_not_wake(cube: Embedded) -> None:
    service = cube.service
    sb = await service.create(spec(auto_pause=True))
    await service.pause("t1", sb.sandbox_id)
    assert (await service.wake(sb.sandbox_id)).state == SandboxState.PAUSED
    assert (await service.connect("t1", sb.sandbox_id)).state == SandboxState.RUNNING  # connect always resumes


async def test_pause_to_disk_then_resume(cube: Embedded) -> None:
    service, agent = cube.service, cube.agent
    sb = await service.create(spec(auto_pause=True, auto_resume=True))
    vm_id = sb.runtime.vm.vm_id if sb.runtime.vm else ""
    to_disk_after(cube, 0)
    await paused_long_ago(cube, sb)
    assert await service.write_out_paused() == 0  # 0 s: never
    to_disk_after(cube, 600)
    fresh = await service.create(spec())
    await service.pause("t1", fresh.sandbox_id)  # paused just now: stays in RAM
    before = agent.report().memory_mb_used
    assert await service.write_out_paused() == 1
    assert agent.report().memory_mb_used == before - sb.memory_mb  # on disk: no memory reserved
    out = service.find(sb.sandbox_id)
    assert out.state == SandboxState.PAUSED and out.runtime.on_disk and out.runtime.vm is None
    assert vm_id not in agent.vmm.vms  # its VM ended
    assert (saved_dir(cube, out) / "memory.ram").is_file()
    assert not service.find(fresh.sandbox_id).runtime.on_disk
    assert await service.write_out_paused() == 0  # once
    woken = await service.wake(sb.sandbox_id)
    assert woken.state == SandboxState.RUNNING and woken.runtime.vm is not None and woken.runtime.saved is None
    assert woken.runtime.disk == sb.runtime.disk and woken.runtime.nic == sb.runtime.nic  # its own disk and slot
    assert woken.runtime.vm.vm_id in agent.vmm.vms
    assert not saved_dir(cube, out).exists()  # the saved state is deleted once it runs
    assert service.find(sb.sandbox_id).paused_at is None
    await service.kill("t1", sb.sandbox_id)
    await service.kill("t1", fresh.sandbox_id)
    assert agent.vmm.vms.keys() <= {m.sandbox_id for m in cube.store.list_sandboxes() if m.team_id != "t1"}
    assert not any((agent.storage.root / "disks").glob(f"{sb.sandbox_id}*"))


async def test_kill_of_a_sandbox_on_disk_frees_its_saved_state(cube: Embedded) -> None:
    service, agent = cube.service, cube.agent
    sb = await service.create(spec())
    await paused_long_ago(cube, sb)
    assert await service.write_out_paused() == 1
    out = service.find(sb.sandbox_id)
    directory = saved_dir(cube, out)
    assert directory.is_dir()
    await service.kill("t1", sb.sandbox_id)
    assert not directory.exists()
    assert not any((agent.storage.root / "disks").glob(f"{sb.sandbox_id}*"))
    assert not any(slot.endswith(sb.sandbox_id) for slot in agent.network.slots)


async def test_snapshot_and_network_of_a_sandbox_on_disk(cube: Embedded) -> None:
    service = cube.service
    sb = await service.create(spec())
    await paused_long_ago(cube, sb)
    assert await service.write_out_paused() == 1
    await service.network_audit("t1", sb.sandbox_id)  # its network slot is there without a VM
    ref = await service.snapshot("t1", sb.sandbox_id)  # brought back into RAM, still paused
    after = service.find(sb.sandbox_id)
    assert after.state == SandboxState.PAUSED and not after.runtime.on_disk and ref.vm_state is not None
    copy = await service.create(SandboxSpec(template_id=ref.snapshot_id, team_id="t1"))
    assert copy.state == SandboxState.RUNNING


async def test_a_sandbox_that_cannot_be_written_out_stays_in_ram(cube: Embedded,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    service, agent = cube.service, cube.agent
    tried: list[str] = []

    async def refuse(sandbox_id: str) -> Any:
        tried.append(sandbox_id)
        raise UnsupportedOperation(driver="fake", operation="pause to disk (volumes mounted)")

    monkeypatch.setattr(agent, "pause_to_disk", refuse)
    sb = await service.create(spec())
    await paused_long_ago(cube, sb)
    assert await service.write_out_paused() == 0
    assert await service.write_out_paused() == 0
    assert tried == [sb.sandbox_id]  # not tried again and again
    assert not service.find(sb.sandbox_id).runtime.on_disk
    assert (await service.connect("t1", sb.sandbox_id)).state == SandboxState.RUNNING


async def test_a_sandbox_on_disk_survives_a_restart_and_a_reboot(
        plugin_host: Callable[..., PluginHost], tmp_path: Path) -> None:
    host = plugin_host()
    first = Embedded(host, SqliteStore(tmp_path / "cube.db"))
    await first.start()
    await first.agent.ensure_templates(("base",))
    sb = await first.service.create(spec(auto_pause=True, auto_resume=True))
    await paused_long_ago(first, sb)
    assert await first.service.write_out_paused() == 1
    directory = saved_dir(first, first.service.find(sb.sandbox_id))
    await first.stop()
    network = host.hooks.network_driver()
    assert sb.runtime.nic is not None and sb.runtime.nic.slot_id in network.slots
    network.slots.clear()  # a host reboot: the network slots are gone
    second = Embedded(host, SqliteStore(tmp_path / "cube.db"))
    await second.start()
    try:
        kept = second.service.find(sb.sandbox_id)
        assert kept.state == SandboxState.PAUSED and kept.runtime.on_disk
        assert sb.runtime.nic.slot_id in network.slots  # built again at the node's start
        assert directory.is_dir()  # reconcile's garbage collection kept its saved state
        woken = await second.service.wake(sb.sandbox_id)
        assert woken.state == SandboxState.RUNNING and woken.runtime.vm is not None
        assert not directory.exists()
    finally:
        await second.stop()


async def test_a_sandbox_on_disk_without_its_files_is_failed_at_restart(
        plugin_host: Callable[..., PluginHost], tmp_path: Path) -> None:
    host = plugin_host()
    first = Embedded(host, SqliteStore(tmp_path / "cube.db"))
    await first.start()
    await first.agent.ensure_templates(("base",))
    sb = await first.service.create(spec())
    await paused_long_ago(first, sb)
    assert await first.service.write_out_paused() == 1
    out = first.service.find(sb.sandbox_id)
    await first.stop()
    assert out.runtime.saved is not None
    out.runtime.saved.memory_file.unlink()
    second = Embedded(host, SqliteStore(tmp_path / "cube.db"))
    await second.start()
    try:
        lost = second.store.get_sandbox(sb.sandbox_id)
        assert lost is not None and lost.state == SandboxState.ERROR
    finally:
        await second.stop()


async def test_a_node_short_of_memory_writes_its_paused_sandboxes_out_at_once(cube: Embedded) -> None:
    service, agent = cube.service, cube.agent
    sb = await service.create(spec())
    running = await service.create(spec())
    await service.pause("t1", sb.sandbox_id)  # just now: the delay (600 s) has not passed
    assert await service.write_out_paused() == 0
    agent.memory_probe = lambda: 100  # MiB available, below pause_to_disk_below_mb (512)
    agent.beat()
    assert await service.write_out_paused() == 1
    assert service.find(sb.sandbox_id).runtime.on_disk
    assert not service.find(running.sandbox_id).runtime.on_disk  # only paused ones
    to_disk_after(cube, 0)  # the delay off: memory pressure still counts
    other = await service.create(spec())
    await service.pause("t1", other.sandbox_id)
    assert await service.write_out_paused() == 1


async def test_resume_events_say_whether_from_disk(cube: Embedded) -> None:
    service = cube.service
    sub = service.events.subscribe("t1")
    sb = await service.create(spec(auto_pause=True, auto_resume=True))
    await service.pause("t1", sb.sandbox_id)
    await service.wake(sb.sandbox_id)  # from RAM
    await paused_long_ago(cube, sb)
    assert await service.write_out_paused() == 1  # no event of its own: still "paused"
    await service.wake(sb.sandbox_id)
    got = []
    while True:
        try:
            got.append(await asyncio.wait_for(anext(sub), 0.05))
        except TimeoutError:
            break
    assert [(e.type, e.data.get("from_disk")) for e in got] == [
        ("sandbox.created", None), ("sandbox.paused", None), ("sandbox.resumed", False),
        ("sandbox.paused", None), ("sandbox.resumed", True)]


async def test_a_sandbox_with_volumes_stays_paused_in_ram(cube: Embedded) -> None:
    from cube_core.models import VolumeMount

    service = cube.service
    await service.volumes.create("t1", "data")
    sb = await service.create(spec(volume_mounts=(VolumeMount(name="data", path="/mnt/data"),)))
    await paused_long_ago(cube, sb)
    assert await service.write_out_paused() == 0
    assert not service.find(sb.sandbox_id).runtime.on_disk
    assert (await service.connect("t1", sb.sandbox_id)).state == SandboxState.RUNNING


async def test_filesystem_only_pause_then_connect_boots_from_its_disk(cube: Embedded) -> None:
    service, agent = cube.service, cube.agent
    sb = await service.create(spec(env_vars={"A": "1"}))
    assert sb.runtime.vm is not None
    old_vm = sb.runtime.vm.vm_id
    before = agent.report().memory_mb_used
    paused = await service.pause("t1", sb.sandbox_id, memory=False)
    assert paused.state == SandboxState.PAUSED and paused.runtime.disk_only
    assert old_vm not in agent.vmm.vms  # its VM ended, no saved state
    assert agent.report().memory_mb_used == before - sb.memory_mb
    assert await service.write_out_paused() == 0  # nothing to write out
    back = await service.connect("t1", sb.sandbox_id)
    assert back.state == SandboxState.RUNNING and back.runtime.vm is not None
    assert back.runtime.vm.vm_id != old_vm
    assert back.runtime.disk == sb.runtime.disk and back.runtime.nic == sb.runtime.nic
    assert ("personalize", back.runtime.vm.vm_id) in agent.vmm.calls  # the same sandbox again: id, token, env
    assert agent.vmm.vms[back.runtime.vm.vm_id]["env"] == {"A": "1"}
    await service.kill("t1", sb.sandbox_id)
    assert not any((agent.storage.root / "disks").glob(f"{sb.sandbox_id}*"))


async def test_auto_pause_without_memory_and_no_wake_by_traffic(cube: Embedded) -> None:
    service = cube.service
    sb = await service.create(spec(auto_pause=True, auto_pause_memory=False, auto_resume=True))
    await service.set_timeout("t1", sb.sandbox_id, 0)
    await asyncio.sleep(0.01)
    assert await service.reap_expired() == 1
    paused = service.find(sb.sandbox_id)
    assert paused.state == SandboxState.PAUSED and paused.runtime.disk_only
    assert (await service.wake(sb.sandbox_id)).state == SandboxState.PAUSED  # traffic does not boot it
    assert (await service.connect("t1", sb.sandbox_id)).state == SandboxState.RUNNING


async def test_connect_without_memory_reboots_a_paused_sandbox(cube: Embedded) -> None:
    service, agent = cube.service, cube.agent
    sb = await service.create(spec())
    await paused_long_ago(cube, sb)
    assert await service.write_out_paused() == 1
    directory = saved_dir(cube, service.find(sb.sandbox_id))
    back = await service.connect("t1", sb.sandbox_id, memory=False)
    assert back.state == SandboxState.RUNNING and back.runtime.saved is None
    assert not directory.exists()  # its memory was dropped, not restored
    assert back.runtime.vm is not None and ("personalize", back.runtime.vm.vm_id) in agent.vmm.calls


async def test_a_sandbox_paused_without_memory_survives_a_restart(
        plugin_host: Callable[..., PluginHost], tmp_path: Path) -> None:
    host = plugin_host()
    first = Embedded(host, SqliteStore(tmp_path / "cube.db"))
    await first.start()
    await first.agent.ensure_templates(("base",))
    sb = await first.service.create(spec())
    await first.service.pause("t1", sb.sandbox_id, memory=False)
    await first.stop()
    second = Embedded(host, SqliteStore(tmp_path / "cube.db"))
    await second.start()
    try:
        kept = second.service.find(sb.sandbox_id)
        assert kept.state == SandboxState.PAUSED and kept.runtime.disk_only
        assert (await second.service.connect("t1", sb.sandbox_id)).state == SandboxState.RUNNING
    finally:
        await second.stop()
