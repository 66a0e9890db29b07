"""The core's VMM contract suite, run against the real driver (real guests, TCG here)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cube_core import DiskHandle, NicHandle, VmSpec
from cube_core.testing.contract import VmmContract
from kvm_helpers import RUN_TOKEN

from cube_vmm_kvm import KvmVmm

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.asyncio(loop_scope="session")]


class TestKvmVmmContract(VmmContract):
    ready_timeout = 300.0

    @pytest.fixture
    def driver(self, kvm: KvmVmm) -> KvmVmm:
        return kvm

    @pytest.fixture
    def vm_spec_factory(self, base_image: Path, guest_kernel: Path, tmp_path: Path):
        def make(name: str) -> VmSpec:
            vm_id = f"{name}-{RUN_TOKEN}"
            disk = tmp_path / f"{vm_id}.qcow2"
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base_image),
                            str(disk)], check=True)
            return VmSpec(vm_id=vm_id, kernel=guest_kernel, memory_mb=256,
                          rootfs_disk=DiskHandle(disk_id=vm_id, path=disk, format="qcow2"))

        return make

    @pytest.fixture
    def nic_factory(self):
        async def make(owner_id: str) -> NicHandle | None:
            return None

        return make
