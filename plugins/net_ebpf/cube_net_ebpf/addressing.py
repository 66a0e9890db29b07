"""Slot addressing: every sandbox gets an index, and the index decides its names and its /30.

Inside each sandbox namespace the addresses are the same for every sandbox (so snapshots need no
re-addressing): the guest is 169.254.0.21/30 behind the tap's 169.254.0.22. Towards the host each
slot has its own /30 out of a carrier-grade-NAT range (100.64.0.0/10 by default): the host side is
``.1`` on ``vh<index>``, the namespace side ``.2`` on ``vg0``. Index 0's /30 is reserved for Cube's
own addresses (the resolver lives on its ``.1``).
"""

from __future__ import annotations

import ipaddress
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass

from cube_net_ebpf.nodenames import LOCAL, HostNames

GUEST_ADDR = "169.254.0.21"
GATEWAY_ADDR = "169.254.0.22"
GUEST_PREFIXLEN = 30
GUEST_MAC = "52:54:00:00:00:21"
TAP_MAC = "02:5a:00:00:00:01"
TAP_NAME = "tap0"
NS_VETH = "vg0"
HOST_VETH_PREFIX = LOCAL.host_if_prefix
"""Host links of node ``local``; other nodes add their tag (see :mod:`.nodenames`)."""
NETNS_PREFIX = LOCAL.netns_prefix
LINK_PREFIXLEN = 30

_SLOT_RE = re.compile(r"^(?P<owner>[a-z0-9_.]+)-(?P<index>\d+)$")
_OWNER_BAD = re.compile(r"[^a-z0-9_.]+")
_OWNER_MAX = 40


@dataclass(frozen=True, slots=True)
class SlotAddress:
    """Names and addresses of one slot, all derived from its index."""

    index: int
    host_if: str
    host_addr: str
    ns_addr: str

    @property
    def network(self) -> str:
        return f"{self.host_addr}/{LINK_PREFIXLEN}"


class AddressPlan:
    """Maps slot indexes to /30 links inside ``subnet`` (host links named after ``names``)."""

    def __init__(self, subnet: str, names: HostNames = LOCAL) -> None:
        self.subnet = ipaddress.IPv4Network(subnet)
        if self.subnet.prefixlen > 28:
            raise ValueError(f"subnet {subnet} is too small for sandbox links")
        self.max_index = (self.subnet.num_addresses // 4) - 1
        self.names = names
        names.check_index_fits(self.max_index)

    @property
    def reserved(self) -> ipaddress.IPv4Network:
        """Index 0's /30, kept for Cube's own addresses."""
        return ipaddress.IPv4Network((int(self.subnet.network_address), LINK_PREFIXLEN))

    @property
    def resolver_addr(self) -> str:
        return str(self.reserved[1])

    def slot(self, index: int) -> SlotAddress:
        if not 1 <= index <= self.max_index:
            raise ValueError(f"slot index {index} out of range 1..{self.max_index}")
        base = int(self.subnet.network_address) + 4 * index
        return SlotAddress(index=index, host_if=host_if_name(index, self.names),
                           host_addr=str(ipaddress.IPv4Address(base + 1)),
                           ns_addr=str(ipaddress.IPv4Address(base + 2)))

    def index_of_addr(self, addr: str) -> int | None:
        """The slot index whose link holds ``addr`` (host or namespace side), if any."""
        try:
            ip = ipaddress.IPv4Address(addr)
        except ValueError:
            return None
        if ip not in self.subnet:
            return None
        index = (int(ip) - int(self.subnet.network_address)) // 4
        return index if 1 <= index <= self.max_index else None


def host_if_name(index: int, names: HostNames = LOCAL) -> str:
    return f"{names.host_if_prefix}{index}"


def index_of_host_if(ifname: str, names: HostNames = LOCAL) -> int | None:
    """The index of one of ``names``' host links (never another node's: a tag starts with a
    letter and has a fixed length)."""
    prefix = names.host_if_prefix
    rest = ifname[len(prefix):] if ifname.startswith(prefix) else ""
    return int(rest) if rest.isdigit() and rest.isascii() else None


def slot_id_for(owner_id: str, index: int) -> str:
    """A slot id unique per index and readable per owner: ``<owner>-<index>``. The owner part
    never starts with a dot: ids starting with one are the driver's own (``.pool-<index>``)."""
    owner = _OWNER_BAD.sub("_", owner_id.lower()).strip("_.")[:_OWNER_MAX] or "slot"
    return f"{owner}-{index}"


def index_of_slot(slot_id: str) -> int | None:
    match = _SLOT_RE.match(slot_id)
    return int(match.group("index")) if match else None


def netns_name(slot_id: str, names: HostNames = LOCAL) -> str:
    return f"{names.netns_prefix}{slot_id}"


def slot_of_netns(name: str, names: HostNames = LOCAL) -> str | None:
    """The slot id of one of ``names``' namespaces. Another node's never parses: its prefix
    leaves a ``-`` in what would be the owner part, which slot ids never hold."""
    prefix = names.netns_prefix
    if not name.startswith(prefix):
        return None
    slot_id = name[len(prefix):]
    return slot_id if index_of_slot(slot_id) is not None else None


class SlotIndexes:
    """Which slot indexes are taken. Crash-safe because it is rebuilt from the links and
    namespaces that exist (``mark_used``) before anything is handed out. Next-fit, so a freed
    index is reused as late as possible (its old link may still be going away)."""

    def __init__(self, max_index: int) -> None:
        self.max_index = max_index
        self._used: set[int] = set()
        self._cursor = 0
        self._lock = threading.Lock()

    def mark_used(self, index: int) -> None:
        with self._lock:
            self._used.add(index)

    def claim(self, index: int) -> bool:
        """Reserve ``index`` itself; False if it is taken."""
        with self._lock:
            if index in self._used:
                return False
            self._used.add(index)
            return True

    def take(self, is_free: Callable[[int], bool] = lambda _i: True) -> int:
        """Reserve the next index that is neither taken nor refused by ``is_free``."""
        with self._lock:
            for _ in range(self.max_index):
                self._cursor = self._cursor % self.max_index + 1
                index = self._cursor
                if index not in self._used and is_free(index):
                    self._used.add(index)
                    return index
        raise LookupError("no free network slot index")

    def free(self, index: int) -> None:
        with self._lock:
            self._used.discard(index)

    def used(self) -> frozenset[int]:
        with self._lock:
            return frozenset(self._used)
