"""The core's contract suites, run against the fake plugins the unit tests use, so the fakes
cannot drift from what the real drivers are held to."""

from __future__ import annotations

from pathlib import Path

import pytest

from cube_core import DiskHandle, NetworkPolicy, NicHandle, VmSpec, VolumeStore
from cube_core.testing.contract import (
    NetworkContract,
    SchedulerContract,
    StorageContract,
    VmmContract,
    VolumeContract,
)
from cube_core.testing.fakes import FakeNetwork, FakeVmm, FirstFitScheduler, MemoryStorage


class TestFakeVmmContract(VmmContract):
    ready_timeout = 5.0

    @pytest.fixture
    def driver(self) -> FakeVmm:
        return FakeVmm()

    @pytest.fixture
    def vm_spec_factory(self, tmp_path: Path):
        def make(vm_id: str) -> VmSpec:
            disk = tmp_path / f"{vm_id}.qcow2"
            disk.write_text("fake disk")
            return VmSpec(vm_id=vm_id, kernel=Path("/dev/null"), memory_mb=256,
                          rootfs_disk=DiskHandle(disk_id=vm_id, path=disk))

        return make

    @pytest.fixture
    def nic_factory(self):
        network = FakeNetwork()

        async def make(owner_id: str) -> NicHandle | None:
            return await network.allocate(owner_id, NetworkPolicy())

        return make


class TestFakeNetworkContract(NetworkContract):
    @pytest.fixture
    def driver(self) -> FakeNetwork:
        return FakeNetwork()


class TestMemoryStorageContract(StorageContract):
    @pytest.fixture
    def driver(self, tmp_path: Path) -> MemoryStorage:
        return MemoryStorage(tmp_path / "storage")

    @pytest.fixture
    def base_image(self, tmp_path: Path) -> Path:
        path = tmp_path / "base.img"
        path.write_text("base")
        return path


class TestMemoryVolumesContract(VolumeContract):
    @pytest.fixture
    def volumes(self, tmp_path: Path) -> VolumeStore:
        return MemoryStorage(tmp_path / "storage").volume_store()


class TestFirstFitSchedulerContract(SchedulerContract):
    @pytest.fixture
    def driver(self) -> FirstFitScheduler:
        return FirstFitScheduler()
