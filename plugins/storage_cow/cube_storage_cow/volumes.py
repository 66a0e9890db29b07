"""``ImageVolumes``: volumes as sparse ext4 images, read and written on the host in userspace.

Each volume is ``<root>/volumes/<id>.ext4``: a sparse file of :data:`VOLUME_DEVICE_BYTES` (the size
of a VM's volume slot) holding an ext4 filesystem of the volume's quota (``size_mb``). A sandbox
mounts it through a VM's volume slot; the host never mounts a filesystem a guest wrote in its own
kernel: the content API runs e2fsprogs' ``debugfs`` (userspace) on the image, after ``e2fsck -p``
has replayed the journal of a guest that did not unmount it (a killed sandbox). The core keeps
content calls away from an image that a sandbox mounts read-write.

A filesystem a guest wrote is hostile input, so e2fsprogs run on it as an unprivileged uid
(``volume_tool_uid``: no groups, no capabilities, own session) that reaches only that image, through
a descriptor Cube opened (``/proc/self/fd/N``; the image's directory stays root's), and exchanges
file content through memfds, never through paths Cube reads back.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import re
import secrets
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import structlog
from cube_core import (
    VOLUME_DEVICE_BYTES,
    DiskHandle,
    StorageError,
    VolumeEntry,
    VolumeFullError,
    VolumeNotFoundError,
    VolumePathError,
    VolumePathNotFoundError,
    VolumeStore,
)

log = structlog.get_logger(__name__)

T = TypeVar("T")

TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
USER_ID = 1000
"""Owner of a volume's root and, by default, of what the content API creates: the sandboxes' user."""
TIMEOUT_S = 300.0
_TYPES = {"regular": "file", "directory": "directory", "symlink": "symlink"}
_STAT_TYPE = re.compile(r"Type:\s+(\S+)\s+Mode:\s+([0-7]+)")
_STAT_OWNER = re.compile(r"User:\s+(\d+)\s+Group:\s+(\d+).*?Size:\s+(\d+)", re.S)
_STAT_TIME = re.compile(r"^\s*(atime|mtime|ctime):\s+0x([0-9a-f]+)", re.M)
_STAT_LINK = re.compile(r'Fast link dest:\s+"(.*)"\s*$', re.M)
_PROMPT = re.compile(r"^debugfs: .*$", re.M)


def _quote(name: str) -> str:
    if '"' in name or any(ord(c) < 32 for c in name):
        raise VolumePathError(path=name, reason="names with '\"' or control characters are not supported")
    return f'"{name}"'


def run_tool(argv: Sequence[str], image: Path, *, uid: int | None, write: bool, stdin: bytes | None = None,
             pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess[bytes]:
    """Run e2fsprogs' ``argv`` on ``image`` (appended as ``/proc/self/fd/N``) as ``uid`` (gid the
    same, no other groups; None: as this process). The image is made ``uid``'s own (its owner only:
    the group a jailed QEMU reads it with stays)."""
    fd = os.open(image, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC | os.O_NOFOLLOW)
    try:
        user: dict[str, Any] = {}
        if uid is not None:
            st = os.fstat(fd)
            if st.st_uid != uid:
                os.fchown(fd, uid, -1)
            if stat.S_IMODE(st.st_mode) & 0o600 != 0o600:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o600)
            user = {"user": uid, "group": uid, "extra_groups": []}
        return subprocess.run([*argv, f"/proc/self/fd/{fd}"], input=stdin, capture_output=True, timeout=TIMEOUT_S,
                              check=False, pass_fds=(fd, *pass_fds), env=TOOL_ENV, cwd="/", start_new_session=True,
                              **user)
    finally:
        os.close(fd)


class Debugfs:
    """One image, through ``debugfs`` (blocking; the caller serializes calls per image)."""

    def __init__(self, image: Path, uid: int | None) -> None:
        self.image = image
        self.uid = uid

    def run(self, commands: Sequence[str], *, write: bool = False, pass_fds: Sequence[int] = ()) -> str:
        """Run ``commands`` in one ``debugfs`` process; its output, or :class:`_Failed` with what it
        printed on stderr (every error of debugfs goes there)."""
        script = ("\n".join(commands) + "\n").encode()
        proc = run_tool(["debugfs", *(["-w"] if write else []), "-f", "-"], self.image, uid=self.uid, write=write,
                        stdin=script, pass_fds=pass_fds)
        errors = [line for line in proc.stderr.decode(errors="replace").splitlines()
                  if line.strip() and not line.startswith("debugfs ")]
        if proc.returncode != 0 or errors:
            raise _Failed("; ".join(errors) or f"debugfs exited with {proc.returncode}")
        return proc.stdout.decode(errors="surrogateescape")

    def outputs(self, commands: Sequence[str]) -> list[str]:
        """Each command's output (debugfs echoes ``debugfs: <command>`` before it)."""
        text = self.run(commands)
        parts = _PROMPT.split(text)
        return parts[1:len(commands) + 1]


