"""Applying one untrusted OCI layer tar to a build tree, as root, without ever leaving the tree.

The rules (docs/templates.md, "Untrusted images"):

- member names and hard-link targets are relative paths: a leading ``/`` or any ``..``
  component refuses the layer;
- every parent directory is opened with ``O_NOFOLLOW`` from the tree's own fd, so a symlink
  in a parent (``a -> /etc`` then ``a/passwd``) refuses the layer instead of being followed; a
  symlink in the last component is replaced, never written through;
- device nodes, setuid/setgid bits on files and ``security.capability`` xattrs are dropped
  unless the operator allows them (:class:`LayerPolicy`); other ``security.*`` and ``trusted.*``
  xattrs are always dropped. What was dropped is listed in the build log;
- the bytes and entries a layer may write are capped before anything is written, so a small
  compressed layer that expands past the cap is refused after reading its headers.

Every refusal is an :class:`OciLayerError` naming the layer and the member.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import IO

import structlog
from cube_core import StorageError

log = structlog.get_logger(__name__)

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
CHUNK = 1 << 20
MAX_DEPTH = 256
"""Path components of one member: deeper trees break recursive tools (rmtree, mkfs) on the host."""
MAX_META_BYTES = 1 << 20
"""Size of one pax or GNU long-name header: tarfile reads them into memory whole."""
META_TYPES = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
              tarfile.GNUTYPE_LONGLINK)
XATTR = "SCHILY.xattr."
SAFE_XATTRS = ("user.", "system.posix_acl_access", "system.posix_acl_default")
CAPABILITY = "security.capability"
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
SHOWN = 5


class OciLayerError(StorageError):
    """A layer entry was refused (unsafe path, symlink parent, over a cap) or could not be written."""

    msg_fmt = "OCI layer {layer} ({digest}), member {member!r}: {reason}"


@dataclass(frozen=True)
class LayerPolicy:
    """What an image may put in a tree (operator options ``oci_*``), and how much."""

    allow_devices: bool = False
    allow_setuid: bool = False
    allow_capabilities: bool = False
    max_file_bytes: int = 4 << 30
    max_total_bytes: int | None = None
    """Regular-file bytes of all layers together (files later deleted or replaced count too);
    None: twice the image size (see :meth:`for_image`)."""
    max_entries: int = 500_000
    """Entries of all layers together."""

    def for_image(self, size_mb: int) -> LayerPolicy:
        """This policy with the total cap set (twice the image size unless the operator set it)."""
        return replace(self, max_total_bytes=self.max_total_bytes or (2 * size_mb) << 20)

    @property
    def total_cap(self) -> int:
        if self.max_total_bytes is None:
            raise StorageError("LayerPolicy.for_image() was not called")
        return self.max_total_bytes


@dataclass
class Budget:
    """What the layers applied so far have used of the policy's caps."""

    bytes: int = 0
    entries: int = 0


@dataclass
class Dropped:
    """What one layer lost to the policy, for the build log."""

    devices: list[str] = field(default_factory=list)
    setuid: list[str] = field(default_factory=list)
    capabilities: list[str] = field(default_factory=list)
    xattrs: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)

    def lines(self, layer: int) -> list[str]:
        out = []
        for what, names in (("device nodes dropped", self.devices),
                            ("setuid/setgid bits cleared", self.setuid),
                            ("security.capability xattrs dropped", self.capabilities),
                            ("security.*/trusted.* xattrs dropped", self.xattrs),
                            ("unsupported entries skipped", self.other)):
            if names:
                more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
                out.append(f"oci layer {layer}: {len(names)} {what}: {', '.join(names[:SHOWN])}{more}")
        return out


class BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses huge pax / long-name headers before tarfile reads them into memory
    (``_proc_member`` is tarfile's documented hook for subclasses)."""

    def _proc_member(self, tar: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in META_TYPES and self.size > MAX_META_BYTES:
            raise StorageError(f"tar header of {self.size} bytes before {self.name!r} "
                               f"(more than {MAX_META_BYTES})")
        result: tarfile.TarInfo = super()._proc_member(tar)  # type: ignore[misc]  # not in typeshed
        return result


@dataclass(frozen=True)
class Entry:
    member: tarfile.TarInfo
    parts: tuple[str, ...]

    @property
    def path(self) -> str:
        return "/".join(self.parts)


class LayerWriter:
    """Applies one layer (``tf``) to the tree open at ``root_fd``; see the module docstring."""

    def __init__(self, root_fd: int, tf: tarfile.TarFile, *, layer: int, digest: str, policy: LayerPolicy,
                 budget: Budget) -> None:
        self.root_fd = root_fd
        self.tf = tf
        self.layer = layer
        self.digest = digest
        self.policy = policy
        self.budget = budget
        self.dropped = Dropped()
        self._dropped_paths: set[tuple[str, ...]] = set()

    def error(self, member: str, reason: str) -> OciLayerError:
        return OciLayerError(layer=self.layer, digest=self.digest, member=member, reason=reason)

    def apply(self) -> int:
        """Whiteouts first (they only hide lower layers), then the entries; returns the entry count."""
        entries = self._read_headers()
        count = 0
        for whiteouts in (True, False):
            for entry in entries:
                name = entry.parts[-1]
                if name.startswith(WHITEOUT) != whiteouts:
                    continue
                try:
                    if name == OPAQUE:
                        self._opaque(entry)
                    elif name.startswith(WHITEOUT + WHITEOUT):
                        continue  # other AUFS metadata (.wh..wh.plnk etc.)
                    elif name.startswith(WHITEOUT):
                        self._whiteout(entry)
                    else:
                        self._extract(entry)
                        count += 1
                except OSError as exc:
                    raise self.error(entry.member.name, exc.strerror or str(exc)) from exc
                except (OverflowError, ValueError) as exc:  # ids or device numbers out of range, NUL in a name
                    raise self.error(entry.member.name, f"invalid entry: {exc}") from exc
                except (tarfile.TarError, EOFError) as exc:  # data cut short (headers were complete)
                    raise self.error(entry.member.name, f"unreadable data: {exc}") from exc
        return count

    # -- headers: names and caps, before anything is written ---------------------------------------

    def _read_headers(self) -> list[Entry]:
        entries: list[Entry] = []
        member: tarfile.TarInfo | None = None
        while True:
            try:
                member = self.tf.next()
            except (OSError, EOFError, tarfile.TarError, StorageError) as exc:
                after = member.name if member is not None else "(start)"
                raise self.error(after, f"unreadable layer after this member: {exc}") from exc
            if member is None:
                return entries
            self.budget.entries += 1
            if self.budget.entries > self.policy.max_entries:
                raise self.error(member.name, f"more than {self.policy.max_entries} entries in the image "
                                              "(option oci_max_entries)")
            parts = self._check_path(member.name, member.name, "path")
            if not parts:
                continue  # the root directory itself
            if member.isreg():
                if member.size > self.policy.max_file_bytes:
                    raise self.error(member.name, f"file of {_mib(member.size)} is over the per-file cap of "
                                                  f"{_mib(self.policy.max_file_bytes)} (option oci_max_file_mb)")
                self.budget.bytes += member.size
                if self.budget.bytes > self.policy.total_cap:
                    raise self.error(member.name, f"the layers expand past the cap of "
                                                  f"{_mib(self.policy.total_cap)} of file data "
                                                  "(option oci_max_total_mb; a decompression bomb?)")
            elif member.islnk():
                self._check_path(member.name, member.linkname, "hard link target")
            entries.append(Entry(member, parts))

    def _check_path(self, member: str, path: str, what: str) -> tuple[str, ...]:
        if path.startswith("/"):
            raise self.error(member, f"absolute {what} {path!r}")
        parts = tuple(p for p in path.split("/") if p not in ("", "."))
        if ".." in parts:
            raise self.error(member, f"'..' in {what} {path!r}")
        if len(parts) > MAX_DEPTH:
            raise self.error(member, f"{what} deeper than {MAX_DEPTH} components")
        return parts

    # -- whiteouts ----------------------------------------------------------------------------------

    def _opaque(self, entry: Entry) -> None:
        """``dir/.wh..wh..opq``: empty a lower directory (nothing to do if it is not a real one)."""
        with self._parent(entry, entry.parts[:-1], create=False) as fd:
            if fd is None:
                return
            for name in os.listdir(fd):
                _remove_at(fd, name)

    def _whiteout(self, entry: Entry) -> None:
        """``dir/.wh.name``: delete ``name`` of a lower layer (never through a symlink)."""
        hidden = entry.parts[-1][len(WHITEOUT):]
        if hidden in ("", ".", ".."):
            raise self.error(entry.member.name, f"whiteout of {hidden!r}")
        with self._parent(entry, entry.parts[:-1], create=False) as fd:
            if fd is not None:
                _remove_at(fd, hidden)

    # -- entries ------------------------------------------------------------------------------------

    def _extract(self, entry: Entry) -> None:
        member, name = entry.member, entry.parts[-1]
        with self._parent(entry, entry.parts[:-1], create=True) as parent:
            assert parent is not None
            existing = _lstat_at(parent, name)
            if member.isdir():
                if existing is None or not stat.S_ISDIR(existing.st_mode):
                    if existing is not None:
                        _remove_at(parent, name)
                    os.mkdir(name, 0o700, dir_fd=parent)
                fd = os.open(name, DIR_FLAGS, dir_fd=parent)
                with _closing(fd):
                    self._set_attrs(entry, fd, stat.S_IFDIR)
            elif member.isreg():
                if existing is not None:
                    _remove_at(parent, name)
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                             dir_fd=parent)
                with _closing(fd):
                    self._copy_data(entry, fd)
                    self._set_attrs(entry, fd, stat.S_IFREG)
            elif member.issym():
                if existing is not None:
                    _remove_at(parent, name)
                os.symlink(member.linkname, name, dir_fd=parent)
                os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
                with contextlib.suppress(OSError, OverflowError, NotImplementedError):
                    os.utime(name, (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)
            elif member.islnk():
                self._hardlink(entry, parent, name, existing)
            elif member.ischr() or member.isblk():
                if not self.policy.allow_devices:
                    self.dropped.devices.append(entry.path)
                    self._dropped_paths.add(entry.parts)
                    return
                if existing is not None:
                    _remove_at(parent, name)
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=parent)
                self._set_attrs_at(entry, parent, name, kind)
            elif member.isfifo():
                if existing is not None:
                    _remove_at(parent, name)
                os.mkfifo(name, 0o600, dir_fd=parent)
                self._set_attrs_at(entry, parent, name, stat.S_IFIFO)
            else:
                self.dropped.other.append(f"{entry.path} (type {member.type!r})")

    def _copy_data(self, entry: Entry, fd: int) -> None:
        src = self.tf.extractfile(entry.member)
        if src is None:
            raise self.error(entry.member.name, "regular file without data")
        left = entry.member.size
        with src:
            while left > 0:
                chunk = src.read(min(CHUNK, left))
                if not chunk:
                    raise self.error(entry.member.name, "file data ends early (truncated layer)")
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                left -= len(chunk)

    def _hardlink(self, entry: Entry, parent: int, name: str, existing: os.stat_result | None) -> None:
        member = entry.member
        target = tuple(p for p in member.linkname.split("/") if p not in ("", "."))
        if target in self._dropped_paths:
            self.dropped.devices.append(f"{entry.path} (hard link to {member.linkname})")
            return
        if not target or target == entry.parts:
            raise self.error(member.name, f"hard link to itself or the root ({member.linkname!r})")
        with self._parent(entry, target[:-1], create=False, what="hard link target") as src_dir:
            source = _lstat_at(src_dir, target[-1]) if src_dir is not None else None
            if src_dir is None or source is None or stat.S_ISDIR(source.st_mode):
                raise self.error(member.name, f"hard link target {member.linkname!r} is missing or a directory")
            if existing is not None:
                _remove_at(parent, name)
            os.link(target[-1], name, src_dir_fd=src_dir, dst_dir_fd=parent, follow_symlinks=False)
        # a hard link shares its target's inode: the attributes are the target's

    # -- attributes ---------------------------------------------------------------------------------

    def _mode(self, entry: Entry, kind: int) -> int:
        mode = entry.member.mode & 0o7777
        if kind == stat.S_IFDIR:
            return mode & ~stat.S_ISUID  # setgid on a directory only picks the group of new files
        if mode & (stat.S_ISUID | stat.S_ISGID) and not self.policy.allow_setuid:
            self.dropped.setuid.append(entry.path)
            mode &= ~(stat.S_ISUID | stat.S_ISGID)
        return mode

    def _xattrs(self, entry: Entry) -> Iterator[tuple[str, bytes]]:
        for key, value in entry.member.pax_headers.items():
            if not key.startswith(XATTR):
                continue
            name = key[len(XATTR):]
            if name == CAPABILITY and not self.policy.allow_capabilities:
                self.dropped.capabilities.append(entry.path)
            elif name == CAPABILITY or name.startswith(SAFE_XATTRS):
                yield name, value.encode("utf-8", "surrogateescape")
            else:
                self.dropped.xattrs.append(f"{entry.path} ({name})")

    def _set_attrs(self, entry: Entry, fd: int, kind: int) -> None:
        member = entry.member
        os.fchown(fd, member.uid, member.gid)
        os.fchmod(fd, self._mode(entry, kind))  # after chown, which clears setuid bits
        for name, value in self._xattrs(entry):
            try:
                os.setxattr(fd, name, value)
            except OSError as exc:
                log.debug("xattr not set", path=entry.path, xattr=name, error=str(exc))
        with contextlib.suppress(OSError, OverflowError):  # an mtime out of range is not worth a refusal
            os.utime(fd, (member.mtime, member.mtime))

    def _set_attrs_at(self, entry: Entry, parent: int, name: str, kind: int) -> None:
        """Attributes of a device node or fifo (which must not be opened)."""
        member = entry.member
        os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
        os.chmod(name, self._mode(entry, kind), dir_fd=parent)  # we just made it: not a symlink
        with contextlib.suppress(OSError, OverflowError):  # an mtime out of range is not worth a refusal
            os.utime(name, (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)

    # -- walking ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _parent(self, entry: Entry, parts: tuple[str, ...], *, create: bool,
                what: str = "path") -> Iterator[int | None]:
        """An fd of the directory ``parts`` under the tree, opened one component at a time with
        ``O_NOFOLLOW``. A missing component is created (``create``) or gives None; a symlink or
        non-directory refuses the entry when creating, and gives None for whiteouts."""
        fd = os.dup(self.root_fd)
        try:
            for depth, name in enumerate(parts, 1):
                try:
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        yield None
                        return
                    os.mkdir(name, 0o755, dir_fd=fd)
                    child = os.open(name, DIR_FLAGS, dir_fd=fd)
                    os.fchmod(child, 0o755)
                except OSError as exc:
                    if not create and what == "path":
                        yield None  # a whiteout below a symlink or file: nothing real to hide
                        return
                    st = _lstat_at(fd, name)
                    kind = "a symlink" if st is not None and stat.S_ISLNK(st.st_mode) else "not a directory"
                    where = "/".join(parts[:depth])
                    raise self.error(entry.member.name, f"{what} parent {where!r} is {kind}; "
                                                        "Cube never follows symlinks while unpacking") from exc
                os.close(fd)
                fd = child
            yield fd
        finally:
            os.close(fd)


def apply_layer(root_fd: int, tf: tarfile.TarFile, *, layer: int, digest: str, policy: LayerPolicy,
                budget: Budget, log_lines: list[str]) -> int:
    """Apply one layer to the tree open at ``root_fd``; returns how many entries it wrote."""
    writer = LayerWriter(root_fd, tf, layer=layer, digest=digest, policy=policy, budget=budget)
    count = writer.apply()
    for line in writer.dropped.lines(layer):
        log_lines.append(line)
        log.warning("unsafe image content neutralised", detail=line)
    return count


def copy_capped(src: IO[bytes], dst: IO[bytes], cap: int, error: OciLayerError) -> int:
    """Copy at most ``cap`` bytes; raise ``error`` if ``src`` has more."""
    total = 0
    while chunk := src.read(CHUNK):
        total += len(chunk)
        if total > cap:
            raise error
        dst.write(chunk)
    return total


def _lstat_at(dir_fd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dir_fd: int, name: str) -> None:
    """Remove ``name`` (file, symlink or whole directory) in ``dir_fd`` without following symlinks."""
    st = _lstat_at(dir_fd, name)
    if st is None:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)


@contextlib.contextmanager
def _closing(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.0f} MiB"
