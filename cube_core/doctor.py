"""Host checks for ``cube doctor``: can this machine run Cube, and with what isolation?

A :class:`Check` has a status (ok / warn / fail), what was found and how to fix it. The core checks
only what the core itself needs (Python, privileges, the state directory); every plugin contributes
the checks of what it uses through the ``cube_doctor_checks`` hook (the VMM plugin: KVM, TCG, QEMU;
the network plugin: BPF, nftables; the storage plugin: its image tools).
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    """One line of ``cube doctor``: ``fail`` makes ``cube doctor`` exit 1, ``warn`` does not.

    :param name: short name of what was checked (``kvm``, ``bpf``, ``python``).
    :param status: ``ok``, ``warn`` (Cube runs, with less) or ``fail`` (Cube cannot run).
    :param detail: what was found.
    :param hint: how to fix it (empty when ``ok``).
    """

    name: str
    status: Status
    detail: str
    hint: str = ""


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", "ok" if ok else "fail", platform.python_version(),
                 "" if ok else "install Python 3.11 or newer")


def check_root() -> Check:
    if os.geteuid() == 0:
        return Check("root", "ok", "running as root")
    return Check("root", "warn", f"running as uid {os.geteuid()}",
                 "network slots, cgroups and tap devices need root (or CAP_NET_ADMIN + CAP_SYS_ADMIN)")


def check_disk(path: Path, min_free_gb: float = 10.0) -> Check:
    """Free space where the state directory is (or would be created)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    free = usage.free / 2**30
    status: Status = "ok" if free >= min_free_gb else "warn"
    return Check("state-dir", status, f"{path}: {free:.1f} GiB free at {probe}",
                 "" if status == "ok" else f"free at least {min_free_gb:.0f} GiB for images and snapshots")


def core_checks(state_dir: Path) -> list[Check]:
    return [check_python(), check_root(), check_disk(state_dir)]
