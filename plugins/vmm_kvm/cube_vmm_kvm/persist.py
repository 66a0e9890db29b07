"""Versioned state models of this plugin, and how they are written to and read from disk.

``VmRecord`` is what a node agent needs to take over a running VM after a restart; it travels in
``VmHandle.data`` and is also written to ``<workdir>/vm.json``. ``SnapshotRecord`` travels in
``VmState.data`` and describes how the saved VM was started, so a clone gets the same devices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from cube_core import Isolation, VmmError
from pydantic import BaseModel, ConfigDict, ValidationError

SCHEMA_VERSION: Literal[1] = 1
RECORD_FILE = "vm.json"

M = TypeVar("M", bound=BaseModel)


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VmRecord(_Model):
    """Everything needed to re-attach to a running QEMU and to free what it owns."""

    schema_version: Literal[1] = SCHEMA_VERSION
    vm_id: str
    pid: int
    workdir: Path
    qmp_socket: Path
    ctl_socket: Path
    console_log: Path
    ram_file: Path
    ram_shared: bool
    """``share=on`` (a cold boot whose RAM file can become a snapshot) or a private CoW mapping."""
    ram_owned: bool
    """Whether shutdown deletes ``ram_file`` (never for a clone: it maps a snapshot's file)."""
    accel: Literal["kvm", "tcg"]
    isolation: Isolation
    memory_mb: int
    cpu_count: int
    kernel: Path
    initrd: Path | None = None
    append: str
    cpu_model: str
    pic: bool
    has_nic: bool
    guest_mac: str | None = None
    cgroup_version: Literal[0, 1, 2] = 0
    cgroup_paths: dict[str, Path] = {}
    restored_from: str | None = None
    base_state_id: str | None = None
    """The snapshot whose RAM file a clone maps ``share=off`` (its template, also for a clone of a
    ``diff`` snapshot); None when the VM owns its RAM file."""
    send_configuration: bool = True
    """QEMU's ``migration.send-configuration`` (off for clones of ``diff`` snapshots)."""
    jail_uid: int | None = None
    """The uid (and gid) the VM's jailed QEMU runs as (leased; freed at shutdown); None unjailed."""
    volume_slots: int = 0
    """Spare virtio-blk devices (``cube-vol<i>``) the VM has for volumes; a snapshot keeps the count."""


class SnapshotRecord(_Model):
    """How a saved VM ran: a clone must use the same machine, devices and RAM size."""

    schema_version: Literal[1] = SCHEMA_VERSION
    format: Literal["shared", "full", "diff"]
    """``shared``: RAM in ``memory_file`` + device state only (x-ignore-shared; cold-booted VMs);
    ``diff``: the pages a clone changed since its base RAM file, in ``memory_file``, + device state
    without RAM (snapshots of clones); ``full``: RAM inside the device-state stream (a clone whose
    base RAM file is gone, or ``clone_snapshot = "full"``)."""
    accel: Literal["kvm", "tcg"]
    append: str
    cpu_model: str
    pic: bool
    has_nic: bool
    guest_mac: str | None = None
    volume_slots: int = 0
    save_ms: float = 0.0
    config_section: bool = True
    """Whether ``device_state`` carries QEMU's configuration section (never for ``diff``)."""
    base_memory_file: Path | None = None
    """``diff`` only: the RAM file the diff is relative to (the template snapshot's ``memory.ram``)."""
    base_state_id: str | None = None
    """``diff`` only: the snapshot that owns ``base_memory_file``."""
    base_bytes: int = 0
    base_mtime_ns: int = 0
    """``diff`` only: size and mtime of ``base_memory_file`` when saved (a changed base is refused)."""
    dirty_bytes: int = 0
    """``diff`` only: bytes of guest RAM in the diff."""


def _parse(model: type[M], data: dict[str, Any], what: str) -> M:
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise VmmError(f"{what}: unsupported schema_version {version!r} (this plugin reads {SCHEMA_VERSION})")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise VmmError(f"{what}: invalid record: {exc}") from exc


def record_from_data(data: dict[str, Any]) -> VmRecord:
    """Read a ``VmRecord`` back from ``VmHandle.data``."""
    return _parse(VmRecord, data, "VmHandle.data")


def snapshot_from_data(data: dict[str, Any]) -> SnapshotRecord:
    """Read a ``SnapshotRecord`` back from ``VmState.data``."""
    return _parse(SnapshotRecord, data, "VmState.data")


def save(record: VmRecord) -> Path:
    """Write ``<workdir>/vm.json`` atomically; return its path."""
    path = record.workdir / RECORD_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(record.model_dump_json(indent=1))
    os.replace(tmp, path)
    return path


def restore(workdir: Path) -> VmRecord:
    """Read the ``VmRecord`` saved in ``workdir``."""
    path = workdir / RECORD_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise VmmError(f"cannot read {path}: {exc}") from exc
    return _parse(VmRecord, data, str(path))
