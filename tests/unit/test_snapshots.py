from __future__ import annotations

import pytest

from cube_core.embedded import Embedded
from cube_core.errors import SnapshotInUseError, SnapshotNotFoundError
from cube_core.models import SandboxSpec, SnapshotRef
from cube_core.service import SandboxService
from cube_core.state import SandboxState


async def test_snapshot_tree_and_create_from_snapshot(cube: Embedded, service: SandboxService) -> None:
    sb = await service.create(SandboxSpec(template_id="base", team_id="t", metadata={"m": "1"}))
    first = await service.snapshot("t", sb.sandbox_id, name="first")
    second = await service.snapshot("t", sb.sandbox_id)
    template_snap = service.get_template("base").snapshot
    # the tree follows what a snapshot is built on: both derive from the template's snapshot
    assert first.parent_id == second.parent_id == template_snap.snapshot_id
    assert first.names == ("first",)
    assert service.get("t", sb.sandbox_id).state == SandboxState.RUNNING  # keeps running
    assert [s.snapshot_id for s in service.list_snapshots("t")] == [first.snapshot_id, second.snapshot_id]
    rolled = await service.rollback("t", sb.sandbox_id, first.snapshot_id)
    assert (await service.snapshot("t", rolled.sandbox_id)).parent_id == first.snapshot_id
    for extra in service.list_snapshots("t")[2:]:
        await service.delete_snapshot("t", extra.snapshot_id)
    assert service.list_snapshots("other") == []

    child = await service.create(SandboxSpec(template_id=first.snapshot_id, team_id="t"))
    assert child.template_id == "base" and child.state == SandboxState.RUNNING
    grandchild = await service.snapshot("t", child.sandbox_id)
    assert grandchild.parent_id == first.snapshot_id
    assert child.runtime.vm is not None and ("restore", child.runtime.vm.vm_id) in cube.agent.vmm.calls
    with pytest.raises(Exception, match="not found"):  # another team cannot use the snapshot
        await service.create(SandboxSpec(template_id=first.snapshot_id, team_id="other"))

    with pytest.raises(SnapshotInUseError):
        await service.delete_snapshot("t", first.snapshot_id)  # the grandchild builds on it
    await service.delete_snapshot("t", grandchild.snapshot_id)
    await service.delete_snapshot("t", first.snapshot_id)
    await service.delete_snapshot("t", second.snapshot_id)
    with pytest.raises(SnapshotNotFoundError):
        service.get_snapshot("t", first.snapshot_id)


async def test_fork_gives_fresh_identities(cube: Embedded, service: SandboxService) -> None:
    parent = await service.create(SandboxSpec(template_id="base", team_id="t", env_vars={"A": "1"}))
    forks = await service.fork("t", parent.sandbox_id, count=3)
    ids = {f.sandbox_id for f in forks}
    assert len(ids) == 3 and parent.sandbox_id not in ids
    assert all(f.env_vars == {"A": "1"} and f.state == SandboxState.RUNNING for f in forks)
    boot_ids = {cube.agent.vmm.vms[f.runtime.vm.vm_id]["boot_id"] for f in forks}
    assert len(boot_ids) == 3
    with pytest.raises(Exception, match="not found"):
        await service.fork("other", parent.sandbox_id)


async def test_rollback_keeps_id_and_replaces_vm(cube: Embedded, service: SandboxService) -> None:
    sb = await service.create(SandboxSpec(template_id="base", team_id="t"))
    snap = await service.snapshot("t", sb.sandbox_id)
    old_vm = service.get("t", sb.sandbox_id).runtime.vm.vm_id
    rolled = await service.rollback("t", sb.sandbox_id, snap.snapshot_id)
    assert rolled.sandbox_id == sb.sandbox_id and rolled.state == SandboxState.RUNNING
    assert rolled.runtime.vm.vm_id != old_vm and old_vm not in cube.agent.vmm.vms
    assert rolled.runtime.parent_snapshot == snap.snapshot_id
    other = await service.create(SandboxSpec(template_id="base", team_id="t"))
    with pytest.raises(SnapshotNotFoundError):
        await service.rollback("t", other.sandbox_id, snap.snapshot_id)


async def test_snapshot_bases_are_kept_by_gc(cube: Embedded) -> None:
    """A VMM may save a clone as a difference from its template snapshot: that base must outlive
    garbage collection (the node agent's, at start) even when no template record names it any more."""
    template_state = cube.store.get_template("base").snapshot.vm_state
    assert template_state is not None
    diff = template_state.model_copy(update={"state_id": "snap-diff", "base_state_id": "tmpl-old"})
    cube.store.put_snapshot(SnapshotRef(snapshot_id="snap-diff", template_id="base", team_id="t", vm_state=diff))
    cube.store.put_snapshot(SnapshotRef(snapshot_id="snap-full", template_id="base", team_id="t"))
    snaps = {s.snapshot_id: s for s in cube.store.list_snapshots()}
    assert (snaps["snap-diff"].base_state_id, snaps["snap-full"].base_state_id) == ("tmpl-old", None)
    assert {"tmpl-old", "snap-diff", "snap-full"} <= cube.agent._kept_snapshots()
    kept: list[set[str]] = []

    async def gc(live_disks: set[str], snapshots: set[str]) -> None:
        kept.append(snapshots)

    cube.agent.storage.gc = gc  # type: ignore[method-assign]
    await cube.agent._reconcile()
    assert {"tmpl-old", "snap-diff", "snap-full"} <= kept[0]


async def test_a_snapshot_names_the_build_its_sandbox_came_from(cube: Embedded, service: SandboxService) -> None:
    """The parent is the template snapshot the sandbox was restored from, also after the template
    was rebuilt (its record then names a newer snapshot)."""
    before = service.get_template("base")
    assert before.snapshot is not None
    sb = await service.create(SandboxSpec(template_id="base", team_id="t"))
    rebuilt = before.snapshot.model_copy(update={"snapshot_id": "snap-rebuilt"})
    cube.service.store.put_template(before.model_copy(update={"snapshot": rebuilt}))
    assert (await service.snapshot("t", sb.sandbox_id)).parent_id == before.snapshot.snapshot_id
