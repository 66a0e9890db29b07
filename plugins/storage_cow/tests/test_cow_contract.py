"""The core's storage contract suite, run against CowStorage (qcow2 overlays and reflink=auto)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cube_core.testing.contract import StorageContract, VolumeContract

pytestmark = pytest.mark.root


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    path = tmp_path / "base.ext4"
    with open(path, "wb") as fh:
        fh.truncate(16 << 20)
    path.chmod(0o444)
    return path


class TestCowStorageContract(StorageContract):
    @pytest.fixture(params=["never", "auto"])
    async def driver(self, request, make_driver):
        d = make_driver(reflink=request.param)
        await d.start()
        yield d
        await d.close()


class TestCowVolumesContract(VolumeContract):
    @pytest.fixture
    async def volumes(self, make_driver):
        d = make_driver(reflink="never")
        await d.start()
        yield d.volume_store()
        await d.close()


async def test_a_volume_image_is_a_sparse_slot_sized_device(make_driver) -> None:
    from cube_core import VOLUME_DEVICE_BYTES

    d = make_driver(reflink="never")
    await d.start()
    store = d.volume_store()
    await store.create("vol-size", 64)
    try:
        image = (await store.disk("vol-size")).path
        assert image.stat().st_size == VOLUME_DEVICE_BYTES
        assert image.stat().st_blocks * 512 < 16 << 20  # sparse: the filesystem's metadata only
        assert [e.path for e in await store.list("vol-size", "/")] == []  # no lost+found
    finally:
        await store.delete("vol-size")
        await d.close()


async def test_a_read_only_mount_gets_a_consistent_filesystem(make_driver) -> None:
    """A guest killed while it wrote leaves a filesystem marked not clean; a read-only mount
    (``noload``: no journal replay in the guest) gets it checked first, a read-write one as it is."""
    import subprocess

    from cube_storage_cow.volumes import _needs_check

    d = make_driver(reflink="never")
    await d.start()
    store = d.volume_store()
    await store.create("vol-dirty", 16)
    try:
        image = (await store.disk("vol-dirty")).path
        await store.write("vol-dirty", "/a.txt", b"kept")
        subprocess.run(["debugfs", "-w", "-R", "ssv state 0", str(image)], check=True, capture_output=True)
        assert _needs_check(image)
        assert not (await store.disk("vol-dirty")).readonly and _needs_check(image)  # the guest replays
        assert (await store.disk("vol-dirty", read_only=True)).readonly
        assert not _needs_check(image)
        # e2fsck's lost+found is not the user's content
        assert [e.path for e in await store.list("vol-dirty", "/")] == ["/a.txt"]
    finally:
        await store.delete("vol-dirty")
        await d.close()


async def test_e2fsprogs_run_unprivileged_with_only_the_image(make_driver, tmp_path: Path) -> None:
    """What a tool run on a volume image (a hostile filesystem) can do: its own uid, no groups, no
    capabilities; the image through the descriptor only, not by its path; no root-only file."""
    import os

    from cube_storage_cow.volumes import run_tool

    d = make_driver(reflink="never")
    await d.start()
    store = d.volume_store()
    await store.create("vol-priv", 16)
    try:
        await store.write("vol-priv", "/a.txt", b"content")
        image = (await store.disk("vol-priv")).path
        uid = store.tool_uid
        assert uid is not None and uid == d.config.volume_tool_uid and image.stat().st_uid == uid
        secret = tmp_path / "root-only"
        secret.write_text("secret")
        secret.chmod(0o600)
        probe = (f'id -u; id -G; grep CapEff /proc/self/status; head -c 4 "$0"; echo; '
                 f'head -c 4 {image} 2>&1; cat {secret} 2>&1; test -w "$0" && echo writable')
        out = run_tool(["sh", "-c", probe], image, uid=uid, write=True).stdout.decode().splitlines()
        assert out[0] == str(uid) and out[1] == str(uid), out
        assert out[2].split() == ["CapEff:", "0000000000000000"], out
        assert len(out[3]) == 4  # the image through /proc/self/fd/N
        assert "Permission denied" in out[4] and "Permission denied" in out[5], out
        assert out[6] == "writable"
        assert await store.read("vol-priv", "/a.txt") == b"content"
        parent = os.stat(image.parent)
        assert parent.st_uid == 0 and parent.st_mode & 0o777 == 0o700
    finally:
        await store.delete("vol-priv")
        await d.close()
