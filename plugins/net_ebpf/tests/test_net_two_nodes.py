"""Two nodes on one host: two network drivers (node ids, subnets) beside the session's ``local``
driver. Each one's start-up cleanup and sweep removes only its own namespaces and links, its
table is its own, and the sandboxes of both still reach the test internet afterwards."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator

import nettools
import pytest
from cube_core import NetworkPolicy

from cube_net_ebpf import EbpfNetConfig, EbpfNetwork, nat
from cube_net_ebpf.addressing import netns_name

pytestmark = [pytest.mark.root, pytest.mark.ebpf]

NODES = {"test-node-a": "198.51.100.0/24", "test-node-b": "203.0.113.0/24"}
WEB = "198.18.0.10"


class _NodeGuests:
    """Test "guest" namespaces of one node (its slot indexes overlap the other node's)."""

    def __init__(self, letter: str) -> None:
        self.prefix = f"ctn{letter}-"
        self.created: dict[int, str] = {}

    def __call__(self, index: int) -> str:
        name = f"{self.prefix}{index}"
        nettools.del_netns(name)
        nettools.add_netns(name)
        self.created[index] = name
        return name

    def cleanup(self) -> None:
        for name in self.created.values():
            nettools.del_netns(name)


def _config(node_id: str) -> EbpfNetConfig:
    return EbpfNetConfig(subnet=NODES[node_id], pool_size=1, dns_upstreams=("198.18.0.53",)
                         ).for_node(node_id)


def _tables() -> str:
    return nettools.sh("nft", "list", "tables").stdout


@pytest.fixture
async def nodes(internet: str) -> AsyncIterator[dict[str, tuple[EbpfNetwork, _NodeGuests]]]:
    made: dict[str, tuple[EbpfNetwork, _NodeGuests]] = {}
    for node_id in NODES:
        guests = _NodeGuests(node_id[-1])
        made[node_id] = (EbpfNetwork(_config(node_id), test_guest_netns=guests), guests)
    try:
        for driver, _ in made.values():
            await driver.start()
        yield made
    finally:
        for driver, guests in made.values():
            await driver.sweep(())
            await driver.close()
            guests.cleanup()
            nat.remove_host(driver.names)
            shutil.rmtree(driver.config.state_dir, ignore_errors=True)
            shutil.rmtree(driver.config.bpf_pin_dir, ignore_errors=True)


async def _restart(driver: EbpfNetwork, guests: _NodeGuests, live: set[str]) -> EbpfNetwork:
    """What a restarted node agent does: a new driver, its start-up cleanup, then its sweep."""
    await driver.close()
    fresh = EbpfNetwork(driver.config, test_guest_netns=guests)
    await fresh.start()
    await fresh.sweep(live)
    return fresh


async def test_two_nodes_clean_up_only_their_own(nodes, net_driver):
    (a, guests_a), (b, guests_b) = nodes["test-node-a"], nodes["test-node-b"]
    assert a.names.tag and b.names.tag and a.names != b.names
    assert a.config.state_dir != b.config.state_dir and a.config.bpf_pin_dir != b.config.bpf_pin_dir
    assert a.resolver != b.resolver
    nic_a = await a.allocate("sbx", NetworkPolicy())
    nic_b = await b.allocate("sbx", NetworkPolicy())
    nic_l = await net_driver.allocate("sbxl", NetworkPolicy())
    assert nic_a.netns != nic_b.netns and nic_a.data["host_if"] != nic_b.data["host_if"]
    assert nic_a.netns.startswith(f"cube-{a.names.tag}-") and nic_b.netns.startswith(f"cube-{b.names.tag}-")
    assert nic_a.data["host_if"].startswith(f"vh{a.names.tag}") and len(nic_a.data["host_if"]) <= 15
    # leftovers of crashed runs, one per node, named as each node names them
    crashed = {n: netns_name(f"crashed-{i}", d.names) for (n, (d, _)), i in zip(nodes.items(), (61, 62), strict=True)}
    crashed["local"] = netns_name("crashed-63")
    for name in crashed.values():
        nettools.add_netns(name)
    try:
        def alive(*nics) -> bool:  # type: ignore[no-untyped-def]
            names, links = nettools.netns_list(), nettools.links()
            return all(n.netns in names and n.data["host_if"] in links for n in nics)

        tables = _tables()
        assert f"inet {a.names.nft_table}" in tables and f"inet {b.names.nft_table}" in tables
        assert "inet cube\n" in tables

        a = await _restart(a, guests_a, {nic_a.slot_id})
        nodes["test-node-a"] = (a, guests_a)
        names = nettools.netns_list()
        assert crashed["test-node-a"] not in names
        assert crashed["test-node-b"] in names and crashed["local"] in names
        assert alive(nic_a, nic_b, nic_l)
        assert f"inet {b.names.nft_table}" in _tables()

        b = await _restart(b, guests_b, {nic_b.slot_id})
        nodes["test-node-b"] = (b, guests_b)
        names = nettools.netns_list()
        assert crashed["test-node-b"] not in names and crashed["local"] in names
        assert alive(nic_a, nic_b, nic_l)
        assert f"inet {a.names.nft_table}" in _tables()

        await net_driver.sweep(set(net_driver._slots))  # node local sweeps too
        assert crashed["local"] not in nettools.netns_list()
        assert alive(nic_a, nic_b, nic_l)
        tables = _tables()
        assert f"inet {a.names.nft_table}" in tables and f"inet {b.names.nft_table}" in tables

        # both nodes' sandboxes still reach the internet through their own tables
        for driver, guests, nic in ((a, guests_a, nic_a), (b, guests_b, nic_b)):
            ns = guests.created[nic.data["index"]]
            nettools.configure_guest(ns)
            [r] = nettools.guest(ns, f"tcp={WEB}:80")
            assert r["ok"] and r["body"] == f"hello from {WEB}:80", (driver.names, r)

        # releasing on one node leaves the other's slot in place
        await a.release(nic_a)
        assert nettools.wait_until(lambda: nic_a.data["host_if"] not in nettools.links())
        assert alive(nic_b, nic_l)
    finally:
        for name in crashed.values():
            nettools.del_netns(name)
        await net_driver.release(nic_l)
