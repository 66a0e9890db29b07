"""Template images from an OCI image layout tarball built here: layers in order, whiteouts.

The attacks an untrusted image can try are in test_cow_oci_attacks.py."""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from cow_helpers import ext4_cat, ext4_ls, ext4_stat, fsck_clean
from cube_core import RootfsRecipe, TemplateBuildError
from oci_layouts import TAR, TAR_GZ, E, make_layout
from oci_layouts import layer as _layer

pytestmark = pytest.mark.root


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
    E("lib", kind=tarfile.SYMTYPE, link="usr/lib"),
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


LAYER2 = [
    E("data/.wh.old.txt", b""),
    E("opt/app/.wh..wh..opq", b""),
    E("opt/app/c.txt", b"c\n"),
    E("lib", kind=tarfile.DIRTYPE, mode=0o755),  # a directory replaces the lower symlink (overlayfs)
    E("lib/added", b"added in a directory that replaced the lib -> usr/lib symlink\n"),
    E("./usr/bin/hello", b"#!/bin/sh\necho hello v2\n", mode=0o755),
]


async def test_oci_layers_and_whiteouts_applied_in_order(tmp_path: Path, make_driver):
    layout = make_layout(tmp_path / "image.oci.tar", [
        (_layer(LAYER1, compress=False), TAR),
        (_layer(LAYER2, compress=True), TAR_GZ),
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
    assert ext4_stat(img, "/bin")["type"] == "symlink"
    assert ext4_stat(img, "/lib")["type"] == "directory"
    assert ext4_cat(img, "/lib/added").startswith(b"added in a directory")
    assert "capable" in _xattr(img, "/usr/bin/ping", "user.cube")
    assert "wrong-arch" not in ext4_ls(img, "/")
    # privileged content is neutralised by default, and the build log says so
    assert ext4_stat(img, "/usr/bin/ping")["mode"] & 0o7777 == 0o755
    assert "null" not in ext4_ls(img, "/dev")
    assert "oci layer 1: 1 device nodes dropped: dev/null" in image.build_log
    assert "oci layer 1: 1 setuid/setgid bits cleared: usr/bin/ping" in image.build_log
    # Cube's own files, on top of the image
    assert "user:x:1000:1000::/home/user:/bin/bash\n" in ext4_cat(img, "/etc/passwd").decode()
    assert ext4_cat(img, "/etc/hostname") == b"cube\n"  # replaced the image's symlink to /etc/shadow
    assert "cube_guest" in ext4_ls(img, "/opt/cube/guest")
    assert not Path("/etc/shadow").is_symlink()

    again = await driver.build_rootfs(RootfsRecipe(name="oci2", source="oci", path=layout))
    assert again.path == img


async def test_corrupt_layer_blob_is_refused(tmp_path: Path, make_driver):
    layout = make_layout(tmp_path / "bad.oci.tar", [
        (_layer(LAYER1, compress=False), TAR),
    ], corrupt=True)
    driver = make_driver()
    await driver.start()
    with pytest.raises(TemplateBuildError, match="corrupt"):
        await driver.build_rootfs(RootfsRecipe(name="bad", source="oci", path=layout))
    assert driver.images() == []


async def test_not_a_layout_is_refused(tmp_path: Path, make_driver):
    bogus = tmp_path / "bogus.tar"
    bogus.write_bytes(_layer([E("hello", b"hi")]))
    driver = make_driver()
    await driver.start()
    with pytest.raises(TemplateBuildError, match="no index.json"):
        await driver.build_rootfs(RootfsRecipe(name="bogus", source="oci", path=bogus))


def _xattr(image: Path, path: str, name: str) -> str:
    import subprocess

    return subprocess.run(["debugfs", "-R", f"ea_get {path} {name}", str(image)], capture_output=True,
                          text=True).stdout
