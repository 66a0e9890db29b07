"""Compile a sandbox's egress policy (E2B ``allow_internet_access`` / ``allow_out`` /
``deny_out`` plus plugin-contributed :class:`cube_core.EgressRule` objects) into filter entries.

Semantics, as in E2B: internet access is on by default; ``allow_internet_access=False`` means
deny everything not explicitly allowed; an allow always wins over a deny; domains in
``allow_out`` are allowed through Cube's resolver (their resolved addresses are allowed for the
answer's TTL), domains denied get NXDOMAIN. On top of that, always-denied ranges (private,
link-local, loopback, CGNAT incl. other sandboxes, multicast) are denied unless an allow rule
names them, IPv6 is denied unless an IPv6 range is allowed, and DNS may only go to Cube's
resolver.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cube_core import EgressRule, NetworkError, NetworkPolicy

Proto = Literal["tcp", "udp", "any"]
PROTO_NUMBERS: dict[str, int] = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17}
PROTO_NAMES: dict[int, str] = {v: k for k, v in PROTO_NUMBERS.items()}

ALWAYS_DENIED: tuple[str, ...] = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
)
"""Denied unless an allow rule names them (169.254.169.254, the cloud metadata address, is in
the link-local range). 198.18.0.0/15 is deliberately absent: tests use it as "the internet"."""

_DOMAIN_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_-]{1,63}\.?$")


@dataclass(frozen=True, slots=True, order=True)
class CidrRule:
    """One entry of the allow or deny trie (IPv4)."""

    cidr: str
    proto: int = 0
    port: int = 0


@dataclass(frozen=True, slots=True)
class DomainRule:
    pattern: str
    proto: int = 0
    port: int = 0

    def matches(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        if self.pattern.startswith("*."):
            return fnmatch.fnmatchcase(name, self.pattern) or name == self.pattern[2:]
        return name == self.pattern


@dataclass(frozen=True)
class CompiledPolicy:
    default_allow: bool
    allow_ipv6: bool
    allow: tuple[CidrRule, ...]
    deny: tuple[CidrRule, ...]
    allow_domains: tuple[DomainRule, ...] = ()
    deny_domains: tuple[DomainRule, ...] = ()
    labels: dict[CidrRule | DomainRule, str] = field(default_factory=dict, compare=False)

    @property
    def names_default_allow(self) -> bool:
        """Whether names matching no domain rule resolve (no default deny, no deny-all rule)."""
        return self.default_allow and not any(
            r.cidr == "0.0.0.0/0" and r.proto == 0 for r in self.deny)

    def resolve_verdict(self, name: str) -> tuple[bool, tuple[DomainRule, ...]]:
        """(may resolve, allow rules the answers should be added under) for a query name."""
        allowed = tuple(r for r in self.allow_domains if r.matches(name))
        if allowed:
            return True, allowed
        if any(r.matches(name) for r in self.deny_domains):
            return False, ()
        return self.names_default_allow, ()


def _is_domain(target: str) -> bool:
    return bool(_DOMAIN_RE.match(target.lower())) and not target.replace(".", "").isdigit()


def _parse(target: str, proto: str, port: int | None, action: str
           ) -> CidrRule | DomainRule | Literal["ipv6"]:
    target = target.strip()
    if proto not in PROTO_NUMBERS or proto == "icmp":
        raise NetworkError(f"unknown protocol {proto!r} in egress rule")
    pnum = PROTO_NUMBERS[proto]
    if port is not None and not 0 <= port <= 65535:
        raise NetworkError(f"port {port} out of range in egress rule")
    if port and not pnum:
        raise NetworkError(f"egress rule {target}: a port needs protocol tcp or udp")
    try:
        net = ipaddress.ip_network(target, strict=False)
    except ValueError:
        if not _is_domain(target):
            raise NetworkError(f"egress {action} target {target!r} is not an address, CIDR or "
                               "domain name") from None
        return DomainRule(pattern=target.lower().rstrip("."), proto=pnum, port=port or 0)
    if net.version == 6:
        return "ipv6"
    return CidrRule(cidr=str(net), proto=pnum, port=port or 0)


def compile_policy(policy: NetworkPolicy, extra_rules: Sequence[EgressRule] = (),
                   *, resolver: str | None = None) -> CompiledPolicy:
    """Turn a policy into filter entries; raises NetworkError for a malformed target."""
    allow: dict[CidrRule, str] = {}
    deny: dict[CidrRule, str] = {}
    allow_domains: dict[DomainRule, str] = {}
    deny_domains: dict[DomainRule, str] = {}
    allow_ipv6 = False
    entries: Iterable[tuple[str, str, str, int | None]] = [
        *(("allow", t, "any", None) for t in policy.allow_out),
        *(("deny", t, "any", None) for t in policy.deny_out),
        *((r.action, r.target, r.protocol, r.port) for r in extra_rules),
    ]
    for action, target, proto, port in entries:
        parsed = _parse(target, proto, port, action)
        label = f"{action} {target}" + (f" {proto}" if proto != "any" else "") + (
            f":{port}" if port else "")
        if parsed == "ipv6":
            allow_ipv6 = allow_ipv6 or action == "allow"
        elif isinstance(parsed, DomainRule):
            (allow_domains if action == "allow" else deny_domains).setdefault(parsed, label)
        else:
            (allow if action == "allow" else deny).setdefault(parsed, label)
    if resolver is not None:
        for pnum in (PROTO_NUMBERS["udp"], PROTO_NUMBERS["tcp"]):
            allow.setdefault(CidrRule(f"{resolver}/32", pnum, 53), "cube resolver")
            deny.setdefault(CidrRule("0.0.0.0/0", pnum, 53), "dns only through cube resolver")
    labels: dict[CidrRule | DomainRule, str] = {}
    for cidr_table in (allow, deny):
        labels.update(cidr_table.items())
    for domain_table in (allow_domains, deny_domains):
        labels.update(domain_table.items())
    return CompiledPolicy(default_allow=policy.allow_internet_access, allow_ipv6=allow_ipv6,
                          allow=tuple(sorted(allow)), deny=tuple(sorted(deny)),
                          allow_domains=tuple(allow_domains), deny_domains=tuple(deny_domains),
                          labels=labels)
