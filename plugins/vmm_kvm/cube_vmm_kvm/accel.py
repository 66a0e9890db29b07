"""Choosing the accelerator: KVM where the host can run a stock guest kernel, TCG otherwise.

``/dev/kvm`` alone proves little: on a nested PVM host (``kvm_pvm``) it exists and answers the API
version ioctl, but a stock Linux guest does not boot. So ``auto`` picks KVM only when the vendor
module is ``kvm_intel`` or ``kvm_amd`` and ``/dev/kvm`` opens read-write with the stable API.
The result is what ``cube doctor`` shows and what every sandbox reports as its isolation.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from cube_core import Isolation

log = structlog.get_logger(__name__)

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
VENDOR_MODULES = ("kvm_intel", "kvm_amd")
PVM_MODULE = "kvm_pvm"
NO_KVM_REASON = "this host cannot run a stock guest kernel with KVM"


@dataclass(frozen=True)
class AccelReport:
    """What QEMU will use and why (for ``cube doctor`` and the per-sandbox isolation field)."""

    accel: Literal["kvm", "tcg"]
    isolation: Isolation
    reason: str
    kvm_usable: bool


def _kvm_device_usable(dev: Path) -> tuple[bool, str]:
    try:
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"{dev} cannot be opened read-write ({errno.errorcode.get(exc.errno or 0, exc)})"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return False, f"KVM_GET_API_VERSION on {dev} failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != KVM_API_VERSION:
        return False, f"{dev} reports KVM API {version}, expected {KVM_API_VERSION}"
    return True, f"{dev} answers KVM API {KVM_API_VERSION}"


def probe_kvm(sys_root: Path = Path("/")) -> tuple[bool, str]:
    """Whether hardware KVM that can run a stock guest is available, and why (or why not)."""
    modules = sys_root / "sys" / "module"
    if (modules / PVM_MODULE).exists():
        return False, f"{NO_KVM_REASON}: /dev/kvm is provided by {PVM_MODULE} (nested PVM)"
    vendor = next((m for m in VENDOR_MODULES if (modules / m).exists()), None)
    if vendor is None:
        return False, f"{NO_KVM_REASON}: neither kvm_intel nor kvm_amd is loaded"
    ok, why = _kvm_device_usable(sys_root / "dev" / "kvm")
    if not ok:
        return False, f"{NO_KVM_REASON}: {why}"
    return True, f"{vendor} loaded and {why}"


def detect(requested: Literal["auto", "kvm", "tcg"] = "auto", *,
           sys_root: Path = Path("/")) -> AccelReport:
    """Decide the accelerator for ``requested`` (the ``accel`` option).

    ``kvm`` is honoured even where the probe says no (the operator knows better), but the reason
    says so; ``tcg`` is always possible. Isolation is ``kvm`` only when QEMU really uses KVM.
    """
    usable, why = probe_kvm(sys_root)
    if requested == "tcg":
        report = AccelReport("tcg", "tcg", "TCG requested by configuration", usable)
    elif requested == "kvm":
        reason = "KVM requested by configuration" + ("" if usable else f" (warning: {why})")
        report = AccelReport("kvm", "kvm", reason, usable)
    elif usable:
        report = AccelReport("kvm", "kvm", why, usable)
    else:
        report = AccelReport("tcg", "tcg", f"{why}; using TCG emulation (not a security boundary)", usable)
    log.debug("accelerator chosen", accel=report.accel, reason=report.reason)
    return report


def host_tsc_khz(cpuinfo: Path = Path("/proc/cpuinfo")) -> int:
    """The host TSC rate in kHz (under TCG the guest TSC runs at the host rate).

    Used as ``tsc_early_khz``: without it the guest's PIT calibration fails about half the time
    under TCG, the TSC is marked unstable and each idle guest burns 1-2 % of a core.
    """
    try:
        text = cpuinfo.read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            try:
                return round(float(line.split(":", 1)[1]) * 1000)
            except ValueError:
                return 0
    return 0
