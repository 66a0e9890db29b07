"""Builders of OCI image layouts for the storage_cow tests (stdlib tarfile/gzip, no registry)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import tarfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

TAR = "application/vnd.oci.image.layer.v1.tar"
TAR_GZ = "application/vnd.oci.image.layer.v1.tar+gzip"
TAR_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"

Spec = tuple[tuple[Any, ...], dict[str, Any]]


def E(*args: Any, **kwargs: Any) -> Spec:
    """One layer entry: ``E(name, data=None, kind=REGTYPE, mode=0o644, uid=0, gid=0, link="", pax=None,
    dev=(1, 3), size=None)``; ``data`` may be bytes or a file object of ``size`` bytes."""
    return (args, kwargs)


class Zeros(io.RawIOBase):
    """``size`` zero bytes, produced on the fly (tar bombs without holding them in memory)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _entry(tf: tarfile.TarFile, name: str, data: bytes | io.RawIOBase | None = None, *,
           kind: bytes = tarfile.REGTYPE, mode: int = 0o644, uid: int = 0, gid: int = 0, link: str = "",
           pax: dict[str, str] | None = None, dev: tuple[int, int] = (1, 3), size: int | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, gid, link
    info.mtime = 1_700_000_000
    if pax:
        info.pax_headers = pax
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        info.devmajor, info.devminor = dev
    if isinstance(data, bytes):
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    elif data is not None:
        assert size is not None
        info.size = size
        tf.addfile(info, io.BufferedReader(data))
    else:
        tf.addfile(info)


def layer(entries: Iterable[Spec], compress: str | bool = False) -> bytes:
    """A layer tarball (PAX format) of ``entries``; ``compress``: False, True/"gzip" or "zstd"."""
    buf = io.BytesIO()
    sink: Any = gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, compresslevel=6) if compress in (True, "gzip") else buf
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for args, kwargs in entries:
            _entry(tf, *args, **kwargs)
    if sink is not buf:
        sink.close()
    raw = buf.getvalue()
    if compress == "zstd":
        raw = subprocess.run(["zstd", "-q", "-c"], input=raw, capture_output=True, check=True).stdout
    return raw


def _blob(blobs: dict[str, bytes], data: bytes, media: str) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}


def make_layout(path: Path, layers: list[tuple[bytes, str]], *, other_arch_layer: bytes | None = None,
                corrupt: bool = False, as_dir: bool = False) -> Path:
    """An OCI image layout (index.json -> manifest(s) -> config + layers): a tarball, or with
    ``as_dir`` a directory."""
    blobs: dict[str, bytes] = {}
    config = _blob(blobs, json.dumps({"architecture": "amd64", "os": "linux"}).encode(),
                   "application/vnd.oci.image.config.v1+json")

    def manifest(layer_list: list[tuple[bytes, str]]) -> bytes:
        body = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config,
                "layers": [_blob(blobs, data, media) for data, media in layer_list]}
        return json.dumps(body).encode()

    manifests = []
    if other_arch_layer is not None:  # listed first: must be skipped on amd64
        desc = _blob(blobs, manifest([(other_arch_layer, TAR)]), MANIFEST)
        manifests.append({**desc, "platform": {"architecture": "arm64", "os": "linux"}})
    desc = _blob(blobs, manifest(layers), MANIFEST)
    manifests.append({**desc, "platform": {"architecture": "amd64", "os": "linux"}})
    index = json.dumps({"schemaVersion": 2, "manifests": manifests}).encode()
    if corrupt:
        last = layers[-1][0]
        blobs[hashlib.sha256(last).hexdigest()] = last[:-1] + bytes([last[-1] ^ 1])
    files = [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index),
             *((f"blobs/sha256/{d}", b) for d, b in blobs.items())]
    if as_dir:
        for name, data in files:
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            (path / name).write_bytes(data)
        return path
    with tarfile.open(path, "w") as out:
        for name, data in files:
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return path
