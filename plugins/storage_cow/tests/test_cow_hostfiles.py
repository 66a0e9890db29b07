"""What the plugin leaves on the host is closed to other users (modes in cube_storage_cow.hostfiles)."""

from __future__ import annotations

import os
import stat
import tarfile
from pathlib import Path

import pytest
from cube_core import RootfsRecipe
from oci_layouts import TAR, E, layer, make_layout

from cube_storage_cow import oci

pytestmark = pytest.mark.root


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def _open_to_others(root: Path) -> list[str]:
    return [f"{p} {_mode(p):o}" for p in [root, *root.rglob("*")]
            if not p.is_symlink() and _mode(p) & stat.S_IRWXO]


async def test_images_disks_snapshots_and_build_trees_are_closed(tmp_path: Path, make_driver,
                                                                 monkeypatch: pytest.MonkeyPatch):
    seen: dict[str, int] = {}
    real_populate = oci.populate

    def spy(tree: Path, source: Path, **kwargs: object) -> None:
        seen["work"], seen["build"] = _mode(tree.parent), _mode(tree.parent.parent)
        real_populate(tree, source, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(oci, "populate", spy)
    os.umask(0o022)  # what a root shell usually has
    layout = make_layout(tmp_path / "img.tar", [(layer([E("etc", kind=tarfile.DIRTYPE, mode=0o755)]), TAR)])
    driver = make_driver(reflink="never")
    await driver.start()
    image = await driver.build_rootfs(RootfsRecipe(name="img", source="oci", path=layout))
    disk = await driver.create_disk("sbx-1", image.path)
    snap = driver.snapshot_dir("snap-1")
    (snap / "memory").write_bytes(b"guest RAM")  # what the VMM writes there (umask 022: 0644)
    frozen = await driver.freeze_disk(disk, "snap-1")

    assert seen == {"work": 0o700, "build": 0o700}  # untrusted trees are unpacked where nobody else can reach
    root = driver.root
    modes = {p: _mode(p) for p in (root, root / "images", root / "disks", root / "snapshots", snap, root / "build")}
    assert modes == {root: 0o750, root / "images": 0o750, root / "disks": 0o750, root / "snapshots": 0o750,
                     snap: 0o750, root / "build": 0o700}
    assert _mode(image.path) == 0o440 and _mode(image.path.with_suffix(".json")) == 0o440
    assert _mode(disk.path) == 0o600
    assert _mode(frozen.path) == 0o440
    # the VMM's own file (0644 under umask 022) is unreachable: its directories are closed
    assert _open_to_others(root) == [f"{snap / 'memory'} 644"]


async def test_start_closes_what_older_versions_left_open(tmp_path: Path, make_driver):
    root = tmp_path / "root"
    for sub in ("images", "disks", "snapshots/old-snap", "build"):
        (root / sub).mkdir(parents=True)
    files = {root / "images/abc.ext4": 0o444, root / "images/abc.json": 0o444,
             root / "snapshots/old-snap/disk.qcow2": 0o444, root / "disks/sbx.qcow2": 0o644}
    for path, mode in files.items():
        path.write_bytes(b"x")
        path.chmod(mode)
    for path in [root, *root.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
    # a jail that granted a VM group access must keep it: only "other" bits go
    (root / "disks/sbx.qcow2").chmod(0o664)

    await make_driver(reflink="never").start()
    assert _open_to_others(root) == []
    assert _mode(root / "images/abc.ext4") == 0o440
    assert _mode(root / "disks/sbx.qcow2") == 0o660
    assert _mode(root / "snapshots/old-snap") == 0o750
    assert _mode(root / "build") == 0o700