class _Failed(Exception):
    pass


def _needs_check(image: Path) -> bool:
    """The filesystem was not unmounted cleanly (a killed sandbox): its journal needs a replay."""
    with open(image, "rb") as fh:
        fh.seek(1024)
        sb = fh.read(1024)
    if len(sb) < 0x64 or struct.unpack_from("<H", sb, 0x38)[0] != 0xEF53:
        raise StorageError(f"{image.name}: not an ext4 filesystem")
    state = struct.unpack_from("<H", sb, 0x3A)[0]
    incompat = struct.unpack_from("<I", sb, 0x60)[0]
    return bool(incompat & 0x4) or not state & 0x1


def _size_mb(image: Path) -> int:
    """The filesystem's size (the volume's quota), from its superblock."""
    with open(image, "rb") as fh:
        fh.seek(1024)
        sb = fh.read(0x20)
    blocks, log_size = int(struct.unpack_from("<I", sb, 0x04)[0]), int(struct.unpack_from("<I", sb, 0x18)[0])
    return (blocks << (10 + log_size)) >> 20


def _parse_stat(path: str, text: str) -> VolumeEntry:
    kind = _STAT_TYPE.search(text)
    owner = _STAT_OWNER.search(text)
    if kind is None or owner is None:
        raise StorageError(f"debugfs stat of {path!r}: unexpected output {text[:200]!r}")
    times = {m.group(1): datetime.fromtimestamp(int(m.group(2), 16), UTC) for m in _STAT_TIME.finditer(text)}
    now = datetime.now(UTC)
    link = _STAT_LINK.search(text)
    entry_type = _TYPES.get(kind.group(1), "unknown")
    return VolumeEntry(name=PurePosixPath(path).name or "/", type=entry_type, path=path,  # type: ignore[arg-type]
                       size=int(owner.group(3)), mode=int(kind.group(2), 8) & 0o7777, uid=int(owner.group(1)),
                       gid=int(owner.group(2)), atime=times.get("atime", now), mtime=times.get("mtime", now),
                       ctime=times.get("ctime", now), target=link.group(1) if link and entry_type == "symlink"
                       else None)


def _children(listing: str) -> list[tuple[str, int]]:
    """``ls -p`` lines ``/ino/mode/uid/gid/name/size/``: (name, mode) of each entry but . and .."""
    out = []
    for line in listing.splitlines():
        if not line.startswith("/"):
            continue
        fields = line.split("/")
        if len(fields) < 7:
            continue
        name = "/".join(fields[5:-2])  # a name may not hold '/', but be safe
        if name in (".", "..") or fields[1] == "0":
            continue
        out.append((name, int(fields[2], 8)))
    return out


