"""Root trees from an OCI image layout (a tarball or a directory): index.json -> manifest -> layers.

Layers are applied in order with the OCI whiteouts (``.wh.<name>`` deletes a lower entry,
``.wh..wh..opq`` hides a lower directory's content). Pure stdlib ``tarfile``, no container runtime.
The image is untrusted: :mod:`cube_storage_cow.layertar` applies each layer without following a
symlink, refuses unsafe paths, caps sizes and drops privileged content (devices, setuid, caps).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import shutil
import stat
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Any

import structlog
from cube_core import StorageError

from cube_storage_cow import commands
from cube_storage_cow.layertar import BoundedTarInfo, Budget, LayerPolicy, OciLayerError, apply_layer, copy_capped

log = structlog.get_logger(__name__)

INDEX_TYPES = ("application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json")
MANIFEST_TYPES = ("application/vnd.oci.image.manifest.v1+json",
                  "application/vnd.docker.distribution.manifest.v2+json")
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le", "s390x": "s390x"}
CHUNK = 1 << 20
MAX_JSON_BYTES = 4 << 20


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
                self._tar = tarfile.open(path, "r:*", tarinfo=BoundedTarInfo)
                for member in self._tar.getmembers():
                    self._names[_norm(member.name)] = member
            except (OSError, tarfile.TarError, StorageError) as exc:
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
            # a regular file, not a symlink (to /dev/zero, say) nor a fifo that would block
            try:
                fd = os.open(self.path / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise StorageError(f"{self.path}: {rel} is not a regular file (a symlink)") from exc
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise StorageError(f"{self.path}: {rel} is not a regular file")
            return os.fdopen(fd, "rb")
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
                raw = fh.read(MAX_JSON_BYTES + 1)
            if len(raw) > MAX_JSON_BYTES:
                raise StorageError(f"{self.path}: {digest or 'index.json'} is larger than {MAX_JSON_BYTES} bytes")
            data = json.loads(raw)
        except ValueError as exc:
            raise StorageError(f"{self.path}: invalid JSON in {digest or 'index.json'}: {exc}") from exc
        if not isinstance(data, dict):
            raise StorageError(f"{self.path}: {digest or 'index.json'} is not a JSON object")
        return data


def layers(layout: Layout) -> list[dict[str, Any]]:
    """The layer descriptors of the layout's image for this host's platform, bottom first."""
    arch = ARCHES.get(platform.machine(), platform.machine())
    try:
        manifest = _pick_manifest(layout, layout.json(), arch, depth=0)
    except (KeyError, TypeError, AttributeError) as exc:
        raise StorageError(f"{layout.path}: malformed image index or manifest ({exc!r})") from exc
    found = manifest.get("layers")
    if not isinstance(found, list) or not all(isinstance(d, dict) for d in found):
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


def populate(tree: Path, source: Path, *, policy: LayerPolicy, cancel: threading.Event,
             log_lines: list[str]) -> None:
    """Apply every layer of the OCI layout ``source`` to the empty directory ``tree``
    (see :mod:`cube_storage_cow.layertar` for what an untrusted layer may and may not do)."""
    layout = Layout(source)
    root_fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    budget = Budget()
    try:
        descs = layers(layout)
        for number, desc in enumerate(descs, 1):
            if cancel.is_set():
                raise commands.Cancelled("oci")
            digest = str(desc.get("digest"))
            with _layer_tar(layout, desc, number, policy, scratch=tree.parent) as tf:
                count = apply_layer(root_fd, tf, layer=number, digest=digest, policy=policy, budget=budget,
                                    log_lines=log_lines)
            log_lines.append(f"oci layer {number}/{len(descs)} {digest}: {count} entries")
        log_lines.append(f"oci: {budget.entries} entries, {budget.bytes >> 20} MiB of file data")
    finally:
        os.close(root_fd)
        layout.close()


@contextlib.contextmanager
def _layer_tar(layout: Layout, desc: dict[str, Any], number: int, policy: LayerPolicy, *,
               scratch: Path) -> Iterator[tarfile.TarFile]:
    digest = str(desc.get("digest"))
    with layout.blob(digest) as blob:
        media = str(desc.get("mediaType", ""))
        magic = blob.read(4)
        blob.seek(0)
        if media.endswith("+zstd") or magic == ZSTD_MAGIC:
            with _zstd_layer(blob, number, digest, policy, scratch) as tf:
                yield tf
            return
        try:
            tf = tarfile.open(fileobj=blob, mode="r:*", tarinfo=BoundedTarInfo)
        except (tarfile.TarError, StorageError) as exc:
            raise OciLayerError(layer=number, digest=digest, member="(start)",
                                reason=f"not a (gzip) tar: {exc}") from exc
        with tf:
            yield tf


@contextlib.contextmanager
def _zstd_layer(blob: IO[bytes], number: int, digest: str, policy: LayerPolicy,
                scratch: Path) -> Iterator[tarfile.TarFile]:
    """A zstd layer, decompressed by the ``zstd`` tool into a scratch file of capped size."""
    zstd = commands.require_tool("zstd", "zstd")
    cap = policy.total_cap + policy.total_cap // 4 + (64 << 20)  # file data + tar headers
    too_big = OciLayerError(layer=number, digest=digest, member="(start)",
                            reason=f"decompresses past {cap >> 20} MiB (option oci_max_total_mb; "
                                   "a decompression bomb?)")
    with tempfile.TemporaryDirectory(prefix=".oci-", dir=scratch) as tmp:
        plain = Path(tmp, "layer.tar")
        with subprocess.Popen([zstd, "-d", "-q", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL) as proc:
            assert proc.stdin is not None and proc.stdout is not None
            feeder = threading.Thread(target=_feed, args=(blob, proc.stdin), daemon=True)
            feeder.start()
            try:
                with open(plain, "wb") as out:
                    copy_capped(proc.stdout, out, cap, too_big)
            except BaseException:
                proc.kill()  # the feeder then fails on a broken pipe and stops
                raise
            finally:
                feeder.join()
            if proc.wait() != 0:
                raise OciLayerError(layer=number, digest=digest, member="(start)",
                                    reason=f"zstd -d failed (exit {proc.returncode})")
        with tarfile.open(plain, mode="r:", tarinfo=BoundedTarInfo) as tf:
            yield tf


def _feed(src: IO[bytes], dst: IO[bytes]) -> None:
    with contextlib.suppress(OSError), dst:
        shutil.copyfileobj(src, dst, CHUNK)


def _norm(name: str) -> str:
    """A tar member name without leading ``./`` or ``/``."""
    parts = [p for p in PurePosixPath("/", name).parts[1:] if p not in ("", ".")]
    return "/".join(parts)
