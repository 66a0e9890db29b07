"""The storage driver contract: template images, per-sandbox copy-on-write disks, snapshot files."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

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
