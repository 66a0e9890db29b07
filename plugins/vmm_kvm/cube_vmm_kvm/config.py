"""``[vmm.options]`` of the ``kvm`` plugin: an inert spec, validated from plugins.toml."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class KvmConfig(BaseModel):
    """Options of the QEMU ``microvm`` driver (``[vmm] plugin = "kvm"``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    qemu_binary: str = "qemu-system-x86_64"
    """Name (looked up in ``PATH``) or path of the QEMU system emulator."""
    accel: Literal["auto", "kvm", "tcg"] = "auto"
    """``auto`` uses KVM only where it can run a stock guest (kvm_intel / kvm_amd), else TCG."""
    tb_size_mb: int = Field(default=32, ge=1, le=1024)
    """TCG translation-cache size per VM (ignored under KVM)."""
    cpu_model: str | None = None
    """``-cpu`` value; default ``host`` under KVM and ``qemu64,+arat`` under TCG."""
    pic: bool = True
    """Keep the legacy 8259 PIC. Measured here: with ``pic=off`` under TCG the guest boots ~50 ms
    sooner but its timers never fire (``time.sleep(0.3)`` hangs), so leave it on."""
    mem_dir: Path = Path("/dev/shm/cube")
    """tmpfs directory for the RAM files of cold-booted VMs (``share=on``)."""
    run_dir: Path = Path("/run/cube/vms")
    """One work directory per VM: sockets, pidfile, console log, saved record."""
    kernel: Path | None = None
    """Guest vmlinux used when a spec names none; normally the core passes ``VmSpec.kernel``."""
    disk_cache: Literal["writeback", "none", "unsafe", "directsync", "writethrough"] = "writeback"
    seccomp: bool = True
    """Run QEMU under ``-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,...``."""
    tap_vnet_hdr: bool = False
    """Open taps with IFF_VNET_HDR (must be the same for a template and its clones)."""
    cgroups: bool = True
    """Put every VM in its own cgroup (v2 or v1) with CPU, memory and pids limits."""
    cgroup_parent: str = "cube"
    memory_overhead_mb: int = Field(default=256, ge=0)
    """Allowed on top of guest RAM before the cgroup OOM-kills QEMU (device model, TCG cache)."""
    cpu_cores_per_vcpu: float = Field(default=1.0, ge=0.0)
    """CPU quota per vCPU in cores; 0 means no CPU limit."""
    pids_max: int = Field(default=256, ge=16)
    boot_timeout_s: float = Field(default=60.0, gt=0)
    qmp_timeout_s: float = Field(default=10.0, gt=0)
    """How long to wait for QMP to answer after spawn, and for most QMP commands."""
    snapshot_timeout_s: float = Field(default=60.0, gt=0)
    clone_snapshot: Literal["diff", "full"] = "diff"
    """How a clone is saved: ``diff`` (the pages it changed since its template + device state,
    proportional to what the guest wrote) or ``full`` (all guest RAM in the migration stream, as
    before; also the fallback when the template's RAM file is gone)."""
