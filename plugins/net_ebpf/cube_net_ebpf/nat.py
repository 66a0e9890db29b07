"""nftables rules: the per-slot table inside each sandbox namespace and Cube's host table.

Inside a slot's namespace (table ``ip cube``):
- TCP to the namespace-side veth address is DNATed to the guest (same port): that address is how
  the host reaches the guest (``NicHandle.guest_address``);
- the guest's outbound traffic is masqueraded to the namespace-side veth address;
- DNS to the gateway (169.254.0.22:53) goes to Cube's resolver, when there is one;
- nothing else may reach the namespace itself (the guest gets a RST or an ICMP error, so it fails
  at once), and only those paths are forwarded.

On the host (table ``inet cube``):
- sandboxes may not reach the host (except replies and Cube's resolver; the rest is rejected,
  so the guest fails fast), nor each other;
- what sandboxes send elsewhere is forwarded and masqueraded;
- when Cube had to turn IPv4 forwarding on, nothing but sandbox traffic is forwarded.
"""

from __future__ import annotations

from dataclasses import dataclass

from cube_net_ebpf import nftables
from cube_net_ebpf.addressing import GATEWAY_ADDR, GUEST_ADDR, HOST_VETH_PREFIX, NS_VETH, TAP_NAME

HOST_TABLE = "cube"


def slot_ruleset(ns_addr: str, resolver: str | None) -> str:
    """The nft script for one slot's new namespace (the ``ip cube`` table).

    No ``add table``/``delete table`` preamble: the namespace is new, and a table delete in the
    transaction costs about 15 ms (an RCU grace period).
    """
    dns = (f'    iifname "{TAP_NAME}" ip daddr {GATEWAY_ADDR} meta l4proto {{ tcp, udp }} '
           f"th dport 53 dnat to {resolver}\n") if resolver else ""
    return f"""table ip cube {{
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "{NS_VETH}" ip daddr {ns_addr} meta l4proto tcp dnat to {GUEST_ADDR}
{dns}  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    oifname "{NS_VETH}" masquerade
  }}
  chain forward {{
    type filter hook forward priority filter; policy drop;
    ct state established,related accept
    iifname "{NS_VETH}" oifname "{TAP_NAME}" ct status dnat accept
    iifname "{TAP_NAME}" oifname "{NS_VETH}" accept
  }}
  chain input {{
    type filter hook input priority filter; policy drop;
    ct state established,related accept
    iifname "lo" accept
    iifname "{TAP_NAME}" meta l4proto tcp reject with tcp reset
    iifname "{TAP_NAME}" reject with icmp type admin-prohibited
  }}
}}
"""


@dataclass(frozen=True, slots=True)
class HostRules:
    subnet: str
    resolver: str | None
    forward_only_sandboxes: bool


def host_ruleset(rules: HostRules) -> str:
    """The nft script for the host's ``inet cube`` table (replaces it atomically)."""
    vh = f'"{HOST_VETH_PREFIX}*"'
    resolver_in = ""
    resolver_guard = ""
    if rules.resolver:
        resolver_in = (f"    iifname {vh} ip daddr {rules.resolver} meta l4proto {{ tcp, udp }} "
                       "th dport 53 accept\n")
        resolver_guard = f"    ip daddr {rules.resolver} drop\n"
    isolate = "    drop\n" if rules.forward_only_sandboxes else ""
    return f"""add table inet {HOST_TABLE}
delete table inet {HOST_TABLE}
table inet {HOST_TABLE} {{
  chain input {{
    type filter hook input priority filter - 5; policy accept;
    iifname {vh} ct state established,related accept
{resolver_in}    iifname {vh} meta l4proto tcp reject with tcp reset
    iifname {vh} reject with icmpx admin-prohibited
{resolver_guard}  }}
  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
    iifname {vh} oifname {vh} drop
    iifname {vh} accept
    oifname {vh} ct state established,related accept
    oifname {vh} drop
{isolate}  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    ip saddr {rules.subnet} oifname != {vh} masquerade
  }}
}}
"""


def apply_slot(ns_addr: str, resolver: str | None) -> None:
    """Install the slot table; the calling thread must be inside the slot's namespace."""
    nftables.run(slot_ruleset(ns_addr, resolver))


def apply_host(rules: HostRules) -> None:
    nftables.run(host_ruleset(rules))


def remove_host() -> None:
    nftables.run(f"add table inet {HOST_TABLE}\ndelete table inet {HOST_TABLE}\n")
