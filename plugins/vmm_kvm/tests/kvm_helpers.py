"""Helpers shared by the vmm_kvm tests (a uniquely named module: conftest modules are not
importable reliably when several plugins' tests run in one session)."""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from cube_core import DiskHandle, NicHandle, VmHandle, VmSpec, VmState
from cube_storage_cow import CowStorage

from cube_vmm_kvm import KvmVmm

REPO = Path(__file__).resolve().parents[3]
RUN_TOKEN = uuid.uuid4().hex[:6]
"""Makes this session's VM ids (and so cgroup names) unique on the machine."""
CGROUP_PARENT = "cube-test"


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def entropy() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@dataclass
class VmFactory:
    """Boots and restores VMs for one test, and always shuts down what it made."""

    driver: KvmVmm
    storage: CowStorage
    base_image: Path
    kernel: Path
    initrd: Path | None = None
    vms: list[VmHandle] = field(default_factory=list)
    disks: dict[str, DiskHandle] = field(default_factory=dict)
    snapshots: list[str] = field(default_factory=list)
    memory_mb: int = 256

    def vm_id(self, name: str) -> str:
        return f"{name}-{RUN_TOKEN}"

    async def spec(self, name: str, base: Path | None = None, memory_mb: int | None = None) -> VmSpec:
        vm_id = self.vm_id(name)
        memory_mb = memory_mb or self.memory_mb
        disk = await self.storage.create_disk(vm_id, base or self.base_image)
        self.disks[vm_id] = disk
        return VmSpec(vm_id=vm_id, kernel=self.kernel, initrd=self.initrd, rootfs_disk=disk, memory_mb=memory_mb)

    async def boot(self, name: str, nic: NicHandle | None = None) -> VmHandle:
        vm = await self.driver.boot(await self.spec(name), nic)
        self.vms.append(vm)
        return vm

    async def restore(self, state: VmState, name: str, base: Path, nic: NicHandle | None = None) -> VmHandle:
        vm = await self.driver.restore(state, await self.spec(name, base, state.memory_mb), nic)
        self.vms.append(vm)
        return vm

    async def snapshot(self, vm: VmHandle, name: str, *, resume: bool = True) -> tuple[VmState, Path]:
        """What the service does: pause, snapshot, freeze the disk, resume (unless ``resume`` is
        false); returns the state and the frozen disk."""
        snapshot_id = self.vm_id(name)
        self.snapshots.append(snapshot_id)
        await self.driver.pause(vm)
        state = await self.driver.snapshot(vm, self.storage.snapshot_dir(snapshot_id))
        disk = await self.storage.freeze_disk(self.disks[vm.vm_id], snapshot_id)
        if resume:
            await self.driver.resume(vm)
        return state, disk.path

    async def cleanup(self, driver: KvmVmm | None = None) -> None:
        for vm in self.vms:
            await (driver or self.driver).shutdown(vm)
        for disk in self.disks.values():
            await self.storage.delete_disk(disk)
        for snapshot_id in self.snapshots:
            await self.storage.delete_snapshot(snapshot_id)
        self.vms.clear()
        self.disks.clear()
        self.snapshots.clear()


def private_bytes(pid: int, ram_file: Path) -> int:
    """Bytes of ``ram_file`` that QEMU ``pid`` holds as private copies (the kernel's own count:
    ``Anonymous`` of that mapping in /proc/<pid>/smaps)."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.rstrip().endswith(" " + str(ram_file))
        elif inside and head and head[0] == "Anonymous:":
            total += int(head[1]) * 1024
    return total


WAIT_TSC = ("import time\n"
            "cs = '/sys/devices/system/clocksource/clocksource0/current_clocksource'\n"
            "for _ in range(200):\n"
            "    if open(cs).read().strip() == 'tsc':\n"
            "        break\n"
            "    time.sleep(0.05)\n"
            "print(open(cs).read().strip())\n")


@dataclass
class TemplateSnapshot:
    """A cold-booted VM (still running) and the snapshot taken of it, with its frozen disk."""

    vm: VmHandle
    state: VmState
    disk: Path
    memory_sha256: str
    state_sha256: str
    boot_id: str


async def make_template(driver: KvmVmm, factory: VmFactory, name: str,
                        nic: NicHandle | None = None, before_snapshot: str | None = None) -> TemplateSnapshot:
    """Boot, wait for the guest and its ``tsc`` clocksource, (run ``before_snapshot`` in the guest,)
    pause, snapshot, freeze the disk, resume."""
    snapshot_id = factory.vm_id(f"{name}-snap")
    snap_dir = factory.storage.snapshot_dir(snapshot_id)
    vm = await factory.boot(name, nic)
    ready = await driver.wait_ready(vm, timeout=300)
    clock = await driver.guest_call(vm, "exec", {"cmd": ["python3", "-c", WAIT_TSC]}, timeout=60)
    assert clock["stdout"].strip() == "tsc", clock
    if before_snapshot is not None:
        out = await driver.guest_call(vm, "exec", {"cmd": ["sh", "-c", before_snapshot]}, timeout=120)
        assert out["exit_code"] == 0, out
    await driver.guest_call(vm, "prepare_snapshot", timeout=60)
    await driver.pause(vm)
    state = await driver.snapshot(vm, snap_dir)
    frozen = await factory.storage.freeze_disk(factory.disks[vm.vm_id], snapshot_id)
    await driver.resume(vm)
    return TemplateSnapshot(vm=vm, state=state, disk=frozen.path, memory_sha256=sha256(state.memory_file),
                            state_sha256=sha256(state.device_state), boot_id=str(ready.get("boot_id")))


# -- networking: stand-ins for the network plugin's slots --------------------------------------


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class NetnsSlots:
    """Stand-in for the network plugin's slots: a namespace with a persistent tap at .22/30."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def make(self, name: str) -> NicHandle:
        netns = f"ck{RUN_TOKEN}{name}"[:15]
        _ip("netns", "add", netns)
        self.names.append(netns)
        _ip("-n", netns, "link", "set", "lo", "up")
        _ip("-n", netns, "tuntap", "add", "dev", "tap0", "mode", "tap")
        _ip("-n", netns, "addr", "add", "169.254.0.22/30", "dev", "tap0")
        _ip("-n", netns, "link", "set", "tap0", "address", "02:5a:00:00:00:01")
        _ip("-n", netns, "link", "set", "tap0", "up")
        return NicHandle(slot_id=netns, netns=netns, tap="tap0", guest_address="169.254.0.21")

    def cleanup(self) -> None:
        for name in self.names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def tcp_probe(netns: str, port: int, timeout: float = 3.0) -> str:
    """Connect to the guest from inside ``netns``: 'open', 'refused' (the guest's kernel answered
    with a RST, so it is reachable) or the error."""
    code = ("import socket\n"
            f"s = socket.socket(); s.settimeout({timeout!r})\n"
            f"try:\n    s.connect(('169.254.0.21', {port})); print('open')\n"
            "except ConnectionRefusedError: print('refused')\n"
            "except OSError as e: print('error', e)\n")
    result = subprocess.run(["ip", "netns", "exec", netns, "python3", "-c", code], capture_output=True,
                            text=True, check=False, timeout=timeout + 10)
    return result.stdout.strip() or result.stderr.strip()
