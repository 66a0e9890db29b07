"""What ``cube doctor`` checks for the ``cow`` storage: the tools that build template images and
sandbox disks, and free space under its root."""

from __future__ import annotations

import shutil
from pathlib import Path

from cube_core import Check

from .config import CowConfig

TOOLS = {"debootstrap": "debootstrap", "mkfs.ext4": "e2fsprogs", "qemu-img": "qemu-utils"}
"""Tool -> the Debian package that has it."""


def check_tools(tools: dict[str, str] = TOOLS) -> Check:
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return Check("image-tools", "ok", ", ".join(tools))
    packages = " ".join(sorted({tools[t] for t in missing}))
    return Check("image-tools", "fail", "missing: " + ", ".join(missing), f"apt-get install {packages}")


def check_space(root: Path, min_free_gb: float = 10.0) -> Check:
    probe = root
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free / 2**30
    if free >= min_free_gb:
        return Check("storage-space", "ok", f"{free:.1f} GiB free at {probe}")
    return Check("storage-space", "warn", f"{free:.1f} GiB free at {probe}",
                 f"free at least {min_free_gb:.0f} GiB for images, disks and snapshots")


def doctor_checks(config: CowConfig) -> list[Check]:
    return [check_tools(), check_space(config.root)]
