"""``KvmVmm``: the VMM driver that runs every sandbox in its own QEMU ``microvm`` process.

Life of a VM here: ``boot`` (cold, RAM in a ``share=on`` tmpfs file) → ``wait_ready`` → optionally
``snapshot`` (the template) → ``restore`` many copy-on-write clones → ``pause``/``resume`` →
``shutdown``. Every VM has a work directory ``<run_dir>/<vm_id>`` with its QMP and control
sockets, console log and ``vm.json`` record, and its own cgroup. A new driver (after a node-agent
restart) takes running VMs over with ``reattach`` from their ``VmHandle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import structlog
from cube_core import (
    CAP_PAUSE,
    CAP_PRIORITY,
    CAP_REATTACH,
    CAP_SNAPSHOT,
    VOLUME_DEVICE_BYTES,
    AbnormalShutdownError,
    ConfigError,
    DiskHandle,
    Isolation,
    NicHandle,
    Progress,
    StateFile,
    VmActivity,
    VmHandle,
    VmmDriver,
    VmmError,
    VmSpec,
    VmState,
    content_key,
)

from . import jail, memdiff, persist, qemu, snapshot
from .accel import AccelReport, detect, host_tsc_khz
from .cgroup import CgroupLayout, CgroupLimits, VmCgroup, block_device, detect_layout
from .config import KvmConfig
from .control import ControlChannel
from .guest_kernel import resolve as resolve_guest_kernel
from .persist import SnapshotRecord, VmRecord
from .qemu import MachineSpec, Qmp
from .reclaim import Reclaimer
from .tap import open_tap

log = structlog.get_logger(__name__)

T = TypeVar("T")

GUEST_IP = "169.254.0.21"
GATEWAY_IP = "169.254.0.22"
DEFAULT_GUEST_MAC = "52:54:00:00:00:21"


_Saved = tuple[Path, Path, dict[str, Any], dict[str, Any]]
"""What a ``_save_*`` method made: memory file, device state, ``SnapshotRecord`` fields, log fields."""


@dataclass
class _LiveVm:
    """What this driver instance holds for one VM: its record and open connections."""

    record: VmRecord
    qmp: Qmp
    ctl: ControlChannel
    cgroup: VmCgroup | None
    jail_ms: float = 0.0
    """Time spent on the jail when this process started (uid, chowns, the jailer), for the logs."""
    ram_extras: list[tuple[memdiff.ExtraBlock, int]] | None = None
    """Guest RAM outside the RAM file and its host addresses (fixed for the process's life)."""
    background: bool = False
    """Set by ``set_priority``: a warm-pool member (prepared in the background, then paused)."""

    def handle(self) -> VmHandle:
        return VmHandle(vm_id=self.record.vm_id, pid=self.record.pid, isolation=self.record.isolation,
                        workdir=self.record.workdir, data=self.record.model_dump(mode="json"))


BACKGROUND_CPU_WEIGHT = 1
"""CPU weight of a VM in the background (a warm-pool member being prepared): against the
default 100 of the others, it runs on what they leave idle."""


def volume_drives(vm_id: str, volumes: Sequence[DiskHandle], slots: int) -> tuple[tuple[Path | None, bool], ...]:
    """The VM's volume slots: ``volumes`` first (raw images of the slot size), then a placeholder
    (``None``: QEMU's ``null-co`` device, which reads zeros and drops writes, so a guest that
    writes an empty slot fills no host disk) for each slot left."""
    if len(volumes) > slots:
        raise VmmError(f"VM {vm_id}: {len(volumes)} volumes, but it has {slots} volume slots")
    drives: list[tuple[Path | None, bool]] = []
    for volume in volumes:
        size = volume.path.stat().st_size
        if volume.format != "raw" or size != VOLUME_DEVICE_BYTES:
            raise VmmError(f"VM {vm_id}: volume image {volume.path} is not a raw {VOLUME_DEVICE_BYTES}-byte device")
        drives.append((volume.path, volume.readonly))
    drives += [(None, False)] * (slots - len(volumes))
    return tuple(drives)


class KvmVmm(VmmDriver):
    """QEMU ``microvm`` VMs: KVM where the host can run a stock guest, else TCG."""

    capabilities: ClassVar[frozenset[str]] = frozenset({CAP_SNAPSHOT, CAP_PAUSE, CAP_REATTACH, CAP_PRIORITY})

    def __init__(self, config: KvmConfig) -> None:
        self.config = config
        self._accel: AccelReport | None = None
        self._qemu: str | None = None
        self._cgroups: CgroupLayout | None = None
        self._tsc_khz = 0
        self._uids: jail.UidLeases | None = None
        self._spare: jail.Jailer | None = None
        self._ram_readonly = False
        self._vms: dict[str, _LiveVm] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reclaimer: Reclaimer | None = None

    # -- driver-wide ---------------------------------------------------------------------------

    def guest_kernel(self, setting: str, progress: Progress | None = None) -> tuple[Path, Path | None]:
        """``auto`` builds (or reuses) the Cube kernel from this package's ``kernel/``, falling back
        to Debian's stock kernel + initramfs; ``stock``: that fallback only (see kernel/README.md)."""
        return resolve_guest_kernel(setting, progress)

    @property
    def accel(self) -> AccelReport:
        if self._accel is None:
            self._accel = detect(self.config.accel)
        return self._accel

    @property
    def isolation(self) -> Isolation:
        return self.accel.isolation

    @property
    def volume_slots(self) -> int:
        return self.config.volume_slots

    @property
    def guest_aslr(self) -> bool:
        if self.config.guest_aslr == "auto":
            return self.accel.accel != "tcg"
        return self.config.guest_aslr == "on"

    async def start(self) -> None:
        """Find QEMU, choose the accelerator, prepare directories and cgroups."""
        binary = shutil.which(self.config.qemu_binary)
        if binary is None:
            raise ConfigError(f"QEMU binary {self.config.qemu_binary!r} not found "
                              "(install qemu-system-x86 or set [vmm.options] qemu_binary)")
        self._qemu = binary
        self._accel = detect(self.config.accel)
        for directory in (self.config.run_dir, self.config.mem_dir):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.config.cgroups:
            self._cgroups = detect_layout()
            if self._cgroups is None:
                raise ConfigError("no cgroup hierarchy with the cpu, memory and pids controllers: VMs cannot "
                                  "be limited (mount cgroup v2 or v1; [vmm.options] cgroups = false only "
                                  "for debugging)")
        self._uids = jail.UidLeases(self.config.uid_lease_dir, *self.config.uid_range)
        if self.config.jail:
            self.config.jail_root.mkdir(parents=True, exist_ok=True, mode=0o755)
            self._ram_readonly = await self._run(qemu.supports_readonly_private_ram, binary)
            # A jailer exits right after forking QEMU: its orphan comes back to us, so we can reap it.
            qemu.set_child_subreaper()
            self._spare = jail.Jailer.start()
        self._tsc_khz = host_tsc_khz()
        # always on: the VMs' CPU readings are also what the node's sampler asks (activity)
        # called from worker threads: dict() copies at once, where iterating could meet a change
        self._reclaimer = Reclaimer(lambda: {k: v.record.pid for k, v in dict(self._vms).items()},
                                    reclaimable=self._reclaimable_id,
                                    window_s=self.config.idle_reclaim_after_s,
                                    cpu_pct=self.config.idle_reclaim_cpu_pct,
                                    allow_disk=self.config.idle_reclaim_disk_swap,
                                    refault_kib=int(self.config.idle_reclaim_refault_mib * 1024),
                                    pageouts=self.config.idle_reclaim)
        self._reclaimer.start()
        log.info("vmm started", qemu=binary, accel=self.accel.accel, isolation=self.accel.isolation,
                 reason=self.accel.reason, jail=self.config.jail, readonly_template_ram=self._ram_readonly,
                 cgroup_version=self._cgroups.version if self._cgroups else None)

    async def close(self) -> None:
        """Drop our QMP and control connections; the VMs keep running."""
        reclaimer, self._reclaimer = self._reclaimer, None
        if reclaimer is not None:
            await reclaimer.close()
        spare, self._spare = self._spare, None
        if spare is not None:
            await self._run(spare.close)
        vms, self._vms = self._vms, {}
        for vm in vms.values():
            await vm.ctl.close()
            await vm.qmp.close()

    def _binary(self) -> str:
        if self._qemu is None:
            raise VmmError("KvmVmm.start() was not called")
        return self._qemu

    def _lock(self, vm_id: str) -> asyncio.Lock:
        return self._locks.setdefault(vm_id, asyncio.Lock())

    # -- building blocks -----------------------------------------------------------------------

    def _cpu_model(self) -> str:
        if self.config.cpu_model:
            return self.config.cpu_model
        return "host" if self.accel.accel == "kvm" else "qemu64,+arat"

    def _append(self, spec: VmSpec, nic: NicHandle | None) -> str:
        parts = ["console=ttyS0", "root=/dev/vda", "rw", "rootfstype=ext4", "init=/sbin/cube-init",
                 "panic=-1", "quiet"]
        if self.accel.accel == "tcg":
            parts += ["tsc=reliable", f"tsc_early_khz={self._tsc_khz}"] if self._tsc_khz else []
        if nic is not None:
            # Without a NIC the kernel's IP autoconfig would wait 12 s for a device: leave it out.
            parts.append(f"ip={GUEST_IP}::{GATEWAY_IP}:255.255.255.252:cube:eth0:off")
        parts.append(f"cube.interpreter={1 if spec.interpreter else 0}")
        parts += list(spec.cmdline_extra)
        return " ".join(parts)

    def _limits(self, memory_mb: int, cpu_count: int, disk: Path | None = None) -> CgroupLimits:
        cfg = self.config
        period = 100_000
        quota = None if cfg.cpu_cores_per_vcpu == 0 else max(1000, int(cpu_count * cfg.cpu_cores_per_vcpu * period))
        return CgroupLimits(cpu_quota_us=quota, cpu_period_us=period,
                            memory_bytes=(memory_mb + cfg.memory_overhead_mb) << 20, pids_max=cfg.pids_max,
                            swap_bytes=self._swap_bytes(memory_mb), cpu_weight=cfg.cpu_weight,
                            io_device=block_device(disk) if disk is not None else None,
                            io_read_bps=cfg.io_read_bps, io_write_bps=cfg.io_write_bps,
                            io_read_iops=cfg.io_read_iops, io_write_iops=cfg.io_write_iops)

    def _swap_bytes(self, memory_mb: int) -> int:
        """``swap_mb``; with idle reclaim and ``swap_mb = 0``, the memory limit (what a VM may
        have paged out; on cgroup v2 ``memory.swap.max = 0`` would make every page-out fail)."""
        cfg = self.config
        if cfg.swap_mb == 0 and cfg.idle_reclaim:
            return (memory_mb + cfg.memory_overhead_mb) << 20
        return cfg.swap_mb << 20

    def _workdir(self, vm_id: str) -> Path:
        workdir = self.config.run_dir / qemu.check_vm_id(vm_id)
        if workdir.exists():
            try:
                old = persist.restore(workdir)
            except VmmError:
                old = None
            if old is not None and qemu.is_our_qemu(old.pid, old.vm_id, old.workdir):
                raise VmmError(f"VM {vm_id} already runs (pid {old.pid})")
            shutil.rmtree(workdir, ignore_errors=True)
            if old is not None and old.jail_uid is not None and self._uids is not None:
                self._uids.release(old.jail_uid, old.vm_id)
        workdir.mkdir(parents=True, mode=0o700)
        return workdir

    async def _run(self, func: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(None, func, *args)

    def _take_jailer(self) -> jail.Jailer:
        """The spare jailer (its interpreter already started), or a new one when there is none."""
        taken, self._spare = self._spare, None
        return taken or jail.Jailer.start()

    def _refill_spare(self) -> None:
        """Start the next spare jailer once a VM start is done: its interpreter start-up (CPU) then
        does not compete with the QEMU that is starting."""
        if self.config.jail and self._spare is None and self._uids is not None:
            self._spare = jail.Jailer.start()

    def _prepare_jail(self, machine: MachineSpec, uid: int, group: VmCgroup | None) -> jail.JailSpec:
        """Give the VM's uid what it must write (its socket directory, own RAM file, disk) and the
        jail group what clones share (a template's RAM file); return its jail."""
        cfg = self.config
        machine.sock_dir.mkdir(mode=0o700, exist_ok=True)
        os.chown(machine.sock_dir, uid, uid)
        if machine.ram_shared:
            fd = os.open(machine.ram_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.fchown(fd, uid, uid)
            finally:
                os.close(fd)
        else:
            # Shared by clones of many uids: readable through the jail group. QEMU 7.2 opens a
            # share=off RAM file read-write, so there the group may write it too (see README).
            os.chown(machine.ram_file, -1, cfg.jail_group)
            os.chmod(machine.ram_file, 0o640 if machine.ram_readonly else 0o660)
        if not machine.disk_readonly:
            os.chown(machine.disk_path, uid, uid)
        for path, readonly in machine.volume_drives:
            if path is not None and not readonly:
                os.chown(path, uid, uid)
        for path in jail.read_only_inputs(machine):
            jail.grant_read(path, uid, (cfg.jail_group,), cfg.jail_group)
        procs = tuple(d / "cgroup.procs" for d in group.dirs) if group is not None else ()
        return jail.plan(machine, qemu_binary=self._binary(), uid=uid, gid=uid, groups=(cfg.jail_group,),
                         root=cfg.jail_root, cgroup_procs=procs)

    async def _launch(self, machine: MachineSpec, record_fields: dict[str, Any],
                      cpu_count: int) -> _LiveVm:
        """Spawn QEMU for ``machine`` (in its jail and cgroup) and connect QMP."""
        tap_fd = machine.tap_fd
        argv = qemu.build_argv(self._binary(), machine)
        (machine.workdir / "argv").write_text("\0".join(argv))
        pass_fds = () if tap_fd is None else (tap_fd,)
        group: VmCgroup | None = None
        pid: int | None = None
        uid: int | None = None
        jail_ms = 0.0
        try:
            if self._cgroups is not None:
                limits = self._limits(machine.memory_mb, cpu_count, machine.disk_path)
                group = await self._run(VmCgroup.create, self._cgroups, self.config.cgroup_parent,
                                        machine.vm_id, limits)
            if self.config.jail and self._uids is not None:
                jail_started = time.monotonic()
                uid = self._uids.allocate(machine.vm_id, machine.workdir)
                try:
                    spec = await self._run(self._prepare_jail, machine, uid, group)
                except OSError as exc:
                    raise VmmError(f"VM {machine.vm_id}: cannot prepare its jail: {exc.filename}: "
                                   f"{exc.strerror}") from exc
                pid = await self._run(jail.spawn, spec, argv, machine.qemu_log, pass_fds, self._take_jailer())
                jail_ms = (time.monotonic() - jail_started) * 1000
            else:
                machine.sock_dir.mkdir(mode=0o700, exist_ok=True)
                pid = qemu.spawn(argv, log_path=machine.qemu_log, env=qemu.QEMU_ENV, pass_fds=pass_fds)
                if group is not None:
                    group.add_pid(pid)
            record = VmRecord(
                vm_id=machine.vm_id, pid=pid, workdir=machine.workdir, qmp_socket=machine.qmp_socket,
                ctl_socket=machine.ctl_socket, console_log=machine.console_log, ram_file=machine.ram_file,
                ram_shared=machine.ram_shared, accel=machine.accel, isolation=machine.accel,
                memory_mb=machine.memory_mb, cpu_count=cpu_count, kernel=machine.kernel, initrd=machine.initrd,
                append=machine.append,
                cpu_model=machine.cpu_model, pic=machine.pic, has_nic=tap_fd is not None,
                guest_mac=machine.guest_mac, send_configuration=machine.send_configuration,
                volume_slots=len(machine.volume_drives),
                cgroup_version=group.version if group else 0,
                cgroup_paths=group.paths if group else {}, jail_uid=uid, **record_fields)
            persist.save(record)
            qmp = Qmp(machine.vm_id, machine.qmp_socket)
            await qmp.connect(timeout=self.config.qmp_timeout_s, pid=pid, qemu_log=machine.qemu_log)
        except BaseException:
            if pid is not None:
                qemu.send_signal(pid, signal.SIGKILL)
                await qemu.wait_exit(pid, 5.0)
            if group is not None:
                with contextlib.suppress(VmmError):
                    group.remove()
            if uid is not None and self._uids is not None:
                self._uids.release(uid, machine.vm_id)
            raise
        finally:
            if tap_fd is not None:
                os.close(tap_fd)
        return _LiveVm(record, qmp, ControlChannel(machine.vm_id, machine.ctl_socket), group, jail_ms=jail_ms)

    def _machine_extras(self) -> dict[str, Any]:
        return {"ram_readonly": self._ram_readonly and self.config.jail,
                "console_ring_bytes": 1 << (self.config.console_ring_kb * 1024).bit_length() - 1,
                "mem_merge": self.config.mem_merge}

    async def _open_tap(self, nic: NicHandle | None) -> int | None:
        if nic is None:
            return None
        if not nic.tap:
            raise VmmError(f"network slot {nic.slot_id} has no tap device")
        return await self._run(lambda: open_tap(nic.netns, nic.tap or "", vnet_hdr=self.config.tap_vnet_hdr))

    async def _get(self, vm: VmHandle) -> _LiveVm:
        live = self._vms.get(vm.vm_id)
        if live is None:
            await self.reattach(vm)
            live = self._vms[vm.vm_id]
        return live

    # -- VmmDriver -----------------------------------------------------------------------------

    async def boot(self, spec: VmSpec, nic: NicHandle | None) -> VmHandle:
        """Cold-boot ``spec``; returns once QEMU runs and answers QMP (the guest is still booting)."""
        self._binary()
        async with self._lock(spec.vm_id):
            workdir = self._workdir(spec.vm_id)
            ram_file = self.config.mem_dir / f"{spec.vm_id}.ram"
            ram_file.unlink(missing_ok=True)
            if spec.cpu_count > 1:
                log.info("guest kernel is uniprocessor: booting 1 vCPU", vm_id=spec.vm_id,
                         cpu_count=spec.cpu_count)
            disk = spec.rootfs_disk
            started = time.monotonic()
            try:
                drives = await self._run(volume_drives, spec.vm_id, spec.volumes, self.config.volume_slots)
                tap_fd = await self._open_tap(nic)
                machine = MachineSpec(
                    vm_id=spec.vm_id, workdir=workdir, kernel=self.config.kernel or spec.kernel,
                    append=self._append(spec, nic), memory_mb=spec.memory_mb, accel=self.accel.accel,
                    cpu_model=self._cpu_model(), ram_file=ram_file, ram_shared=True, disk_path=disk.path,
                    disk_format=disk.format, disk_readonly=disk.readonly, disk_cache=self.config.disk_cache,
                    tb_size_mb=self.config.tb_size_mb, pic=self.config.pic, tap_fd=tap_fd,
                    guest_mac=(nic.guest_mac if nic else None), incoming=False, seccomp=self.config.seccomp,
                    initrd=spec.initrd, volume_drives=drives, **self._machine_extras())
                live = await self._launch(machine, {"ram_owned": True}, spec.cpu_count)
            except BaseException:
                shutil.rmtree(workdir, ignore_errors=True)
                ram_file.unlink(missing_ok=True)
                raise
            self._vms[spec.vm_id] = live
            self._refill_spare()
            log.info("vm booting", vm_id=spec.vm_id, pid=live.record.pid, accel=machine.accel,
                     spawn_ms=round((time.monotonic() - started) * 1000, 1), jail_ms=round(live.jail_ms, 1))
            return live.handle()

    async def wait_ready(self, vm: VmHandle, *, timeout: float) -> dict[str, Any]:
        live = await self._get(vm)
        try:
            return await live.ctl.wait_ready(timeout=timeout)
        except VmmError as exc:
            if not qemu.is_running(live.record.pid):
                error = qemu.log_tail(live.record.workdir / "qemu.log")
                raise VmmError(f"VM {vm.vm_id}: QEMU exited before the guest was ready: {error}") from exc
            tail = await self.console(vm)
            raise VmmError(f"{exc}; console: {tail[-2000:]}") from exc

    async def console(self, vm: VmHandle, *, size: int = 1 << 20) -> str:
        """Take what the guest wrote to its serial console since the last call (at most the ring's
        size: older output is gone), and append it to ``console.log`` in the work directory for
        debugging. Empty when QEMU does not answer."""
        live = await self._get(vm)
        try:
            text = await live.qmp.console(size)
        except VmmError:
            return ""
        with contextlib.suppress(OSError), open(live.record.console_log, "a") as f:
            f.write(text)
        return text

    async def guest_call(self, vm: VmHandle, op: str, params: dict[str, Any] | None = None, *,
                         timeout: float = 10.0) -> dict[str, Any]:
        live = await self._get(vm)
        return await live.ctl.call(op, params, timeout=timeout)

    async def pause(self, vm: VmHandle) -> None:
        live = await self._get(vm)
        await live.qmp.execute("stop", timeout=self.config.qmp_timeout_s)
        if self._reclaimer is not None and self._reclaimable(live):
            self._reclaimer.paused(vm.vm_id, live.record.pid)

    def _reclaimable_id(self, vm_id: str) -> bool:
        live = self._vms.get(vm_id)
        return live is not None and self._reclaimable(live)

    def _reclaimable(self, live: _LiveVm) -> bool:
        """Idle reclaim leaves warm-pool members warm (their first command would fault back what
        the warm-up filled: measured 120 -> 310 ms p50), unless ``idle_reclaim_pool``."""
        return not live.background or self.config.idle_reclaim_pool

    async def resume(self, vm: VmHandle) -> None:
        live = await self._get(vm)
        await live.qmp.execute("cont", timeout=self.config.qmp_timeout_s)
        if self._reclaimer is not None:
            self._reclaimer.mark_busy(vm.vm_id)

    async def set_priority(self, vm: VmHandle, *, background: bool) -> None:
        """The VM's cgroup CPU weight: :data:`BACKGROUND_CPU_WEIGHT` or ``cpu_weight`` again
        (one small file write; nothing without cgroups)."""
        live = await self._get(vm)
        live.background = background
        if live.cgroup is not None:
            live.cgroup.set_cpu_weight(BACKGROUND_CPU_WEIGHT if background else self.config.cpu_weight)

    async def activity(self, vms: Sequence[VmHandle], *, max_age_s: float) -> dict[str, VmActivity]:
        """From the idle tracker (the reclaimer's: one reading of ``/proc/<pid>/stat`` per VM
        serves both), the readings older than ``max_age_s`` taken again in one worker thread."""
        if self._reclaimer is None or not vms:
            return {}
        return await self._run(self._reclaimer.activity, [vm.vm_id for vm in vms], max_age_s)

    async def is_alive(self, vm: VmHandle) -> bool:
        record = self._vms[vm.vm_id].record if vm.vm_id in self._vms else persist.record_from_data(vm.data)
        return qemu.is_our_qemu(record.pid, record.vm_id, record.workdir)

    async def snapshot(self, vm: VmHandle, target_dir: Path) -> VmState:
        """Save ``vm`` into ``target_dir``; the VM keeps its run state (a running VM runs again
        when this returns, a paused one stays paused).

        A cold-booted VM (RAM in a ``share=on`` file) is saved ``shared``: ``memory.ram`` +
        ``device.state``. A clone is saved ``diff``: ``memory.diff`` (the pages it changed since
        its template, whose RAM file it maps copy-on-write) + ``device.state``; the returned
        state's ``base_state_id`` names that template snapshot. Only when the template's RAM file
        is gone (or ``clone_snapshot = "full"``) is a clone saved ``full`` (RAM in the stream).

        A running guest is asked to ``prepare_snapshot`` first (sync disks, drop host connections).
        A paused VM is saved as it is (memory, devices and disk are consistent at the pause). To
        freeze the disk at the snapshot point of a VM that keeps running, pause it first, snapshot,
        freeze the disk, resume.
        """
        live = await self._get(vm)
        rec = live.record
        async with self._lock(vm.vm_id):
            was_running = await live.qmp.status() == "running"
            if was_running:
                await live.ctl.call("prepare_snapshot", timeout=self.config.snapshot_timeout_s)
            target_dir.mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            if rec.ram_shared:
                saved = await self._save_shared(live, target_dir, was_running)
            elif self._diff_base(rec) is not None:
                saved = await self._save_diff(live, target_dir, was_running)
            else:
                saved = await self._save_full(live, target_dir, was_running)
            memory_file, state_path, fields, details = saved
            total_ms = (time.monotonic() - started) * 1000
            data = SnapshotRecord(accel=rec.accel, append=rec.append, cpu_model=rec.cpu_model, pic=rec.pic,
                                  has_nic=rec.has_nic, guest_mac=rec.guest_mac, volume_slots=rec.volume_slots,
                                  **fields)
            log.info("vm snapshot saved", vm_id=vm.vm_id, format=data.format, save_ms=round(data.save_ms, 1),
                     total_ms=round(total_ms, 1), state_bytes=state_path.stat().st_size, **details)
            return VmState(state_id=target_dir.name, memory_file=memory_file, device_state=state_path,
                           memory_mb=rec.memory_mb, cpu_count=rec.cpu_count, kernel=rec.kernel,
                           initrd=rec.initrd, isolation=rec.isolation, data=data.model_dump(mode="json"),
                           base_state_id=data.base_state_id, volume_slots=rec.volume_slots)

    def state_files(self, state: VmState) -> list[StateFile]:
        """``memory.ram`` (``shared``) or ``memory.diff`` (``diff``; its base RAM file comes with
        the base snapshot), ``device.state`` (for ``full`` the one file holds both), and the
        kernel and initrd the machine booted (content-keyed: QEMU reads them at start-up)."""
        files = [StateFile(path=state.memory_file)]
        if state.device_state != state.memory_file:
            files.append(StateFile(path=state.device_state))
        for path in (state.kernel, state.initrd):
            if path is not None:
                files.append(StateFile(path=path, key=content_key(path)))
        return files

    def relocate(self, state: VmState, files: Mapping[Path, Path], base: VmState | None) -> VmState:
        """The copied files' paths; a ``diff`` gets the base RAM file of this node's copy of its
        base snapshot (size and mtime are checked at restore, as for one made here)."""
        saved = persist.snapshot_from_data(state.data)
        if saved.format == "diff":
            if base is None:
                raise VmmError(f"snapshot {state.state_id} is a diff against {saved.base_state_id}, "
                               "which is not on this node")
            saved = saved.model_copy(update={"base_memory_file": base.memory_file})
        try:
            return state.evolve(memory_file=files[state.memory_file], device_state=files[state.device_state],
                                kernel=files.get(state.kernel, state.kernel),
                                initrd=files.get(state.initrd, state.initrd) if state.initrd else None,
                                data=saved.model_dump(mode="json"))
        except KeyError as exc:
            raise VmmError(f"snapshot {state.state_id}: no copy of {exc.args[0]}") from None

    def _diff_base(self, rec: VmRecord) -> Path | None:
        """The RAM file a clone maps copy-on-write, when a ``diff`` against it is possible: the
        file at that path must still be the one QEMU mapped."""
        if rec.ram_shared or rec.ram_owned or self.config.clone_snapshot != "diff":
            return None
        if not memdiff.base_mappings(rec.pid, rec.ram_file):
            log.warning("the clone's base RAM file is gone or replaced: saving all its RAM",
                        vm_id=rec.vm_id, base=str(rec.ram_file))
            return None
        return rec.ram_file

    async def _save_shared(self, live: _LiveVm, target_dir: Path, was_running: bool) -> _Saved:
        """Device state (x-ignore-shared migration) + a sparse copy of the ``share=on`` RAM file."""
        rec = live.record
        state_path = target_dir / snapshot.STATE_FILE
        save_ms = await snapshot.save_state(live.qmp, state_path, ignore_shared=True,
                                            timeout=self.config.snapshot_timeout_s)
        try:
            memory_file = target_dir / snapshot.MEMORY_FILE
            copied = await self._run(snapshot.copy_sparse, rec.ram_file, memory_file)
        finally:
            if was_running:
                await live.qmp.execute("cont", timeout=self.config.qmp_timeout_s)
        return memory_file, state_path, {"format": "shared", "save_ms": round(save_ms, 2),
                                         "config_section": rec.send_configuration}, {
            "ram_copied_mib": round(copied / 2**20, 1)}

    async def _save_full(self, live: _LiveVm, target_dir: Path, was_running: bool) -> _Saved:
        """All of guest RAM and the device state in one migration stream."""
        rec = live.record
        state_path = target_dir / snapshot.STATE_FILE
        try:
            save_ms = await snapshot.save_state(live.qmp, state_path, ignore_shared=False,
                                                timeout=self.config.snapshot_timeout_s)
        finally:
            if was_running:
                await live.qmp.execute("cont", timeout=self.config.qmp_timeout_s)
        return state_path, state_path, {"format": "full", "save_ms": round(save_ms, 2),
                                        "config_section": rec.send_configuration}, {}

    async def _save_diff(self, live: _LiveVm, target_dir: Path, was_running: bool) -> _Saved:
        """Device state without RAM + the pages changed since the base RAM file + the BIOS block,
        all taken while the VM is stopped; the files are synced after it continues."""
        rec = live.record
        state_path = target_dir / snapshot.STATE_FILE
        diff_path = target_dir / snapshot.DIFF_FILE
        base = os.stat(rec.ram_file)
        started = time.monotonic()
        if was_running:
            await live.qmp.execute("stop", timeout=self.config.qmp_timeout_s)
        try:
            await snapshot.save_devices(live.qmp, state_path, timeout=self.config.snapshot_timeout_s)
            if live.ram_extras is None:
                live.ram_extras = await snapshot.ram_extras(live.qmp, skip=qemu.RAM_ID)
            extras = live.ram_extras
            stats = await self._run(memdiff.save, rec.pid, rec.ram_file, diff_path, extras)
            save_ms = (time.monotonic() - started) * 1000
        finally:
            if was_running:
                await live.qmp.execute("cont", timeout=self.config.qmp_timeout_s)
        await self._run(snapshot.fsync_paths, state_path, diff_path)
        base_state_id = rec.base_state_id or rec.restored_from
        return diff_path, state_path, {
            "format": "diff", "save_ms": round(save_ms, 2), "config_section": False,
            "base_memory_file": rec.ram_file, "base_state_id": base_state_id,
            "base_bytes": base.st_size, "base_mtime_ns": base.st_mtime_ns, "dirty_bytes": stats.data_bytes}, {
            "dirty_mib": round(stats.data_bytes / 2**20, 1), "runs": stats.runs, "scan_ms": round(stats.scan_ms, 1),
            "copy_ms": round(stats.copy_ms, 1), "extras": [e.name for e, _ in extras], "base": base_state_id}

    def _check_base(self, state: VmState, saved: SnapshotRecord) -> Path:
        """The base RAM file of a ``diff`` snapshot, unchanged since the snapshot was taken."""
        base = saved.base_memory_file
        if base is None:
            raise VmmError(f"snapshot {state.state_id}: diff without a base RAM file")
        try:
            st = os.stat(base)
        except OSError as exc:
            raise VmmError(f"snapshot {state.state_id} needs the RAM file {base} of snapshot "
                           f"{saved.base_state_id}, which is gone: {exc.strerror}") from exc
        if (st.st_size, st.st_mtime_ns) != (saved.base_bytes, saved.base_mtime_ns):
            raise VmmError(f"snapshot {state.state_id}: its base RAM file {base} changed since it was taken")
        return base

    async def restore(self, state: VmState, spec: VmSpec, nic: NicHandle | None) -> VmHandle:
        """Start a clone of ``state`` with ``spec``'s disk and ``nic``; it runs when this returns.

        ``shared`` and ``diff`` snapshots: the clone maps the (template's) RAM file ``share=off``;
        for a ``diff`` the changed pages are written into it before the device state is loaded.
        ``full``: the clone gets its own RAM file, filled from the stream.
        """
        self._binary()
        saved = persist.snapshot_from_data(state.data)
        if saved.accel != self.accel.accel:
            raise VmmError(f"snapshot {state.state_id} was made under {saved.accel}, "
                           f"this node runs {self.accel.accel}")
        if spec.initrd is not None and spec.initrd != state.initrd:
            raise VmmError(f"snapshot {state.state_id} was booted with initrd {state.initrd}; "
                           f"a clone cannot use {spec.initrd}")
        if saved.has_nic != (nic is not None):
            raise VmmError(f"snapshot {state.state_id} was made {'with' if saved.has_nic else 'without'} a NIC; "
                           "a clone must have the same devices")
        if nic is not None and saved.guest_mac and nic.guest_mac != saved.guest_mac:
            log.warning("clone NIC MAC differs from the snapshot's; the guest keeps the snapshot's",
                        vm_id=spec.vm_id, snapshot_mac=saved.guest_mac, nic_mac=nic.guest_mac)
        for path in (state.memory_file, state.device_state, state.kernel, state.initrd):
            if path is not None and not path.exists():
                # The kernel (and initrd) must be the very files the snapshot booted: QEMU reads
                # them at start-up and its ROM blobs are part of the saved machine.
                raise VmmError(f"snapshot {state.state_id}: {path} is missing")
        diff: memdiff.DiffIndex | None = None
        diff_base: Path | None = None
        if saved.format == "diff":
            diff_base = self._check_base(state, saved)
            diff = await self._run(memdiff.read_index, state.memory_file)
            if diff.base_bytes != saved.base_bytes:
                raise VmmError(f"snapshot {state.state_id}: {state.memory_file} does not match its base RAM file")
        if spec.memory_mb != state.memory_mb:
            log.info("clone memory size comes from the snapshot", vm_id=spec.vm_id,
                     snapshot_mb=state.memory_mb, requested_mb=spec.memory_mb)
        async with self._lock(spec.vm_id):
            started = time.monotonic()
            workdir = self._workdir(spec.vm_id)
            owned = saved.format == "full"
            if saved.format == "shared":
                ram_file = state.memory_file
                base_state_id: str | None = state.state_id
            elif diff_base is not None:
                ram_file, base_state_id = diff_base, saved.base_state_id
            else:
                ram_file = self.config.mem_dir / f"{spec.vm_id}.ram"
                ram_file.unlink(missing_ok=True)
                base_state_id = None
            disk = spec.rootfs_disk
            live: _LiveVm | None = None
            applied: memdiff.DiffStats | None = None
            try:
                drives = await self._run(volume_drives, spec.vm_id, spec.volumes, saved.volume_slots)
                tap_fd = await self._open_tap(nic)
                machine = MachineSpec(
                    vm_id=spec.vm_id, workdir=workdir, kernel=state.kernel, append=saved.append,
                    memory_mb=state.memory_mb, accel=saved.accel, cpu_model=saved.cpu_model,
                    ram_file=ram_file, ram_shared=owned, disk_path=disk.path, disk_format=disk.format,
                    disk_readonly=disk.readonly, disk_cache=self.config.disk_cache,
                    tb_size_mb=self.config.tb_size_mb, pic=saved.pic, tap_fd=tap_fd,
                    guest_mac=(nic.guest_mac if nic else None), incoming=True, seccomp=self.config.seccomp,
                    initrd=state.initrd, send_configuration=saved.config_section, volume_drives=drives,
                    **self._machine_extras())
                live = await self._launch(machine, {"ram_owned": owned, "restored_from": state.state_id,
                                                    "base_state_id": base_state_id}, spec.cpu_count)
                spawned = time.monotonic()
                if diff is not None:
                    addresses = await snapshot.extra_addresses(live.qmp, diff.extras)
                    applied = await self._run(memdiff.apply, live.record.pid, ram_file, state.memory_file,
                                              diff, addresses)
                running = await snapshot.load_state(live.qmp, state.device_state,
                                                    ignore_shared=saved.format == "shared",
                                                    timeout=self.config.snapshot_timeout_s)
                if not running:
                    # Saved from a paused source: the clone comes up paused too.
                    await live.qmp.execute("cont", timeout=self.config.qmp_timeout_s)
            except BaseException:
                if live is not None:
                    self._vms[spec.vm_id] = live
                    with contextlib.suppress(VmmError):
                        await self._teardown(live, timeout=2.0)
                shutil.rmtree(workdir, ignore_errors=True)
                if owned:
                    ram_file.unlink(missing_ok=True)
                raise
            self._vms[spec.vm_id] = live
            done = time.monotonic()
            self._refill_spare()
            log.info("vm restored", vm_id=spec.vm_id, pid=live.record.pid, state_id=state.state_id,
                     format=saved.format, spawn_ms=round((spawned - started) * 1000, 1),
                     jail_ms=round(live.jail_ms, 1),
                     restore_ms=round((done - started) * 1000, 1),
                     **({"dirty_mib": round(applied.data_bytes / 2**20, 1), "apply_ms": round(
                         applied.scan_ms + applied.copy_ms, 1)} if applied is not None else {}))
            return live.handle()

    async def reattach(self, vm: VmHandle) -> VmHandle:
        """Take over a VM started by an earlier driver (or node-agent process) from its handle."""
        record = persist.record_from_data(vm.data)
        if record.vm_id != vm.vm_id:
            raise VmmError(f"handle of {vm.vm_id} carries the record of {record.vm_id}")
        if not qemu.is_our_qemu(record.pid, record.vm_id, record.workdir):
            raise VmmError(f"VM {vm.vm_id}: pid {record.pid} is not its QEMU any more (exited or reused)")
        old = self._vms.pop(vm.vm_id, None)
        if old is not None:
            await old.ctl.close()
            await old.qmp.close()
        qmp = Qmp(record.vm_id, record.qmp_socket)
        await qmp.connect(timeout=self.config.qmp_timeout_s, pid=record.pid)
        group = VmCgroup(record.cgroup_version, record.cgroup_paths) if record.cgroup_version else None
        live = _LiveVm(record, qmp, ControlChannel(record.vm_id, record.ctl_socket), group)
        self._vms[vm.vm_id] = live
        log.info("vm reattached", vm_id=vm.vm_id, pid=record.pid)
        return live.handle()

    async def shutdown(self, vm: VmHandle, *, timeout: float = 10.0) -> None:
        """QMP ``quit``, then SIGTERM, then SIGKILL; then free the work directory, cgroup and the
        VM's own RAM file (never a snapshot's files). Idempotent."""
        async with self._lock(vm.vm_id):
            live = self._vms.get(vm.vm_id)
            if live is None:
                try:
                    record = persist.record_from_data(vm.data)
                except VmmError:
                    record = None
                if record is None:
                    return
                group = VmCgroup(record.cgroup_version, record.cgroup_paths) if record.cgroup_version else None
                live = _LiveVm(record, Qmp(record.vm_id, record.qmp_socket),
                               ControlChannel(record.vm_id, record.ctl_socket), group)
                self._vms[vm.vm_id] = live
            await self._teardown(live, timeout=timeout)
        self._locks.pop(vm.vm_id, None)

    async def _teardown(self, live: _LiveVm, *, timeout: float) -> None:
        rec = live.record
        ours = qemu.is_our_qemu(rec.pid, rec.vm_id, rec.workdir)
        errors: list[str] = []
        try:
            await live.ctl.close()
            if ours:
                await self._stop_process(live, timeout, errors)
        finally:
            await live.qmp.close()
            self._vms.pop(rec.vm_id, None)
            if live.cgroup is not None:
                try:
                    await self._run(live.cgroup.remove)
                except VmmError as exc:
                    errors.append(str(exc))
            # off the event loop (a work directory's tree, a RAM file's pages: milliseconds each,
            # which 50 kills at once made a tenth of the server's samples); shielded: a cancelled
            # caller still gets the files freed
            await asyncio.shield(self._run(self._free_files, rec))
        if errors:
            raise AbnormalShutdownError(vm_id=rec.vm_id, reason="; ".join(errors))

    def _free_files(self, rec: VmRecord) -> None:
        """The VM's work directory, its own RAM file, its jail uid (once QEMU is gone)."""
        shutil.rmtree(rec.workdir, ignore_errors=True)
        if rec.ram_owned:
            rec.ram_file.unlink(missing_ok=True)
        if rec.jail_uid is not None and self._uids is not None and not qemu.is_running(rec.pid):
            self._uids.release(rec.jail_uid, rec.vm_id)

    async def _stop_process(self, live: _LiveVm, timeout: float, errors: list[str]) -> None:
        rec = live.record
        soft = max(0.5, timeout / 2)
        try:
            if not live.qmp.connected:
                await live.qmp.connect(timeout=min(1.0, soft), pid=rec.pid)
            with contextlib.suppress(VmmError):  # QEMU may close the socket before it answers
                await live.qmp.execute("quit", timeout=soft)
            if await qemu.wait_exit(rec.pid, soft):
                log.info("vm stopped", vm_id=rec.vm_id)
                return
        except VmmError as exc:
            log.warning("QMP quit failed; signalling", vm_id=rec.vm_id, error=str(exc))
        for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 5.0)):
            qemu.send_signal(rec.pid, sig)
            if await qemu.wait_exit(rec.pid, wait):
                log.warning("vm stopped by signal", vm_id=rec.vm_id, signal=sig.name)
                return
        errors.append(f"pid {rec.pid} survived SIGKILL")
