"""What ``cube doctor`` checks for the ``kvm`` VMM: QEMU and its TCG, KVM (the same decision
:func:`accel.detect` makes for every VM), cgroups, ``/dev/net/tun``, the swap idle reclaim
pages into, and KSM merging guest pages across tenants."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from cube_core import Check

from .accel import detect
from .cgroup import detect_layout
from .config import KvmConfig
from .reclaim import swap_devices, usable_swap


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def check_qemu(binary: str) -> tuple[Check, Check]:
    """The QEMU binary and whether it has TCG (the fallback where KVM cannot be used)."""
    path = shutil.which(binary)
    if path is None:
        hint = "apt-get install qemu-system-x86 qemu-utils (or set [vmm.options] qemu_binary)"
        return (Check("qemu", "fail", f"{binary} not found", hint),
                Check("tcg", "fail", "no QEMU, so no TCG", hint))
    version = ((_run([path, "--version"]) or "?").splitlines() or ["?"])[0]
    accels = _run([path, "-accel", "help"]) or ""
    tcg = Check("tcg", "ok", "QEMU TCG emulation available") if "tcg" in accels.split() else \
        Check("tcg", "fail", "this QEMU has no TCG", "install Debian's qemu-system-x86")
    return Check("qemu", "ok", f"{version} ({path})"), tcg


def check_kvm(config: KvmConfig, sys_root: Path = Path("/")) -> Check:
    """What isolation VMs get here, from the same probe the driver uses."""
    report = detect(config.accel, sys_root=sys_root)
    if report.accel == "kvm" and report.kvm_usable:
        return Check("kvm", "ok", f"{report.reason}: sandboxes get isolation 'kvm'")
    if report.accel == "kvm":
        return Check("kvm", "warn", report.reason, "set [vmm.options] accel = \"auto\" on this host")
    return Check("kvm", "warn", f"{report.reason}: sandboxes get isolation 'tcg'",
                 "use a bare-metal host with VT-x/AMD-V (kvm_intel/kvm_amd), or enable nested virtualization")


def check_cgroups(config: KvmConfig, mounts: Path = Path("/proc/self/mounts")) -> Check:
    """The cpu, memory and pids controllers; without them the driver refuses to start."""
    if not config.cgroups:
        return Check("cgroups", "warn", "[vmm.options] cgroups = false: VMs run without CPU/memory limits",
                     "turn cgroups back on outside debugging")
    layout = detect_layout(mounts)
    if layout is None:
        return Check("cgroups", "fail", "no cgroup hierarchy with the cpu, memory and pids controllers",
                     "mount cgroup2 on /sys/fs/cgroup (systemd.unified_cgroup_hierarchy=1) and enable "
                     "the controllers")
    return Check("cgroups", "ok", f"cgroup v{layout.version} with {', '.join(sorted(layout.mounts))}")


def check_tun(dev: Path = Path("/dev/net/tun")) -> Check:
    if dev.exists():
        return Check("tun", "ok", str(dev))
    return Check("tun", "fail", f"{dev} missing", "modprobe tun (or mknod /dev/net/tun c 10 200)")


def check_reclaim(config: KvmConfig, swaps: Path = Path("/proc/swaps")) -> Check:
    """Idle reclaim (``[vmm.options] idle_reclaim``) and the swap it needs: RAM-backed unless
    ``idle_reclaim_disk_swap``."""
    if not config.idle_reclaim:
        return Check("idle_reclaim", "ok", "off ([vmm.options] idle_reclaim = false)")
    ok, why = usable_swap(swap_devices(swaps), allow_disk=config.idle_reclaim_disk_swap)
    if ok:
        return Check("idle_reclaim", "ok", f"idle VMs are paged out to {why}")
    return Check("idle_reclaim", "warn", f"off: {why}",
                 "scripts/zram-swap.sh setup 8G (RAM-backed swap; see plugins/vmm_kvm/README.md, \"Idle reclaim\")")


def check_ksm(config: KvmConfig, run: Path = Path("/sys/kernel/mm/ksm/run")) -> Check:
    """Whether the host's KSM merges guest RAM (``[vmm.options] mem_merge`` marks it mergeable):
    it merges identical pages of every VM on the host, also different teams', and memory
    deduplication is a cross-VM side channel (docs/security.md, "Memory shared between VMs")."""
    try:
        running = run.read_text().strip() == "1"
    except OSError:
        running = False
    if not config.mem_merge:
        return Check("ksm", "ok", "guest RAM is not mergeable ([vmm.options] mem_merge = false)")
    if not running:
        return Check("ksm", "ok", "KSM is not running: no guest page is merged")
    return Check("ksm", "warn", "KSM runs and merges guest pages across all VMs, also different teams' "
                 "(a cross-VM side channel)",
                 "on a host shared by tenants that do not trust each other set [vmm.options] mem_merge = "
                 "false, or echo 0 > /sys/kernel/mm/ksm/run")


def doctor_checks(config: KvmConfig) -> list[Check]:
    qemu, tcg = check_qemu(config.qemu_binary)
    return [qemu, check_kvm(config), tcg, check_cgroups(config), check_tun(), check_reclaim(config),
            check_ksm(config)]
