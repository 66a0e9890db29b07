"""An untrusted OCI image attacks the host while Cube (as root) unpacks it.

Each layer here is built with tarfile/gzip into an OCI layout directory and goes through
``CowStorage.build_rootfs``, which is what ``cube template build --from-oci`` calls (one test
runs the real command line too). Refused layers raise an :class:`OciLayerError` naming the layer
and member; neutralised content is absent from the image and listed in the build log. The
files the attacks aim at are decoys under tmp, checked untouched afterwards.
"""

from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from cow_helpers import debugfs, ext4_ls, ext4_stat, fsck_clean
from cube_core import CubeError, RootfsRecipe, TemplateBuildError
from cube_core.testing.fakes import FAKE_CONFIG
from oci_layouts import TAR, TAR_GZ, TAR_ZSTD, E, Zeros, layer, make_layout

from cube_storage_cow.layertar import OciLayerError

pytestmark = pytest.mark.root

CAP_NET_RAW = 13
# vfs_cap_data revision 2, effective flag set, permitted = cap_net_raw
CAPS = struct.pack("<IIIII", 0x02000001, 1 << CAP_NET_RAW, 0, 0, 0).decode("utf-8", "surrogateescape")
BASE = [E("etc", kind=tarfile.DIRTYPE, mode=0o755), E("etc/os-release", b"ID=evil\n")]


