"""The egress proxy's rules (``headerrules``) and the proxy itself on loopback (no root: the
original destination is given by the test instead of ``SO_ORIGINAL_DST``), plus its nft rules."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from cube_core import HttpRule
from cube_core.credentials import CredentialNotFoundError

from cube_net_ebpf import headerrules
from cube_net_ebpf.httpproxy import HttpProxy, ProxyClient, ProxyLimits
from cube_net_ebpf.nat import HostRules, host_ruleset

SECRETS = {"my-key": "s3cr3t-value", "other": "x"}


def rule(host: str, **headers: str) -> HttpRule:
    return HttpRule(host=host, headers=headers)


async def resolve(name: str) -> str:
    if name not in SECRETS:
        raise headerrules.UnresolvedSecret(name, "not found")
    return SECRETS[name]


# -- pure rules -----------------------------------------------------------------------------------


def test_hosts_match_by_name_wildcard_and_address() -> None:
    rules = [rule("api.example.com", A="1"), rule("*.svc.example.com", B="2"), rule("198.18.0.0/24", C="3")]
    assert headerrules.matching(rules, "api.example.com", "203.0.113.1") == rules[:1]
    assert headerrules.matching(rules, "x.svc.example.com", "203.0.113.1") == rules[1:2]
    assert headerrules.matching(rules, "svc.example.com", "203.0.113.1") == []  # wildcard: below only
    assert headerrules.matching(rules, "evil.example.com", "198.18.0.9") == rules[2:]  # by address
    assert headerrules.matching(rules, "api.example.com.evil", "203.0.113.1") == []
    assert headerrules.request_host("API.Example.com:8080") == "api.example.com"
    assert headerrules.request_host("api.example.com.") == "api.example.com"
    assert headerrules.request_host("[2001:db8::1]:80") == "2001:db8::1"


async def test_placeholders_resolve_and_later_rules_win() -> None:
    rules = [rule("h", Authorization="Bearer ${e2b.secrets.my-key}", X="a"),
             rule("h", x="b ${e2b.secrets.other}${e2b.secrets.my-key}")]
    out = await headerrules.resolve_headers(rules, resolve)
    assert out == {"Authorization": "Bearer s3cr3t-value", "x": "b xs3cr3t-value"}
    assert headerrules.apply([("authorization", "guest's"), ("Accept", "*/*")], out) == [
        ("Accept", "*/*"), ("Authorization", "Bearer s3cr3t-value"), ("x", "b xs3cr3t-value")]


async def test_unknown_secret_and_unsafe_value_fail() -> None:
    with pytest.raises(headerrules.UnresolvedSecret, match="'nope'"):
        await headerrules.resolve_headers([rule("h", A="${e2b.secrets.nope}")], resolve)

    async def crlf(name: str) -> str:
        return "a\r\nInjected: 1"
    with pytest.raises(headerrules.UnresolvedSecret, match="line break"):
        await headerrules.resolve_headers([rule("h", A="${e2b.secrets.x}")], crlf)


def test_rule_checks() -> None:
    assert headerrules.check_rule(rule("api.example.com", Authorization="Bearer ${e2b.secrets.k}")) is None
    assert "identity" in str(headerrules.check_rule(rule("h.example", A="${e2b.identity.tokens.aws}")))
    assert "cannot be set" in str(headerrules.check_rule(rule("h.example", Host="x")))
    assert "not an HTTP token" in str(headerrules.check_rule(rule("h.example", **{"a b": "x"})))
    assert headerrules.check_rule(rule("not a host")) is not None


LOCAL_LINKS = '{ "vh0*", "vh1*", "vh2*", "vh3*", "vh4*", "vh5*", "vh6*", "vh7*", "vh8*", "vh9*" }'
"""Node ``local``'s own links (``vh<index>``) in its host table."""


def test_host_table_redirects_only_listed_slots() -> None:
    script = host_ruleset(HostRules(subnet="100.64.0.0/10", resolver="100.64.0.1",
                                    forward_only_sandboxes=False, http_proxy=("100.64.0.1", 3129)))
    assert "set http_rule_slots" in script
    assert f"iifname {LOCAL_LINKS} ip saddr @http_rule_slots tcp dport {{ 80 }} dnat ip to 100.64.0.1:3129" in script
    assert 'ip daddr 100.64.0.1 tcp dport 3129 ct status dnat accept' in script
    assert "3130" not in script  # HTTPS is redirected only with its listener
    tls = host_ruleset(HostRules(subnet="100.64.0.0/10", resolver="100.64.0.1", forward_only_sandboxes=False,
                                 http_proxy=("100.64.0.1", 3129), https_proxy_port=3130, https_ports=(443, 8443)))
    assert (f"iifname {LOCAL_LINKS} ip saddr @http_rule_slots tcp dport {{ 443, 8443 }} "
            "dnat ip to 100.64.0.1:3130") in tls
    assert 'ip daddr 100.64.0.1 tcp dport 3130 ct status dnat accept' in tls
    plain = host_ruleset(HostRules(subnet="100.64.0.0/10", resolver=None, forward_only_sandboxes=False))
    assert "http_rule_slots" not in plain and "3129" not in plain


