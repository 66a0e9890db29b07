"""Template images from an OCI image layout tarball built here: layers in order, whiteouts, safety."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest
from cow_helpers import ext4_cat, ext4_ls, ext4_stat, fsck_clean
from cube_core import RootfsRecipe, TemplateBuildError

pytestmark = pytest.mark.root


def _entry(tf: tarfile.TarFile, name: str, data: bytes | None = None, *, kind: bytes = tarfile.REGTYPE,
           mode: int = 0o644, uid: int = 0, gid: int = 0, link: str = "", pax: dict[str, str] | None = None):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.uid, info.gid, info.linkname = kind, mode, uid, gid, link
    info.mtime = 1_700_000_000
    if pax:
        info.pax_headers = pax
    if kind == tarfile.CHRTYPE:
        info.devmajor, info.devminor = 1, 3
    if data is not None:
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    else:
        tf.addfile(info)


def _layer(entries, compress: bool) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for args, kwargs in entries:
            _entry(tf, *args, **kwargs)
    raw = buf.getvalue()
    return gzip.compress(raw, mtime=0) if compress else raw


def E(*args, **kwargs):
    return (args, kwargs)


def _blob(blobs: dict[str, bytes], data: bytes, media: str) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media, "digest": f"sha256:{digest}", "size": len(data)}


def make_layout(path: Path, layers: list[tuple[bytes, str]], *, other_arch_layer: bytes | None = None,
                corrupt: bool = False) -> Path:
    """Write an OCI image layout tarball (index.json -> manifest(s) -> config + layers)."""
    blobs: dict[str, bytes] = {}
    config = _blob(blobs, json.dumps({"architecture": "amd64", "os": "linux"}).encode(),
                   "application/vnd.oci.image.config.v1+json")

    def manifest(layer_list):
        body = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json", "config": config,
                "layers": [_blob(blobs, data, media) for data, media in layer_list]}
        return json.dumps(body).encode()

    manifests = []
    if other_arch_layer is not None:  # listed first: must be skipped on amd64
        desc = _blob(blobs, manifest([(other_arch_layer, "application/vnd.oci.image.layer.v1.tar")]),
                     "application/vnd.oci.image.manifest.v1+json")
        manifests.append({**desc, "platform": {"architecture": "arm64", "os": "linux"}})
    desc = _blob(blobs, manifest(layers), "application/vnd.oci.image.manifest.v1+json")
    manifests.append({**desc, "platform": {"architecture": "amd64", "os": "linux"}})
    index = json.dumps({"schemaVersion": 2, "manifests": manifests}).encode()
    if corrupt:
        last = layers[-1][0]
        blobs[hashlib.sha256(last).hexdigest()] = last[:-1] + bytes([last[-1] ^ 1])
    with tarfile.open(path, "w") as out:
        for name, data in [("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'), ("index.json", index),
                           *((f"blobs/sha256/{d}", b) for d, b in blobs.items())]:
            info = tarfile.TarInfo(f"./{name}")
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    return path


LAYER1 = [
    E("etc", kind=tarfile.DIRTYPE, mode=0o755),
    E("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"),
    E("etc/group", b"root:x:0:\n"),
    E("usr", kind=tarfile.DIRTYPE, mode=0o755),
    E("usr/bin", kind=tarfile.DIRTYPE, mode=0o755),
    E("usr/bin/hello", b"#!/bin/sh\necho hello\n", mode=0o755),
    E("usr/bin/hello2", kind=tarfile.LNKTYPE, link="usr/bin/hello"),
    E("usr/bin/ping", b"ping", mode=0o4755, pax={"SCHILY.xattr.user.cube": "capable"}),
    E("bin", kind=tarfile.SYMTYPE, link="usr/bin"),
    E("data", kind=tarfile.DIRTYPE, mode=0o755),
    E("data/old.txt", b"old\n"),
    E("data/keep.txt", b"keep\n", uid=1234, gid=5678, mode=0o600),
    E("opt", kind=tarfile.DIRTYPE, mode=0o755),
    E("opt/app", kind=tarfile.DIRTYPE, mode=0o755),
    E("opt/app/a.txt", b"a\n"),
    E("opt/app/sub", kind=tarfile.DIRTYPE, mode=0o755),
    E("opt/app/sub/b.txt", b"b\n"),
    E("dev", kind=tarfile.DIRTYPE, mode=0o755),
    E("dev/null", kind=tarfile.CHRTYPE, mode=0o666),
    E("etc/hostname", kind=tarfile.SYMTYPE, link="/../../../../etc/shadow"),
]


def layer2(escape_rel: str):
    return [
        E("data/.wh.old.txt", b""),
        E("opt/app/.wh..wh..opq", b""),
        E("opt/app/c.txt", b"c\n"),
        E("bin/added", b"added through the bin -> usr/bin symlink\n", mode=0o755),
        E("evil", kind=tarfile.SYMTYPE, link="../../../../../../../../"),
        E(f"evil/{escape_rel}", b"escaped!\n"),
        E("./usr/bin/hello", b"#!/bin/sh\necho hello v2\n", mode=0o755),
    ]


@pytest.fixture
def escape(tmp_path: Path) -> Path:
    return tmp_path / "host-pwned.txt"


async def test_oci_layers_and_whiteouts_applied_in_order(tmp_path: Path, make_driver, escape: Path):
    layout = make_layout(tmp_path / "image.oci.tar", [
        (_layer(LAYER1, compress=False), "application/vnd.oci.image.layer.v1.tar"),
        (_layer(layer2(str(escape).lstrip("/")), compress=True), "application/vnd.oci.image.layer.v1.tar+gzip"),
    ], other_arch_layer=_layer([E("wrong-arch", b"arm64\n")], compress=False))
    driver = make_driver()
    await driver.start()
    image = await driver.build_rootfs(RootfsRecipe(name="oci", source="oci", path=layout))
    img = image.path
    fsck_clean(img)

    assert ext4_ls(img, "/data") == {"keep.txt"}  # .wh.old.txt removed old.txt
    assert ext4_ls(img, "/opt/app") == {"c.txt"}  # opaque dir hid a.txt and sub/
    keep = ext4_stat(img, "/data/keep.txt")
    assert (keep["uid"], keep["gid"], keep["mode"] & 0o7777) == (1234, 5678, 0o600)
    assert ext4_cat(img, "/usr/bin/hello") == b"#!/bin/sh\necho hello v2\n"  # upper layer wins
    assert ext4_cat(img, "/usr/bin/hello2") == b"#!/bin/sh\necho hello\n"  # hard link kept lower inode
    assert ext4_cat(img, "/usr/bin/added").startswith(b"added through")
    assert ext4_stat(img, "/bin")["type"] == "symlink"
    assert ext4_stat(img, "/usr/bin/ping")["mode"] & 0o7777 == 0o4755
    assert "capable" in _xattr(img, "/usr/bin/ping", "user.cube")
    assert ext4_stat(img, "/dev/null")["type"] == "character special"
    assert "wrong-arch" not in ext4_ls(img, "/")
    # Cube's own files, on top of the image
    assert "user:x:1000:1000::/home/user:/bin/bash\n" in ext4_cat(img, "/etc/passwd").decode()
    assert ext4_cat(img, "/etc/hostname") == b"cube\n"
    assert "cube_guest" in ext4_ls(img, "/opt/cube/guest")
    # the escaping symlink + file landed inside the tree, never on the host
    assert not escape.exists()
    assert ext4_cat(img, str(escape)) == b"escaped!\n"
    assert not Path("/etc/shadow").is_symlink()

    again = await driver.build_rootfs(RootfsRecipe(name="oci2", source="oci", path=layout))
    assert again.path == img


async def test_corrupt_layer_blob_is_refused(tmp_path: Path, make_driver, escape: Path):
    layout = make_layout(tmp_path / "bad.oci.tar", [
        (_layer(LAYER1, compress=False), "application/vnd.oci.image.layer.v1.tar"),
    ], corrupt=True)
    driver = make_driver()
    await driver.start()
    with pytest.raises(TemplateBuildError, match="corrupt"):
        await driver.build_rootfs(RootfsRecipe(name="bad", source="oci", path=layout))
    assert driver.images() == []


async def test_not_a_layout_is_refused(tmp_path: Path, make_driver):
    bogus = tmp_path / "bogus.tar"
    with tarfile.open(bogus, "w") as tf:
        _entry(tf, "hello", b"hi")
    driver = make_driver()
    await driver.start()
    with pytest.raises(TemplateBuildError, match="no index.json"):
        await driver.build_rootfs(RootfsRecipe(name="bogus", source="oci", path=bogus))


def _xattr(image: Path, path: str, name: str) -> str:
    import subprocess

    return subprocess.run(["debugfs", "-R", f"ea_get {path} {name}", str(image)], capture_output=True,
                          text=True).stdout
