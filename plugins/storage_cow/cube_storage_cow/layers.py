"""Per-sandbox copy-on-write disks, frozen snapshot layers, and their garbage collection.

On-disk layout under ``root`` (everything named for its owner, so GC needs no database)::

    disks/<owner_id>.qcow2            writable overlay of one sandbox (or <owner_id>.raw: reflink copy)
    disks/.<owner_id>.<fmt>.tmp-<r>   being created (renamed into place when complete)
    snapshots/<snapshot_id>/          memory + device state files (written by the VMM)
    snapshots/<snapshot_id>/disk.qcow2   the frozen disk layer, 0440, never modified again
    snapshots/<snapshot_id>/.deleted     deleted, but the disk layer still backs other layers
    content/sha256-<hex>.<fmt>        an image copied from another node (named by its content)

Formats are never guessed from file content (a guest controls its disk's bytes): a ``.qcow2``
name means qcow2, anything else raw, and qemu-img always gets ``-F``. Backing files are absolute.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import structlog
from cube_core import DiskHandle, SnapshotNotFoundError, StateFile, StorageError, content_key

from cube_storage_cow import commands, hostfiles
from cube_storage_cow.config import Reflink

log = structlog.get_logger(__name__)

Format = Literal["raw", "qcow2"]
NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
ID_RE = re.compile(NAME)
DISK_RE = re.compile(rf"(?P<owner>{NAME})\.(?P<fmt>qcow2|raw)")
DISK_TMP_RE = re.compile(rf"\.(?P<owner>{NAME})\.(?:qcow2|raw)\.tmp-[0-9a-f]+")
LAYER_NAMES = ("disk.qcow2", "disk.raw")
TOMBSTONE = ".deleted"
QCOW2_MAGIC = b"QFI\xfb"


def check_id(kind: str, value: str) -> str:
    if not ID_RE.fullmatch(value):
        raise StorageError(f"invalid {kind} {value!r}: use 1-128 of [A-Za-z0-9._-], not starting with . - _")
    return value


def format_of(path: Path) -> Format:
    """The format of an image we made, from its name (never from its content)."""
    return "qcow2" if path.suffix == ".qcow2" else "raw"


def backing_file(path: Path) -> Path | None:
    """The backing file recorded in a qcow2 header (None for raw files and unreadable headers)."""
    if format_of(path) != "qcow2":
        return None
    try:
        with open(path, "rb") as fh:
            header = fh.read(20)
            if len(header) < 20 or header[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", header[8:20])
            if offset == 0 or size == 0 or size > 4096:
                return None
            fh.seek(offset)
            name = fh.read(size).decode(errors="surrogateescape")
    except OSError:
        return None
    backing = Path(name)
    return backing if backing.is_absolute() else path.parent / backing


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
    except ValueError:
        return False
    return True


class DiskLayers:
    """Disk and snapshot files under one root; every method is blocking (call from a thread)."""

    def __init__(self, root: Path, reflink: Reflink = "auto") -> None:
        self.root = root
        self.disks = root / "disks"
        self.snapshots = root / "snapshots"
        self.content = root / "content"
        self.reflink_mode: Reflink = reflink
        self.reflink = False
        """Whether per-sandbox disks are reflink copies (decided by :meth:`prepare`)."""
        self._lock = threading.RLock()

    # -- setup ----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directories and decide reflink vs qcow2 (``always`` fails if unsupported)."""
        for directory in (self.root, self.disks, self.snapshots):
            hostfiles.make_dir(directory)
        for path in [*self.disks.iterdir(), *self.snapshots.iterdir(), *self.snapshots.glob("*/disk.*")]:
            hostfiles.close_to_others(path)  # made before these modes
        commands.require_tool("qemu-img", "qemu-utils")
        supported = self.reflink_mode != "never" and reflink_supported(self.disks)
        if self.reflink_mode == "always" and not supported:
            raise StorageError(f"reflink = 'always' but the filesystem of {self.disks} has no reflink "
                               "support (use xfs/btrfs, or reflink = 'auto'/'never')")
        self.reflink = supported
        log.info("disk layers ready", root=str(self.root), method="reflink" if supported else "qcow2")

    # -- disks ----------------------------------------------------------------------------------

    def create(self, owner_id: str, base: Path) -> DiskHandle:
        """A writable disk for ``owner_id`` over the immutable ``base`` (replaces an older one)."""
        check_id("owner id", owner_id)
        base = base.absolute()
        if not base.is_file():
            raise StorageError(f"base image {base} does not exist")
        base_fmt = format_of(base)
        fmt: Format = base_fmt if self.reflink else "qcow2"
        final = self.disks / f"{owner_id}.{fmt}"
        tmp = self.disks / f".{owner_id}.{fmt}.tmp-{secrets.token_hex(4)}"
        with self._lock:
            try:
                if self.reflink:
                    commands.run(["cp", "--reflink=always", base, tmp])
                else:
                    commands.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", base_fmt, "-b", base, tmp])
                os.chmod(tmp, hostfiles.PRIVATE_FILE_MODE)
                for ext in ("qcow2", "raw"):
                    stale = self.disks / f"{owner_id}.{ext}"
                    if stale != final:
                        with contextlib.suppress(FileNotFoundError):
                            stale.unlink()
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
        log.debug("disk created", owner_id=owner_id, base=str(base), format=fmt)
        return DiskHandle(disk_id=owner_id, path=final, format=fmt, data={
            "owner_id": owner_id, "base": str(base), "base_format": base_fmt,
            "method": "reflink" if self.reflink else "qcow2-overlay"})

    def delete(self, disk: DiskHandle) -> None:
        """Free a sandbox's writable disk; idempotent. Frozen layers go with their snapshot; a
        deleted snapshot's layer that was kept only for this disk goes with it."""
        if not _inside(disk.path, self.disks):
            raise StorageError(f"refusing to delete {disk.path}: not a writable disk of this driver "
                               "(frozen layers are freed by delete_snapshot)")
        with self._lock:
            parent = backing_file(disk.path)
            with contextlib.suppress(FileNotFoundError):
                disk.path.unlink()
            self._free_kept_layers(parent)
            owner = DISK_RE.fullmatch(disk.path.name)
            if owner is not None:
                for tmp in self.disks.glob(f".{owner['owner']}.*.tmp-*"):
                    with contextlib.suppress(FileNotFoundError):
                        tmp.unlink()

    # -- snapshots ------------------------------------------------------------------------------

    def snapshot_dir(self, snapshot_id: str) -> Path:
        check_id("snapshot id", snapshot_id)
        path = self.snapshots / snapshot_id
        if (path / TOMBSTONE).exists():
            raise StorageError(f"snapshot {snapshot_id} was deleted but its disk layer still backs "
                               "other disks; use a new snapshot id")
        return hostfiles.make_dir(path)

    def freeze(self, disk: DiskHandle, snapshot_id: str) -> DiskHandle:
        """Copy the (stopped, flushed) disk to ``snapshots/<id>/disk.<fmt>``, read-only forever.

        A copy, not a rename: the sandbox's own disk stays valid and writable, and a VMM that
        still holds it open can never change the frozen layer. ``cp --reflink=auto`` makes the
        copy O(1) on xfs/btrfs; on ext4 it costs the overlay's size (only what the guest wrote).
        """
        if not _inside(disk.path, self.disks) or not disk.path.is_file():
            raise StorageError(f"cannot freeze {disk.path}: not a live disk of this driver")
        fmt = format_of(disk.path)
        with self._lock:
            directory = self.snapshot_dir(snapshot_id)
            target = directory / f"disk.{fmt}"
            if any((directory / name).exists() for name in LAYER_NAMES):
                raise StorageError(f"snapshot {snapshot_id} already has a disk layer")
            tmp = directory / f".disk.{fmt}.tmp-{secrets.token_hex(4)}"
            try:
                commands.run(["cp", "--reflink=auto", "--sparse=always", disk.path, tmp])
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(tmp, hostfiles.SHARED_FILE_MODE)
                os.replace(tmp, target)
                hostfiles.fsync_dir(directory)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                raise
        parent = backing_file(target)
        log.debug("disk frozen", snapshot_id=snapshot_id, source=str(disk.path), bytes=target.stat().st_size)
        return DiskHandle(disk_id=snapshot_id, path=target, format=fmt, readonly=True, data={
            "snapshot_id": snapshot_id, "parent": str(parent) if parent else None,
            "frozen_from": disk.disk_id})

    def delete_snapshot(self, snapshot_id: str) -> None:
        """Free a snapshot's files; idempotent. A disk layer that still backs another disk or
        layer is kept (with a tombstone) until its last user is deleted (or :meth:`gc` finds it
        unreferenced, after a crash)."""
        check_id("snapshot id", snapshot_id)
        directory = self.snapshots / snapshot_id
        with self._lock:
            if not directory.is_dir():
                return
            users = self._dependents(directory)
            if not users:
                parent = next((backing_file(layer) for layer in _layers(directory)), None)
                shutil.rmtree(directory)
                self._free_kept_layers(parent)
                return
            _trim(directory)
        log.info("snapshot deleted; disk layer kept while other layers use it", snapshot_id=snapshot_id,
                 used_by=[str(u) for u in users[:5]])

    def snapshot_layer(self, snapshot_id: str) -> DiskHandle:
        """The frozen disk layer of a snapshot (``SnapshotNotFoundError`` if it has none)."""
        check_id("snapshot id", snapshot_id)
        for name in LAYER_NAMES:
            path = self.snapshots / snapshot_id / name
            if path.is_file():
                return DiskHandle(disk_id=snapshot_id, path=path, format=format_of(path), readonly=True)
        raise SnapshotNotFoundError(snapshot_id=snapshot_id)

    # -- copies between nodes -------------------------------------------------------------------

    def _key(self, path: Path) -> str:
        if path.parent.parent.resolve() == self.snapshots.resolve() and path.name in LAYER_NAMES:
            return f"layer:{path.parent.name}"
        return content_key(path)

    def layer_files(self, disk: DiskHandle) -> list[StateFile]:
        """The frozen layer and its backing chain, top first (``layer:<id>`` for frozen layers,
        the content's ``sha256:`` for anything else: template images, copied images)."""
        paths: list[Path] = []
        path: Path | None = disk.path
        while path is not None:
            if path in paths or len(paths) > 64:
                raise StorageError(f"the backing chain of {disk.path} loops or is too deep")
            if not path.is_file():
                raise StorageError(f"{path} (in the backing chain of {disk.path}) is missing")
            paths.append(path)
            path = backing_file(path)
        keys = [self._key(p) for p in paths]
        return [StateFile(path=p, key=k, parent=keys[i + 1] if i + 1 < len(keys) else None)
                for i, (p, k) in enumerate(zip(paths, keys, strict=True))]

    def local_layer(self, key: str) -> Path | None:
        if key.startswith("layer:"):
            sid = check_id("snapshot id", key.removeprefix("layer:"))
            found = _layers(self.snapshots / sid)
            return found[0] if found else None
        name = re.sub(r"[^A-Za-z0-9._-]", "-", key)
        for fmt in ("raw", "qcow2"):
            if (self.content / f"{name}.{fmt}").is_file():
                return self.content / f"{name}.{fmt}"
        return None

    def adopt(self, snapshot_id: str, chain: Sequence[StateFile], received: Mapping[str, Path]) -> DiskHandle:
        """Move the received files of ``chain`` into place, bottom first, each qcow2 layer backed
        by this node's file of its parent key (``qemu-img rebase -u``: only the header changes)."""
        check_id("snapshot id", snapshot_id)
        with self._lock:
            for item in reversed(chain):
                if item.key is None or item.key not in received:
                    continue
                fmt = format_of(item.path)
                if item.key.startswith("layer:"):
                    dest = self.snapshot_dir(item.key.removeprefix("layer:")) / f"disk.{fmt}"
                else:
                    hostfiles.make_dir(self.content)
                    dest = self.content / f"{re.sub(r'[^A-Za-z0-9._-]', '-', item.key)}.{fmt}"
                if dest.exists():
                    continue
                came = received[item.key]
                if item.parent is not None:
                    if fmt != "qcow2":
                        raise StorageError(f"{item.path}: a raw file with a backing file")
                    parent = self.local_layer(item.parent)
                    if parent is None:
                        raise StorageError(f"layer {item.key}: its backing file {item.parent} is not on this node")
                    os.chmod(came, hostfiles.PRIVATE_FILE_MODE)
                    commands.run(["qemu-img", "rebase", "-u", "-f", "qcow2", "-F", format_of(parent),
                                  "-b", parent.absolute(), came])
                with open(came, "rb") as fh:
                    os.fsync(fh.fileno())
                os.chmod(came, hostfiles.SHARED_FILE_MODE)
                os.replace(came, dest)
                hostfiles.fsync_dir(dest.parent)
        top = self.local_layer(f"layer:{snapshot_id}")
        if top is None:
            raise StorageError(f"snapshot {snapshot_id}: no disk layer after the copy")
        parent_file = backing_file(top)
        log.info("disk layer copied in", snapshot_id=snapshot_id, received=sorted(received))
        return DiskHandle(disk_id=snapshot_id, path=top, format=format_of(top), readonly=True, data={
            "snapshot_id": snapshot_id, "parent": str(parent_file) if parent_file else None, "copied": True})

    # -- GC -------------------------------------------------------------------------------------

    def gc(self, live_owners: Iterable[str], live_snapshots: Iterable[str]) -> int:
        """Free every disk whose owner is not live and every snapshot that is neither live nor
        (transitively) backing a kept disk; works from file names alone, so also after a crash."""
        owners, snaps = set(live_owners), set(live_snapshots)
        freed = 0
        with self._lock:
            kept: list[Path] = []
            for entry in sorted(self.disks.iterdir()) if self.disks.is_dir() else []:
                m = DISK_RE.fullmatch(entry.name)
                if m is not None and m["owner"] in owners and entry.is_file():
                    kept.append(entry)
                    continue
                _remove(entry)
                freed += 1
            if not self.snapshots.is_dir():
                return freed
            present = {d.name for d in self.snapshots.iterdir()}
            keep = snaps & present
            frontier = kept + [layer for sid in keep for layer in _layers(self.snapshots / sid)]
            while frontier:
                parent = backing_file(frontier.pop())
                if parent is None or not _inside(parent, self.snapshots):
                    continue
                sid = parent.resolve().relative_to(self.snapshots.resolve()).parts[0]
                if sid in present and sid not in keep:
                    keep.add(sid)
                    frontier.extend(_layers(self.snapshots / sid))
            for name in sorted(present):
                directory = self.snapshots / name
                if name not in keep:
                    _remove(directory)
                    freed += 1
                    continue
                for tmp in directory.glob(".disk.*.tmp-*"):
                    _remove(tmp)
                if name not in snaps and _trim(directory):
                    freed += 1  # only backs other layers now: its memory files go
        if freed:
            log.info("storage gc", freed=freed)
        return freed

    def _free_kept_layers(self, parent: Path | None) -> None:
        """Up the backing chain from a layer just deleted (``parent``: the file it was backed
        by): every deleted snapshot (tombstone) whose disk layer nothing uses any more goes now,
        not at the next :meth:`gc` (a warm member restored while its template was deleted, a
        sandbox of a deleted snapshot). Called with the lock held."""
        while parent is not None and _inside(parent, self.snapshots):
            directory = self.snapshots / parent.resolve().relative_to(self.snapshots.resolve()).parts[0]
            if not (directory / TOMBSTONE).exists() or self._dependents(directory):
                return
            parent = next((backing_file(layer) for layer in _layers(directory)), None)
            shutil.rmtree(directory)
            log.info("deleted snapshot's disk layer freed: its last user went", snapshot_id=directory.name)

    def _dependents(self, directory: Path) -> list[Path]:
        """Disks and other snapshots' layers whose backing file lies in ``directory``."""
        users: list[Path] = []
        candidates = [*self.disks.glob("*.qcow2"), *self.snapshots.glob("*/disk.qcow2")]
        for layer in candidates:
            if layer.parent == directory:
                continue
            parent = backing_file(layer)
            if parent is not None and _inside(parent, directory):
                users.append(layer)
        return users


def _layers(directory: Path) -> list[Path]:
    return [directory / name for name in LAYER_NAMES if (directory / name).is_file()]


def _trim(directory: Path) -> bool:
    """Keep only the disk layer (and a tombstone); return whether anything was removed."""
    removed = False
    for entry in directory.iterdir():
        if entry.name in (*LAYER_NAMES, TOMBSTONE):
            continue
        _remove(entry)
        removed = True
    if not (directory / TOMBSTONE).exists():
        (directory / TOMBSTONE).write_text("deleted; the disk layer still backs other layers\n")
        removed = True
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def reflink_supported(directory: Path) -> bool:
    """Probe: can ``cp --reflink=always`` clone a file inside ``directory``?"""
    src = directory / f".reflink-probe-{secrets.token_hex(4)}"
    dst = src.with_name(src.name + ".copy")
    try:
        src.write_bytes(b"cube reflink probe\n")
        try:
            commands.run(["cp", "--reflink=always", src, dst])
        except StorageError:
            return False
        return True
    finally:
        for path in (src, dst):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
