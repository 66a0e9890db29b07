"""Template images from a ``dir`` source: content, ownership, safety, content-addressed reuse."""

from __future__ import annotations

import asyncio
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from cow_helpers import copy_guest, ext4_cat, ext4_ls, ext4_stat, fsck_clean, make_source_tree, run_async, sha256_file
from cube_core import RootfsRecipe, TemplateBuildError

from cube_storage_cow import CowConfig, CowStorage
from cube_storage_cow.rootfs import tree_fingerprint

pytestmark = pytest.mark.root


class Built:
    def __init__(self, driver: CowStorage, recipe: RootfsRecipe, image, source: Path, escape: Path,
                 steps: list[tuple[str, float | None]], source_print: str) -> None:
        self.driver, self.recipe, self.image, self.source = driver, recipe, image, source
        self.escape, self.steps, self.source_print = escape, steps, source_print


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, guest_src: Path) -> Built:
    tmp = tmp_path_factory.mktemp("dirbuild")
    escape = tmp / "host-escape"
    escape.mkdir()
    (escape / "hosts-file").write_text("host file, must stay\n")
    source = make_source_tree(tmp / "src", escape)
    before = tree_fingerprint(source)
    driver = CowStorage(CowConfig(root=tmp / "root", cache=tmp / "cache", guest_src=guest_src,
                                  image_size_mb=64, agent_runtime=False))
    recipe = RootfsRecipe(name="mini", source="dir", path=source)
    steps: list[tuple[str, float | None]] = []

    async def go():
        await driver.start()
        return await driver.build_rootfs(recipe, lambda s, f: steps.append((s, f)))

    image = run_async(go())
    return Built(driver, recipe, image, source, escape, steps, before)


def test_image_is_content_addressed_clean_and_immutable(built: Built):
    img = built.image.path
    assert img.parent == built.driver.root / "images"
    assert img.name == built.image.content_hash[:32] + ".ext4"
    assert len(built.image.content_hash) == 64
    assert stat.S_IMODE(img.stat().st_mode) == 0o440
    assert img.stat().st_size == 64 << 20
    assert 0 < built.image.bytes_allocated < img.stat().st_size  # sparse
    fsck_clean(img)
    assert not list((built.driver.root / "build").iterdir()), "scratch tree left behind"
    assert built.steps[-1] == ("rootfs image ready", 1.0)
    fractions = [f for _, f in built.steps if f is not None]
    assert fractions == sorted(fractions)


def test_guest_agent_and_init_installed(built: Built, guest_src: Path):
    img = built.image.path
    assert "cube_guest" in ext4_ls(img, "/opt/cube/guest")
    names = ext4_ls(img, "/opt/cube/guest/cube_guest")
    expected = {p.name for p in (guest_src / "cube_guest").iterdir() if p.is_file()}
    assert expected <= names and "__init__.py" in names
    assert ext4_cat(img, "/opt/cube/guest/cube_guest/__init__.py") == \
        (guest_src / "cube_guest/__init__.py").read_bytes()
    init = ext4_stat(img, "/usr/sbin/cube-init")  # /sbin -> usr/sbin in the source tree
    assert init["mode"] & 0o7777 == 0o755 and init["uid"] == 0
    assert ext4_cat(img, "/usr/sbin/cube-init") == (guest_src / "init/cube-init").read_bytes()
    assert ext4_stat(img, "/usr/sbin/init")["type"] == "symlink"


def test_user_account_and_sudo(built: Built):
    img = built.image.path
    passwd = ext4_cat(img, "/etc/passwd").decode()
    assert passwd.startswith("root:x:0:0:root:/root:/bin/bash\n")
    assert "user:x:1000:1000::/home/user:/bin/bash\n" in passwd
    assert "user:x:1000:\n" in ext4_cat(img, "/etc/group").decode()
    assert ext4_cat(img, "/etc/shadow").decode().splitlines()[-1].startswith("user:*:")
    shadow = ext4_stat(img, "/etc/shadow")
    assert (shadow["mode"] & 0o7777, shadow["gid"]) == (0o640, 42)  # rewritten, mode/owner kept
    home = ext4_stat(img, "/home/user")
    assert (home["type"], home["uid"], home["gid"]) == ("directory", 1000, 1000)
    bashrc = ext4_stat(img, "/home/user/.bashrc")
    assert (bashrc["uid"], bashrc["gid"]) == (1000, 1000)
    assert ext4_cat(img, "/etc/sudoers.d/user") == b"user ALL=(ALL:ALL) NOPASSWD: ALL\n"
    assert ext4_stat(img, "/etc/sudoers.d/user")["mode"] & 0o7777 == 0o440


