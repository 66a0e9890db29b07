"""Per-VM cgroups with CPU, memory (+swap), pids and IO limits, on cgroup v2 or v1.

v2 (a unified hierarchy that offers the ``cpu``, ``memory``, ``pids`` (and ``io``) controllers):
``<mount>/<parent>/<vm_id>/{cpu.max,cpu.weight,memory.max,memory.swap.max,pids.max,io.max}``.
v1 (each controller mounted on its own, as on hosts that still boot with the legacy hierarchy):
``cpu.cfs_{quota,period}_us`` and ``cpu.shares``, ``memory.limit_in_bytes`` and
``memory.memsw.limit_in_bytes``, ``pids.max``, ``blkio.throttle.{read,write}_{bps,iops}_device``.

Limits are mandatory: any limit that cannot be written raises ``VmmError`` and the VM does not
start. The only tolerated gap is swap accounting that the kernel does not offer on a host that
has no swap at all (nothing to limit).
"""

from __future__ import annotations

import contextlib
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
IO_CONTROLLER = {1: "blkio", 2: "io"}
"""The IO controller's name per cgroup version; its limits are per block device."""


@dataclass(frozen=True)
class CgroupLimits:
    """Limits of one VM; ``None`` leaves a resource unlimited."""

    cpu_quota_us: int | None = None
    cpu_period_us: int = 100_000
    memory_bytes: int | None = None
    swap_bytes: int | None = None
    """Swap on top of ``memory_bytes``; None leaves it unlimited."""
    pids_max: int | None = None
    cpu_weight: int | None = None
    """1..10000 (v2 ``cpu.weight``; v1 ``cpu.shares`` = weight * 1024 / 100)."""
    io_device: tuple[int, int] | None = None
    """``(major, minor)`` of the whole block device the VM's disk lives on."""
    io_read_bps: int = 0
    io_write_bps: int = 0
    io_read_iops: int = 0
    io_write_iops: int = 0
    """0: unlimited."""

    @property
    def io_limited(self) -> bool:
        return self.io_device is not None and any(
            (self.io_read_bps, self.io_write_bps, self.io_read_iops, self.io_write_iops))


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
    v2_io = False
    for mountpoint, fstype, options in _mount_table(mounts_file):
        if fstype == "cgroup2":
            try:
                available = set((mountpoint / "cgroup.controllers").read_text().split())
            except OSError:
                continue
            if set(CONTROLLERS) <= available:
                v2 = mountpoint
                v2_io = IO_CONTROLLER[2] in available
        elif fstype == "cgroup":
            for controller in (*CONTROLLERS, IO_CONTROLLER[1]):
                if controller in options and controller not in v1:
                    v1[controller] = mountpoint
    if v2 is not None:
        return CgroupLayout(2, {c: v2 for c in (*CONTROLLERS, *((IO_CONTROLLER[2],) if v2_io else ()))})
    if v1:
        return CgroupLayout(1, v1)
    return None


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise VmmError(f"cannot write {value!r} to {path}: {exc.strerror}") from exc


def host_has_swap(swaps: Path = Path("/proc/swaps")) -> bool:
    try:
        return len(swaps.read_text().splitlines()) > 1
    except OSError:
        return True


def _write_swap(path: Path, value: str) -> None:
    """Swap limits exist only with swap accounting; without it, only a swapless host is safe."""
    if not path.exists() and not host_has_swap():
        log.debug("no swap accounting and no swap: nothing to limit", file=str(path))
        return
    _write(path, value)


