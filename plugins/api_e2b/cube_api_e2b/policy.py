"""E2B network options -> :class:`cube_core.NetworkPolicy`, refusing what Cube cannot enforce.

``allowOut`` takes CIDRs, addresses and domain names (``example.com``, ``*.example.com``);
``denyOut`` takes only CIDRs and addresses (as upstream). ``rules`` (host -> header transforms,
``${e2b.secrets.<name>}`` placeholders kept as written) becomes :attr:`NetworkPolicy.rules`,
which the network plugin applies (docs/api.md "Secrets in outbound requests"). Options Cube
does not implement (``dnsServers``, ``egressProxy``, ``maskRequestHost``, ``httpsPorts``) are
refused with a 400 naming the field rather than silently ignored: a caller relying on them would
be unprotected.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from cube_core import HttpRule, NetworkPolicy

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


SECRET_PLACEHOLDER = re.compile(r"\$\{e2b\.secrets\.[^{}\x00-\x1f\x7f-\x9f]+\}")
ANY_PLACEHOLDER = re.compile(r"\$\{e2b\.[^{}]*\}")
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
MAX_RULE_HOSTS = 64
MAX_RULES = 256


def _rules(field: str, raw: dict[str, Any] | None) -> tuple[HttpRule, ...]:
    """E2B ``rules`` -> ``HttpRule``s in order; the shape is checked here, header semantics
    (which names a rule may set) by the network plugin."""
    out: list[HttpRule] = []
    if len(raw or {}) > MAX_RULE_HOSTS:
        raise InvalidRequestError(field=field, reason=f"at most {MAX_RULE_HOSTS} hosts")
    if sum(len(v) for v in (raw or {}).values() if isinstance(v, list)) > MAX_RULES:
        raise InvalidRequestError(field=field, reason=f"at most {MAX_RULES} rules in all")
    for host, rules in (raw or {}).items():
        where = f"{field}.{host}"
        name = host.strip().lower()
        if not (_is_address(name) or (DOMAIN_RE.match(name) and not name.replace(".", "").isdigit())):
            raise InvalidRequestError(field=where, reason=f"{host!r} is not a domain name, an IP address or a CIDR")
        if not isinstance(rules, list):
            raise InvalidRequestError(field=where, reason="expected a list of rules")
        for i, rule in enumerate(rules):
            transform = rule.get("transform") if isinstance(rule, dict) else None
            if not isinstance(rule, dict) or set(rule) - {"transform"} or not isinstance(transform, dict | None) \
                    or set(transform or {}) - {"headers"}:
                raise InvalidRequestError(field=f"{where}[{i}]", reason='a rule is {"transform": {"headers": {...}}}')
            headers = (transform or {}).get("headers")
            headers = headers or {}
            if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
                raise InvalidRequestError(field=f"{where}[{i}].transform.headers",
                                          reason="expected an object of header names to strings")
            for key, value in headers.items():
                if not HEADER_NAME.match(key) or any(c in value for c in "\r\n\x00"):
                    raise InvalidRequestError(field=f"{where}[{i}].transform.headers.{key[:64]}",
                                              reason="a header is an HTTP token name and a one-line value")
                for found in ANY_PLACEHOLDER.findall(value):
                    if not SECRET_PLACEHOLDER.fullmatch(found):
                        raise InvalidRequestError(
                            field=f"{where}[{i}].transform.headers.{key}",
                            reason=f"{found} is not supported by this Cube server (only ${{e2b.secrets.<name>}})")
            out.append(HttpRule(host=name, headers=dict(headers)))
    return tuple(out)


def _refuse_unsupported(prefix: str, **options: object) -> None:
    for name, value in options.items():
        if value:  # None, empty list and empty dict mean "not asked for"
            raise InvalidRequestError(field=f"{prefix}{name}", reason="not supported by this Cube server")


def network_policy(allow_internet_access: bool | None, network: SandboxNetworkConfig | None) -> NetworkPolicy:
    """The policy of a new sandbox."""
    net = network or SandboxNetworkConfig()
    _refuse_unsupported("network.", dnsServers=net.dns_servers, egressProxy=net.egress_proxy,
                        maskRequestHost=net.mask_request_host, httpsPorts=net.https_ports)
    return NetworkPolicy(
        allow_internet_access=True if allow_internet_access is None else allow_internet_access,
        allow_out=_targets("network.allowOut", net.allow_out, domains=True),
        deny_out=_targets("network.denyOut", net.deny_out, domains=False),
        allow_public_traffic=True if net.allow_public_traffic is None else net.allow_public_traffic,
        rules=_rules("network.rules", net.rules),
    )


def updated_policy(current: NetworkPolicy, update: SandboxNetworkUpdateConfig) -> NetworkPolicy:
    """``PUT /sandboxes/{id}/network``: replaces the egress rules; an omitted field is cleared."""
    _refuse_unsupported("", dnsServers=update.dns_servers, egressProxy=update.egress_proxy)
    return NetworkPolicy(
        allow_internet_access=True if update.allow_internet_access is None else update.allow_internet_access,
        allow_out=_targets("allowOut", update.allow_out, domains=True),
        deny_out=_targets("denyOut", update.deny_out, domains=False),
        allow_public_traffic=current.allow_public_traffic,
        rules=_rules("rules", update.rules),
    )
