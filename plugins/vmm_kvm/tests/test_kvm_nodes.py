"""Several nodes on one host: per-node defaults of the VM directories and cgroup parent, and the
uid leases that two nodes share on purpose."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from cube_core import CoreSettings

from cube_vmm_kvm import jail
from cube_vmm_kvm.config import KvmConfig
from cube_vmm_kvm.nodenames import node_path_name
from cube_vmm_kvm.plugin import KvmPlugin


def test_local_keeps_the_historical_defaults() -> None:
    assert KvmConfig().for_node("local") == KvmConfig()
    cfg = KvmConfig().for_node("local")
    assert (cfg.run_dir, cfg.mem_dir, cfg.cgroup_parent) == (Path("/run/cube/vms"), Path("/dev/shm/cube"), "cube")


def test_other_nodes_get_their_own_dirs_and_cgroup_but_share_leases_and_jail_root() -> None:
    a, b = KvmConfig().for_node("node-a"), KvmConfig().for_node("node-b")
    assert (a.run_dir, a.mem_dir, a.cgroup_parent) == (Path("/run/cube/node-a/vms"),
                                                       Path("/dev/shm/cube/node-a"), "cube-node-a")
    assert a.run_dir != b.run_dir and a.mem_dir != b.mem_dir and a.cgroup_parent != b.cgroup_parent
    assert a.uid_lease_dir == b.uid_lease_dir == KvmConfig().uid_lease_dir
    assert a.jail_root == b.jail_root
    explicit = KvmConfig(run_dir=Path("/srv/vms"), cgroup_parent="lab").for_node("node-a")
    assert (explicit.run_dir, explicit.cgroup_parent) == (Path("/srv/vms"), "lab")
    assert explicit.mem_dir == Path("/dev/shm/cube/node-a")
    odd = KvmConfig().for_node("rack 1/host")
    assert "/" not in odd.cgroup_parent and odd.run_dir.parent.parent == Path("/run/cube")
    assert node_path_name("rack 1/host") != node_path_name("rack_1_host")


def test_plugin_builds_its_driver_for_the_core_node_id() -> None:
    plugin = KvmPlugin(KvmConfig())
    plugin.cube_configure(CoreSettings(node_id="node-b"))
    assert plugin.cube_vmm_driver() is plugin.driver
    assert plugin.driver.config.run_dir == Path("/run/cube/node-b/vms")
    local = KvmPlugin(KvmConfig())
    before = local.driver
    local.cube_configure(CoreSettings())
    assert local.driver is before and local.config == KvmConfig()


def _lease_many(lease_dir: str, workdir: str, node: str, count: int, out: multiprocessing.Queue) -> None:
    leases = jail.UidLeases(Path(lease_dir), 7000, 7000 + 63)
    out.put([leases.allocate(f"{node}-{i}", Path(workdir)) for i in range(count)])


def test_two_nodes_sharing_the_lease_dir_never_lease_one_uid_twice(tmp_path: Path) -> None:
    lease_dir = tmp_path / "uids"
    stale = jail.UidLeases(lease_dir, 7000, 7000 + 63)
    gone = tmp_path / "gone"
    gone.mkdir()
    for i in range(32):  # a node that died: its leases are all stale
        stale.allocate(f"dead-{i}", gone)
    gone.rmdir()
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    procs = []
    for node in ("node-a", "node-b", "node-c", "node-d"):
        work = tmp_path / node
        work.mkdir()
        procs.append(ctx.Process(target=_lease_many, args=(str(lease_dir), str(work), node, 16, out)))
    for p in procs:
        p.start()
    got = [uid for _ in procs for uid in out.get(timeout=30)]
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    assert len(got) == 64 and len(set(got)) == 64, sorted(got)
    holders = {stale.owner(uid) for uid in got}
    assert len(holders) == 64 and not any(h.startswith("dead-") for h in holders if h)
