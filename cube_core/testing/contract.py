"""Contract test suites that fakes and real drivers both run [devpi, ironic].

Subclass one in your plugin's tests and provide the fixtures it names::

    class TestMyVmm(VmmContract):
        @pytest.fixture
        def driver(self): ...
        @pytest.fixture
        def vm_spec_factory(self): ...   # (vm_id) -> VmSpec that boots
        @pytest.fixture
        def nic_factory(self): ...       # async (owner_id) -> NicHandle | None
"""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from cube_core import (
    CAP_PAUSE,
    CAP_SNAPSHOT,
    NetworkDriver,
    NetworkPolicy,
    NicHandle,
    NoCapacityError,
    Node,
    NodeStatus,
    SandboxSpec,
    Scheduler,
    StorageDriver,
    VmmDriver,
    VmSpec,
    VolumeFullError,
    VolumeNotFoundError,
    VolumePathError,
    VolumePathNotFoundError,
    VolumeStore,
)

VmSpecFactory = Callable[[str], VmSpec]
NicFactory = Callable[[str], Awaitable[NicHandle | None]]


class VmmContract:
    """What every VMM driver must do. Fixtures: ``driver``, ``vm_spec_factory``, ``nic_factory``."""

    ready_timeout: float = 300.0

    async def test_isolation_is_reported(self, driver: VmmDriver) -> None:
        assert driver.isolation in ("kvm", "tcg", "none")

    async def test_boot_call_shutdown(self, driver: VmmDriver, vm_spec_factory: VmSpecFactory,
                                      nic_factory: NicFactory) -> None:
        spec = vm_spec_factory("contract-boot")
        vm = await driver.boot(spec, await nic_factory(spec.vm_id))
        try:
            ready = await driver.wait_ready(vm, timeout=self.ready_timeout)
            assert isinstance(ready, dict)
            assert await driver.is_alive(vm)
            pong = await driver.guest_call(vm, "ping", {})
            assert pong.get("boot_id")
        finally:
            await driver.shutdown(vm)
        assert not await driver.is_alive(vm)
        await driver.shutdown(vm)  # idempotent

    async def test_pause_resume(self, driver: VmmDriver, vm_spec_factory: VmSpecFactory,
                                nic_factory: NicFactory) -> None:
        if CAP_PAUSE not in driver.capabilities:
            pytest.skip(f"{type(driver).__name__} does not declare the pause capability")
        spec = vm_spec_factory("contract-pause")
        vm = await driver.boot(spec, await nic_factory(spec.vm_id))
        try:
            await driver.wait_ready(vm, timeout=self.ready_timeout)
            await driver.pause(vm)
            await driver.resume(vm)
            assert (await driver.guest_call(vm, "ping", {})).get("boot_id")
        finally:
            await driver.shutdown(vm)

    async def test_snapshot_restore(self, driver: VmmDriver, vm_spec_factory: VmSpecFactory,
                                    nic_factory: NicFactory, tmp_path: Path) -> None:
        if CAP_SNAPSHOT not in driver.capabilities:
            pytest.skip(f"{type(driver).__name__} does not declare the snapshot capability")
        spec = vm_spec_factory("contract-tmpl")
        vm = await driver.boot(spec, await nic_factory(spec.vm_id))
        try:
            await driver.wait_ready(vm, timeout=self.ready_timeout)
            state = await driver.snapshot(vm, tmp_path / "snap")
        finally:
            await driver.shutdown(vm)
        assert state.memory_file.exists() and state.device_state.exists()
        clone_spec = vm_spec_factory("contract-clone")
        clone = await driver.restore(state, clone_spec, await nic_factory(clone_spec.vm_id))
        try:
            assert (await driver.guest_call(clone, "ping", {}, timeout=60)).get("boot_id")
        finally:
            await driver.shutdown(clone)

    async def test_state_files_copied_elsewhere_restore(self, driver: VmmDriver, vm_spec_factory: VmSpecFactory,
                                                        nic_factory: NicFactory, tmp_path: Path) -> None:
        """What another node does with a copy: every file of ``state_files`` in a new place,
        ``relocate``, restore from there (the original files gone)."""
        if CAP_SNAPSHOT not in driver.capabilities:
            pytest.skip(f"{type(driver).__name__} does not declare the snapshot capability")
        spec = vm_spec_factory("contract-src")
        vm = await driver.boot(spec, await nic_factory(spec.vm_id))
        try:
            await driver.wait_ready(vm, timeout=self.ready_timeout)
            state = await driver.snapshot(vm, tmp_path / "src")
        finally:
            await driver.shutdown(vm)
        files = driver.state_files(state)
        paths = [f.path for f in files]
        assert state.memory_file in paths and state.device_state in paths
        assert all(f.key is None or f.key.startswith("sha256:") for f in files)
        moved: dict[Path, Path] = {}
        for i, item in enumerate(files):
            if item.key is None:  # this snapshot's own files move; content-keyed ones stay shared
                moved[item.path] = tmp_path / "copy" / f"{i}-{item.path.name}"
                moved[item.path].parent.mkdir(exist_ok=True)
                shutil.copy2(item.path, moved[item.path])
        shutil.rmtree(tmp_path / "src")
        here = driver.relocate(state, moved, None)
        assert here.memory_file == moved[state.memory_file] and here.device_state == moved[state.device_state]
        clone_spec = vm_spec_factory("contract-copy")
        clone = await driver.restore(here, clone_spec, await nic_factory(clone_spec.vm_id))
        try:
            assert (await driver.guest_call(clone, "ping", {}, timeout=60)).get("boot_id")
        finally:
            await driver.shutdown(clone)


