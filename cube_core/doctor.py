"""Host checks for ``cube doctor``: can this machine run Cube, and with what isolation?

Each check returns a :class:`Check` with a status (ok / warn / fail), what was found and how to
fix it. ``kvm_usability()`` is the one place that decides whether KVM can run a stock guest here;
the VMM plugin's accelerator choice agrees with it.
"""

from __future__ import annotations

import ctypes
import os
import platform
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    hint: str = ""


@dataclass(frozen=True)
class KvmReport:
    usable: bool
    module: str | None
    reason: str


def kvm_usability(sys_module: Path = Path("/sys/module"), dev: Path = Path("/dev/kvm")) -> KvmReport:
    """Whether KVM can run a stock Linux guest: /dev/kvm must be openable and backed by
    ``kvm_intel`` or ``kvm_amd``. A ``kvm_pvm`` module (nested PVM) runs only tiny guests."""
    if not dev.exists():
        return KvmReport(False, None, "/dev/kvm does not exist (no hardware virtualization exposed)")
    modules = {m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if (sys_module / m).exists()}
    if "kvm_pvm" in modules and not modules & {"kvm_intel", "kvm_amd"}:
        return KvmReport(False, "kvm_pvm", "KVM here is nested PVM (kvm_pvm): a stock Linux guest "
                         "kernel does not boot with it")
    module = next((m for m in ("kvm_intel", "kvm_amd") if m in modules), None)
    if module is None:
        return KvmReport(False, None, "/dev/kvm exists but neither kvm_intel nor kvm_amd is loaded")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmReport(False, module, f"/dev/kvm is not readable and writable by uid {os.getuid()}")
    return KvmReport(True, module, f"KVM via {module}")


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", "ok" if ok else "fail", platform.python_version(),
                 "" if ok else "install Python 3.11 or newer")


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("root", "ok", "running as root")
    return Check("root", "warn", f"running as uid {os.geteuid()}",
                 "network slots, cgroups and tap devices need root (or CAP_NET_ADMIN + CAP_SYS_ADMIN)")


def check_qemu(binary: str = "qemu-system-x86_64") -> tuple[Check, Check]:
    path = shutil.which(binary)
    if path is None:
        missing = Check("qemu", "fail", f"{binary} not found", "apt-get install qemu-system-x86 qemu-utils")
        return missing, Check("tcg", "fail", "no QEMU, so no TCG", missing.hint)
    version = (_run([path, "--version"]) or "?").splitlines()[0]
    accels = _run([path, "-accel", "help"]) or ""
    tcg = Check("tcg", "ok", "QEMU TCG emulation available") if "tcg" in accels else \
        Check("tcg", "fail", "this QEMU has no TCG", "install Debian's qemu-system-x86")
    return Check("qemu", "ok", version), tcg


def check_kvm(report: KvmReport | None = None) -> Check:
    report = report or kvm_usability()
    if report.usable:
        return Check("kvm", "ok", f"{report.reason}: sandboxes get isolation 'kvm'")
    return Check("kvm", "warn", f"KVM cannot run a stock guest here: {report.reason}; TCG will be used "
                 "(isolation 'tcg': emulation, not a security boundary)",
                 "use a bare-metal host with VT-x/AMD-V (kvm_intel/kvm_amd), or enable nested virtualization")


def check_cgroups(root: Path = Path("/sys/fs/cgroup")) -> Check:
    if (root / "cgroup.controllers").exists():
        controllers = (root / "cgroup.controllers").read_text().split()
        missing = [c for c in ("cpu", "memory", "pids") if c not in controllers]
        if missing:
            return Check("cgroups", "warn", f"cgroup v2 without {', '.join(missing)}",
                         "enable the controllers in the parent's cgroup.subtree_control")
        return Check("cgroups", "ok", "cgroup v2 with cpu, memory, pids")
    v1 = [c for c in ("cpu", "memory", "pids") if (root / c).is_dir()]
    if len(v1) == 3:
        return Check("cgroups", "ok", "cgroup v1 with cpu, memory, pids")
    return Check("cgroups", "warn", "no usable cgroup controllers found: per-sandbox CPU/memory limits off",
                 "mount cgroup2 on /sys/fs/cgroup (systemd.unified_cgroup_hierarchy=1)")


def check_tun(dev: Path = Path("/dev/net/tun")) -> Check:
    if dev.exists():
        return Check("tun", "ok", str(dev))
    return Check("tun", "fail", f"{dev} missing", "modprobe tun (or mknod /dev/net/tun c 10 200)")


def check_bpf() -> Check:
    libc = ctypes.CDLL(None, use_errno=True)
    # BPF_MAP_CREATE (0) of a 1-entry array map: the cheapest proof that bpf() works here.
    attr = (ctypes.c_uint32 * 30)(2, 4, 4, 1)
    fd = libc.syscall(321, 0, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd >= 0:
        os.close(fd)
        return Check("bpf", "ok", "bpf() syscall works (map created)")
    err = ctypes.get_errno()
    return Check("bpf", "warn", f"bpf() failed: {os.strerror(err)}; egress policy unavailable",
                 "run as root on a kernel with CONFIG_BPF_SYSCALL; check kernel.unprivileged_bpf_disabled")


def check_disk(path: Path, min_free_gb: float = 10.0) -> Check:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free = usage.free / 2**30
    status: Status = "ok" if free >= min_free_gb else "warn"
    return Check("disk", status, f"{free:.1f} GiB free at {probe}",
                 "" if status == "ok" else f"free at least {min_free_gb:.0f} GiB for images and snapshots")


def check_tools() -> Check:
    missing = [t for t in ("debootstrap", "mkfs.ext4", "qemu-img", "nft", "clang") if shutil.which(t) is None]
    if not missing:
        return Check("tools", "ok", "debootstrap, mkfs.ext4, qemu-img, nft, clang")
    return Check("tools", "warn", "missing: " + ", ".join(missing),
                 "run `make install` (apt-get install debootstrap e2fsprogs qemu-utils nftables clang)")


def run_checks(state_dir: Path) -> list[Check]:
    qemu, tcg = check_qemu()
    return [check_python(), check_root(), qemu, check_kvm(), tcg, check_cgroups(), check_tun(),
            check_bpf(), check_disk(state_dir), check_tools()]
