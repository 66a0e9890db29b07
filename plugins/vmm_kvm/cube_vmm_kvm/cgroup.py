"""Per-VM cgroups with CPU, memory and pids limits, on cgroup v2 or v1.

v2 (a unified hierarchy that offers the ``cpu``, ``memory`` and ``pids`` controllers):
``<mount>/<parent>/<vm_id>/{cpu.max,memory.max,pids.max}``.
v1 (each controller mounted on its own, as on hosts that still boot with the legacy hierarchy):
``<cpu mount>/<parent>/<vm_id>/cpu.cfs_{quota,period}_us``,
``<memory mount>/<parent>/<vm_id>/memory.limit_in_bytes`` and ``<pids mount>/<parent>/<vm_id>/pids.max``.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import structlog
from cube_core import VmmError

log = structlog.get_logger(__name__)

CONTROLLERS = ("cpu", "memory", "pids")


@dataclass(frozen=True)
class CgroupLimits:
    """Limits of one VM; ``None`` leaves a resource unlimited."""

    cpu_quota_us: int | None = None
    cpu_period_us: int = 100_000
    memory_bytes: int | None = None
    pids_max: int | None = None


@dataclass(frozen=True)
class CgroupLayout:
    """Where the controllers live: one v2 mount, or one v1 mount per controller."""

    version: Literal[1, 2]
    mounts: dict[str, Path]
    """controller -> hierarchy root (the same path for every controller under v2)."""


def _mount_table(mounts_file: Path) -> Iterator[tuple[Path, str, set[str]]]:
    for line in mounts_file.read_text().splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        yield Path(parts[1].replace("\\040", " ")), parts[2], set(parts[3].split(","))


def detect_layout(mounts_file: Path = Path("/proc/self/mounts")) -> CgroupLayout | None:
    """Find the cgroup hierarchies that offer our controllers; v2 wins when it has all three."""
    v1: dict[str, Path] = {}
    v2: Path | None = None
    for mountpoint, fstype, options in _mount_table(mounts_file):
        if fstype == "cgroup2":
            try:
                available = set((mountpoint / "cgroup.controllers").read_text().split())
            except OSError:
                continue
            if set(CONTROLLERS) <= available:
                v2 = mountpoint
        elif fstype == "cgroup":
            for controller in CONTROLLERS:
                if controller in options and controller not in v1:
                    v1[controller] = mountpoint
    if v2 is not None:
        return CgroupLayout(2, {c: v2 for c in CONTROLLERS})
    if v1:
        return CgroupLayout(1, v1)
    return None


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise VmmError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


class VmCgroup:
    """The cgroup directories of one VM (one per hierarchy)."""

    def __init__(self, version: Literal[1, 2], paths: dict[str, Path]) -> None:
        self.version = version
        self.paths = paths
        """controller -> directory of this VM's cgroup."""

    @property
    def dirs(self) -> list[Path]:
        return sorted(set(self.paths.values()))

    @classmethod
    def create(cls, layout: CgroupLayout, parent: str, name: str, limits: CgroupLimits) -> VmCgroup:
        """Create ``<parent>/<name>`` in every hierarchy and write the limits."""
        paths = {c: root / parent / name for c, root in layout.mounts.items()}
        if layout.version == 2:
            root = layout.mounts["cpu"]
            wanted = " ".join(f"+{c}" for c in CONTROLLERS)
            for directory in (root, root / parent):
                directory.mkdir(exist_ok=True)
                enabled = set((directory / "cgroup.subtree_control").read_text().split())
                if not set(CONTROLLERS) <= enabled:
                    _write(directory / "cgroup.subtree_control", wanted)
        for directory in sorted(set(paths.values())):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise VmmError(f"cannot create cgroup {directory}: {exc.strerror}") from exc
        group = cls(layout.version, paths)
        group.apply(limits)
        return group

    def apply(self, limits: CgroupLimits) -> None:
        if self.version == 2:
            d = self.paths["cpu"]
            quota = "max" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
            _write(d / "cpu.max", f"{quota} {limits.cpu_period_us}")
            _write(d / "memory.max", "max" if limits.memory_bytes is None else str(limits.memory_bytes))
            _write(d / "pids.max", "max" if limits.pids_max is None else str(limits.pids_max))
            return
        if "cpu" in self.paths:
            d = self.paths["cpu"]
            _write(d / "cpu.cfs_period_us", str(limits.cpu_period_us))
            _write(d / "cpu.cfs_quota_us", "-1" if limits.cpu_quota_us is None else str(limits.cpu_quota_us))
        if "memory" in self.paths:
            d = self.paths["memory"]
            _write(d / "memory.limit_in_bytes", "-1" if limits.memory_bytes is None else str(limits.memory_bytes))
        if "pids" in self.paths:
            _write(self.paths["pids"] / "pids.max", "max" if limits.pids_max is None else str(limits.pids_max))

    def add_pid(self, pid: int) -> None:
        """Move a process (all its threads) into this VM's cgroup in every hierarchy."""
        for directory in self.dirs:
            _write(directory / "cgroup.procs", str(pid))

    def pids(self) -> set[int]:
        found: set[int] = set()
        for directory in self.dirs:
            try:
                found.update(int(p) for p in (directory / "cgroup.procs").read_text().split())
            except OSError:
                continue
        return found

    def exists(self) -> bool:
        return any(d.exists() for d in self.dirs)

    def remove(self, *, timeout: float = 5.0) -> None:
        """Remove the directories (idempotent). Processes must be gone; an exiting one is waited for."""
        deadline = time.monotonic() + timeout
        for directory in self.dirs:
            while True:
                try:
                    os.rmdir(directory)
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                        raise VmmError(f"cannot remove cgroup {directory}: {exc.strerror}") from exc
                    time.sleep(0.02)
        log.debug("cgroup removed", dirs=[str(d) for d in self.dirs])
