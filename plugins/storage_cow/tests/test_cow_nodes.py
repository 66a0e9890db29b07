"""Several nodes on one host: each node's storage root is its own (its gc removes what it does
not know), the build cache is shared."""

from __future__ import annotations

from pathlib import Path

from cube_core import CoreSettings

from cube_storage_cow import CowConfig, CowPlugin


def test_local_keeps_its_root_whatever_the_state_dir() -> None:
    assert CowConfig().for_node("local", Path("/srv/cube")) == CowConfig()


def test_other_nodes_keep_storage_under_their_state_dir_and_share_the_cache() -> None:
    a = CowConfig().for_node("node-a", Path("/var/lib/cube-a"))
    b = CowConfig().for_node("node-b", Path("/var/lib/cube-b"))
    assert (a.root, b.root) == (Path("/var/lib/cube-a/storage"), Path("/var/lib/cube-b/storage"))
    assert a.cache == b.cache == CowConfig().cache
    explicit = CowConfig(root=Path("/srv/disks")).for_node("node-a", Path("/var/lib/cube-a"))
    assert explicit.root == Path("/srv/disks")


async def test_plugin_driver_uses_the_node_root_and_gc_stays_in_it(tmp_path: Path) -> None:
    drivers = {}
    for node in ("node-a", "node-b"):
        plugin = CowPlugin(CowConfig(reflink="never"))
        plugin.cube_configure(CoreSettings(node_id=node, state_dir=tmp_path / node))
        drivers[node] = plugin.cube_storage_driver()
        assert drivers[node].root == tmp_path / node / "storage"  # type: ignore[attr-defined]
        await drivers[node].start()
    base = tmp_path / "base.ext4"
    base.write_bytes(b"\0" * (1 << 20))
    disk = await drivers["node-a"].create_disk("sbx-1", base)
    assert await drivers["node-b"].gc((), ()) == 0  # node-b knows no sandbox: nothing of a's goes
    assert Path(disk.path).exists()
    assert await drivers["node-a"].gc((), ()) >= 1
    assert not Path(disk.path).exists()
