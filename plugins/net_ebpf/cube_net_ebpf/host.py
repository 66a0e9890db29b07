"""Host-wide set-up: /run/netns, IPv4 forwarding, the node's host table (``inet cube``); and the
inventory of this node's slots on the host (for crash recovery and sweeping: only ever the
namespaces and links named after this node, see :mod:`.nodenames`)."""

from __future__ import annotations

import ipaddress
import resource
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pyroute2 import IPRoute

from cube_net_ebpf import nat, netns
from cube_net_ebpf.addressing import index_of_host_if, index_of_slot, slot_of_netns
from cube_net_ebpf.nodenames import LOCAL, HostNames

log = structlog.get_logger(__name__)

FORWARDING_MARKER = Path("/run/cube/net-forwarding-enabled")
"""Exists while IPv4 forwarding is on because Cube turned it on (cleared by a reboot, as the
sysctl is). One per host, shared by every node on it on purpose: it describes the host's sysctl,
so a node started after another one turned forwarding on still knows only sandbox traffic may be
forwarded."""


def raise_open_files_limit() -> int:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; return the soft limit.

    A node holds about two descriptors per sandbox (QMP, guest control channel) besides the
    network's, so systemd's default soft limit of 1024 would refuse sandboxes near 500 (the
    one ``select()`` user found, libnftables, gets a socket below 1024: see :mod:`.nftables`).
    Children (QEMU) inherit the raised limit.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        log.info("raised the open files limit", soft_was=soft, soft=hard)
    return hard


def prepare(subnet: str, resolver: str | None, manage_forwarding: bool,
            names: HostNames = LOCAL, http_proxy: tuple[str, int] | None = None,
            http_ports: tuple[int, ...] = (80,), https_proxy_port: int | None = None,
            https_ports: tuple[int, ...] = (443,)) -> bool:
    """Set up the host once per start; return whether only sandbox traffic is forwarded."""
    netns.ensure_rundir()
    forward_only = False
    if manage_forwarding:
        if netns.read_sysctl("net/ipv4/ip_forward") == "0":
            FORWARDING_MARKER.parent.mkdir(parents=True, exist_ok=True)
            FORWARDING_MARKER.touch()
            netns.write_sysctl("net/ipv4/ip_forward", "1")
            log.info("enabled IPv4 forwarding for sandbox traffic only")
        forward_only = FORWARDING_MARKER.exists()
    nat.apply_host(nat.HostRules(subnet=subnet, resolver=resolver,
                                 forward_only_sandboxes=forward_only, names=names,
                                 http_proxy=http_proxy, http_ports=http_ports,
                                 https_proxy_port=https_proxy_port, https_ports=https_ports))
    return forward_only


@dataclass
class Inventory:
    """Slots found on the host: namespaces by slot id, host links by index."""

    namespaces: dict[str, str] = field(default_factory=dict)
    """slot id -> namespace name"""
    host_links: dict[int, str] = field(default_factory=dict)
    """index -> host-side link name"""

    def indexes(self) -> set[int]:
        found = set(self.host_links)
        for slot_id in self.namespaces:
            index = index_of_slot(slot_id)
            if index is not None:
                found.add(index)
        return found


def inventory(names: HostNames = LOCAL) -> Inventory:
    """This node's namespaces and host links (other nodes' never match ``names``)."""
    inv = Inventory()
    for name in netns.names():
        slot_id = slot_of_netns(name, names)
        if slot_id is not None:
            inv.namespaces[slot_id] = name
    with IPRoute() as ipr:
        for link in ipr.get_links():
            ifname = link.get("ifname") or link.get_attr("IFLA_IFNAME")
            index = index_of_host_if(str(ifname), names) if ifname else None
            if index is not None:
                inv.host_links[index] = str(ifname)
    return inv


def ensure_local_address(address: str) -> None:
    """Put ``address``/32 on the host's loopback (Cube's resolver listens there)."""
    with IPRoute() as ipr:
        lo = ipr.link_lookup(ifname="lo")[0]
        present = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=lo, family=2)}
        if address not in present:
            ipr.addr("add", index=lo, address=address, prefixlen=32)


def own_addresses(exclude_subnet: str) -> list[str]:
    """The host's IPv4 and IPv6 addresses outside Cube's subnet and loopback (always denied to
    sandboxes)."""
    subnet = ipaddress.IPv4Network(exclude_subnet)
    out = []
    with IPRoute() as ipr:
        for msg in ipr.get_addr(family=2):
            addr = ipaddress.IPv4Address(msg.get_attr("IFA_ADDRESS"))
            if addr not in subnet and not addr.is_loopback:
                out.append(f"{addr}/32")
        for msg in ipr.get_addr(family=10):
            addr6 = ipaddress.IPv6Address(msg.get_attr("IFA_ADDRESS").split("%")[0])
            if not addr6.is_loopback:
                out.append(f"{addr6}/128")
    return out