class NetworkContract:
    """What every network driver must do. Fixture: ``driver`` (started)."""

    async def test_allocate_release(self, driver: NetworkDriver) -> None:
        a = await driver.allocate("contract-a", NetworkPolicy())
        b = await driver.allocate("contract-b", NetworkPolicy())
        try:
            assert a.slot_id != b.slot_id
            assert a.guest_address and b.guest_address
        finally:
            await driver.release(a)
            await driver.release(b)
        await driver.release(a)  # idempotent

    async def test_sweep_removes_orphans(self, driver: NetworkDriver) -> None:
        keep = await driver.allocate("contract-keep", NetworkPolicy())
        orphan = await driver.allocate("contract-orphan", NetworkPolicy())
        try:
            assert await driver.sweep({keep.slot_id}) >= 1
        finally:
            await driver.release(keep)
            await driver.release(orphan)


class StorageContract:
    """What every storage driver must do. Fixtures: ``driver`` and ``base_image`` (a Path)."""

    async def test_disk_lifecycle(self, driver: StorageDriver, base_image: Path) -> None:
        disk = await driver.create_disk("contract-disk", base_image)
        assert disk.path.exists()
        await driver.delete_disk(disk)
        assert not disk.path.exists()
        await driver.delete_disk(disk)  # idempotent

    async def test_freeze_and_layer(self, driver: StorageDriver, base_image: Path) -> None:
        disk = await driver.create_disk("contract-freeze", base_image)
        frozen = await driver.freeze_disk(disk, "contract-snap")
        child = await driver.create_disk("contract-child", frozen.path)
        try:
            assert child.path.exists() and frozen.path.exists()
        finally:
            await driver.delete_disk(child)
            await driver.delete_snapshot("contract-snap")

    async def test_a_layer_chain_copied_back_is_adopted(self, driver: StorageDriver, base_image: Path,
                                                        tmp_path: Path) -> None:
        """``layer_files`` names the frozen layer and everything under it, top first, with keys
        and parents; the files copied elsewhere and the snapshot gone, ``adopt_layer`` takes the
        copies back (what a node that receives a snapshot does) and a disk over it works."""
        disk = await driver.create_disk("contract-src", base_image)
        frozen = await driver.freeze_disk(disk, "contract-copy")
        await driver.delete_disk(disk)
        chain = driver.layer_files(frozen)
        assert chain[0].path == frozen.path and chain[0].key == "layer:contract-copy"
        assert [f.parent for f in chain[:-1]] == [f.key for f in chain[1:]] and chain[-1].parent is None
        assert all(f.key for f in chain)
        assert driver.local_layer("layer:contract-copy") == frozen.path
        received: dict[str, Path] = {}
        for i, item in enumerate(chain):
            assert item.key is not None
            received[item.key] = tmp_path / f"copy-{i}"
            shutil.copy(item.path, received[item.key])
        await driver.delete_snapshot("contract-copy")
        assert driver.local_layer("layer:contract-copy") is None
        adopted = driver.adopt_layer("contract-copy", chain, received)
        try:
            assert adopted.path.exists() and driver.local_layer("layer:contract-copy") == adopted.path
            assert all(driver.local_layer(f.key) is not None for f in chain if f.key)
            assert [f.key for f in driver.layer_files(adopted)] == [f.key for f in chain]
            child = await driver.create_disk("contract-child", adopted.path)
            await driver.delete_disk(child)
        finally:
            await driver.delete_snapshot("contract-copy")

    async def test_gc_frees_unowned(self, driver: StorageDriver, base_image: Path) -> None:
        live = await driver.create_disk("contract-live", base_image)
        dead = await driver.create_disk("contract-dead", base_image)
        try:
            assert await driver.gc({"contract-live"}, set()) >= 1
            assert live.path.exists()
            assert not dead.path.exists()
        finally:
            await driver.delete_disk(live)