class Decoy:
    """Host files an attack aims at: a directory with a passwd file, outside every Cube dir."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "host-etc"
        self.dir.mkdir()
        self.passwd = self.dir / "passwd"
        self.passwd.write_text("root:x:0:0:decoy:/root:/bin/sh\n")
        self.before = self.snapshot()

    def snapshot(self) -> dict[str, tuple[int, int, bytes]]:
        out = {}
        for path in sorted(self.dir.rglob("*")):
            st = path.lstat()
            data = path.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[str(path)] = (st.st_mode, st.st_nlink, data)
        return out

    @property
    def abs(self) -> str:
        return str(self.dir)

    @property
    def rel(self) -> str:
        return self.abs.lstrip("/")

    def up(self, depth: int = 12) -> str:
        """``../../..`` far enough to reach / from any build tree, then this decoy (relative)."""
        return "../" * depth + self.abs.lstrip("/")

    def assert_untouched(self) -> None:
        assert self.snapshot() == self.before


@pytest.fixture
def decoy(tmp_path: Path) -> Decoy:
    return Decoy(tmp_path)


def _layout(tmp_path: Path, *layers: list, compress: str | bool = False) -> Path:
    media = {False: TAR, True: TAR_GZ, "gzip": TAR_GZ, "zstd": TAR_ZSTD}[compress]
    path = tmp_path / "layout"
    path.mkdir()
    return make_layout(path, [(layer(entries, compress), media) for entries in layers], as_dir=True)


async def _refused(driver, layout: Path) -> OciLayerError:
    with pytest.raises(TemplateBuildError) as info:
        await driver.build_rootfs(RootfsRecipe(name="evil", source="oci", path=layout))
    cause = info.value.__cause__
    assert isinstance(cause, OciLayerError), repr(cause)
    assert isinstance(cause, CubeError)
    assert cause.message in info.value.message
    assert driver.images() == []
    assert list((driver.root / "build").iterdir()) == [], "scratch tree left behind"
    return cause


def _symlink_parent(decoy: Decoy) -> list:
    return [E("a", kind=tarfile.SYMTYPE, link=decoy.abs), E("a/passwd", b"pwned\n")]


ATTACKS = {
    # name: (layers, layer number, member, words of the reason)
    "dotdot": (lambda d: [BASE + [E(f"{d.up()}/passwd", b"pwned\n")]], 1, "{up}/passwd", "'..'"),
    "dotdot-inside": (lambda d: [BASE + [E("etc/../../passwd", b"pwned\n")]], 1, "etc/../../passwd", "'..'"),
    "absolute": (lambda d: [BASE + [E(f"{d.abs}/passwd", b"pwned\n")]], 1, "{abs}/passwd", "absolute"),
    "symlink-parent-absolute": (lambda d: [BASE + _symlink_parent(d)], 1, "a/passwd",
                                "parent 'a' is a symlink"),
    "symlink-parent-dotdot": (lambda d: [BASE + [E("a", kind=tarfile.SYMTYPE, link="../" * 12),
                                                 E(f"a/{d.rel}/passwd", b"pwned\n")]], 1,
                              "a/{rel}/passwd", "parent 'a' is a symlink"),
    "symlink-parent-relative-to-decoy": (lambda d: [BASE + [E("a", kind=tarfile.SYMTYPE, link=d.up()),
                                                            E("a/passwd", b"pwned\n")]], 1, "a/passwd",
                                         "parent 'a' is a symlink"),
    "symlink-parent-deep": (lambda d: [BASE + [E("etc/x", kind=tarfile.SYMTYPE, link=d.abs),
                                               E("etc/x/passwd", b"pwned\n")]], 1, "etc/x/passwd",
                            "parent 'etc/x' is a symlink"),
    "symlink-parent-lower-layer": (lambda d: [BASE + [E("a", kind=tarfile.SYMTYPE, link=d.abs)],
                                              [E("a/passwd", b"pwned\n")]], 2, "a/passwd",
                                   "parent 'a' is a symlink"),
    "hardlink-dotdot": (lambda d: [BASE + [E("x", kind=tarfile.LNKTYPE, link=f"{d.up()}/passwd")]], 1, "x",
                        "'..' in hard link target"),
    "hardlink-absolute": (lambda d: [BASE + [E("x", kind=tarfile.LNKTYPE, link=f"{d.abs}/passwd")]], 1, "x",
                          "absolute hard link target"),
    "hardlink-via-symlink": (lambda d: [BASE + [E("s", kind=tarfile.SYMTYPE, link=d.abs),
                                                E("x", kind=tarfile.LNKTYPE, link="s/passwd")]], 1, "x",
                             "hard link target parent 's' is a symlink"),
    "whiteout-dotdot": (lambda d: [BASE, [E("etc/.wh...", b"")]], 2, "etc/.wh...", "whiteout of '..'"),
    "uid-out-of-range": (lambda d: [BASE + [E("f", b"x", uid=1 << 40)]], 1, "f", "invalid entry"),
    "nul-in-name": (lambda d: [BASE + [E("n" * 120 + "\0/passwd", b"x")]], 1, "n" * 120 + "\0/passwd",
                    "invalid entry"),
    "huge-pax-header": (lambda d: [BASE + [E("big", b"x", pax={"comment": "y" * (2 << 20)})]], 1, "(start)",
                        "tar header of"),
}


@pytest.mark.parametrize("attack", list(ATTACKS))
async def test_attack_is_refused_and_host_untouched(attack: str, tmp_path: Path, make_driver, decoy: Decoy):
    build, number, member, reason = ATTACKS[attack]
    layout = _layout(tmp_path, *build(decoy))
    driver = make_driver()
    await driver.start()
    err = await _refused(driver, layout)
    assert err.layer == number
    assert err.digest.startswith("sha256:")
    if member != "(start)":
        assert err.member == member.format(up=decoy.up(), rel=decoy.rel, abs=decoy.abs)
    assert reason in err.reason
    assert f"OCI layer {number}" in str(err)
    decoy.assert_untouched()


async def test_layout_with_special_blob_or_malformed_index_is_refused(tmp_path: Path, make_driver):
    """A layout directory whose blob is a symlink to /dev/zero (hashing would never end) or whose
    index is not what the spec says gives a clear error, not a hang or a traceback."""
    layout = _layout(tmp_path, BASE)
    blob = max((layout / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    blob.unlink()
    blob.symlink_to("/dev/zero")
    driver = make_driver()
    await driver.start()
    with pytest.raises(TemplateBuildError) as info:
        await driver.build_rootfs(RootfsRecipe(name="zero", source="oci", path=layout))
    assert "is not a regular file" in info.value.message
    (layout / "index.json").write_text('{"schemaVersion": 2, "manifests": ["not an object"]}')
    with pytest.raises(TemplateBuildError, match="malformed image index"):
        await driver.build_rootfs(RootfsRecipe(name="bad", source="oci", path=layout))
    (layout / "index.json").write_bytes(b" " * (5 << 20) + b"{}")
    with pytest.raises(TemplateBuildError, match="larger than"):
        await driver.build_rootfs(RootfsRecipe(name="big", source="oci", path=layout))
    assert driver.images() == []


@pytest.mark.parametrize("compress", [False, "gzip"])
async def test_truncated_layer_is_refused(compress: str | bool, tmp_path: Path, make_driver):
    whole = layer(BASE + [E("data.bin", os.urandom(256 << 10))], compress)
    cut = whole[:len(whole) // 2]
    path = tmp_path / "layout"
    path.mkdir()
    layout = make_layout(path, [(cut, TAR_GZ if compress else TAR)], as_dir=True)
    driver = make_driver()
    await driver.start()
    err = await _refused(driver, layout)
    assert err.layer == 1 and "unreadable" in err.reason


async def test_privileged_content_is_neutralised_by_default(tmp_path: Path, make_driver, decoy: Decoy):
    """Device nodes (even one aimed at the host's disk), setuid/setgid bits, file capabilities and
    trusted.* xattrs do not reach the image; a hard link to a dropped device goes too."""
    layout = _layout(tmp_path, BASE + [
        E("dev", kind=tarfile.DIRTYPE, mode=0o755),
        E("dev/sda", kind=tarfile.BLKTYPE, mode=0o666, dev=(8, 0)),
        E("dev/mem", kind=tarfile.CHRTYPE, mode=0o666, dev=(1, 1)),
        E("dev/mem2", kind=tarfile.LNKTYPE, link="dev/mem"),
        E("usr", kind=tarfile.DIRTYPE, mode=0o755),
        E("usr/bin", kind=tarfile.DIRTYPE, mode=0o755),
        E("usr/bin/rootshell", b"#!/bin/sh\nexec sh\n", mode=0o4755),
        E("usr/bin/groupshell", b"#!/bin/sh\nexec sh\n", mode=0o2755, gid=42),
        E("usr/bin/ping", b"ping", mode=0o755, pax={"SCHILY.xattr.security.capability": CAPS}),
        E("usr/bin/tagged", b"t", pax={"SCHILY.xattr.trusted.overlay.opaque": "y",
                                       "SCHILY.xattr.user.note": "kept"}),
        E("srv", kind=tarfile.DIRTYPE, mode=0o2775, gid=50),  # setgid dir: harmless, kept
    ], compress="gzip")
    driver = make_driver()
    await driver.start()
    image = await driver.build_rootfs(RootfsRecipe(name="priv", source="oci", path=layout))
    img = image.path
    fsck_clean(img)
    assert {"sda", "mem", "mem2"}.isdisjoint(ext4_ls(img, "/dev"))
    assert ext4_stat(img, "/usr/bin/rootshell")["mode"] & 0o7777 == 0o755
    assert ext4_stat(img, "/usr/bin/groupshell")["mode"] & 0o7777 == 0o755
    assert ext4_stat(img, "/srv")["mode"] & 0o7777 == 0o2775
    assert "security.capability" not in _xattrs(img, "/usr/bin/ping")
    tagged = _xattrs(img, "/usr/bin/tagged")
    assert "trusted.overlay.opaque" not in tagged and "user.note" in tagged
    log = image.build_log
    assert "oci layer 1: 3 device nodes dropped: dev/sda, dev/mem, dev/mem2 (hard link to dev/mem)" in log
    assert "oci layer 1: 2 setuid/setgid bits cleared: usr/bin/rootshell, usr/bin/groupshell" in log
    assert "oci layer 1: 1 security.capability xattrs dropped: usr/bin/ping" in log
    assert "security.*/trusted.* xattrs dropped: usr/bin/tagged (trusted.overlay.opaque)" in log
    decoy.assert_untouched()


async def test_operator_can_allow_devices_setuid_and_capabilities(tmp_path: Path, make_driver):
    layout = _layout(tmp_path, BASE + [
        E("dev", kind=tarfile.DIRTYPE, mode=0o755),
        E("dev/null", kind=tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        E("dev/loop9", kind=tarfile.BLKTYPE, mode=0o660, dev=(7, 9), gid=6),
        E("usr", kind=tarfile.DIRTYPE, mode=0o755),
        E("usr/bin", kind=tarfile.DIRTYPE, mode=0o755),
        E("usr/bin/su", b"su", mode=0o4755),
        E("usr/bin/wall", b"wall", mode=0o2755, gid=5),
        E("usr/bin/ping", b"ping", mode=0o755, pax={"SCHILY.xattr.security.capability": CAPS}),
    ])
    strict = make_driver()
    await strict.start()
    strict_image = await strict.build_rootfs(RootfsRecipe(name="strict", source="oci", path=layout))
    driver = make_driver(oci_allow_devices=True, oci_allow_setuid=True, oci_allow_capabilities=True)
    await driver.start()
    image = await driver.build_rootfs(RootfsRecipe(name="trusting", source="oci", path=layout))
    img = image.path
    assert image.content_hash != strict_image.content_hash  # the policy is part of the image's identity
    null, loop = ext4_stat(img, "/dev/null"), ext4_stat(img, "/dev/loop9")
    assert (null["type"], null["mode"] & 0o7777) == ("character special", 0o666)
    assert (loop["type"], loop["mode"] & 0o7777, loop["gid"]) == ("block special", 0o660, 6)
    assert "Device major/minor number: 07:09" in debugfs(img, "stat /dev/loop9")
    assert ext4_stat(img, "/usr/bin/su")["mode"] & 0o7777 == 0o4755
    assert ext4_stat(img, "/usr/bin/wall")["mode"] & 0o7777 == 0o2755
    assert "security.capability" in _xattrs(img, "/usr/bin/ping")
    assert "dropped" not in image.build_log and "cleared" not in image.build_log


@pytest.mark.parametrize("compress", ["gzip", "zstd"])
async def test_tar_bomb_is_refused_early(compress: str, tmp_path: Path, make_driver):
    """A small compressed layer that expands to 400 MiB: 64 MiB images cap file data at 128 MiB."""
    size = 400 << 20
    layout = _layout(tmp_path, BASE + [E("bomb", Zeros(size), size=size, mode=0o644)], compress=compress)
    blob = max((layout / "blobs/sha256").iterdir(), key=lambda p: p.stat().st_size)
    assert blob.stat().st_size < 2 << 20  # small on disk
    driver = make_driver()
    await driver.start()
    started = time.monotonic()
    err = await _refused(driver, layout)
    elapsed = time.monotonic() - started
    assert err.layer == 1
    if compress == "gzip":
        assert (err.member, "over the per-file cap" in err.reason or "expand past" in err.reason) == ("bomb", True)
        assert "128 MiB" in err.reason
    else:
        assert "decompresses past" in err.reason
    assert elapsed < 30, f"refusing took {elapsed:.1f}s"
    print(f"{compress} bomb refused in {elapsed:.2f}s")


async def test_many_files_bomb_hits_the_total_cap(tmp_path: Path, make_driver):
    files = [E(f"f{i:03}", Zeros(8 << 20), size=8 << 20) for i in range(20)]  # 160 MiB, 8 MiB each
    layout = _layout(tmp_path, BASE + files, compress=True)
    driver = make_driver(oci_max_file_mb=16)
    await driver.start()
    err = await _refused(driver, layout)
    assert err.member == "f015"  # 16 x 8 MiB + etc/os-release passes 128 MiB
    assert "expand past the cap of 128 MiB" in err.reason


async def test_per_file_and_entry_caps_are_options(tmp_path: Path, make_driver):
    layout = _layout(tmp_path, BASE + [E("big", Zeros(3 << 20), size=3 << 20)])
    driver = make_driver(oci_max_file_mb=2)
    await driver.start()
    err = await _refused(driver, layout)
    assert (err.member, "over the per-file cap of 2 MiB" in err.reason) == ("big", True)

    many = tmp_path / "many"
    many.mkdir()
    layout = _layout(many, [E(f"e{i}", b"") for i in range(50)])
    driver = make_driver(oci_max_entries=20)
    await driver.start()
    err = await _refused(driver, layout)
    assert err.member == "e20" and "more than 20 entries" in err.reason


def test_cli_template_build_from_oci_reports_the_refusal(tmp_path: Path, guest_src: Path, decoy: Decoy):
    """The real ``cube template build --from-oci``: exit 2, the layer and member in the message."""
    layout = _layout(tmp_path, BASE + _symlink_parent(decoy))
    state = tmp_path / "state"
    config = tmp_path / "plugins.toml"
    storage = (f'[storage]\nplugin = "cow"\noptions = {{ root = "{state}/storage", cache = "{tmp_path}/cache", '
               f'guest_src = "{guest_src}", image_size_mb = 64 }}')
    text = FAKE_CONFIG.format(state_dir=state)
    text = text.replace(f'[storage]\nplugin = "fake"\noptions = {{ root = "{state}/storage" }}', storage)
    assert 'plugin = "cow"' in text
    config.write_text(text)
    cube = str(Path(sys.executable).with_name("cube"))
    result = subprocess.run([cube, "template", "build", "evil", "--from-oci", str(layout), "--config", str(config)],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=120)
    assert result.returncode == 2, result.stdout + result.stderr
    message = " ".join(result.stderr.split())
    assert "OCI layer 1" in message and "member 'a/passwd'" in message
    assert "parent 'a' is a symlink" in message
    decoy.assert_untouched()
    assert list((state / "storage" / "build").iterdir()) == []


def _xattrs(image: Path, path: str) -> str:
    return subprocess.run(["debugfs", "-R", f"ea_list {path}", str(image)], capture_output=True,
                          text=True).stdout
