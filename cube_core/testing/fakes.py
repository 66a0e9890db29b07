"""Fake drivers for tests of the core, registered as entry point ``fake`` in every namespace.

They keep everything in memory (and a temp directory for files) and never start a VM. Never
enable them in a real deployment: ``cube doctor`` and ``/health`` report ``isolation: none``.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict

from cube_core import (
    CAP_HTTP_RULES,
    CAP_PAUSE,
    CAP_PRIORITY,
    CAP_REATTACH,
    CAP_SNAPSHOT,
    CAP_VOLUMES,
    Check,
    DiskHandle,
    EgressRule,
    Isolation,
    NetworkDriver,
    NetworkPolicy,
    NicHandle,
    NoCapacityError,
    Node,
    Progress,
    RootfsImage,
    RootfsRecipe,
    SandboxSpec,
    Scheduler,
    SecretSource,
    StateFile,
    StorageDriver,
    VmActivity,
    VmHandle,
    VmmDriver,
    VmmError,
    VmSpec,
    VmState,
    VolumeStore,
    content_key,
    hookimpl,
)
from cube_core.snapshotfiles import key_name
from cube_core.testing.memvolumes import MemoryVolumes


class FakeConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    root: Path | None = None


class FakeVmm(VmmDriver):
    capabilities: ClassVar[frozenset[str]] = frozenset({CAP_SNAPSHOT, CAP_PAUSE, CAP_REATTACH, CAP_PRIORITY})

    def __init__(self) -> None:
        self.vms: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str]] = []
        self.aslr = True
        """What :attr:`guest_aslr` answers (tests turn it off)."""
        self.busy: dict[str, VmActivity] = {}
        """What :meth:`activity` answers, by VM id (tests set it; unset: left out, unknown)."""

    @property
    def volume_slots(self) -> int:
        return 2

    @property
    def guest_aslr(self) -> bool:
        return self.aslr

    @property
    def isolation(self) -> Isolation:
        return "none"

    def guest_kernel(self, setting: str, progress: Progress | None = None) -> tuple[Path, Path | None]:
        """The fake boots nothing: ``auto`` and ``stock`` mean ``none`` here."""
        return Path("/dev/null"), None

    def _new(self, vm_id: str, root: Path) -> VmHandle:
        boot_id = str(uuid.uuid4())
        self.vms[vm_id] = {"running": True, "boot_id": boot_id, "env": {}}
        return VmHandle(vm_id=vm_id, pid=None, isolation="none", workdir=root, boot_id=boot_id)

    async def boot(self, spec: VmSpec, nic: NicHandle | None) -> VmHandle:
        self.calls.append(("boot", spec.vm_id))
        return self._new(spec.vm_id, spec.rootfs_disk.path.parent)

    def state_files(self, state: VmState) -> list[StateFile]:
        files = [StateFile(path=state.memory_file), StateFile(path=state.device_state)]
        for path in (state.kernel, state.initrd):
            if path is not None and path.is_file():
                files.append(StateFile(path=path, key=content_key(path)))
        return files

    def relocate(self, state: VmState, files: Mapping[Path, Path], base: VmState | None) -> VmState:
        data = dict(state.data)
        if state.base_state_id is not None:
            if base is None:
                raise VmmError(f"snapshot {state.state_id} needs {state.base_state_id}, not on this node")
            data["base_memory_file"] = str(base.memory_file)
        return state.evolve(
            memory_file=files[state.memory_file], device_state=files[state.device_state],
            kernel=files.get(state.kernel, state.kernel),
            initrd=files.get(state.initrd, state.initrd) if state.initrd else None, data=data)

    async def set_priority(self, vm: VmHandle, *, background: bool) -> None:
        self._check(vm)["background"] = background
        self.calls.append(("background" if background else "foreground", vm.vm_id))

    async def activity(self, vms: Sequence[VmHandle], *, max_age_s: float) -> dict[str, VmActivity]:
        return {vm.vm_id: self.busy[vm.vm_id] for vm in vms if vm.vm_id in self.busy}

    async def wait_ready(self, vm: VmHandle, *, timeout: float) -> dict[str, Any]:
        self._check(vm)
        return {"event": "ready", "boot_id": self.vms[vm.vm_id]["boot_id"]}

    def _check(self, vm: VmHandle) -> dict[str, Any]:
        state = self.vms.get(vm.vm_id)
        if state is None:
            raise VmmError(f"fake VM {vm.vm_id} does not exist")
        return state

    async def guest_call(self, vm: VmHandle, op: str, params: dict[str, Any] | None = None, *,
                         timeout: float = 10.0) -> dict[str, Any]:
        state = self._check(vm)
        self.calls.append((op, vm.vm_id))
        if not state["running"]:
            raise VmmError(f"fake VM {vm.vm_id} is paused")
        events: list[dict[str, Any]] = state.setdefault("events", [])  # like the guest agent's event log

        def event(message: str, **fields: str) -> None:
            events.append({"seq": len(events) + 1, "ts_ms": int(time.time() * 1000), "level": "info",
                           "message": message, "fields": fields})

        if op == "personalize":
            state["env"] = dict((params or {}).get("env_vars", {}))
            state["trust_pem"] = (params or {}).get("trust_pem")
            state["aslr"] = (params or {}).get("aslr")
            event("sandbox started", sandbox_id=str((params or {}).get("sandbox_id")))
        if op == "mount_volumes":
            state["mounts"] = list((params or {}).get("volumes", []))
            return {"mounted": [m["path"] for m in state["mounts"]]}
        if op == "apply":  # a member personalized at join: the create's env vars on top
            state["env"] = {**state["env"], **dict((params or {}).get("env_vars", {}))}
        if op == "exec":
            cmd = " ".join((params or {}).get("cmd", []))
            event("process started", cmd=cmd)
            failing = re.search(r"\bexit (\d+)\s*$", cmd)  # a command ending in "exit N" fails with N
            code = int(failing.group(1)) if failing else 0
            event("process exited", cmd=cmd, exit_code=str(code))
            return {"exit_code": code, "stdout": cmd, "stderr": f"failed with {code}" if code else ""}
        if op == "observe":
            after = int((params or {}).get("after", 0))
            metrics = {"cpu_count": 2, "cpu_used_pct": 12.5, "mem_used": 256 << 20, "mem_total": 512 << 20,
                       "mem_cache": 1 << 20, "disk_used": 1 << 30, "disk_total": 2 << 30}
            return {"metrics": metrics, "logs": [e for e in events if e["seq"] > after], "last_seq": len(events)}
        return {"ok": True, "boot_id": state["boot_id"]}

    async def shutdown(self, vm: VmHandle, *, timeout: float = 10.0) -> None:
        self.calls.append(("shutdown", vm.vm_id))
        self.vms.pop(vm.vm_id, None)

    async def is_alive(self, vm: VmHandle) -> bool:
        return vm.vm_id in self.vms

    async def pause(self, vm: VmHandle) -> None:
        self._check(vm)["running"] = False

    async def resume(self, vm: VmHandle) -> None:
        self._check(vm)["running"] = True

    async def snapshot(self, vm: VmHandle, target_dir: Path) -> VmState:
        self._check(vm)
        target_dir.mkdir(parents=True, exist_ok=True)
        mem, dev = target_dir / "memory.ram", target_dir / "device.state"
        mem.write_bytes(b"fake-ram")
        dev.write_bytes(b"fake-state")
        base: tuple[str, str] | None = self.vms[vm.vm_id].get("base")
        # like kvm: a clone is saved as a diff against the snapshot whose memory it maps
        return VmState(state_id=target_dir.name, memory_file=mem, device_state=dev, memory_mb=512,
                       kernel=Path("/dev/null"), isolation="none", volume_slots=self.volume_slots,
                       base_state_id=base[0] if base else None,
                       data={"base_memory_file": base[1]} if base else {})

    async def restore(self, state: VmState, spec: VmSpec, nic: NicHandle | None) -> VmHandle:
        if not state.memory_file.exists():
            raise VmmError(f"snapshot memory file {state.memory_file} is missing")
        if state.base_state_id is not None:
            base = (state.base_state_id, str(state.data["base_memory_file"]))
            if not Path(base[1]).exists():
                raise VmmError(f"base memory file {base[1]} of {state.state_id} is missing")
        else:
            base = (state.state_id, str(state.memory_file))
        if len(spec.volumes) > state.volume_slots:
            raise VmmError(f"snapshot {state.state_id} has {state.volume_slots} volume slots, "
                           f"{len(spec.volumes)} volumes asked for")
        self.calls.append(("restore", spec.vm_id))
        handle = self._new(spec.vm_id, spec.rootfs_disk.path.parent)
        self.vms[spec.vm_id]["base"] = base
        self.vms[spec.vm_id]["volumes"] = [v.path for v in spec.volumes]
        return handle

    async def reattach(self, vm: VmHandle) -> VmHandle:
        if vm.vm_id not in self.vms:
            raise VmmError(f"fake VM {vm.vm_id} is gone")
        return vm


class FakeNetwork(NetworkDriver):
    capabilities: ClassVar[frozenset[str]] = frozenset({"policy", CAP_HTTP_RULES})

    def __init__(self) -> None:
        self.slots: dict[str, NetworkPolicy] = {}
        self.updates: list[tuple[str, NetworkPolicy, tuple[EgressRule, ...]]] = []
        """Every ``update_policy`` call: slot, policy, extra rules."""
        self.secrets: SecretSource | None = None
        """What the node agent gave :meth:`use_secrets` (tests resolve through it)."""
        self.trust: str | None = None
        """What :meth:`guest_trust` answers (tests set a PEM)."""

    def use_secrets(self, source: SecretSource) -> None:
        self.secrets = source

    def guest_trust(self) -> str | None:
        return self.trust

    async def allocate(self, owner_id: str, policy: NetworkPolicy,
                       extra_rules: Sequence[EgressRule] = ()) -> NicHandle:
        slot = f"fake-{owner_id}"
        self.slots[slot] = policy
        return NicHandle(slot_id=slot, guest_address="127.0.0.1")

    async def release(self, nic: NicHandle) -> None:
        self.slots.pop(nic.slot_id, None)

    async def sweep(self, live: Iterable[str]) -> int:
        keep = set(live)
        gone = [s for s in self.slots if s not in keep]
        for s in gone:
            del self.slots[s]
        return len(gone)

    async def recreate(self, nic: NicHandle, policy: NetworkPolicy,
                       extra_rules: Sequence[EgressRule] = ()) -> NicHandle:
        self.slots.setdefault(nic.slot_id, policy)
        return nic

    async def update_policy(self, nic: NicHandle, policy: NetworkPolicy,
                            extra_rules: Sequence[EgressRule] = ()) -> None:
        if nic.slot_id not in self.slots:
            raise VmmError(f"no slot {nic.slot_id}")
        self.slots[nic.slot_id] = policy
        self.updates.append((nic.slot_id, policy, tuple(extra_rules)))

    async def audit(self, nic: NicHandle, *, limit: int = 1000) -> list[dict[str, Any]]:
        return []


class MemoryStorage(StorageDriver):
    """Files in a temporary directory; 'images' are small marker files."""

    capabilities: ClassVar[frozenset[str]] = frozenset({CAP_VOLUMES})

    def __init__(self, root: Path | None = None) -> None:
        self._root = root or Path(tempfile.mkdtemp(prefix="cube-fake-storage-"))
        self._volumes = MemoryVolumes(self._root / "volumes")

    @property
    def root(self) -> Path:
        return self._root

    def volume_store(self) -> VolumeStore:
        return self._volumes

    async def build_rootfs(self, recipe: RootfsRecipe, progress: Progress | None = None) -> RootfsImage:
        digest = hashlib.sha256(recipe.model_dump_json().encode()).hexdigest()
        path = self._root / "images" / f"{digest[:16]}.img"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(recipe.name)
        if progress:
            progress("fake image", 1.0)
        return RootfsImage(path=path, content_hash=digest, bytes_allocated=path.stat().st_size)

    async def create_disk(self, owner_id: str, base: Path) -> DiskHandle:
        if not base.exists():
            raise VmmError(f"base image {base} is missing")
        path = self._root / "disks" / f"{owner_id}.qcow2"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(base))
        return DiskHandle(disk_id=owner_id, path=path)

    async def freeze_disk(self, disk: DiskHandle, snapshot_id: str) -> DiskHandle:
        target = self.snapshot_dir(snapshot_id) / "disk.qcow2"
        shutil.copyfile(disk.path, target)
        return DiskHandle(disk_id=snapshot_id, path=target, readonly=True)

    async def delete_disk(self, disk: DiskHandle) -> None:
        disk.path.unlink(missing_ok=True)

    def snapshot_dir(self, snapshot_id: str) -> Path:
        path = self._root / "snapshots" / snapshot_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    async def delete_snapshot(self, snapshot_id: str) -> None:
        path = self._root / "snapshots" / snapshot_id
        if path.exists():
            for f in path.iterdir():
                f.unlink()
            path.rmdir()

    def _layer_key(self, path: Path) -> str:
        snapshots = self._root / "snapshots"
        if path.parent.parent == snapshots:
            return f"layer:{path.parent.name}"
        return content_key(path)

    def layer_files(self, disk: DiskHandle) -> list[StateFile]:
        """A fake disk or layer holds the path of its base as text; images hold anything else."""
        chain: list[StateFile] = []
        path: Path | None = disk.path
        while path is not None:
            key = self._layer_key(path)
            parent: Path | None = None
            if key.startswith("layer:"):
                parent = Path(path.read_text())
            chain.append(StateFile(path=path, key=key, parent=self._layer_key(parent) if parent else None))
            path = parent
        return chain

    def local_layer(self, key: str) -> Path | None:
        if key.startswith("layer:"):
            path = self._root / "snapshots" / key.removeprefix("layer:") / "disk.qcow2"
        else:
            path = self._root / "content" / f"{key_name(key)}.img"
        return path if path.is_file() else None

    def adopt_layer(self, snapshot_id: str, chain: Sequence[StateFile],
                    received: Mapping[str, Path]) -> DiskHandle:
        for item in reversed(chain):
            assert item.key is not None
            if item.key not in received:
                continue
            if item.key.startswith("layer:"):
                dest = self.snapshot_dir(item.key.removeprefix("layer:")) / "disk.qcow2"
            else:
                dest = self._root / "content" / f"{key_name(item.key)}.img"
                dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(received[item.key], dest)
            if item.parent is not None:
                parent = self.local_layer(item.parent)
                if parent is None:
                    raise VmmError(f"layer {item.key}: its parent {item.parent} is not here")
                dest.write_text(str(parent))
        top = self.local_layer(f"layer:{snapshot_id}")
        if top is None:
            raise VmmError(f"snapshot {snapshot_id}: no disk layer after the copy")
        return DiskHandle(disk_id=snapshot_id, path=top, readonly=True)

    async def gc(self, live_owners: Iterable[str], live_snapshots: Iterable[str]) -> int:
        owners, snaps, n = set(live_owners), set(live_snapshots), 0
        for f in (self._root / "disks").glob("*.qcow2"):
            if f.stem not in owners:
                f.unlink()
                n += 1
        for d in (self._root / "snapshots").glob("*"):
            if d.name not in snaps:
                await self.delete_snapshot(d.name)
                n += 1
        return n


class FirstFitScheduler(Scheduler):
    def place(self, spec: SandboxSpec, nodes: Sequence[Node]) -> Node:
        for node in nodes:
            if node.healthy and node.memory_mb_total - node.memory_mb_used >= spec.memory_mb:
                return node
        raise NoCapacityError(cpu=spec.cpu_count, memory_mb=spec.memory_mb)


class FakeVmmPlugin:
    """Entry point ``cube.vmm: fake``."""

    Config = FakeConfig

    def __init__(self, config: FakeConfig) -> None:
        self.driver = FakeVmm()

    @hookimpl
    def cube_vmm_driver(self) -> VmmDriver:
        return self.driver

    @hookimpl
    def cube_doctor_checks(self) -> list[Check]:
        return [Check("vmm", "warn", "fake VMM: sandboxes are directories, not VMs (isolation 'none')",
                      "configure a real VMM plugin (kvm) outside tests")]


class FakeNetworkPlugin:
    """Entry point ``cube.network: fake``."""

    Config = FakeConfig

    def __init__(self, config: FakeConfig) -> None:
        self.driver = FakeNetwork()

    @hookimpl
    def cube_network_driver(self) -> NetworkDriver:
        return self.driver


class FakeStoragePlugin:
    """Entry point ``cube.storage: fake``."""

    Config = FakeConfig

    def __init__(self, config: FakeConfig) -> None:
        self.driver = MemoryStorage(config.root)

    @hookimpl
    def cube_storage_driver(self) -> StorageDriver:
        return self.driver


class FakeSchedulerPlugin:
    """Entry point ``cube.scheduler: fake``."""

    Config = FakeConfig

    def __init__(self, config: FakeConfig) -> None:
        self.driver = FirstFitScheduler()

    @hookimpl
    def cube_scheduler(self) -> Scheduler:
        return self.driver


class FakeApiPlugin:
    """Entry point ``cube.api: fake``: one route, ``GET /fake/sandboxes``, for tests of the app."""

    Config = FakeConfig

    def __init__(self, config: FakeConfig) -> None:
        self.config = config

    @hookimpl
    def cube_api_routers(self, service: Any) -> list[Any]:
        from fastapi import APIRouter

        router = APIRouter()

        @router.get("/fake/sandboxes")
        async def sandboxes(team: str) -> list[str]:
            return [s.sandbox_id for s in service.list(team)]

        return [router]


FAKE_CONFIG = """
[core]
state_dir = "{state_dir}"
templates = []
kernel = "none"
pool = {{ size = 0 }}

[vmm]
plugin = "fake"

[network]
plugin = "fake"

[storage]
plugin = "fake"
options = {{ root = "{state_dir}/storage" }}

[scheduler]
plugin = "fake"

[[api]]
plugin = "fake"
"""