class VolumeContract:
    """What every storage plugin's volumes (capability ``volumes``) must do. Fixture: ``volumes``
    (the driver's :class:`VolumeStore`, started)."""

    async def test_create_write_read_list_remove(self, volumes: VolumeStore) -> None:
        await volumes.create("vol-contract", 16)
        try:
            root = await volumes.stat("vol-contract", "/")
            assert root.type == "directory" and root.uid == 1000 and root.gid == 1000
            entry = await volumes.write("vol-contract", "/hello.txt", b"hi there\n")
            assert (entry.type, entry.path, entry.name, entry.size) == ("file", "/hello.txt", "hello.txt", 9)
            assert (entry.uid, entry.gid, entry.mode) == (1000, 1000, 0o644)
            assert await volumes.read("vol-contract", "/hello.txt") == b"hi there\n"
            await volumes.write("vol-contract", "/hello.txt", b"replaced")
            assert await volumes.read("vol-contract", "/hello.txt") == b"replaced"
            assert (await volumes.stat("vol-contract", "/hello.txt")).size == 8
            with pytest.raises(VolumePathNotFoundError):
                await volumes.write("vol-contract", "/no/such/dir/f", b"x")
            deep = await volumes.write("vol-contract", "/a/b/c.bin", bytes(range(256)) * 4, parents=True,
                                       mode=0o600, uid=0, gid=0)
            assert (deep.mode, deep.uid, deep.gid, deep.size) == (0o600, 0, 0, 1024)
            assert await volumes.read("vol-contract", "/a/b/c.bin") == bytes(range(256)) * 4
            names = [e.path for e in await volumes.list("vol-contract", "/")]
            assert sorted(names) == ["/a", "/hello.txt"]
            deep_list = await volumes.list("vol-contract", "/", depth=3)
            assert sorted(e.path for e in deep_list) == ["/a", "/a/b", "/a/b/c.bin", "/hello.txt"]
            assert {e.path: e.type for e in deep_list}["/a/b"] == "directory"
            await volumes.remove("vol-contract", "/a")
            with pytest.raises(VolumePathNotFoundError):
                await volumes.stat("vol-contract", "/a/b/c.bin")
            with pytest.raises(VolumePathNotFoundError):
                await volumes.read("vol-contract", "/a")
            with pytest.raises(VolumePathNotFoundError):
                await volumes.remove("vol-contract", "/ghost")
        finally:
            await volumes.delete("vol-contract")

    async def test_directories_and_metadata(self, volumes: VolumeStore) -> None:
        await volumes.create("vol-dirs", 16)
        try:
            made = await volumes.make_dir("vol-dirs", "/x/y/z", parents=True, mode=0o700)
            assert (made.type, made.mode) == ("directory", 0o700)
            with pytest.raises(VolumePathError):
                await volumes.make_dir("vol-dirs", "/x/y/z")  # exists
            assert (await volumes.make_dir("vol-dirs", "/x/y/z", parents=True)).path == "/x/y/z"
            with pytest.raises(VolumePathNotFoundError):
                await volumes.make_dir("vol-dirs", "/p/q")
            with pytest.raises(VolumePathError):
                await volumes.read("vol-dirs", "/x")  # a directory
            changed = await volumes.update("vol-dirs", "/x/y", uid=12, gid=34, mode=0o711)
            assert (changed.uid, changed.gid, changed.mode) == (12, 34, 0o711)
            assert (await volumes.stat("vol-dirs", "/x/y")).mode == 0o711
        finally:
            await volumes.delete("vol-dirs")

    async def test_quota_is_the_volume_size(self, volumes: VolumeStore) -> None:
        await volumes.create("vol-quota", 8)
        try:
            await volumes.write("vol-quota", "/small", b"x" * (1 << 20))
            with pytest.raises(VolumeFullError):
                await volumes.write("vol-quota", "/big", b"y" * (9 << 20))
            assert await volumes.read("vol-quota", "/small") == b"x" * (1 << 20)
        finally:
            await volumes.delete("vol-quota")

    async def test_delete_and_disk(self, volumes: VolumeStore) -> None:
        await volumes.create("vol-gone", 8)
        disk = await volumes.disk("vol-gone")
        assert disk.format == "raw" and disk.path.exists() and not disk.readonly
        assert (await volumes.disk("vol-gone", read_only=True)).readonly
        assert "vol-gone" in volumes.ids()
        await volumes.delete("vol-gone")
        await volumes.delete("vol-gone")  # idempotent
        assert "vol-gone" not in volumes.ids() and not disk.path.exists()
        with pytest.raises(VolumeNotFoundError):
            await volumes.stat("vol-gone", "/")


class SchedulerContract:
    """What every scheduler must do. Fixture: ``driver``."""

    def spec(self, memory_mb: int = 512) -> SandboxSpec:
        return SandboxSpec(template_id="base", team_id="t", memory_mb=memory_mb)

    def test_places_on_a_node_with_room(self, driver: Scheduler) -> None:
        nodes = [Node(node_id="full", cpu_total=2, memory_mb_total=1024, memory_mb_used=1000),
                 Node(node_id="free", cpu_total=2, memory_mb_total=4096)]
        before = [n.model_copy() for n in nodes]
        assert driver.place(self.spec(), nodes).node_id == "free"
        assert nodes == before

    def test_no_capacity(self, driver: Scheduler) -> None:
        nodes = [Node(node_id="tiny", cpu_total=1, memory_mb_total=256)]
        with pytest.raises(NoCapacityError):
            driver.place(self.spec(memory_mb=512), nodes)

    def test_skips_unhealthy(self, driver: Scheduler) -> None:
        nodes = [Node(node_id="sick", cpu_total=8, memory_mb_total=65536, status=NodeStatus.DOWN),
                 Node(node_id="ok", cpu_total=1, memory_mb_total=2048)]
        assert driver.place(self.spec(), nodes).node_id == "ok"
