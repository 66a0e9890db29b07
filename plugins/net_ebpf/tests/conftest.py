from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import nettools  # noqa: E402

from cube_net_ebpf import EbpfNetConfig, EbpfNetwork  # noqa: E402

GUEST_NS_PREFIX = "ctg-"
HERE = str(Path(__file__).parent)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root (network namespaces, netlink, nftables, eBPF)")
        for item in items:
            if "root" in item.keywords and str(item.fspath).startswith(HERE):
                item.add_marker(skip)


class GuestNamespaces:
    """One "guest" namespace per slot index (test-only stand-in for the VM behind tap0)."""

    def __init__(self) -> None:
        self.created: dict[int, str] = {}

    def __call__(self, index: int) -> str:
        name = f"{GUEST_NS_PREFIX}{index}"
        nettools.del_netns(name)
        nettools.add_netns(name)
        self.created[index] = name
        return name

    def of(self, nic) -> str:
        return self.created[nic.data["index"]]

    def cleanup(self) -> None:
        for name in self.created.values():
            nettools.del_netns(name)
        self.created.clear()


@pytest.fixture(scope="session")
def guests() -> Iterator[GuestNamespaces]:
    g = GuestNamespaces()
    yield g
    g.cleanup()


@pytest.fixture(scope="session")
def internet() -> Iterator[str]:
    with nettools.internet() as name:
        yield name


def make_config(**overrides) -> EbpfNetConfig:
    base = {"pool_size": 1, "dns_upstreams": ("198.18.0.53",), "dns_min_ttl": 1,
            "dns_grace_s": 0.5, "openable_ranges": ("10.255.255.10/32",)}
    return EbpfNetConfig(**{**base, **overrides})


@pytest.fixture(scope="session")
def net_driver(guests: GuestNamespaces, internet: str) -> Iterator[EbpfNetwork]:
    """One driver for the session (a pool of 1, the test internet's DNS server upstream);
    slots it builds have a veth-backed "guest" namespace instead of a tap."""
    driver = EbpfNetwork(make_config(), test_guest_netns=guests)
    asyncio.run(driver.start())
    yield driver
    asyncio.run(driver.sweep(()))
    asyncio.run(driver.close())