def test_etc_files(built: Built):
    img = built.image.path
    assert ext4_cat(img, "/etc/resolv.conf") == b"nameserver 169.254.0.22\n"
    assert ext4_cat(img, "/etc/hostname") == b"cube\n"
    assert ext4_cat(img, "/etc/machine-id") == b""
    assert b"127.0.0.1\tlocalhost" in ext4_cat(img, "/etc/hosts")
    assert ext4_stat(img, "/etc/hosts")["type"] == "regular"
    tmp = ext4_stat(img, "/tmp")
    assert tmp["mode"] & 0o7777 == 0o1777
    for d in ("/proc", "/sys", "/dev", "/run"):
        assert ext4_stat(img, d)["type"] == "directory"


def test_source_ownership_and_modes_preserved(built: Built):
    img = built.image.path
    data = ext4_stat(img, "/srv/data.txt")
    assert (data["uid"], data["gid"], data["mode"] & 0o7777) == (123, 456, 0o640)
    assert ext4_stat(img, "/usr/bin/tool")["mode"] & 0o7777 == 0o4755


def test_tree_is_slimmed(built: Built):
    img = built.image.path
    assert ext4_ls(img, "/usr/share/doc") == set()
    assert ext4_ls(img, "/var/cache/apt") == set()


def test_symlinks_out_of_the_tree_never_touch_the_host(built: Built):
    assert (built.escape / "hosts-file").read_text() == "host file, must stay\n"
    assert sorted(p.name for p in built.escape.iterdir()) == ["hosts-file"]
    # inside the image, /opt still points where the symlink says, re-rooted at /
    assert "cube_guest" in ext4_ls(built.image.path, "/opt/cube/guest")
    assert tree_fingerprint(built.source) == built.source_print, "the source tree was modified"


async def test_second_build_is_reused_instantly(built: Built):
    steps: list[tuple[str, float | None]] = []
    before = built.image.path.stat()
    started = time.monotonic()
    again = await built.driver.build_rootfs(built.recipe, lambda s, f: steps.append((s, f)))
    elapsed = time.monotonic() - started
    assert again.path == built.image.path and again.content_hash == built.image.content_hash
    after = built.image.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert elapsed < 1.0, elapsed
    await asyncio.sleep(0)  # progress is delivered through the loop
    assert steps == [("rootfs image up to date", 1.0)]
    assert "reused" in again.build_log
    # the name is not part of the content: another recipe with the same content shares the image
    same = await built.driver.build_rootfs(built.recipe.model_copy(update={"name": "other"}))
    assert same.path == built.image.path


async def test_changes_in_guest_files_or_source_give_a_new_image(tmp_path: Path, make_driver, built: Built):
    guest = copy_guest(tmp_path / "guest")
    source = tmp_path / "src"
    shutil.copytree(built.source, source, symlinks=True)
    driver = make_driver(guest_src=guest)
    await driver.start()
    recipe = RootfsRecipe(name="mini", source="dir", path=source)
    first = await driver.build_rootfs(recipe)

    (guest / "cube_guest" / "__init__.py").write_text("AGENT = 'changed'\n")
    second = await driver.build_rootfs(recipe)
    assert second.content_hash != first.content_hash and second.path != first.path
    assert ext4_cat(second.path, "/opt/cube/guest/cube_guest/__init__.py") == b"AGENT = 'changed'\n"
    assert first.path.exists(), "older images stay until pruned"

    (guest / "init" / "cube-init").write_text("#!/bin/sh\necho v2\n")
    third = await driver.build_rootfs(recipe)
    assert third.content_hash not in (first.content_hash, second.content_hash)

    (source / "srv" / "new.txt").write_text("new\n")
    fourth = await driver.build_rootfs(recipe)
    assert fourth.content_hash not in (first.content_hash, second.content_hash, third.content_hash)
    assert ext4_cat(fourth.path, "/srv/new.txt") == b"new\n"

    sized = await driver.build_rootfs(recipe.model_copy(update={"size_mb": 96}))
    assert sized.path.stat().st_size == 96 << 20 and sized.content_hash != fourth.content_hash

    assert await driver.prune_images([fourth.path]) == 4
    assert driver.images() == [fourth.path]
    assert not first.path.exists() and not first.path.with_suffix(".json").exists()


