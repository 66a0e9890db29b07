"""The storage driver contract: template images, per-sandbox copy-on-write disks, snapshot files."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from cube_core.errors import UnsupportedOperation
from cube_core.models import DiskHandle, Frozen, StateFile

Progress = Callable[[str, float | None], None]
"""``progress(step_description, fraction_done_or_None)``."""


class RootfsRecipe(Frozen):
    """How to make a template's root filesystem."""

    name: str
    source: Literal["debootstrap", "dir", "oci"] = "debootstrap"
    path: Path | None = None
    """The directory (``dir``) or OCI image layout tarball (``oci``)."""
    suite: str = "bookworm"
    packages: tuple[str, ...] = ()
    interpreter: bool = False
    size_mb: int = Field(default=2048, ge=64)


class RootfsImage(Frozen):
    path: Path
    content_hash: str
    bytes_allocated: int
    build_log: str = ""


CAP_VOLUMES = "volumes"
"""A storage driver that lists this answers :meth:`StorageDriver.volume_store`."""

VOLUME_DEVICE_BYTES = 256 << 30
"""The size every volume image has as a block device (sparse), and so every VM's volume slot: a
clone of a snapshot must see devices of the size the snapshot saw. A volume's filesystem inside
is the volume's quota (``size_mb``), at most this."""

VOLUME_MAX_MB = VOLUME_DEVICE_BYTES >> 20


class VolumeEntry(Frozen):
    """One file, directory or symlink of a volume (the SDK's ``VolumeEntryStat``)."""

    name: str
    type: Literal["file", "directory", "symlink", "unknown"]
    path: str
    """Absolute within the volume (``/`` is its root)."""
    size: int
    mode: int
    """Permission bits only (``0o644``)."""
    uid: int
    gid: int
    atime: datetime
    mtime: datetime
    ctime: datetime
    target: str | None = None
    """A symlink's target."""


class VolumeStore(abc.ABC):
    """Volumes of one node: filesystem images kept by the storage plugin, mountable by that node's
    VMs (:meth:`disk`) and read and written by the host without mounting them (the content API).

    Paths are absolute within the volume (``/a/b``), already normalized by the core (no ``..``).
    Content operations on a volume a VM writes are the caller's to prevent (the core refuses them
    while a sandbox mounts it read-write). Errors: :class:`~cube_core.errors.VolumeNotFoundError`,
    :class:`~cube_core.errors.VolumePathNotFoundError` (a path or its parent is missing),
    :class:`~cube_core.errors.VolumePathError` (wrong kind of entry, exists already),
    :class:`~cube_core.errors.VolumeFullError` (the quota is used up)."""

    @abc.abstractmethod
    async def create(self, volume_id: str, size_mb: int) -> None:
        """An empty filesystem of ``size_mb`` (the quota) on a device of
        :data:`VOLUME_DEVICE_BYTES`; its root owned by uid/gid 1000 (the sandboxes' user)."""

    @abc.abstractmethod
    async def delete(self, volume_id: str) -> None:
        """Free the volume and everything in it; idempotent."""

    @abc.abstractmethod
    def ids(self) -> list[str]:
        """The volumes this node holds."""

    @abc.abstractmethod
    async def disk(self, volume_id: str, *, read_only: bool = False) -> DiskHandle:
        """The volume's image for a VM's volume slot (raw, :data:`VOLUME_DEVICE_BYTES` long), ready
        to be mounted: for a read-only mount, which cannot replay a journal, a filesystem a guest
        left uncleanly (a killed sandbox) is made consistent first."""

    @abc.abstractmethod
    async def stat(self, volume_id: str, path: str) -> VolumeEntry: ...

    @abc.abstractmethod
    async def list(self, volume_id: str, path: str, depth: int = 1) -> list[VolumeEntry]:
        """The entries under the directory ``path``, ``depth`` levels down (1: its children)."""

    @abc.abstractmethod
    async def read(self, volume_id: str, path: str) -> bytes: ...

    @abc.abstractmethod
    async def write(self, volume_id: str, path: str, data: bytes, *, uid: int | None = None,
                    gid: int | None = None, mode: int | None = None, parents: bool = False) -> VolumeEntry:
        """Create or replace the file ``path``; ``parents`` creates missing directories above it.
        Unset ``uid``/``gid`` are 1000, unset ``mode`` 0o644 (a replaced file keeps its own)."""

    @abc.abstractmethod
    async def make_dir(self, volume_id: str, path: str, *, uid: int | None = None, gid: int | None = None,
                       mode: int | None = None, parents: bool = False) -> VolumeEntry:
        """Create the directory ``path`` (``parents``: and missing ones above it; an existing
        directory is then no error). Unset ``mode`` is 0o755."""

    @abc.abstractmethod
    async def remove(self, volume_id: str, path: str) -> None:
        """Remove a file, symlink or directory (with its content)."""

    @abc.abstractmethod
    async def update(self, volume_id: str, path: str, *, uid: int | None = None, gid: int | None = None,
                     mode: int | None = None) -> VolumeEntry:
        """Change an entry's owner and permission bits."""


