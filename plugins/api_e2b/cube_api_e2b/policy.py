"""E2B network options -> :class:`cube_core.NetworkPolicy`, refusing what Cube cannot enforce.

``allowOut`` takes CIDRs, addresses and domain names (``example.com``, ``*.example.com``);
``denyOut`` takes only CIDRs and addresses (as upstream). Options Cube does not implement
(``dnsServers``, ``egressProxy``, ``maskRequestHost``, ``httpsPorts``, ``rules``) are refused with a
400 naming the field rather than silently ignored: a caller relying on them would be unprotected.
"""

from __future__ import annotations

import ipaddress
import re

from cube_core import NetworkPolicy

from cube_api_e2b.errors import InvalidRequestError
from cube_api_e2b.schemas import SandboxNetworkConfig, SandboxNetworkUpdateConfig

_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
DOMAIN_RE = re.compile(rf"^(\*\.)?({_LABEL}\.)*{_LABEL}\.?$")


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


def _targets(field: str, values: list[str] | None, *, domains: bool) -> tuple[str, ...]:
    out: list[str] = []
    for i, raw in enumerate(values or []):
        value = raw.strip().lower()
        if _is_address(value) or (domains and DOMAIN_RE.match(value) and not value.replace(".", "").isdigit()):
            out.append(value)
            continue
        kind = "a CIDR, an IP address or a domain name" if domains else "a CIDR or an IP address"
        raise InvalidRequestError(field=f"{field}[{i}]", reason=f"{raw!r} is not {kind}")
    return tuple(out)


def _refuse_unsupported(prefix: str, **options: object) -> None:
    for name, value in options.items():
        if value:  # None, empty list and empty dict mean "not asked for"
            raise InvalidRequestError(field=f"{prefix}{name}", reason="not supported by this Cube server")


def network_policy(allow_internet_access: bool | None, network: SandboxNetworkConfig | None) -> NetworkPolicy:
    """The policy of a new sandbox."""
    net = network or SandboxNetworkConfig()
    _refuse_unsupported("network.", dnsServers=net.dns_servers, egressProxy=net.egress_proxy,
                        maskRequestHost=net.mask_request_host, httpsPorts=net.https_ports, rules=net.rules)
    return NetworkPolicy(
        allow_internet_access=True if allow_internet_access is None else allow_internet_access,
        allow_out=_targets("network.allowOut", net.allow_out, domains=True),
        deny_out=_targets("network.denyOut", net.deny_out, domains=False),
        allow_public_traffic=True if net.allow_public_traffic is None else net.allow_public_traffic,
    )


def updated_policy(current: NetworkPolicy, update: SandboxNetworkUpdateConfig) -> NetworkPolicy:
    """``PUT /sandboxes/{id}/network``: replaces the egress rules; an omitted field is cleared."""
    _refuse_unsupported("", dnsServers=update.dns_servers, egressProxy=update.egress_proxy, rules=update.rules)
    return NetworkPolicy(
        allow_internet_access=True if update.allow_internet_access is None else update.allow_internet_access,
        allow_out=_targets("allowOut", update.allow_out, domains=True),
        deny_out=_targets("denyOut", update.deny_out, domains=False),
        allow_public_traffic=current.allow_public_traffic,
    )
