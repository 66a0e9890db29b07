"""``[vmm.options]`` of the ``kvm`` plugin: an inert spec, validated from plugins.toml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .nodenames import node_defaults


class KvmConfig(BaseModel):
    """Options of the QEMU ``microvm`` driver (``[vmm] plugin = "kvm"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    qemu_binary: str = "qemu-system-x86_64"
    """Name (looked up in ``PATH``) or path of the QEMU system emulator."""
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    """``auto`` uses KVM only where it can run a stock guest (kvm_intel / kvm_amd), else TCG."""
    tb_size_mb: int = Field(default=32, ge=1, le=1024)
    """TCG translation-cache size per VM (ignored under KVM). The largest part of an idle sandbox
    under TCG: a sandbox that ran a few commands has all of it resident (see docs/bench.md,
    "Memory per sandbox"); smaller saves memory and costs command latency (retranslation)."""
    guest_aslr: Literal["auto", "on", "off"] = "auto"
    """Address-space layout randomization inside the guests (``kernel.randomize_va_space``, set
    by the guest agent when the node makes a guest a sandbox). ``auto``: on under KVM, off under
    TCG. QEMU 7.2's TCG keys a translation by the guest's virtual address, so with ASLR every new
    process (each ``commands.run`` starts a ``bash``) is translated from scratch: measured,
    ``commands.run("true")`` 153 -> 33 ms p50 with it off (docs/bench.md). Off weakens exploit
    mitigation for the sandbox's own processes against each other, not the VM boundary (and a
    TCG guest is not a security boundary anyway: docs/security.md)."""
    mem_merge: bool = True
    """Mark guest RAM mergeable (``madvise(MADV_MERGEABLE)``, QEMU's ``mem-merge``, its default),
    so that KSM, when the host runs it (``/sys/kernel/mm/ksm/run = 1``), can merge identical
    pages across VMs. Costs nothing while KSM is off; the saving and ksmd's CPU with it on are in
    docs/bench.md. ``false`` keeps guest RAM out of KSM (``mem-merge=off``)."""
    cpu_model: str | None = None
    """``-cpu`` value; default ``host`` under KVM and ``qemu64,+arat`` under TCG."""
    pic: bool = True
    """Keep the legacy 8259 PIC. Measured here: with ``pic=off`` under TCG the guest boots ~50 ms
    sooner but its timers never fire (``time.sleep(0.3)`` hangs), so leave it on."""
    mem_dir: Path = Path("/dev/shm/cube")
    """tmpfs directory for the RAM files of cold-booted VMs (``share=on``). Default
    ``/dev/shm/cube`` for node ``local``, else ``/dev/shm/cube/<node_id>``."""
    run_dir: Path = Path("/run/cube/vms")
    """One work directory per VM: sockets, pidfile, console log, saved record. Default
    ``/run/cube/vms`` for node ``local``, else ``/run/cube/<node_id>/vms``."""
    kernel: Path | None = None
    """Guest vmlinux used when a spec names none; normally the core passes ``VmSpec.kernel``."""
    disk_cache: Literal["writeback", "none", "unsafe", "directsync", "writethrough"] = "writeback"
    seccomp: bool = True
    """Run QEMU under ``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,...``."""
    tap_vnet_hdr: bool = False
    """Open taps with IFF_VNET_HDR (must be the same for a template and its clones)."""
    jail: bool = True
    """Run every QEMU in its jail (own uid/gid, no capabilities, ``no_new_privs``, own mount/PID/
    IPC/UTS namespaces, a root holding only the VM's files). Off only for debugging and for the
    ``cube bench --jail off`` comparison."""
    uid_range: tuple[int, int] = (400000, 409999)
    """Inclusive range of uids for jailed QEMUs, one per running VM (gid = uid). Must not overlap
    real users; 0 is refused."""
    jail_group: int = 399999
    """Supplementary gid of every jailed QEMU: shared template files (the RAM file of a template
    snapshot) are given this group. Must not be a real group."""
    jail_root: Path = Path("/run/cube/jail")
    """Empty directory over which each jailer mounts its VM's tmpfs root (in its own namespace;
    nodes on one host may share it)."""
    uid_lease_dir: Path = Path("/run/cube/uids")
    """One lease file per uid in use (survives a node-agent restart). Shared by every node on the
    host on purpose, so no two nodes hand out the same jail uid: keep it the same for all."""
    console_ring_kb: int = Field(default=128, ge=4, le=16384)
    """Size of the serial console ring buffer kept inside QEMU (rounded down to a power of two).
    Nothing is written to disk, so a guest flooding ``/dev/ttyS0`` cannot fill the host."""
    cgroups: bool = True
    """Put every VM in its own cgroup (v2 or v1) with CPU, memory (+swap), pids and IO limits.
    Mandatory when on: a VM whose limits cannot be set does not start, and a host without the
    controllers fails ``start()``. Off only for debugging."""
    cpu_weight: int = Field(default=100, ge=1, le=10000)
    """Relative CPU weight of a VM (cgroup v2 ``cpu.weight``; v1 ``cpu.shares`` = weight * 1024 / 100)."""
    swap_mb: int = Field(default=0, ge=0)
    """Swap a VM may use on top of its memory limit (v2 ``memory.swap.max``, v1 ``memsw``)."""
    idle_reclaim: bool = True
    """Page idle VMs' private memory (translation cache, QEMU's heap, guest pages written) out to
    RAM-backed swap (zram), where it is kept compressed: a paused sandbox right after its pause, a
    running VM once it has been idle for ``idle_reclaim_after_s`` (warm-pool members only with
    ``idle_reclaim_pool``). Needs swap on the host
    (``scripts/zram-swap.sh``); without it this stays off (logged once, ``cube doctor`` says so).
    Costs the first command after a reclaim its page faults back (docs/bench.md). With it on and
    ``swap_mb = 0``, a VM may swap up to its memory limit (cgroup v2 ``memory.swap.max``)."""
    idle_reclaim_after_s: float = Field(default=20.0, ge=1.0)
    """How long a running VM must be idle before it is reclaimed (one task checks all VMs every
    half of this)."""
    idle_reclaim_cpu_pct: float = Field(default=2.0, gt=0.0)
    """Idle: its QEMU used less than this % of one core (measured over at least half of
    ``idle_reclaim_after_s``; an idle TCG guest uses 0.1-0.5 %). The driver's one idle threshold:
    the node's sampler asks it too (``VmmDriver.activity``; with ``idle_reclaim = false`` the
    readings go on, only the page-outs stop)."""
    idle_reclaim_pool: bool = False
    """Reclaim warm-pool members too (right after their pause). Off: a member's warm-up filled its
    translation cache so that the first command is fast; paged out, a pool hit's first command
    faults it back (measured here: p50 120 -> 310 ms at c=1). Pool members are few."""
    idle_reclaim_refault_mib: float = Field(default=4.0, ge=0.0)
    """Reclaim a VM that stays idle again once this much of what it swapped out has come back
    (its ``VmSwap`` dropped by it: e.g. the node's metrics ask every ``[core]
    sample_idle_interval_s`` wakes the guest agent, which faults ~10 MiB of translations and
    agent memory back in; measured in docs/bench.md); 0: once per idle period."""
    idle_reclaim_disk_swap: bool = False
    """Reclaim also when the host's swap is on a disk (a partition or file, not zram). Off: guest
    memory would be written to a disk and outlive the VM there (docs/security.md)."""
    io_read_bps: int = Field(default=256 << 20, ge=0)
    io_write_bps: int = Field(default=128 << 20, ge=0)
    io_read_iops: int = Field(default=8000, ge=0)
    io_write_iops: int = Field(default=4000, ge=0)
    """Per-VM IO limits on the block device that holds its disk (0: unlimited). Disks on a file
    system without a block device (tmpfs) have no device to throttle."""
    cgroup_parent: str = "cube"
    """Cgroup (in every hierarchy) holding one child per VM. Default ``cube`` for node
    ``local``, else ``cube-<node_id>``."""
    memory_overhead_mb: int = Field(default=256, ge=0)
    """Allowed on top of guest RAM before the cgroup OOM-kills QEMU (device model, TCG cache)."""
    cpu_cores_per_vcpu: float = Field(default=1.0, ge=0.0)
    """CPU quota per vCPU in cores; 0 means no CPU limit."""
    pids_max: int = Field(default=256, ge=16)
    boot_timeout_s: float = Field(default=60.0, gt=0)
    qmp_timeout_s: float = Field(default=10.0, gt=0)
    """How long to wait for QMP to answer after spawn, and for most QMP commands."""
    snapshot_timeout_s: float = Field(default=60.0, gt=0)
    volume_slots: int = Field(default=2, ge=0, le=8)
    """Spare virtio-blk devices every VM gets for volumes (``microvm`` has no hotplug, and clones
    keep their snapshot's devices): a sandbox can mount this many volumes. Changing it changes the
    template snapshots (they are rebuilt)."""
    clone_snapshot: Literal["diff", "full"] = "diff"
    """How a clone is saved: ``diff`` (the pages it changed since its template + device state,
    proportional to what the guest wrote) or ``full`` (all guest RAM in the migration stream, as
    before; also the fallback when the template's RAM file is gone)."""

    def for_node(self, node_id: str) -> KvmConfig:
        """This config with ``node_id``'s defaults for every per-node option the operator did not
        set (``run_dir``, ``mem_dir``, ``cgroup_parent``; see :mod:`.nodenames`)."""
        update = {k: v for k, v in node_defaults(node_id).items() if k not in self.model_fields_set}
        return self.model_copy(update=update) if update else self

    @model_validator(mode="after")
    def _check_ranges(self) -> KvmConfig:
        lo, hi = self.uid_range
        if lo <= 0 or hi < lo:
            raise ValueError(f"uid_range {lo}-{hi}: must be above 0 and not empty")
        if self.jail_group <= 0 or lo <= self.jail_group <= hi:
            raise ValueError(f"jail_group {self.jail_group}: must be above 0 and outside uid_range")
        return self
