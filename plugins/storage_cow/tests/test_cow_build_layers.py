"""Freeing a template build's layers on real CoW storage (qcow2 layers, real qemu-io I/O): the
node's build engine (:class:`cube_core.builds.BuildEngine`) deletes the layers only the freed build
used; a layer another build's chain uses stays, and one that still backs a disk stays (trimmed)
until nothing is layered on it."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cube_core.builds import BuildEngine
from test_cow_layers import pattern_at, qemu_io

pytestmark = pytest.mark.root

MIB = 1 << 20


@pytest.fixture
def base(tmp_path: Path) -> Path:
    path = tmp_path / "base.ext4"
    path.write_bytes(b"\x11" * (8 * MIB))
    os.chmod(path, 0o444)
    return path


@pytest.fixture
async def driver(make_driver: Any) -> Any:
    d = make_driver(reflink="never")
    await d.start()
    return d


async def step(driver: Any, engine: BuildEngine, disk: Any, key: str, depth: int, build_id: str,
               pattern: int) -> Path:
    """A build step: the guest writes ``pattern`` at ``depth`` MiB, the disk is frozen as a layer."""
    qemu_io(disk.path, "qcow2", f"write -P {pattern:#x} {depth * MIB} 64k")
    frozen = await driver.freeze_disk(disk, f"blayer-{key}-{build_id}")
    engine.index.put(key, frozen.path, "tpl", depth, build_id)
    return frozen.path


async def test_a_freed_build_takes_only_its_own_layers(driver: Any, base: Path) -> None:
    engine = BuildEngine(SimpleNamespace(storage=driver))  # type: ignore[arg-type]
    # v1: steps a, b on the template image, then its snapshot's disk
    disk = await driver.create_disk("bld-v1", base)
    a = await step(driver, engine, disk, "ka", 0, "v1", 0xAA)
    b = await step(driver, engine, disk, "kb", 1, "v1", 0xBB)
    await driver.freeze_disk(disk, "tmpl-v1")
    await driver.delete_disk(disk)
    # v2: a is cached (its disk is layered on v1's layer a), then step c
    start = engine.index.use("ka", "v2")
    assert start == a
    disk = await driver.create_disk("bld-v2", start)
    c = await step(driver, engine, disk, "kc", 1, "v2", 0xCC)
    v2 = await driver.freeze_disk(disk, "tmpl-v2")
    await driver.delete_disk(disk)
    # another template built over v1's last layer (from_template): a disk layered on b
    child = await driver.create_disk("bld-child", b)

    # v1 freed: its snapshot (the control plane's delete), then its layers
    await driver.delete_snapshot("tmpl-v1")
    assert await engine.free_build("v1") == ["blayer-kb-v1"]
    assert not (driver.root / "snapshots" / "tmpl-v1").exists()
    assert a.is_file(), "v2's chain uses a"
    assert b.is_file() and (b.parent / ".deleted").exists(), "b still backs a disk: kept, trimmed"
    sandbox = await driver.create_disk("sbx-1", v2.path)  # v2 still serves: a and c under it
    assert pattern_at(sandbox.path, "qcow2", 0xAA, 0) and pattern_at(sandbox.path, "qcow2", 0xCC, MIB)
    assert pattern_at(child.path, "qcow2", 0xBB, MIB)
    assert await engine.free_build("v1") == []  # idempotent

    await driver.delete_disk(child)
    await driver.delete_disk(sandbox)
    await driver.gc([], ["tmpl-v2", c.parent.name])  # at the node's next start: b backs nothing any more
    assert not b.parent.exists() and a.is_file() and c.is_file()

    await driver.delete_snapshot("tmpl-v2")
    assert sorted(await engine.free_build("v2")) == ["blayer-ka-v1", "blayer-kc-v2"]
    assert not a.parent.exists() and not c.parent.exists()
    assert sorted(p.name for p in (driver.root / "snapshots").iterdir()) == []
    assert (driver.root / "build-layers.json").read_text() == "{}"
