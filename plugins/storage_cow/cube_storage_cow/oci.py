"""Root trees from an OCI image layout (a tarball or a directory): index.json -> manifest -> layers.

Layers are applied in order with the OCI whiteouts (``.wh.<name>`` deletes a lower entry,
``.wh..wh..opq`` hides a lower directory's content). Pure stdlib ``tarfile``, no container runtime.
Every path goes through :mod:`cube_storage_cow.inroot`, so an image cannot write outside its tree.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import stat
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

import structlog
from cube_core import StorageError

from cube_storage_cow import commands, inroot

log = structlog.get_logger(__name__)

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
CHUNK = 1 << 20


class Layout:
    """Read access to the blobs of an OCI image layout, checked against their digests."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._tar: tarfile.TarFile | None = None
        self._names: dict[str, tarfile.TarInfo] = {}
        if path.is_dir():
            if not (path / "index.json").is_file():
                raise StorageError(f"{path} is not an OCI image layout (no index.json)")
        else:
            try:
                self._tar = tarfile.open(path, "r:*")
                for member in self._tar.getmembers():
                    self._names[_norm(member.name)] = member
            except (OSError, tarfile.TarError) as exc:
                self.close()
                raise StorageError(f"cannot read OCI layout tarball {path}: {exc}") from exc
            if "index.json" not in self._names:
                self.close()
                raise StorageError(f"{path} is not an OCI image layout tarball (no index.json)")

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()

    def open(self, rel: str) -> IO[bytes]:
        if self._tar is None:
            return open(self.path / rel, "rb")
        member = self._names.get(rel)
        fh = self._tar.extractfile(member) if member is not None and member.isfile() else None
        if fh is None:
            raise StorageError(f"{self.path}: {rel} missing from the OCI layout")
        return fh

    def blob(self, digest: str) -> IO[bytes]:
        """The blob ``digest`` (``sha256:<hex>``), after checking its content hash."""
        algo, _, hexdigest = digest.partition(":")
        if algo not in ("sha256", "sha512") or not hexdigest.isalnum():
            raise StorageError(f"unsupported digest {digest!r} in {self.path}")
        fh = self.open(f"blobs/{algo}/{hexdigest}")
        h = hashlib.new(algo)
        while chunk := fh.read(CHUNK):
            h.update(chunk)
        if h.hexdigest() != hexdigest:
            fh.close()
            raise StorageError(f"blob {digest} of {self.path} is corrupt (content hash {h.hexdigest()})")
        fh.seek(0)
        return fh

    def json(self, digest: str | None = None) -> dict[str, Any]:
        try:
            with self.open("index.json") if digest is None else self.blob(digest) as fh:
                data = json.load(fh)
        except ValueError as exc:
            raise StorageError(f"{self.path}: invalid JSON in {digest or 'index.json'}: {exc}") from exc
        if not isinstance(data, dict):
            raise StorageError(f"{self.path}: {digest or 'index.json'} is not a JSON object")
        return data


def layers(layout: Layout) -> list[dict[str, Any]]:
    """The layer descriptors of the layout's image for this host's platform, bottom first."""
    arch = ARCHES.get(platform.machine(), platform.machine())
    manifest = _pick_manifest(layout, layout.json(), arch, depth=0)
    found = manifest.get("layers")
    if not isinstance(found, list):
        raise StorageError(f"{layout.path}: image manifest has no layers")
    return found


def _pick_manifest(layout: Layout, index: dict[str, Any], arch: str, depth: int) -> dict[str, Any]:
    if depth > 4:
        raise StorageError(f"{layout.path}: image indexes nested too deeply")
    candidates = []
    for desc in index.get("manifests") or []:
        plat = desc.get("platform") or {}
        if plat and (plat.get("os") not in (None, "linux") or plat.get("architecture") not in (None, arch)):
            continue
        candidates.append(desc)
    for desc in candidates:
        media = desc.get("mediaType")
        if media in INDEX_TYPES:
            return _pick_manifest(layout, layout.json(desc["digest"]), arch, depth + 1)
        if media in MANIFEST_TYPES or media is None:
            manifest = layout.json(desc["digest"])
            if manifest.get("mediaType") in INDEX_TYPES or "manifests" in manifest:
                return _pick_manifest(layout, manifest, arch, depth + 1)
            return manifest
    raise StorageError(f"{layout.path}: no image manifest for linux/{arch}")


def populate(tree: Path, source: Path, *, cancel: threading.Event, log_lines: list[str]) -> None:
    """Apply every layer of the OCI layout ``source`` to the empty directory ``tree``."""
    layout = Layout(source)
    try:
        descs = layers(layout)
        for number, desc in enumerate(descs, 1):
            if cancel.is_set():
                raise commands.Cancelled("oci")
            with _layer_tar(layout, desc, scratch=tree.parent) as tf:
                count = apply_layer(tree, tf)
            log_lines.append(f"oci layer {number}/{len(descs)} {desc.get('digest')}: {count} entries")
    finally:
        layout.close()


