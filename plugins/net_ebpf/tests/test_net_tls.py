"""HTTPS through the egress proxy (TLS inspection of rule hosts only), on loopback without root:
the original destination is given by the test instead of ``SO_ORIGINAL_DST``. The "real"
servers have certificates of a test CA that the proxy is told to trust (``upstream_ca_file``);
the guest trusts the node's egress CA only where the test says so."""

from __future__ import annotations

import asyncio
import datetime
import os
import ssl
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cube_core import HttpRule
from cube_core.credentials import CredentialNotFoundError

from cube_net_ebpf import clienthello
from cube_net_ebpf.egressca import EgressCa
from cube_net_ebpf.httpproxy import HttpProxy, ProxyClient, ProxyLimits, TlsInspection, upstream_context

SECRET = "tls-s3cr3t-value"
RULE_HOST = "api.example.test"


def client_hello(server_name: str | None) -> bytes:
    """The ClientHello Python's ssl sends for ``server_name``."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = server_name is not None
    if server_name is None:
        ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_server_name_of_a_client_hello() -> None:
    hello = client_hello("API.Example.test")
    assert clienthello.parse(hello) == clienthello.Hello("api.example.test")
    assert clienthello.parse(client_hello(None)) == clienthello.Hello(None)
    for cut in (1, 5, 40, len(hello) - 1):
        assert clienthello.parse(hello[:cut]) is None  # not complete yet: wait for more
    # the same hello split over two records is still found
    body = hello[5:]
    split = b"\x16\x03\x01" + (100).to_bytes(2, "big") + body[:100] + \
        b"\x16\x03\x01" + (len(body) - 100).to_bytes(2, "big") + body[100:]
    assert clienthello.parse(split) == clienthello.Hello("api.example.test")
    for junk in (b"GET / HTTP/1.1\r\n", b"\x16\x02", b"\x17\x03\x03\x00\x10" + b"x" * 16):
        with pytest.raises(clienthello.NotTls):
            clienthello.parse(junk)
    with pytest.raises(clienthello.NotTls):  # a handshake message that claims a huge hello
        clienthello.parse(b"\x16\x03\x01\x00\x04\x01\xff\xff\xff")


def test_node_ca_is_made_once_and_mints_leaves(tmp_path: Path) -> None:
    ca = EgressCa.load_or_create(tmp_path / "ca")
    assert stat.S_IMODE(os.stat(tmp_path / "ca" / "ca.key").st_mode) == 0o600
    again = EgressCa.load_or_create(tmp_path / "ca")
    assert again.pem == ca.pem  # reused across restarts
    first = ca.server_context("api.example.test")
    assert ca.server_context("api.example.test") is first and ca.minted == 1  # cached per name
    ca.server_context("other.example.test")
    assert ca.minted == 2
    cert = x509.load_pem_x509_certificate(ca.pem.encode())
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > datetime.timedelta(days=3000)


class Upstream:
    """An HTTPS server that records each request's raw bytes and answers 200 with its name."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await reader.read(4096)
            if not chunk:
                break
            data += chunk
        self.requests.append(data)
        body = f"hello from {self.name}".encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        await writer.drain()
        writer.close()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    real_ca = EgressCa.load_or_create(tmp_path / "real-ca", "test CA of the real servers")
    (tmp_path / "real-ca.pem").write_text(real_ca.pem)
    node_ca = EgressCa.load_or_create(tmp_path / "node-ca")
    servers, upstreams = [], {}
    for name in (RULE_HOST, "other.example.test"):
        upstreams[name] = Upstream(name)
        servers.append(await asyncio.start_server(upstreams[name].handle, "127.0.0.1", 0,
                                                  ssl=real_ca.server_context(name)))
    ports = {name: s.sockets[0].getsockname()[1] for name, s in zip(upstreams, servers, strict=True)}
    state: dict[str, Any] = {"dst": ("127.0.0.1", ports[RULE_HOST]), "addresses": {"127.0.0.1"},
                             "events": [], "node_ca": node_ca, "real_ca": tmp_path / "real-ca.pem",
                             "upstreams": upstreams, "ports": ports}
    rules = (HttpRule(host=RULE_HOST, headers={"Authorization": "Bearer ${e2b.secrets.my-key}"}),)

    async def addresses(name: str) -> set[str]:
        return set(state["addresses"])

    async def secrets(slot_id: str, name: str) -> str:
        if name != "my-key":
            raise CredentialNotFoundError(kind="secret", ident=name)
        return SECRET

    def make(trust_real_ca: bool = True) -> HttpProxy:
        proxy = HttpProxy("127.0.0.1", 0, lambda peer: ProxyClient("sbx-1", rules), addresses,
                          lambda slot, ev: state["events"].append(ev),
                          limits=ProxyLimits(head_timeout_s=2, idle_s=3),
                          destination=lambda sock: state["dst"],
                          tls=TlsInspection(node_ca, 0, upstream_context(
                              state["real_ca"] if trust_real_ca else None)))
        proxy.secrets = secrets
        return proxy

    state["make"] = make
    try:
        yield state
    finally:
        for s in servers:
            s.close()