def block_device(path: Path, sys_block: Path = Path("/sys/dev/block")) -> tuple[int, int] | None:
    """``(major, minor)`` of the whole block device holding ``path``; None on a file system
    without one (tmpfs, overlay: major 0)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None
    node = sys_block / f"{major}:{minor}"
    if (node / "partition").exists():
        try:
            parent = (node.resolve().parent / "dev").read_text().strip()
            major, minor = (int(x) for x in parent.split(":"))
        except (OSError, ValueError):
            return None
    return major, minor


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
        missing = [c for c in CONTROLLERS if c not in layout.mounts]
        if limits.io_limited and IO_CONTROLLER[layout.version] not in layout.mounts:
            missing.append(IO_CONTROLLER[layout.version])
        if missing:
            raise VmmError(f"cgroup v{layout.version}: no {', '.join(missing)} controller for the limits of {name}")
        paths = {c: root / parent / name for c, root in layout.mounts.items()}
        if layout.version == 2:
            root = layout.mounts["cpu"]
            controllers = list(layout.mounts)
            wanted = " ".join(f"+{c}" for c in controllers)
            for directory in (root, root / parent):
                directory.mkdir(exist_ok=True)
                enabled = set((directory / "cgroup.subtree_control").read_text().split())
                if not set(controllers) <= enabled:
                    _write(directory / "cgroup.subtree_control", wanted)
        for directory in sorted(set(paths.values())):
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise VmmError(f"cannot create cgroup {directory}: {exc.strerror}") from exc
        group = cls(layout.version, paths)
        try:
            group.apply(limits)
        except VmmError:
            with contextlib.suppress(VmmError):
                group.remove(timeout=0.5)
            raise
        return group

    def apply(self, limits: CgroupLimits) -> None:
        if self.version == 2:
            d = self.paths["cpu"]
            quota = "max" if limits.cpu_quota_us is None else str(limits.cpu_quota_us)
            _write(d / "cpu.max", f"{quota} {limits.cpu_period_us}")
            _write(d / "memory.max", "max" if limits.memory_bytes is None else str(limits.memory_bytes))
            _write(d / "pids.max", "max" if limits.pids_max is None else str(limits.pids_max))
            if limits.cpu_weight is not None:
                _write(d / "cpu.weight", str(limits.cpu_weight))
            if limits.swap_bytes is not None:
                _write_swap(d / "memory.swap.max", str(limits.swap_bytes))
            if limits.io_limited and limits.io_device is not None:
                dev = f"{limits.io_device[0]}:{limits.io_device[1]}"
                values = (("rbps", limits.io_read_bps), ("wbps", limits.io_write_bps),
                          ("riops", limits.io_read_iops), ("wiops", limits.io_write_iops))
                _write(d / "io.max", dev + "".join(f" {k}={v or 'max'}" for k, v in values))
            return
        d = self.paths["cpu"]
        _write(d / "cpu.cfs_period_us", str(limits.cpu_period_us))
        _write(d / "cpu.cfs_quota_us", "-1" if limits.cpu_quota_us is None else str(limits.cpu_quota_us))
        if limits.cpu_weight is not None:
            _write(d / "cpu.shares", str(max(2, limits.cpu_weight * 1024 // 100)))
        d = self.paths["memory"]
        _write(d / "memory.limit_in_bytes", "-1" if limits.memory_bytes is None else str(limits.memory_bytes))
        if limits.swap_bytes is not None:
            total = "-1" if limits.memory_bytes is None else str(limits.memory_bytes + limits.swap_bytes)
            _write_swap(d / "memory.memsw.limit_in_bytes", total)
        _write(self.paths["pids"] / "pids.max", "max" if limits.pids_max is None else str(limits.pids_max))
        if limits.io_limited and limits.io_device is not None:
            d = self.paths[IO_CONTROLLER[1]]
            dev = f"{limits.io_device[0]}:{limits.io_device[1]}"
            for name, value in (("read_bps", limits.io_read_bps), ("write_bps", limits.io_write_bps),
                                ("read_iops", limits.io_read_iops), ("write_iops", limits.io_write_iops)):
                if value:
                    _write(d / f"blkio.throttle.{name}_device", f"{dev} {value}")

    def set_cpu_weight(self, weight: int) -> None:
        """The VM's relative CPU weight (v2 ``cpu.weight`` 1-10000; v1 ``cpu.shares``, scaled as
        in :meth:`apply`)."""
        if self.version == 2:
            _write(self.paths["cpu"] / "cpu.weight", str(weight))
        else:
            _write(self.paths["cpu"] / "cpu.shares", str(max(2, weight * 1024 // 100)))

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
