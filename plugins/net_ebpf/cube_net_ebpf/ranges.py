"""Always-denied destinations, and the parts of them the operator opened.

A sandbox's own rules (``allow_out``, plugin egress rules) and the addresses Cube's resolver
learns for it never reach an *always-denied* destination: cloud metadata and the rest of
link-local, RFC 1918, CGNAT (which holds Cube's own slots), loopback, multicast, reserved space,
the host's own addresses, and their IPv6 equivalents. Only the operator's configuration
(``[network.options] openable_ranges``) can make a range *openable*: then a sandbox's allow rule
that names it opens it (it is still denied by default). Cube's slot subnet and the host's own
addresses are never openable.

Matching is longest-prefix, as in the filter's ``blocked`` trie: the most specific entry
containing an address decides whether it is always denied or openable.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

ALWAYS_DENIED: tuple[str, ...] = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
)
"""IPv4 ranges no sandbox rule opens (169.254.169.254, the cloud metadata address, is in the
link-local range). 198.18.0.0/15 is deliberately absent: tests use it as "the internet"."""

ALWAYS_DENIED6: tuple[str, ...] = (
    "::/127",           # unspecified and loopback
    "::ffff:0:0/96",    # IPv4-mapped: would reach the IPv4 ranges above
    "64:ff9b::/96",     # NAT64 well-known prefix (embeds IPv4)
    "64:ff9b:1::/48",   # local-use NAT64
    "100::/64",         # discard-only
    "2001::/32",        # Teredo (embeds IPv4)
    "2002::/16",        # 6to4 (embeds IPv4)
    "fc00::/7",         # unique local (the IPv6 RFC 1918)
    "fe80::/10",        # link-local (fd00:ec2::254, the IPv6 metadata address, is in fc00::/7)
    "ff00::/8",         # multicast
)
"""IPv6 equivalents of :data:`ALWAYS_DENIED`. 2001:db8::/32 (documentation) is absent for the
same reason as 198.18.0.0/15."""

KIND_ALWAYS = 1
KIND_OPENABLE = 2


def parse_networks(values: Iterable[str]) -> tuple[Network, ...]:
    return tuple(ipaddress.ip_network(v, strict=False) for v in values)


@dataclass(frozen=True)
class DeniedRanges:
    """The always-denied ranges (``always``) and the operator's openings (``openable``)."""

    always: tuple[Network, ...]
    openable: tuple[Network, ...] = ()

    def entries(self) -> list[tuple[Network, int]]:
        """(network, kind) for the filter's tries; an always-denied entry replaces an openable
        one of the same prefix."""
        table: dict[Network, int] = {n: KIND_OPENABLE for n in self.openable}
        table.update({n: KIND_ALWAYS for n in self.always})
        return sorted(table.items(), key=lambda item: (item[0].version, str(item[0])))

    def _most_specific(self, net: Network) -> tuple[Network, int] | None:
        best: tuple[Network, int] | None = None
        for entry, kind in self.entries():
            if entry.version == net.version and net.subnet_of(entry):  # type: ignore[arg-type]
                if best is None or entry.prefixlen > best[0].prefixlen:
                    best = (entry, kind)
        return best

    def always_denied(self, address: str | Address) -> bool:
        """Whether the filter denies ``address`` whatever the sandbox's rules say."""
        addr = ipaddress.ip_address(address)
        best = self._most_specific(ipaddress.ip_network(addr))
        return best is not None and best[1] == KIND_ALWAYS

    def refusal(self, target: Network) -> Network | None:
        """The always-denied range that swallows all of ``target`` (an allow rule naming it
        could open nothing), or None. A target that is wider than every always-denied range
        containing part of it (``0.0.0.0/0``) is accepted: the filter keeps those parts shut."""
        best = self._most_specific(target)
        if best is None or best[1] != KIND_ALWAYS:
            return None
        for opened in self.openable:
            if opened.version == target.version and opened.subnet_of(target):  # type: ignore[arg-type]
                if self._most_specific(opened) == (opened, KIND_OPENABLE):
                    return None
        return best[0]
