"""Volumes in the control plane on the fakes: records and team scope, exclusive read-write mounts,
read-only sharing, no snapshot / fork / pause to disk of a sandbox with volumes, placement on the
volume's node, cleanup."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from cube_core.embedded import Embedded
from cube_core.errors import (
    TemplateError,
    UnsupportedOperation,
    VolumeInUseError,
    VolumeMountedError,
    VolumeNameTakenError,
    VolumeNotFoundError,
    VolumePathError,
)
from cube_core.models import SandboxSpec, VolumeMount, utcnow
from cube_core.state import SandboxState
from cube_core.volumes import VolumeCall, mount_path, normalize


def spec(*mounts: VolumeMount, team: str = "t1", **kw: Any) -> SandboxSpec:
    return SandboxSpec(template_id="base", team_id=team, volume_mounts=mounts, **kw)


def test_paths_are_normalized_and_checked() -> None:
    assert normalize("a//b/./c/") == "/a/b/c" and normalize("/") == "/"
    for bad in ("", "/a/../b", "x" * 5000, "a\0b"):
        with pytest.raises(VolumePathError):
            normalize(bad)
    assert mount_path("/mnt/data/") == "/mnt/data"
    for bad in ("mnt", "/", "/a/.."):
        with pytest.raises(VolumePathError):
            mount_path(bad)


async def test_records_are_team_scoped(cube: Embedded) -> None:
    volumes = cube.service.volumes
    vol = await volumes.create("t1", "data", 32)
    assert (vol.size_mb, vol.node_id) == (32, cube.agent.node_id)
    assert [v.volume_id for v in volumes.list("t1")] == [vol.volume_id] and volumes.list("t2") == []
    with pytest.raises(VolumeNotFoundError):
        volumes.get("t2", vol.volume_id)
    with pytest.raises(VolumeNotFoundError):
        await volumes.delete("t2", vol.volume_id)
    with pytest.raises(VolumeNameTakenError):
        await volumes.create("t1", "data")
    assert (await volumes.create("t2", "data")).size_mb == cube.service.settings.volume_size_mb
    with pytest.raises(VolumeNotFoundError):  # another team's volume by name
        await cube.service.create(spec(VolumeMount(name="data", path="/d"), team="t3"))
    await volumes.delete("t1", vol.volume_id)
    assert vol.volume_id not in cube.agent.storage.volume_store().ids()


async def test_read_write_mounts_are_exclusive_and_block_delete_and_content(cube: Embedded) -> None:
    service, volumes = cube.service, cube.service.volumes
    vol = await volumes.create("t1", "data")
    await volumes.content(vol, VolumeCall(op="write", volume_id=vol.volume_id, path="/a.txt", data=b"x"))
    sb = await service.create(spec(VolumeMount(name="data", path="/mnt/data")))
    assert sb.volume_mounts[0].volume_id == vol.volume_id
    vm = cube.agent.vmm.vms[sb.sandbox_id]
    assert vm["volumes"] == [(await cube.agent.storage.volume_store().disk(vol.volume_id)).path]
    assert vm["mounts"] == [{"slot": 0, "path": "/mnt/data", "read_only": False}]
    for mount in (VolumeMount(name="data", path="/x"), VolumeMount(name="data", path="/x", read_only=True)):
        with pytest.raises(VolumeInUseError, match=f"read-write by sandbox {sb.sandbox_id}"):
            await service.create(spec(mount))
    with pytest.raises(VolumeInUseError):
        await volumes.delete("t1", vol.volume_id)
    with pytest.raises(VolumeInUseError):
        await volumes.content(vol, VolumeCall(op="read", volume_id=vol.volume_id, path="/a.txt"))
    with pytest.raises(VolumeMountedError, match="snapshot"):
        await service.snapshot("t1", sb.sandbox_id)
    # paused long ago: still not written out to disk (it stays in RAM)
    service.settings = service.settings.model_copy(update={"pause_to_disk_after_s": 1.0})
    paused = await service.pause("t1", sb.sandbox_id)
    cube.store.put_sandbox(paused.evolve(paused_at=utcnow() - timedelta(hours=1)))
    assert await service.write_out_paused() == 0
    await service.kill("t1", sb.sandbox_id)
    answer = await volumes.content(vol, VolumeCall(op="read", volume_id=vol.volume_id, path="/a.txt"))
    assert answer.data == b"x"
    again = await service.create(spec(VolumeMount(name="data", path="/again")))
    await service.kill("t1", again.sandbox_id)
    await volumes.delete("t1", vol.volume_id)


async def test_read_only_mounts_share_and_allow_reads(cube: Embedded) -> None:
    service, volumes = cube.service, cube.service.volumes
    vol = await volumes.create("t1", "ro")
    ro = VolumeMount(name="ro", path="/ro", read_only=True)
    first, second = await service.create(spec(ro)), await service.create(spec(ro))
    assert cube.agent.vmm.vms[second.sandbox_id]["mounts"][0]["read_only"] is True
    await volumes.content(vol, VolumeCall(op="list", volume_id=vol.volume_id, path="/"))
    with pytest.raises(VolumeInUseError, match="read-only"):
        await volumes.content(vol, VolumeCall(op="mkdir", volume_id=vol.volume_id, path="/d"))
    with pytest.raises(VolumeInUseError, match="read-only"):
        await service.create(spec(VolumeMount(name="ro", path="/rw")))
    for sb in (first, second):
        await service.kill("t1", sb.sandbox_id)


async def test_one_sandbox_mounts_each_volume_and_path_once(cube: Embedded) -> None:
    await cube.service.volumes.create("t1", "a")
    await cube.service.volumes.create("t1", "b")
    with pytest.raises(VolumePathError):
        await cube.service.create(spec(VolumeMount(name="a", path="/x"), VolumeMount(name="b", path="/x/")))
    with pytest.raises(VolumePathError):
        await cube.service.create(spec(VolumeMount(name="a", path="/x"), VolumeMount(name="a", path="/y")))
    sb = await cube.service.create(spec(VolumeMount(name="a", path="/x"), VolumeMount(name="b", path="/y")))
    assert [m["slot"] for m in cube.agent.vmm.vms[sb.sandbox_id]["mounts"]] == [0, 1]
    await cube.service.kill("t1", sb.sandbox_id)
    await cube.service.volumes.create("t1", "c")
    with pytest.raises(TemplateError, match="2 volume slots, 3 volumes"):  # the fake VMs have 2
        await cube.service.create(spec(VolumeMount(name="c", path="/z"), VolumeMount(name="a", path="/x"),
                                       VolumeMount(name="b", path="/y")))
    assert not [vm for vm in cube.agent.vmm.vms.values() if vm.get("volumes")]  # the failed VM is gone


async def test_a_vmm_without_volume_slots_refuses_mounts(cube: Embedded, monkeypatch: pytest.MonkeyPatch) -> None:
    """501 from a VMM whose VMs have no volume slots; a template snapshot made without them (an
    older Cube) on a VMM that has them: rebuild the template."""
    template = cube.agent.local_template("base")
    assert template.snapshot is not None and template.snapshot.vm_state is not None
    no_slots = template.snapshot.evolve(vm_state=template.snapshot.vm_state.evolve(volume_slots=0))
    cube.agent.template_ready(template.evolve(snapshot=no_slots))
    await cube.service.volumes.create("t1", "v")
    with pytest.raises(TemplateError, match="rebuild the template"):
        await cube.service.create(spec(VolumeMount(name="v", path="/v")))
    monkeypatch.setattr(type(cube.agent.vmm), "volume_slots", property(lambda self: 0))
    with pytest.raises(UnsupportedOperation, match="no volume slots"):
        await cube.service.create(spec(VolumeMount(name="v", path="/v")))
    assert not cube.store.list_sandboxes(team_id="t1", states=(SandboxState.RUNNING,))
