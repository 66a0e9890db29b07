"""Compile a sandbox's egress policy (E2B ``allow_internet_access`` / ``allow_out`` /
``deny_out`` plus plugin-contributed :class:`cube_core.EgressRule` objects) into filter entries.

Semantics, as in E2B: internet access is on by default; ``allow_internet_access=False`` means
deny everything not explicitly allowed; an allow always wins over a deny; domains in
``allow_out`` are allowed through Cube's resolver (their resolved addresses are allowed for the
answer's TTL), domains denied get NXDOMAIN. On top of that, always-denied ranges (``ranges.py``:
metadata/link-local, private, loopback, CGNAT incl. other sandboxes, multicast, the host's own
addresses, their IPv6 equivalents) are never opened by a sandbox's rule: an allow rule that
lies wholly inside one is refused (``NetworkError`` with ``field``/``reason``), a wider one
(``0.0.0.0/0``) leaves them shut. Only ranges the operator made openable are opened by an allow
rule naming them. IPv6 is denied unless an IPv6 allow rule names the destination, and DNS may
only go to Cube's resolver.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from cube_core import EgressRule, NetworkError, NetworkPolicy

from cube_net_ebpf.ranges import DeniedRanges

Proto = Literal["tcp", "udp", "any"]
PROTO_NUMBERS: dict[str, int] = {"any": 0, "icmp": 1, "tcp": 6, "udp": 17}
PROTO_NAMES: dict[int, str] = {v: k for k, v in PROTO_NUMBERS.items()}

_DOMAIN_RE = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*[a-z0-9_-]{1,63}\.?$")


@dataclass(frozen=True, slots=True, order=True)
class CidrRule:
    """One entry of the allow or deny trie (IPv4, or IPv6 in the ``*6`` tuples)."""

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
    system: frozenset[CidrRule] = frozenset()
    """Cube's own allow rules (the resolver): the only ones that reach an always-denied range."""
    allow6: tuple[CidrRule, ...] = ()
    deny6: tuple[CidrRule, ...] = ()

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
           ) -> CidrRule | DomainRule | tuple[Literal["ipv6"], CidrRule]:
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
    rule = CidrRule(cidr=str(net), proto=pnum, port=port or 0)
    if net.version == 6:
        return ("ipv6", rule)
    return rule


def compile_policy(policy: NetworkPolicy, extra_rules: Sequence[EgressRule] = (),
                   *, resolver: str | None = None, denied: DeniedRanges | None = None
                   ) -> CompiledPolicy:
    """Turn a policy into filter entries. Raises NetworkError for a malformed target and, when
    ``denied`` is given, for an allow rule that lies wholly inside an always-denied range (the
    error's ``field`` names the rule, e.g. ``allow_out[0]``)."""
    allow: dict[CidrRule, str] = {}
    deny: dict[CidrRule, str] = {}
    allow6: dict[CidrRule, str] = {}
    deny6: dict[CidrRule, str] = {}
    allow_domains: dict[DomainRule, str] = {}
    deny_domains: dict[DomainRule, str] = {}
    entries: Iterable[tuple[str, str, str, str, int | None]] = [
        *((f"allow_out[{i}]", "allow", t, "any", None) for i, t in enumerate(policy.allow_out)),
        *((f"deny_out[{i}]", "deny", t, "any", None) for i, t in enumerate(policy.deny_out)),
        *((f"egress rule {r.action} {r.target}", r.action, r.target, r.protocol, r.port)
          for r in extra_rules),
    ]
    for where, action, target, proto, port in entries:
        parsed = _parse(target, proto, port, action)
        label = f"{action} {target}" + (f" {proto}" if proto != "any" else "") + (
            f":{port}" if port else "")
        if isinstance(parsed, DomainRule):
            (allow_domains if action == "allow" else deny_domains).setdefault(parsed, label)
            continue
        rule = parsed[1] if isinstance(parsed, tuple) else parsed
        if action == "allow" and denied is not None:
            swallowed_by = denied.refusal(ipaddress.ip_network(rule.cidr))
            if swallowed_by is not None:
                reason = (f"{target} is in the always-denied range {swallowed_by}, which no "
                          "sandbox rule can open (only the operator's network option "
                          "openable_ranges can)")
                raise NetworkError(f"{where}: {reason}", field=where, reason=reason)
        if isinstance(parsed, tuple):
            (allow6 if action == "allow" else deny6).setdefault(rule, label)
        else:
            (allow if action == "allow" else deny).setdefault(rule, label)
    system: set[CidrRule] = set()
    if resolver is not None:
        for pnum in (PROTO_NUMBERS["udp"], PROTO_NUMBERS["tcp"]):
            own = CidrRule(f"{resolver}/32", pnum, 53)
            allow[own] = "cube resolver"
            system.add(own)
            deny.setdefault(CidrRule("0.0.0.0/0", pnum, 53), "dns only through cube resolver")
    labels: dict[CidrRule | DomainRule, str] = {}
    for cidr_table in (allow, deny, allow6, deny6):
        labels.update(cidr_table.items())
    for domain_table in (allow_domains, deny_domains):
        labels.update(domain_table.items())
    return CompiledPolicy(default_allow=policy.allow_internet_access, allow_ipv6=bool(allow6),
                          allow=tuple(sorted(allow)), deny=tuple(sorted(deny)),
                          allow_domains=tuple(allow_domains), deny_domains=tuple(deny_domains),
                          labels=labels, system=frozenset(system), allow6=tuple(sorted(allow6)),
                          deny6=tuple(sorted(deny6)))