# -- the proxy on loopback --------------------------------------------------------------------------


class Upstream:
    """An HTTP server that records each request's raw bytes and answers 200."""

    def __init__(self) -> None:
        self.requests: list[bytes] = []
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await reader.read(4096)
            if not chunk:
                break
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        while len(rest) < length:
            rest += await reader.read(4096)
        self.requests.append(head + b"\r\n\r\n" + rest)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()


@pytest.fixture
async def world() -> AsyncIterator[tuple[HttpProxy, Upstream, list[dict[str, Any]], dict[str, Any]]]:
    upstream = Upstream()
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = server.sockets[0].getsockname()[1]
    events: list[dict[str, Any]] = []
    state: dict[str, Any] = {"rules": (rule("api.example.test", Authorization="Bearer ${e2b.secrets.my-key}"),
                                       rule("bad.example.test", Authorization="${e2b.secrets.missing}")),
                             "addresses": {"127.0.0.1"}}

    async def addresses(name: str) -> set[str]:
        return set(state["addresses"])

    async def secrets(slot_id: str, name: str) -> str:
        assert slot_id == "sbx-1"
        if name not in SECRETS:
            raise CredentialNotFoundError(kind="secret", ident=name)
        return SECRETS[name]

    proxy = HttpProxy("127.0.0.1", 0, lambda peer: ProxyClient("sbx-1", state["rules"]), addresses,
                      lambda slot, ev: events.append(ev),
                      limits=ProxyLimits(max_head=4096, head_timeout_s=0.5, idle_s=2),
                      destination=lambda sock: ("127.0.0.1", upstream.port))
    proxy.secrets = secrets
    await proxy.start()
    try:
        yield proxy, upstream, events, state
    finally:
        await proxy.close()
        server.close()


async def send(proxy: HttpProxy, data: bytes, *, trickle: bool = False) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    try:
        for part in ([data[i:i + 1] for i in range(len(data))] if trickle else [data]):
            writer.write(part)
            await writer.drain()
            if trickle:
                await asyncio.sleep(0.05)
    except OSError:  # the proxy hung up on a trickling guest
        pass
    try:
        answer = await asyncio.wait_for(reader.read(), 5)
    except OSError:
        answer = b""
    writer.close()
    return answer


async def test_rule_host_gets_the_secret_and_the_guest_never_does(world: Any) -> None:
    proxy, upstream, events, _ = world
    answer = await send(proxy, b"POST /v1 HTTP/1.1\r\nHost: api.example.test\r\nAuthorization: guest\r\n"
                               b"Content-Length: 5\r\nX-Mine: ${e2b.secrets.other}\r\n\r\nhello")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"ok")
    assert b"s3cr3t-value" not in answer
    (sent,) = upstream.requests
    assert b"Authorization: Bearer s3cr3t-value\r\n" in sent
    assert b"guest" not in sent and sent.endswith(b"\r\n\r\nhello")
    assert b"X-Mine: ${e2b.secrets.other}" in sent  # the guest's own text is never resolved
    assert events[-1]["verdict"] == "transform" and events[-1]["headers"] == ["Authorization"]
    assert "s3cr3t" not in repr(events)


async def test_unknown_secret_is_a_502_and_nothing_is_sent(world: Any) -> None:
    proxy, upstream, events, _ = world
    answer = await send(proxy, b"GET / HTTP/1.1\r\nHost: bad.example.test\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 502") and b"'missing'" in answer
    assert upstream.requests == []
    assert events[-1]["verdict"] == "deny"


async def test_rule_host_on_a_foreign_address_is_refused(world: Any) -> None:
    proxy, upstream, _, state = world
    state["addresses"] = {"198.18.1.30"}  # api.example.test is elsewhere: 127.0.0.1 is the guest's choice
    answer = await send(proxy, b"GET / HTTP/1.1\r\nHost: api.example.test\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 421")
    assert upstream.requests == []


async def test_other_hosts_pass_through_unchanged(world: Any) -> None:
    proxy, upstream, _, _ = world
    request = b"GET /x HTTP/1.1\r\nHost: other.example.test\r\nAuthorization: mine\r\n\r\n"
    answer = await send(proxy, request)
    assert answer.endswith(b"ok")
    assert upstream.requests == [request]


async def test_hostile_heads_are_bounded(world: Any) -> None:
    proxy, upstream, _, _ = world
    huge = b"GET / HTTP/1.1\r\nHost: api.example.test\r\nX: " + b"a" * 8000 + b"\r\n\r\n"
    assert (await send(proxy, huge)).startswith(b"HTTP/1.1 400")
    assert (await send(proxy, b"\x16\x03\x01 not http\r\n\r\n")).startswith(b"HTTP/1.1 400")
    started = asyncio.get_running_loop().time()
    assert await send(proxy, b"GET / HTTP/1.1\r\nHost: api.example.test\r\n" + b"X: y\r\n" * 40,
                      trickle=True) == b""
    assert asyncio.get_running_loop().time() - started < 5
    assert upstream.requests == []


def test_original_destination_needs_a_redirect() -> None:
    from cube_net_ebpf.httpproxy import original_destination
    with socket.socket() as sock, pytest.raises(OSError):
        original_destination(sock)