async def https_get(proxy: HttpProxy, name: str, trust: str, host: str | None = None) -> tuple[bytes, Any]:
    """A guest's ``GET /`` to ``name`` through the proxy's HTTPS listener, trusting ``trust``."""
    ctx = ssl.create_default_context(cadata=trust)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.tls_port, ssl=ctx, server_hostname=name)
    try:
        writer.write(f"GET /v1 HTTP/1.1\r\nHost: {host or name}\r\nAuthorization: guest's own\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)
        return answer, writer.get_extra_info("ssl_object")
    finally:
        writer.close()


async def test_rule_host_is_inspected_and_gets_the_secret(world: dict[str, Any]) -> None:
    proxy = world["make"]()
    await proxy.start()
    try:
        answer, tls = await https_get(proxy, RULE_HOST, trust=world["node_ca"].pem)
    finally:
        await proxy.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(f"hello from {RULE_HOST}".encode())
    assert SECRET.encode() not in answer
    assert tls.selected_alpn_protocol() == "http/1.1"  # h2 is never offered to the guest
    issuer = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).issuer
    assert issuer == world["node_ca"].cert.subject  # the guest talked to the proxy's leaf
    (sent,) = world["upstreams"][RULE_HOST].requests
    assert f"Authorization: Bearer {SECRET}\r\n".encode() in sent and b"guest's own" not in sent
    assert world["events"][-1]["verdict"] == "transform" and SECRET not in repr(world["events"])


async def test_other_server_names_are_spliced_untouched(world: dict[str, Any]) -> None:
    world["dst"] = ("127.0.0.1", world["ports"]["other.example.test"])
    proxy = world["make"]()
    await proxy.start()
    try:
        # the guest trusts the real CA only: it succeeds only if it sees the real certificate
        answer, _ = await https_get(proxy, "other.example.test", trust=world["real_ca"].read_text())
    finally:
        await proxy.close()
    assert answer.endswith(b"hello from other.example.test")
    assert b"Authorization: guest's own" in world["upstreams"]["other.example.test"].requests[0]
    assert world["node_ca"].minted == 0  # no certificate for a name that is not a rule's
    assert world["events"] == []


async def test_upstream_certificate_failure_is_a_502_and_nothing_is_sent(world: dict[str, Any]) -> None:
    proxy = world["make"](trust_real_ca=False)  # the real server's CA is not in the host's store
    await proxy.start()
    try:
        answer, _ = await https_get(proxy, RULE_HOST, trust=world["node_ca"].pem)
    finally:
        await proxy.close()
    assert answer.startswith(b"HTTP/1.1 502") and b"did not verify" in answer
    assert world["upstreams"][RULE_HOST].requests == []
    assert world["events"][-1]["verdict"] == "deny"


async def test_rule_name_at_a_foreign_address_is_refused(world: dict[str, Any]) -> None:
    world["addresses"] = {"198.18.1.30"}  # the rule host lives elsewhere: 127.0.0.1 is the guest's pick
    proxy = world["make"]()
    await proxy.start()
    try:
        answer, _ = await https_get(proxy, RULE_HOST, trust=world["node_ca"].pem)
        world["addresses"] = {"127.0.0.1"}
        other_host, _ = await https_get(proxy, RULE_HOST, trust=world["node_ca"].pem, host="evil.example.test")
    finally:
        await proxy.close()
    assert answer.startswith(b"HTTP/1.1 421") and b"not an address of" in answer
    assert other_host.startswith(b"HTTP/1.1 421") and b"not the TLS server name" in other_host
    assert world["upstreams"][RULE_HOST].requests == []


async def test_a_guest_without_the_node_ca_fails_its_handshake(world: dict[str, Any]) -> None:
    proxy = world["make"]()
    await proxy.start()
    try:
        with pytest.raises(ssl.SSLCertVerificationError):
            await https_get(proxy, RULE_HOST, trust=world["real_ca"].read_text())
        await asyncio.sleep(0.1)
    finally:
        await proxy.close()
    assert world["upstreams"][RULE_HOST].requests == []
    assert "TLS handshake with the sandbox failed" in world["events"][-1]["reason"]
