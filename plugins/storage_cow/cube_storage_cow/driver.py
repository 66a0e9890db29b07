"""``CowStorage``: Cube's storage driver on a local filesystem.

Template images are immutable ext4 files addressed by content hash (:mod:`.rootfs`); each sandbox
gets a qcow2 overlay (or a reflink copy) named for its id; snapshots are directories holding the
VMM's memory/device files plus a frozen copy of the disk (:mod:`.layers`). Blocking work runs in
worker threads; progress callbacks are delivered on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import ClassVar, TypeVar

import structlog
from cube_core import (
    CAP_VOLUMES,
    DiskHandle,
    Progress,
    RootfsImage,
    RootfsRecipe,
    StateFile,
    StorageDriver,
    StorageError,
    VolumeStore,
)

from cube_storage_cow import hostfiles, rootfs
from cube_storage_cow.commands import Cancelled
from cube_storage_cow.config import CowConfig, default_guest_src
from cube_storage_cow.layers import DiskLayers
from cube_storage_cow.volumes import ImageVolumes

log = structlog.get_logger(__name__)

T = TypeVar("T")


class CowStorage(StorageDriver):
    """Content-addressed template images + copy-on-write disks + snapshot layers under ``config.root``."""

    capabilities: ClassVar[frozenset[str]] = frozenset({
        "rootfs:debootstrap", "rootfs:dir", "rootfs:oci", "disk:qcow2", "disk:reflink", "disk:freeze", CAP_VOLUMES})

    def __init__(self, config: CowConfig | None = None) -> None:
        self.config = config or CowConfig()
        root = self.config.root
        self.settings = rootfs.BuildSettings(
            images=root / "images", work=root / "build", cache=self.config.cache,
            guest_src=self.config.guest_src or default_guest_src(), mirror=self.config.mirror,
            default_size_mb=self.config.image_size_mb, oci_policy=self.config.layer_policy(),
            agent_runtime=self.config.agent_runtime)
        self.layers = DiskLayers(root, self.config.reflink)
        self.volumes = ImageVolumes(root / "volumes", self.config.volume_tool_uid)

    @property
    def root(self) -> Path:
        return self.config.root

    def volume_store(self) -> VolumeStore:
        return self.volumes

    async def start(self) -> None:
        def prepare() -> None:
            hostfiles.make_dir(self.root)
            hostfiles.make_dir(self.settings.images)
            hostfiles.private_dir(self.settings.work)
            self.settings.cache.mkdir(parents=True, exist_ok=True)
            for path in [*self.settings.images.glob("*.ext4"), *self.settings.images.glob("*.json")]:
                hostfiles.close_to_others(path)  # images made before they were 0440
            self.layers.prepare()
            self.volumes.prepare()

        await _in_thread(prepare)

    # -- template images ------------------------------------------------------------------------

    async def build_rootfs(self, recipe: RootfsRecipe, progress: Progress | None = None) -> RootfsImage:
        """Build, or reuse from the content-addressed store, the ext4 image of ``recipe``.

        Raises :class:`cube_core.TemplateBuildError`. Cancelling the awaiting task stops the
        build (debootstrap is killed) and leaves nothing behind but caches.
        """
        loop = asyncio.get_running_loop()
        cancel = threading.Event()

        def report(step: str, fraction: float | None) -> None:
            if progress is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed under us
                    loop.call_soon_threadsafe(progress, step, fraction)

        task = asyncio.ensure_future(asyncio.to_thread(rootfs.build, recipe, self.settings, report, cancel))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            cancel.set()
            with contextlib.suppress(Cancelled, Exception):
                await task
            raise

    async def image_for(self, recipe: RootfsRecipe) -> tuple[str, Path]:
        """The content hash and image path ``recipe`` builds to (whether or not it is built yet)."""
        plan = await _in_thread(rootfs.plan, recipe, self.settings)
        return plan.content_hash, plan.image

    def images(self) -> list[Path]:
        """Every finished template image in the store."""
        return sorted(self.settings.images.glob("*.ext4"))

    async def prune_images(self, keep: Iterable[Path]) -> int:
        """Delete every image not in ``keep`` (the rootfs paths templates still use); return how many.

        Not part of :meth:`gc`, because gc is not told which images templates use.
        """
        keep_set = {Path(p).resolve() for p in keep}

        def prune() -> int:
            gone = 0
            for image in self.images():
                if image.resolve() not in keep_set:
                    rootfs.remove_image(image)
                    gone += 1
            return gone

        return await _in_thread(prune)

    # -- disks and snapshots ----------------------------------------------------------------------

    async def create_disk(self, owner_id: str, base: Path) -> DiskHandle:
        return await _in_thread(self.layers.create, owner_id, base)

    async def freeze_disk(self, disk: DiskHandle, snapshot_id: str) -> DiskHandle:
        return await _in_thread(self.layers.freeze, disk, snapshot_id)

    async def delete_disk(self, disk: DiskHandle) -> None:
        await _in_thread(self.layers.delete, disk)

    def snapshot_dir(self, snapshot_id: str) -> Path:
        with _storage_errors():
            return self.layers.snapshot_dir(snapshot_id)

    def snapshot_layer(self, snapshot_id: str) -> DiskHandle:
        """The frozen disk layer of ``snapshot_id`` (``SnapshotNotFoundError`` if none)."""
        with _storage_errors():
            return self.layers.snapshot_layer(snapshot_id)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await _in_thread(self.layers.delete_snapshot, snapshot_id)

    def layer_files(self, disk: DiskHandle) -> list[StateFile]:
        with _storage_errors():
            return self.layers.layer_files(disk)

    def local_layer(self, key: str) -> Path | None:
        with _storage_errors():
            return self.layers.local_layer(key)

    def adopt_layer(self, snapshot_id: str, chain: Sequence[StateFile],
                    received: Mapping[str, Path]) -> DiskHandle:
        with _storage_errors():
            return self.layers.adopt(snapshot_id, chain, received)

    async def gc(self, live_owners: Iterable[str], live_snapshots: Iterable[str]) -> int:
        owners, snaps = list(live_owners), list(live_snapshots)

        def collect() -> int:
            return self.layers.gc(owners, snaps) + rootfs.gc_leftovers(self.settings)

        return await _in_thread(collect)


@contextlib.contextmanager
def _storage_errors() -> Iterator[None]:
    """OSError from file operations becomes StorageError; CubeErrors pass unchanged."""
    try:
        yield
    except OSError as exc:
        raise StorageError(f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": ")) from exc


async def _in_thread(func: Callable[..., T], *args: object) -> T:
    def call() -> T:
        with _storage_errors():
            return func(*args)

    return await asyncio.to_thread(call)