@contextlib.contextmanager
def _layer_tar(layout: Layout, desc: dict[str, Any], *, scratch: Path) -> Iterator[tarfile.TarFile]:
    with layout.blob(str(desc.get("digest"))) as blob:
        media = str(desc.get("mediaType", ""))
        magic = blob.read(4)
        blob.seek(0)
        with _open_layer(blob, media, magic, desc, scratch) as tf:
            yield tf


@contextlib.contextmanager
def _open_layer(blob: IO[bytes], media: str, magic: bytes, desc: dict[str, Any],
                scratch: Path) -> Iterator[tarfile.TarFile]:
    if media.endswith("+zstd") or magic == ZSTD_MAGIC:
        commands.require_tool("zstd", "zstd")
        with tempfile.TemporaryDirectory(prefix=".oci-", dir=scratch) as tmp:
            packed, plain = Path(tmp, "layer.tar.zst"), Path(tmp, "layer.tar")
            with open(packed, "wb") as fh:
                shutil.copyfileobj(blob, fh, CHUNK)
            commands.run(["zstd", "-d", "-q", "-f", "-o", plain, packed])
            packed.unlink()
            with tarfile.open(plain, mode="r:") as tf:
                yield tf
        return
    try:
        tf = tarfile.open(fileobj=blob, mode="r:*")
    except tarfile.TarError as exc:
        raise StorageError(f"layer {desc.get('digest')} is not a (gzip) tar: {exc}") from exc
    with tf:
        yield tf


def apply_layer(tree: Path, tf: tarfile.TarFile) -> int:
    """Apply one layer: whiteouts first (they only hide lower layers), then the entries."""
    try:
        members = tf.getmembers()
    except (OSError, tarfile.TarError) as exc:
        raise StorageError(f"unreadable layer: {exc}") from exc
    entries: list[tuple[PurePosixPath, tarfile.TarInfo]] = []
    for member in members:
        path = PurePosixPath("/", _norm(member.name))
        if path == PurePosixPath("/"):
            continue
        if path.name == OPAQUE:
            inroot.clear_dir(tree, str(path.parent))
        elif path.name.startswith(WHITEOUT + WHITEOUT):
            continue  # other AUFS metadata (.wh..wh.plnk etc.)
        elif path.name.startswith(WHITEOUT):
            inroot.remove(tree, str(path.parent / path.name[len(WHITEOUT):]))
        else:
            entries.append((path, member))
    for path, member in entries:
        _extract(tree, tf, path, member)
    return len(entries)


def _extract(tree: Path, tf: tarfile.TarFile, path: PurePosixPath, member: tarfile.TarInfo) -> None:
    parent = inroot.ensure_dir(tree, str(path.parent))
    target = parent / path.name
    if member.isdir():
        if not (target.is_dir() and not target.is_symlink()):
            inroot.remove_host_path(target)
            target.mkdir()
    else:
        inroot.remove_host_path(target)
        if member.isreg():
            src = tf.extractfile(member)
            if src is None:
                raise StorageError(f"layer entry {path} has no data")
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as dst:
                shutil.copyfileobj(src, dst, CHUNK)
        elif member.issym():
            os.symlink(member.linkname, target)
        elif member.islnk():
            source = inroot.resolve_in_root(tree, "/" + _norm(member.linkname), follow_final=False)
            if not inroot.lexists(source) or (source.is_dir() and not source.is_symlink()):
                raise StorageError(f"layer hard link {path} -> {member.linkname}: target missing")
            os.link(source, target, follow_symlinks=False)
            return  # a hard link shares its target's inode: attributes are the target's
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(target, kind | (member.mode & 0o7777), os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(target, member.mode & 0o7777)
        else:
            log.warning("skipping unsupported layer entry", path=str(path), type=member.type)
            return
    os.chown(target, member.uid, member.gid, follow_symlinks=False)
    if not member.issym():
        os.chmod(target, member.mode & 0o7777)  # after chown, which clears setuid bits
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            try:
                os.setxattr(target, key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape"),
                            follow_symlinks=False)
            except OSError as exc:
                log.debug("xattr not set", path=str(path), xattr=key, error=str(exc))
    with contextlib.suppress(OSError, NotImplementedError):
        os.utime(target, (member.mtime, member.mtime), follow_symlinks=False)


def _norm(name: str) -> str:
    """A tar member name without leading ``./`` or ``/``."""
    parts = [p for p in PurePosixPath("/", name).parts[1:] if p not in ("", ".")]
    return "/".join(parts)