class StorageDriver(abc.ABC):
    capabilities: ClassVar[frozenset[str]] = frozenset()

    async def start(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Prepare directories; called once."""

    async def close(self) -> None:  # noqa: B027 - optional hook, empty by default
        """Release driver-wide resources."""

    @property
    @abc.abstractmethod
    def root(self) -> Path:
        """The directory under which this driver keeps everything."""

    def volume_store(self) -> VolumeStore:
        """This node's volumes (capability :data:`CAP_VOLUMES`)."""
        raise UnsupportedOperation(driver=type(self).__name__, operation="volumes")

    @abc.abstractmethod
    async def build_rootfs(self, recipe: RootfsRecipe, progress: Progress | None = None) -> RootfsImage:
        """Build (or reuse from the content-addressed cache) an immutable ext4 image."""

    @abc.abstractmethod
    async def create_disk(self, owner_id: str, base: Path) -> DiskHandle:
        """A writable copy-on-write disk over the immutable ``base``."""

    @abc.abstractmethod
    async def freeze_disk(self, disk: DiskHandle, snapshot_id: str) -> DiskHandle:
        """Make ``disk``'s current content an immutable layer for ``snapshot_id`` (the VM must be
        stopped or paused and flushed); return the frozen layer."""

    @abc.abstractmethod
    async def delete_disk(self, disk: DiskHandle) -> None:
        """Free a disk; idempotent."""

    @abc.abstractmethod
    def snapshot_dir(self, snapshot_id: str) -> Path:
        """Where memory and device state files of a snapshot live (created if missing)."""

    @abc.abstractmethod
    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Free a snapshot's files; idempotent."""

    @abc.abstractmethod
    async def gc(self, live_owners: Iterable[str], live_snapshots: Iterable[str]) -> int:
        """Free disks and snapshot files no live owner refers to; return how many went."""

    # -- copies between nodes -------------------------------------------------------------------

    @abc.abstractmethod
    def layer_files(self, disk: DiskHandle) -> list[StateFile]:
        """The frozen layer ``disk`` (of :meth:`freeze_disk`) and every file below it that a disk
        created over it reads, top first. Each has a ``key`` (a node holding that key needs no
        copy: ``layer:<snapshot id>`` for frozen layers, ``sha256:...`` for images) and the
        ``parent`` key it is backed by. Blocking."""

    @abc.abstractmethod
    def local_layer(self, key: str) -> Path | None:
        """Where this driver holds the file of ``key`` (a layer or an image copied here or made
        here), None if it has none. Blocking."""

    @abc.abstractmethod
    def adopt_layer(self, snapshot_id: str, chain: Sequence[StateFile],
                    received: Mapping[str, Path]) -> DiskHandle:
        """Take a copied layer chain as this node's: ``chain`` is :meth:`layer_files` as the other
        node answered (its paths), ``received`` maps the keys this node lacked to the files
        received (moved into place, then each backed by this node's file of its parent key). The
        top layer becomes ``snapshot_id``'s frozen layer; return it. Blocking."""