class ImageVolumes(VolumeStore):
    """Volumes of :class:`~cube_storage_cow.driver.CowStorage` (see the module docstring)."""

    def __init__(self, root: Path, tool_uid: int | None = None) -> None:
        self.root = root
        self.tool_uid = tool_uid if os.geteuid() == 0 else None
        """Who runs e2fsprogs on an image (None: this process, when it cannot switch users)."""
        self._locks: dict[str, asyncio.Lock] = {}

    def prepare(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if shutil.which("debugfs") is None or shutil.which("mkfs.ext4") is None:
            log.warning("volumes need e2fsprogs (debugfs, mkfs.ext4, e2fsck): install it")

    def _image(self, volume_id: str) -> Path:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", volume_id) or volume_id.startswith("."):
            raise VolumeNotFoundError(volume=volume_id)
        return self.root / f"{volume_id}.ext4"

    async def _locked(self, volume_id: str, func: Callable[..., T], *args: Any) -> T:
        lock = self._locks.setdefault(volume_id, asyncio.Lock())
        async with lock:
            return await asyncio.to_thread(func, *args)

    def _open(self, volume_id: str) -> Debugfs:
        """The volume's image, checked (journal replayed) if a guest left it uncleanly."""
        image = self._image(volume_id)
        if not image.exists():
            raise VolumeNotFoundError(volume=volume_id)
        if _needs_check(image):
            proc = run_tool(["e2fsck", "-f", "-p"], image, uid=self.tool_uid, write=True)
            if proc.returncode >= 4:
                raise StorageError(f"volume {volume_id}: its filesystem is damaged (e2fsck: "
                                   f"{proc.stdout.decode(errors='replace')[-300:]})")
            log.info("volume filesystem checked after an unclean stop", volume_id=volume_id, rc=proc.returncode)
            with contextlib.suppress(_Failed):  # e2fsck makes one; not the user's content (kept if not empty)
                Debugfs(image, self.tool_uid).run(["rmdir lost+found"], write=True)
        return Debugfs(image, self.tool_uid)

    # -- lifecycle ------------------------------------------------------------------------------

    async def create(self, volume_id: str, size_mb: int) -> None:
        await self._locked(volume_id, self._create, volume_id, size_mb)

    def _create(self, volume_id: str, size_mb: int) -> None:
        if size_mb << 20 > VOLUME_DEVICE_BYTES:
            raise VolumePathError(path=volume_id, reason=f"size {size_mb} MiB is larger than a volume slot")
        image = self._image(volume_id)
        tmp = image.with_name(f".{image.name}.{secrets.token_hex(4)}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.ftruncate(fd, VOLUME_DEVICE_BYTES)
            finally:
                os.close(fd)
            proc = subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", "-L", volume_id[:16],
                                   "-E", f"root_owner={USER_ID}:{USER_ID},nodiscard", str(tmp), f"{size_mb}M"],
                                  capture_output=True, timeout=TIMEOUT_S, check=False)
            if proc.returncode != 0:
                raise StorageError(f"mkfs.ext4 for volume {volume_id}: {proc.stderr.decode(errors='replace')[-300:]}")
            Debugfs(tmp, self.tool_uid).run(["rmdir lost+found"], write=True)  # not part of the user's content
            os.replace(tmp, image)
        finally:
            tmp.unlink(missing_ok=True)

    async def delete(self, volume_id: str) -> None:
        image = self._image(volume_id)
        await self._locked(volume_id, lambda: image.unlink(missing_ok=True))
        self._locks.pop(volume_id, None)

    def ids(self) -> list[str]:
        return sorted(p.name.removesuffix(".ext4") for p in self.root.glob("*.ext4") if not p.name.startswith("."))

    async def disk(self, volume_id: str, *, read_only: bool = False) -> DiskHandle:
        image = self._image(volume_id)
        if read_only:  # mounted ``noload``: the journal of a guest killed while writing is replayed here
            await self._locked(volume_id, self._open, volume_id)
        elif not image.exists():
            raise VolumeNotFoundError(volume=volume_id)
        return DiskHandle(disk_id=f"volume-{volume_id}", path=image, format="raw", readonly=read_only)

    # -- content --------------------------------------------------------------------------------

    async def stat(self, volume_id: str, path: str) -> VolumeEntry:
        return await self._locked(volume_id, self._stat, self._image(volume_id), path)

    def _fs(self, image: Path) -> Debugfs:
        return self._open(image.name.removesuffix(".ext4"))

    def _stat(self, image: Path, path: str) -> VolumeEntry:
        return self._stat_in(self._fs(image), image, path)

    def _stat_in(self, fs: Debugfs, image: Path, path: str) -> VolumeEntry:
        try:
            return _parse_stat(path, fs.run([f"stat {_quote(path)}"]))
        except _Failed as exc:
            raise self._error(image, path, exc) from None

    @staticmethod
    def _error(image: Path, path: str, exc: _Failed) -> Exception:
        text = str(exc)
        volume_id = image.name.removesuffix(".ext4")
        if "not found" in text or "File not found" in text:
            return VolumePathNotFoundError(path=path, volume_id=volume_id)
        if "Could not allocate" in text or "No free space" in text:
            return VolumeFullError(volume_id=volume_id, size_mb=_size_mb(image))
        if "Ext2 directory" in text or "not a directory" in text.lower():
            return VolumePathError(path=path, reason="a component is not a directory")
        return StorageError(f"volume {volume_id}: {path}: {text[:300]}")

    async def list(self, volume_id: str, path: str, depth: int = 1) -> list[VolumeEntry]:
        return await self._locked(volume_id, self._list, self._image(volume_id), path, depth)

    def _list(self, image: Path, path: str, depth: int) -> builtins.list[VolumeEntry]:
        fs = self._fs(image)
        if self._stat_in(fs, image, path).type != "directory":
            raise VolumePathError(path=path, reason="is not a directory")
        found: builtins.list[str] = []
        level = [path]
        for _ in range(depth):
            if not level:
                break
            listings = fs.outputs([f"ls -p {_quote(d)}" for d in level])
            nxt = []
            for parent, listing in zip(level, listings, strict=True):
                for name, mode in _children(listing):
                    child = str(PurePosixPath(parent) / name)
                    found.append(child)
                    if mode & 0o170000 == 0o040000:
                        nxt.append(child)
            level = nxt
        if not found:
            return []
        stats = fs.outputs([f"stat {_quote(p)}" for p in found])
        return [_parse_stat(p, text) for p, text in zip(found, stats, strict=True)]

    async def read(self, volume_id: str, path: str) -> bytes:
        return await self._locked(volume_id, self._read, self._image(volume_id), path)

    def _read(self, image: Path, path: str) -> bytes:
        fs = self._fs(image)
        entry = self._stat_in(fs, image, path)
        if entry.type != "file":
            raise VolumePathError(path=path, reason="is not a file")
        out = os.memfd_create("cube-volume-read", os.MFD_CLOEXEC)
        try:
            try:
                fs.run([f"dump {_quote(path)} /proc/self/fd/{out}"], pass_fds=(out,))
            except _Failed as exc:
                raise self._error(image, path, exc) from None
            with os.fdopen(os.dup(out), "rb") as fh:
                data = fh.read(entry.size + 1)
            if len(data) != entry.size:
                raise StorageError(f"debugfs dumped {len(data)} bytes of {path!r}, its size is {entry.size}")
            return data
        finally:
            os.close(out)

    async def write(self, volume_id: str, path: str, data: bytes, *, uid: int | None = None,
                    gid: int | None = None, mode: int | None = None, parents: bool = False) -> VolumeEntry:
        return await self._locked(volume_id, self._write, self._image(volume_id), path, data,
                                  uid, gid, mode, parents)

    def _ensure_parent(self, fs: Debugfs, image: Path, path: str, parents: bool, uid: int | None,
                       gid: int | None) -> None:
        parent = str(PurePosixPath(path).parent)
        try:
            entry = self._stat_in(fs, image, parent)
        except VolumePathNotFoundError:
            if not parents:
                raise
            self._ensure_parent(fs, image, parent, True, uid, gid)
            self._mkdir(fs, image, parent, uid, gid, None)
            return
        if entry.type != "directory":
            raise VolumePathError(path=parent, reason="is not a directory")

    def _mkdir(self, fs: Debugfs, image: Path, path: str, uid: int | None, gid: int | None,
               mode: int | None) -> None:
        p = PurePosixPath(path)
        q = _quote(path)
        try:
            fs.run([f"cd {_quote(str(p.parent))}", f"mkdir {_quote(p.name)}",
                    f"sif {q} mode 0{0o040000 | (0o755 if mode is None else mode):o}",
                    f"sif {q} uid {USER_ID if uid is None else uid}",
                    f"sif {q} gid {USER_ID if gid is None else gid}"], write=True)
        except _Failed as exc:
            raise self._error(image, path, exc) from None

    def _write(self, image: Path, path: str, data: bytes, uid: int | None, gid: int | None, mode: int | None,
               parents: bool) -> VolumeEntry:
        if path == "/":
            raise VolumePathError(path=path, reason="is a directory")
        fs = self._fs(image)
        self._ensure_parent(fs, image, path, parents, uid, gid)
        old: VolumeEntry | None = None
        with contextlib.suppress(VolumePathNotFoundError):
            old = self._stat_in(fs, image, path)
        if old is not None and old.type == "directory":
            raise VolumePathError(path=path, reason="is a directory")
        p = PurePosixPath(path)
        tmp_name = f".cube-write-{secrets.token_hex(6)}"
        tmp_q = _quote(str(p.parent / tmp_name))
        final_mode = mode if mode is not None else (old.mode if old else 0o644)
        final_uid = uid if uid is not None else (old.uid if old else USER_ID)
        final_gid = gid if gid is not None else (old.gid if old else USER_ID)
        src = os.memfd_create("cube-volume-write", os.MFD_CLOEXEC)
        try:
            with os.fdopen(os.dup(src), "wb") as fh:
                fh.write(data)
            try:
                fs.run([f"cd {_quote(str(p.parent))}", f"write /proc/self/fd/{src} {_quote(tmp_name)}"], write=True,
                       pass_fds=(src,))
            except _Failed as exc:
                with contextlib.suppress(_Failed):
                    fs.run([f"rm {tmp_q}"], write=True)
                raise self._error(image, path, exc) from None
        finally:
            os.close(src)
        commands = [f"cd {_quote(str(p.parent))}"]
        if old is not None:
            commands.append(f"rm {_quote(p.name)}")
        commands += [f"ln {_quote(tmp_name)} {_quote(p.name)}", f"unlink {_quote(tmp_name)}",
                     f"sif {_quote(p.name)} mode 0{0o100000 | final_mode:o}",
                     f"sif {_quote(p.name)} uid {final_uid}", f"sif {_quote(p.name)} gid {final_gid}"]
        try:
            fs.run(commands, write=True)
        except _Failed as exc:
            raise self._error(image, path, exc) from None
        return self._stat_in(fs, image, path)

    async def make_dir(self, volume_id: str, path: str, *, uid: int | None = None, gid: int | None = None,
                       mode: int | None = None, parents: bool = False) -> VolumeEntry:
        return await self._locked(volume_id, self._make_dir, self._image(volume_id), path,
                                  uid, gid, mode, parents)

    def _make_dir(self, image: Path, path: str, uid: int | None, gid: int | None, mode: int | None,
                  parents: bool) -> VolumeEntry:
        fs = self._fs(image)
        with contextlib.suppress(VolumePathNotFoundError):
            old = self._stat_in(fs, image, path)
            if old.type == "directory" and parents:
                return old
            raise VolumePathError(path=path, reason="exists already")
        self._ensure_parent(fs, image, path, parents, uid, gid)
        self._mkdir(fs, image, path, uid, gid, mode)
        return self._stat_in(fs, image, path)

    async def remove(self, volume_id: str, path: str) -> None:
        await self._locked(volume_id, self._remove, self._image(volume_id), path)

    def _remove(self, image: Path, path: str) -> None:
        if path == "/":
            raise VolumePathError(path=path, reason="the volume's root cannot be removed")
        fs = self._fs(image)
        entry = self._stat_in(fs, image, path)
        commands: builtins.list[str] = []
        if entry.type == "directory":
            self._remove_tree(fs, path, commands)
        else:
            commands.append(f"rm {_quote(path)}")
        try:
            fs.run(commands, write=True)
        except _Failed as exc:
            raise self._error(image, path, exc) from None

    def _remove_tree(self, fs: Debugfs, path: str, commands: builtins.list[str]) -> None:
        for name, mode in _children(fs.outputs([f"ls -p {_quote(path)}"])[0]):
            child = str(PurePosixPath(path) / name)
            if mode & 0o170000 == 0o040000:
                self._remove_tree(fs, child, commands)
            else:
                commands.append(f"rm {_quote(child)}")
        commands.append(f"rmdir {_quote(path)}")

    async def update(self, volume_id: str, path: str, *, uid: int | None = None, gid: int | None = None,
                     mode: int | None = None) -> VolumeEntry:
        return await self._locked(volume_id, self._update, self._image(volume_id), path,
                                  uid, gid, mode)

    def _update(self, image: Path, path: str, uid: int | None, gid: int | None, mode: int | None) -> VolumeEntry:
        fs = self._fs(image)
        entry = self._stat_in(fs, image, path)
        kind = {"file": 0o100000, "directory": 0o040000, "symlink": 0o120000}.get(entry.type, 0)
        commands = []
        if mode is not None:
            commands.append(f"sif {_quote(path)} mode 0{kind | mode:o}")
        if uid is not None:
            commands.append(f"sif {_quote(path)} uid {uid}")
        if gid is not None:
            commands.append(f"sif {_quote(path)} gid {gid}")
        if commands:
            try:
                fs.run(commands, write=True)
            except _Failed as exc:
                raise self._error(image, path, exc) from None
        return self._stat_in(fs, image, path)
