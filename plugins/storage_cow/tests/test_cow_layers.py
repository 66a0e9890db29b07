"""Per-sandbox CoW disks, frozen snapshot layers, deletion and GC, checked with real qemu-io I/O."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cow_helpers import sha256_file
from cube_core import DiskHandle, SnapshotNotFoundError, StorageError

from cube_storage_cow.layers import backing_file, reflink_supported

pytestmark = pytest.mark.root

MIB = 1 << 20


def qemu_io(path: Path, fmt: str, command: str, *, readonly: bool = False) -> str:
    argv = ["qemu-io", "-f", fmt, *(["-r"] if readonly else []), "-c", command, str(path)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "fail" not in out.lower(), out
    return out


def pattern_at(path: Path, fmt: str, pattern: int, offset: int, length: str = "4k") -> bool:
    proc = subprocess.run(["qemu-io", "-f", fmt, "-r", "-c", f"read -P {pattern:#x} {offset} {length}", str(path)],
                          capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    return proc.returncode == 0 and "Pattern verification failed" not in out and "read " in out


@pytest.fixture
def base(tmp_path: Path) -> Path:
    """An immutable 8 MiB raw base image filled with 0x11 (stands in for a template ext4)."""
    path = tmp_path / "base.ext4"
    path.write_bytes(b"\x11" * (8 * MIB))
    os.chmod(path, 0o444)
    return path


@pytest.fixture
async def driver(make_driver):
    d = make_driver(reflink="never")
    await d.start()
    return d


def listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


async def test_overlay_writes_never_reach_the_base(driver, base: Path):
    before = sha256_file(base)
    disk = await driver.create_disk("sbx-1", base)
    assert disk.path == driver.root / "disks" / "sbx-1.qcow2"
    assert (disk.format, disk.readonly, disk.disk_id) == ("qcow2", False, "sbx-1")
    assert disk.data["base"] == str(base) and disk.data["method"] == "qcow2-overlay"
    assert backing_file(disk.path) == base
    assert stat.S_IMODE(disk.path.stat().st_mode) == 0o600
    assert disk.path.stat().st_size < MIB  # an overlay, not a copy

    assert pattern_at(disk.path, "qcow2", 0x11, 0)  # reads fall through to the base
    qemu_io(disk.path, "qcow2", "write -P 0xab 0 4k")
    assert pattern_at(disk.path, "qcow2", 0xab, 0)
    assert pattern_at(disk.path, "qcow2", 0x11, 4096)
    assert sha256_file(base) == before

    other = await driver.create_disk("sbx-2", base)
    assert pattern_at(other.path, "qcow2", 0x11, 0), "sandboxes share nothing but the base"


async def test_freeze_then_layer_new_disks_on_the_frozen_one(driver, base: Path):
    disk = await driver.create_disk("sbx-1", base)
    qemu_io(disk.path, "qcow2", "write -P 0xab 0 4k")
    vm_files = driver.snapshot_dir("snap-1")
    (vm_files / "memory.ram").write_bytes(b"ram")
    started = time.monotonic()
    frozen = await driver.freeze_disk(disk, "snap-1")
    freeze_s = time.monotonic() - started
    assert frozen.path == driver.root / "snapshots" / "snap-1" / "disk.qcow2"
    assert frozen.readonly and frozen.format == "qcow2" and frozen.disk_id == "snap-1"
    assert stat.S_IMODE(frozen.path.stat().st_mode) == 0o440
    assert backing_file(frozen.path) == base
    assert freeze_s < 2.0
    frozen_sum = sha256_file(frozen.path)

    # the sandbox's own disk stays valid and writable; its later writes do not reach the layer
    qemu_io(disk.path, "qcow2", "write -P 0xcd 0 4k")
    assert sha256_file(frozen.path) == frozen_sum
    assert pattern_at(frozen.path, "qcow2", 0xab, 0)

    child = await driver.create_disk("sbx-child", frozen.path)
    assert backing_file(child.path) == frozen.path
    assert pattern_at(child.path, "qcow2", 0xab, 0)  # content of the snapshot
    assert pattern_at(child.path, "qcow2", 0x11, 8192)  # content of the template
    qemu_io(child.path, "qcow2", "write -P 0xee 0 4k")
    assert sha256_file(frozen.path) == frozen_sum
    assert driver.snapshot_layer("snap-1").path == frozen.path

    # snapshot of a snapshot: a 3-deep chain
    grand = await driver.freeze_disk(child, "snap-2")
    assert backing_file(grand.path) == frozen.path
    g = await driver.create_disk("sbx-grand", grand.path)
    assert pattern_at(g.path, "qcow2", 0xee, 0)

    with pytest.raises(StorageError, match="already has a disk layer"):
        await driver.freeze_disk(disk, "snap-1")
    with pytest.raises(StorageError, match="not a live disk"):
        await driver.freeze_disk(frozen, "snap-3")
    with pytest.raises(SnapshotNotFoundError):
        driver.snapshot_layer("nope")


async def test_delete_disk_and_snapshot_free_everything(driver, base: Path):
    disk = await driver.create_disk("sbx-1", base)
    (driver.snapshot_dir("snap-1") / "state.bin").write_bytes(b"x" * 100)
    frozen = await driver.freeze_disk(disk, "snap-1")
    await driver.delete_disk(disk)
    await driver.delete_disk(disk)  # idempotent
    assert not disk.path.exists()
    with pytest.raises(StorageError, match="refusing"):
        await driver.delete_disk(frozen)
    await driver.delete_snapshot("snap-1")
    await driver.delete_snapshot("snap-1")  # idempotent
    assert listing(driver.root / "disks") == [] and listing(driver.root / "snapshots") == []
    assert base.exists()


async def test_deleting_a_snapshot_that_backs_a_disk_keeps_its_layer_until_its_last_user_goes(driver, base: Path):
    disk = await driver.create_disk("sbx-1", base)
    snap_dir = driver.snapshot_dir("snap-1")
    (snap_dir / "memory.ram").write_bytes(b"r" * 4096)
    frozen = await driver.freeze_disk(disk, "snap-1")
    child = await driver.create_disk("sbx-2", frozen.path)

    await driver.delete_snapshot("snap-1")
    assert sorted(p.name for p in snap_dir.iterdir()) == [".deleted", "disk.qcow2"]
    assert pattern_at(child.path, "qcow2", 0x11, 0)  # the child still reads through the layer
    with pytest.raises(StorageError, match="use a new snapshot id"):
        driver.snapshot_dir("snap-1")

    assert await driver.gc(["sbx-2"], []) == 1  # sbx-1's disk; snap-1 still backs sbx-2
    assert frozen.path.exists()
    await driver.delete_disk(child)  # its last user: the kept layer goes with it, not at the next gc
    assert listing(driver.root / "snapshots") == [] and listing(driver.root / "disks") == []
    assert await driver.gc([], []) == 0


async def test_a_chain_of_deleted_snapshots_goes_with_the_last_disk_on_it(driver, base: Path):
    disk = await driver.create_disk("sbx-1", base)
    first = await driver.freeze_disk(disk, "snap-1")
    middle = await driver.create_disk("sbx-2", first.path)
    second = await driver.freeze_disk(middle, "snap-2")
    top = await driver.create_disk("sbx-3", second.path)
    kept = await driver.create_disk("sbx-4", first.path)
    await driver.delete_disk(disk)
    await driver.delete_disk(middle)
    await driver.delete_snapshot("snap-1")
    await driver.delete_snapshot("snap-2")
    assert {p.name for p in (driver.root / "snapshots").iterdir()} == {"snap-1", "snap-2"}

    await driver.delete_disk(top)  # snap-2 goes; snap-1 still backs sbx-4
    assert [p.name for p in (driver.root / "snapshots").iterdir()] == ["snap-1"]
    assert pattern_at(kept.path, "qcow2", 0x11, 0)
    await driver.delete_disk(kept)
    assert listing(driver.root / "snapshots") == [] and listing(driver.root / "disks") == []


async def test_a_snapshot_deleted_after_the_one_it_was_taken_from_frees_both(driver, base: Path):
    disk = await driver.create_disk("sbx-1", base)
    first = await driver.freeze_disk(disk, "snap-1")
    child = await driver.create_disk("sbx-2", first.path)
    await driver.freeze_disk(child, "snap-2")
    await driver.delete_disk(disk)
    await driver.delete_disk(child)
    await driver.delete_snapshot("snap-1")  # kept: snap-2's layer is backed by it
    assert (driver.root / "snapshots" / "snap-1" / ".deleted").exists()
    await driver.delete_snapshot("snap-2")
    assert listing(driver.root / "snapshots") == [] and listing(driver.root / "disks") == []


async def test_gc_after_a_crash_frees_everything_not_referred_to(make_driver, base: Path):
    first = make_driver(reflink="never")
    await first.start()
    live = await first.create_disk("sbx-live", base)
    dead = await first.create_disk("sbx-dead", base)
    qemu_io(dead.path, "qcow2", "write -P 0x42 0 4k")
    (first.snapshot_dir("snap-kept") / "memory.ram").write_bytes(b"k")
    kept_layer = await first.freeze_disk(dead, "snap-kept")
    (first.snapshot_dir("snap-backing") / "memory.ram").write_bytes(b"b")
    backing_layer = await first.freeze_disk(live, "snap-backing")
    from_snap = await first.create_disk("sbx-restored", backing_layer.path)
    (first.snapshot_dir("snap-orphan") / "memory.ram").write_bytes(b"o")
    # what a crash leaves: half-created disks and layers, a build scratch tree, a half-written image
    root = first.root
    (root / "disks" / ".sbx-dead.qcow2.tmp-0badf00d").write_bytes(b"partial")
    (root / "disks" / ".sbx-live.qcow2.tmp-0badf00d").write_bytes(b"partial")
    (root / "snapshots" / "snap-kept" / ".disk.qcow2.tmp-12345678").write_bytes(b"partial")
    for prefix in ("ab" * 16, "cd" * 16):
        (root / "build" / prefix / "tree" / "etc").mkdir(parents=True)
    (root / "images" / f".{'ab' * 16}.ext4.tmp").write_bytes(b"partial")

    # a new process after the crash: only the state store's ids are known
    after = make_driver(reflink="never")
    await after.start()
    freed = await after.gc(live_owners=["sbx-live", "sbx-restored", "sbx-gone"], live_snapshots=["snap-kept"])
    assert listing(root / "disks") == ["sbx-live.qcow2", "sbx-restored.qcow2"]
    # snap-backing is not live, but sbx-restored is layered on it: its disk layer stays, memory goes
    assert listing(root / "snapshots") == [
        "snap-backing", "snap-backing/.deleted", "snap-backing/disk.qcow2",
        "snap-kept", "snap-kept/disk.qcow2", "snap-kept/memory.ram"]
    assert listing(root / "build") == [] and [p.name for p in (root / "images").glob(".*.tmp")] == []
    # sbx-dead + 2 temps, snap-orphan, snap-backing trimmed, 2 build dirs, 1 image temp
    assert freed == 3 + 1 + 1 + 2 + 1
    assert pattern_at(from_snap.path, "qcow2", 0x11, 0) and kept_layer.path.exists()
    assert await after.gc(["sbx-live", "sbx-restored"], ["snap-kept"]) == 0  # stable

    assert await after.gc([], []) == 4
    assert listing(root / "disks") == [] and listing(root / "snapshots") == []
    assert base.exists()


async def test_invalid_ids_and_missing_base_are_refused(driver, base: Path, tmp_path: Path):
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(StorageError, match="invalid"):
            await driver.create_disk(bad, base)
        with pytest.raises(StorageError, match="invalid"):
            driver.snapshot_dir(bad)
    with pytest.raises(StorageError, match="does not exist"):
        await driver.create_disk("sbx-1", tmp_path / "missing.ext4")
    outside = DiskHandle(disk_id="x", path=tmp_path / "elsewhere.qcow2")
    with pytest.raises(StorageError, match="refusing"):
        await driver.delete_disk(outside)


async def test_recreating_an_owners_disk_replaces_it(driver, base: Path):
    disk = await driver.create_disk("sbx-1", base)
    qemu_io(disk.path, "qcow2", "write -P 0xab 0 4k")
    again = await driver.create_disk("sbx-1", base)
    assert again.path == disk.path and pattern_at(again.path, "qcow2", 0x11, 0)
    assert listing(driver.root / "disks") == ["sbx-1.qcow2"]


async def test_reflink_setting_follows_the_filesystem(make_driver, base: Path):
    supported = reflink_supported(base.parent)
    auto = make_driver(reflink="auto")
    await auto.start()
    disk = await auto.create_disk("sbx-1", base)
    if supported:
        assert (disk.format, disk.data["method"]) == ("raw", "reflink")
    else:
        assert (disk.format, disk.data["method"]) == ("qcow2", "qcow2-overlay")
    always = make_driver(reflink="always")
    if supported:
        await always.start()
    else:
        with pytest.raises(StorageError, match="no reflink support"):
            await always.start()


@pytest.mark.slow
async def test_reflink_disks_on_xfs(tmp_path: Path, make_driver, base: Path):
    """Reflink disks for real, on a loop-mounted XFS (needs mkfs.xfs: apt-get install xfsprogs)."""
    import shutil

    if shutil.which("mkfs.xfs") is None:
        pytest.skip("mkfs.xfs missing (apt-get install xfsprogs) - the reflink path needs an XFS to run on")
    fs = tmp_path / "xfs.img"
    with open(fs, "wb") as fh:
        fh.truncate(512 * MIB)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(fs)], check=True)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(fs), str(mnt)], check=True)
    try:
        d = make_driver(root=mnt / "storage", reflink="always")
        await d.start()
        xbase = mnt / "base.ext4"
        subprocess.run(["cp", str(base), str(xbase)], check=True)
        disk = await d.create_disk("sbx-1", xbase)
        assert (disk.format, disk.data["method"]) == ("raw", "reflink")
        qemu_io(disk.path, "raw", "write -P 0xab 0 4k")
        assert pattern_at(disk.path, "raw", 0xab, 0) and pattern_at(xbase, "raw", 0x11, 0)
        frozen = await d.freeze_disk(disk, "snap-1")
        assert frozen.path.name == "disk.raw" and pattern_at(frozen.path, "raw", 0xab, 0)
        child = await d.create_disk("sbx-2", frozen.path)
        assert child.format == "raw" and pattern_at(child.path, "raw", 0xab, 0)
        await d.delete_disk(disk)
        await d.delete_disk(child)
        await d.delete_snapshot("snap-1")
        assert listing(mnt / "storage" / "disks") == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
