"""nftables rules: the per-slot table inside each sandbox namespace and Cube's host table.

Inside a slot's namespace (table ``ip cube``):
- TCP to the namespace-side veth address is DNATed to the guest (same port): that address is how
  the host reaches the guest (``NicHandle.guest_address``);
- the guest's outbound traffic is masqueraded to the namespace-side veth address;
- DNS to the gateway (169.254.0.22:53) goes to Cube's resolver, when there is one;
- nothing else may reach the namespace itself (the guest gets a RST or an ICMP error, so it fails
  at once), and only those paths are forwarded.

On the host (table ``inet cube``; ``inet cube_<tag>`` for a node other than ``local``, see
:mod:`.nodenames`):
- sandboxes may not reach the host (except replies and Cube's resolver; the rest is rejected,
  so the guest fails fast), nor each other (nor the sandboxes of other nodes on the host);
- what sandboxes send elsewhere is forwarded and masqueraded;
- when Cube had to turn IPv4 forwarding on, nothing but sandbox traffic (of any node on the
  host) is forwarded;
- TCP to ``http_ports`` from the sandboxes in the set ``http_rule_slots`` (those with
  ``network.rules``) is DNATed to the node's egress HTTP proxy (:mod:`.httpproxy`), TCP to
  ``https_ports`` to its HTTPS listener; it reads the original destination back with
  ``SO_ORIGINAL_DST``; the eBPF filter on the host link has
  judged that destination before this DNAT (tc ingress runs before netfilter).
"""

from __future__ import annotations

from dataclasses import dataclass

from cube_net_ebpf import nftables
from cube_net_ebpf.addressing import GATEWAY_ADDR, GUEST_ADDR, NS_VETH, TAP_NAME
from cube_net_ebpf.nodenames import FAMILY_PREFIX, LOCAL, HostNames

HOST_TABLE = LOCAL.nft_table
"""The host table of node ``local``; other nodes': ``HostNames.nft_table``."""


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
    names: HostNames = LOCAL
    http_proxy: tuple[str, int] | None = None
    """The egress HTTP proxy's address and port (``None``: no proxy, no redirect)."""
    http_ports: tuple[int, ...] = (80,)
    https_proxy_port: int | None = None
    """The proxy's HTTPS listener (same address); ``None``: HTTPS is not redirected."""
    https_ports: tuple[int, ...] = (443,)


HTTP_SET = "http_rule_slots"


def host_ruleset(rules: HostRules) -> str:
    """The nft script for the node's host table (replaces it atomically).

    Rules about this node's own links match ``<host_if_prefix>*``; the sandbox-to-sandbox drop
    and the forwarding guard match every node's links (``vh*``). Node ``local``'s own links are
    ``vh<digits>`` (a tag starts with a letter), so they match ``vh0*`` .. ``vh9*``: its table
    never rejects what another node's sandboxes send their own resolver or egress proxy."""
    table = rules.names.nft_table
    vh = (f'"{rules.names.host_if_prefix}*"' if rules.names.tag
          else "{ " + ", ".join(f'"{FAMILY_PREFIX}{d}*"' for d in range(10)) + " }")
    family = f'"{FAMILY_PREFIX}*"'
    resolver_in = ""
    resolver_guard = ""
    if rules.resolver:
        resolver_in = (f"    iifname {vh} ip daddr {rules.resolver} meta l4proto {{ tcp, udp }} "
                       "th dport 53 accept\n")
        resolver_guard = f"    ip daddr {rules.resolver} drop\n"
    proxy_in = proxy_nat = ""
    if rules.http_proxy:
        addr, port = rules.http_proxy
        ports = ", ".join(str(p) for p in rules.http_ports)
        proxy_in = (f"    iifname {vh} ip daddr {addr} tcp dport {port} ct status dnat accept\n")
        tls_nat = ""
        if rules.https_proxy_port and rules.https_ports:
            tls_port = rules.https_proxy_port
            tls_ports = ", ".join(str(p) for p in rules.https_ports)
            proxy_in += f"    iifname {vh} ip daddr {addr} tcp dport {tls_port} ct status dnat accept\n"
            tls_nat = (f"    iifname {vh} ip saddr @{HTTP_SET} tcp dport {{ {tls_ports} }} "
                       f"dnat ip to {addr}:{tls_port}\n")
        proxy_nat = f"""  set {HTTP_SET} {{
    type ipv4_addr;
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname {vh} ip saddr @{HTTP_SET} tcp dport {{ {ports} }} dnat ip to {addr}:{port}
{tls_nat}  }}
"""
    isolate = ""
    if rules.forward_only_sandboxes:
        if family != vh:  # other nodes' sandbox traffic is theirs to judge, not this guard's
            isolate = (f"    iifname {family} accept\n"
                       f"    oifname {family} ct state established,related accept\n")
        isolate += "    drop\n"
    return f"""add table inet {table}
delete table inet {table}
table inet {table} {{
{proxy_nat}  chain input {{
    type filter hook input priority filter - 5; policy accept;
    iifname {vh} ct state established,related accept
{resolver_in}{proxy_in}    iifname {vh} meta l4proto tcp reject with tcp reset
    iifname {vh} reject with icmpx admin-prohibited
{resolver_guard}  }}
  chain forward {{
    type filter hook forward priority filter - 5; policy accept;
    iifname {family} oifname {family} drop
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


def set_http_slot(names: HostNames, ns_addr: str, present: bool) -> None:
    """Add or remove a slot's namespace address in the proxy's set (host namespace)."""
    verb = "add" if present else "delete"
    nftables.run(f"{verb} element inet {names.nft_table} {HTTP_SET} {{ {ns_addr} }}\n")


def remove_host(names: HostNames = LOCAL) -> None:
    table = names.nft_table
    nftables.run(f"add table inet {table}\ndelete table inet {table}\n")