async def test_bad_recipes_fail_with_template_build_error(tmp_path: Path, make_driver, built: Built):
    driver = make_driver()
    await driver.start()
    with pytest.raises(TemplateBuildError, match="packages only apply"):
        await driver.build_rootfs(RootfsRecipe(name="x", source="dir", path=built.source, packages=("vim",)))
    with pytest.raises(TemplateBuildError, match="does not exist"):
        await driver.build_rootfs(RootfsRecipe(name="x", source="dir", path=tmp_path / "missing"))
    with pytest.raises(TemplateBuildError, match="needs a path"):
        await driver.build_rootfs(RootfsRecipe(name="x", source="oci"))
    guest = copy_guest(tmp_path / "guest")
    os.unlink(guest / "init" / "cube-init")
    with pytest.raises(TemplateBuildError, match="cube-init"):
        await make_driver(guest_src=guest).build_rootfs(RootfsRecipe(name="x", source="dir", path=built.source))


async def test_too_small_image_fails_cleanly(tmp_path: Path, make_driver, built: Built):
    source = tmp_path / "big"
    shutil.copytree(built.source, source, symlinks=True)
    with open(source / "srv" / "blob", "wb") as fh:
        fh.write(os.urandom(80 << 20))
    driver = make_driver()
    await driver.start()
    with pytest.raises(TemplateBuildError, match="mkfs.ext4 failed"):
        await driver.build_rootfs(RootfsRecipe(name="big", source="dir", path=source, size_mb=64))
    assert driver.images() == []
    assert [p.name for p in (driver.root / "images").iterdir() if not p.name.endswith(".lock")] == []
    assert list((driver.root / "build").iterdir()) == []


async def test_existing_user_is_kept_and_uid_clash_is_refused(tmp_path: Path, make_driver, built: Built):
    driver = make_driver()
    await driver.start()
    source = tmp_path / "withuser"
    shutil.copytree(built.source, source, symlinks=True)
    with open(source / "etc/passwd", "a") as fh:
        fh.write("user:x:1000:1000:Existing:/home/user:/bin/sh\n")
    image = await driver.build_rootfs(RootfsRecipe(name="u", source="dir", path=source))
    passwd = ext4_cat(image.path, "/etc/passwd").decode()
    assert passwd.count("user:x:1000") == 1 and "Existing" in passwd

    clash = tmp_path / "clash"
    shutil.copytree(built.source, clash, symlinks=True)
    with open(clash / "etc/passwd", "a") as fh:
        fh.write("node:x:1000:1000::/home/node:/bin/sh\n")
    with pytest.raises(TemplateBuildError, match="uid 1000 is already used by 'node'"):
        await driver.build_rootfs(RootfsRecipe(name="c", source="dir", path=clash))


def test_image_hash_covers_the_file_bytes_not_only_names(tmp_path: Path, built: Built):
    """The guest digest hashes contents: same names, different bytes -> different digest."""
    from cube_storage_cow.guest import GuestFiles

    a = copy_guest(tmp_path / "a")
    b = copy_guest(tmp_path / "b")
    assert GuestFiles.load(a).digest == GuestFiles.load(b).digest
    target = b / "cube_guest" / "__init__.py"
    target.write_bytes(target.read_bytes().replace(b"a", b"b", 1))
    assert GuestFiles.load(a).digest != GuestFiles.load(b).digest
    assert sha256_file(a / "init/cube-init") == sha256_file(b / "init/cube-init")
