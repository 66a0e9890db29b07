"""E2B ``network.rules`` as the egress proxy applies them: which rules match a request, and the
headers they set, with ``${e2b.secrets.<name>}`` placeholders resolved.

Pure functions (no I/O but the ``resolve`` callback), so the unit tests cover every case:

- a rule's host is a domain (``api.example.com``), a wildcard (``*.example.com``: any name below
  it, not the domain itself), an address or a CIDR. A domain rule matches on the request's
  ``Host`` (port and trailing dot removed, case-insensitive); an address rule on the
  connection's original destination address, whatever ``Host`` says;
- the matching rules' headers are applied in order: a later rule's header replaces an earlier
  one's, and every header a rule sets replaces the guest's own of that name (any case);
- only the placeholders in the rules are resolved, never text the guest sent: a guest that
  writes ``${e2b.secrets.x}`` in its own request sends exactly that;
- a placeholder that does not resolve fails the request (:class:`UnresolvedSecret`): the
  destination never sees a placeholder or a partial header.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence

from cube_core import HttpRule

PLACEHOLDER = re.compile(r"\$\{e2b\.secrets\.([^{}\x00-\x1f\x7f-\x9f]+?)\}")
"""``Secret.fill(name)`` of the SDK: any name without braces or control characters."""
ANY_PLACEHOLDER = re.compile(r"\$\{e2b\.[^{}]*\}")
"""Every E2B placeholder form; the ones other than secrets (``${e2b.identity.tokens.x}``) are
refused when the rule is created."""
HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")
"""An HTTP token (RFC 9110 §5.1)."""
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "upgrade", "host", "content-length", "transfer-encoding"})
"""Headers a rule may not set: they frame the message or belong to the connection."""
MAX_HEADERS = 32
MAX_VALUE = 8192

Resolve = Callable[[str], Awaitable[str]]


class UnresolvedSecret(Exception):  # noqa: N818 - the name says what happened
    """A placeholder of a matching rule names a secret that cannot be read for this sandbox."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"secret {name!r}: {reason}")
        self.name = name
        self.reason = reason


def check_rule(rule: HttpRule) -> str | None:
    """Why ``rule`` cannot be applied (for a 400 naming it), or ``None``."""
    if not _host_kind(rule.host):
        return f"{rule.host!r} is not a domain name, *.domain, an IP address or a CIDR"
    if len(rule.headers) > MAX_HEADERS:
        return f"at most {MAX_HEADERS} headers"
    for name, value in rule.headers.items():
        if not HEADER_NAME.match(name):
            return f"header name {name!r} is not an HTTP token"
        if name.lower() in HOP_BY_HOP:
            return f"header {name!r} cannot be set by a rule"
        if len(value) > MAX_VALUE or any(c in value for c in "\r\n\x00"):
            return f"header {name!r}: a value is one line of at most {MAX_VALUE} characters"
        for found in ANY_PLACEHOLDER.findall(value):
            if not PLACEHOLDER.fullmatch(found):
                return (f"header {name!r}: {found} is not supported by this server "
                        "(only ${e2b.secrets.<name>} placeholders are)")
    return None


def _host_kind(host: str) -> str | None:
    try:
        ipaddress.ip_network(host, strict=False)
    except ValueError:
        pass
    else:
        return "address"
    label = r"(?!-)[a-z0-9_-]{1,63}(?<!-)"
    if re.fullmatch(rf"(\*\.)?({label}\.)*{label}\.?", host.lower()):
        return "domain"
    return None


def request_host(value: str | None) -> str:
    """The name of a ``Host`` header: lower-case, without port, brackets or trailing dot."""
    host = (value or "").strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def host_matches(pattern: str, host: str) -> bool:
    pattern = pattern.lower().rstrip(".")
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def address_matches(pattern: str, address: str) -> bool:
    try:
        return ipaddress.ip_address(address) in ipaddress.ip_network(pattern, strict=False)
    except ValueError:
        return False


def matching(rules: Sequence[HttpRule], host: str, address: str) -> list[HttpRule]:
    """The rules that apply to a request for ``host`` on a connection to ``address``."""
    out = []
    for rule in rules:
        if _host_kind(rule.host) == "address":
            if address_matches(rule.host, address):
                out.append(rule)
        elif host_matches(rule.host, host):
            out.append(rule)
    return out


def domains_of(rules: Sequence[HttpRule]) -> list[str]:
    """The domain patterns among ``rules`` (whose addresses the proxy must check)."""
    return [r.host for r in rules if _host_kind(r.host) == "domain"]


async def resolve_headers(rules: Sequence[HttpRule], resolve: Resolve) -> dict[str, str]:
    """The headers ``rules`` set (lower-case name -> (name as written, value)), placeholders
    resolved; :class:`UnresolvedSecret` when one does not resolve."""
    out: dict[str, str] = {}
    cache: dict[str, str] = {}
    for rule in rules:
        for name, template in rule.headers.items():
            parts: list[str] = []
            pos = 0
            for m in PLACEHOLDER.finditer(template):
                secret = m.group(1)
                if secret not in cache:
                    cache[secret] = await resolve(secret)
                value = cache[secret]
                if any(c in value for c in "\r\n\x00"):
                    raise UnresolvedSecret(secret, "its value cannot be sent in a header "
                                                   "(it holds a line break or NUL)")
                parts += [template[pos:m.start()], value]
                pos = m.end()
            parts.append(template[pos:])
            for existing in [k for k in out if k.lower() == name.lower()]:
                del out[existing]
            out[name] = "".join(parts)
    return out


def apply(headers: Sequence[tuple[str, str]], extra: dict[str, str]) -> list[tuple[str, str]]:
    """``headers`` with every header named in ``extra`` replaced by ``extra``'s value."""
    replaced = {k.lower() for k in extra}
    return [(k, v) for k, v in headers if k.lower() not in replaced] + list(extra.items())
