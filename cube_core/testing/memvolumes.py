"""``MemoryVolumes``: the fake storage driver's volumes, a tree of entries in memory.

What a real driver keeps in a filesystem image is kept in dicts here, with the same semantics
(quota, parents, kinds of entries, errors); :class:`cube_core.testing.contract.VolumeContract`
runs against both. The image files it hands VMs (:meth:`MemoryVolumes.disk`) are empty markers.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from cube_core import (
    DiskHandle,
    VolumeEntry,
    VolumeFullError,
    VolumeNotFoundError,
    VolumePathError,
    VolumePathNotFoundError,
    VolumeStore,
)
from cube_core.models import utcnow

DEFAULT_ID = 1000


@dataclass
class _Node:
    kind: str
    uid: int
    gid: int
    mode: int
    data: bytes = b""
    times: datetime = field(default_factory=utcnow)


@dataclass
class _Volume:
    size_mb: int
    tree: dict[str, _Node] = field(default_factory=dict)

    def used(self) -> int:
        return sum(len(n.data) for n in self.tree.values())


class MemoryVolumes(VolumeStore):
    def __init__(self, root: Path) -> None:
        self.root = root
        self._volumes: dict[str, _Volume] = {}

    def _get(self, volume_id: str) -> _Volume:
        volume = self._volumes.get(volume_id)
        if volume is None:
            raise VolumeNotFoundError(volume=volume_id)
        return volume

    def _node(self, volume_id: str, path: str) -> _Node:
        node = self._get(volume_id).tree.get(path)
        if node is None:
            raise VolumePathNotFoundError(path=path, volume_id=volume_id)
        return node

    def _entry(self, path: str, node: _Node) -> VolumeEntry:
        return VolumeEntry(name=posixpath.basename(path) or "/", type=node.kind, path=path,  # type: ignore[arg-type]
                           size=len(node.data) if node.kind == "file" else 4096, mode=node.mode, uid=node.uid,
                           gid=node.gid, atime=node.times, mtime=node.times, ctime=node.times)

    def _parent(self, volume_id: str, path: str, parents: bool, uid: int | None, gid: int | None) -> None:
        tree = self._get(volume_id).tree
        parent = posixpath.dirname(path)
        node = tree.get(parent)
        if node is None:
            if not parents:
                raise VolumePathNotFoundError(path=parent, volume_id=volume_id)
            self._parent(volume_id, parent, True, uid, gid)
            tree[parent] = _Node("directory", DEFAULT_ID if uid is None else uid,
                                 DEFAULT_ID if gid is None else gid, 0o755)
        elif node.kind != "directory":
            raise VolumePathError(path=parent, reason="is not a directory")

    async def create(self, volume_id: str, size_mb: int) -> None:
        self._volumes[volume_id] = _Volume(size_mb, {"/": _Node("directory", DEFAULT_ID, DEFAULT_ID, 0o755)})
        path = self.root / f"{volume_id}.img"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch()

    async def delete(self, volume_id: str) -> None:
        self._volumes.pop(volume_id, None)
        (self.root / f"{volume_id}.img").unlink(missing_ok=True)

    def ids(self) -> list[str]:
        return sorted(self._volumes)

    async def disk(self, volume_id: str, *, read_only: bool = False) -> DiskHandle:
        self._get(volume_id)
        return DiskHandle(disk_id=f"volume-{volume_id}", path=self.root / f"{volume_id}.img", format="raw",
                          readonly=read_only)

    async def stat(self, volume_id: str, path: str) -> VolumeEntry:
        return self._entry(path, self._node(volume_id, path))

    async def list(self, volume_id: str, path: str, depth: int = 1) -> list[VolumeEntry]:
        if self._node(volume_id, path).kind != "directory":
            raise VolumePathError(path=path, reason="is not a directory")
        prefix = path.rstrip("/") + "/"
        out = []
        for child, node in sorted(self._get(volume_id).tree.items()):
            if child != path and child.startswith(prefix) and child[len(prefix):].count("/") < depth:
                out.append(self._entry(child, node))
        return out

    async def read(self, volume_id: str, path: str) -> bytes:
        node = self._node(volume_id, path)
        if node.kind != "file":
            raise VolumePathError(path=path, reason="is not a file")
        return node.data

    async def write(self, volume_id: str, path: str, data: bytes, *, uid: int | None = None,
                    gid: int | None = None, mode: int | None = None, parents: bool = False) -> VolumeEntry:
        volume = self._get(volume_id)
        self._parent(volume_id, path, parents, uid, gid)
        old = volume.tree.get(path)
        if old is not None and old.kind == "directory":
            raise VolumePathError(path=path, reason="is a directory")
        if volume.used() - (len(old.data) if old else 0) + len(data) > volume.size_mb << 20:
            raise VolumeFullError(volume_id=volume_id, size_mb=volume.size_mb)
        node = _Node("file", DEFAULT_ID if uid is None else uid, DEFAULT_ID if gid is None else gid,
                     0o644 if mode is None else mode, data)
        if old is not None:
            node.uid, node.gid = (old.uid if uid is None else uid), (old.gid if gid is None else gid)
            node.mode = old.mode if mode is None else mode
        volume.tree[path] = node
        return self._entry(path, node)

    async def make_dir(self, volume_id: str, path: str, *, uid: int | None = None, gid: int | None = None,
                       mode: int | None = None, parents: bool = False) -> VolumeEntry:
        tree = self._get(volume_id).tree
        old = tree.get(path)
        if old is not None:
            if old.kind == "directory" and parents:
                return self._entry(path, old)
            raise VolumePathError(path=path, reason="exists already")
        self._parent(volume_id, path, parents, uid, gid)
        tree[path] = node = _Node("directory", DEFAULT_ID if uid is None else uid,
                                  DEFAULT_ID if gid is None else gid, 0o755 if mode is None else mode)
        return self._entry(path, node)

    async def remove(self, volume_id: str, path: str) -> None:
        if path == "/":
            raise VolumePathError(path=path, reason="the volume's root cannot be removed")
        self._node(volume_id, path)
        tree = self._get(volume_id).tree
        for child in [c for c in tree if c == path or c.startswith(path + "/")]:
            del tree[child]

    async def update(self, volume_id: str, path: str, *, uid: int | None = None, gid: int | None = None,
                     mode: int | None = None) -> VolumeEntry:
        node = self._node(volume_id, path)
        node.uid = node.uid if uid is None else uid
        node.gid = node.gid if gid is None else gid
        node.mode = node.mode if mode is None else mode
        return self._entry(path, node)
