"""Cube's resolver for sandboxes: the only DNS server a sandbox can reach.

The guest asks its gateway (169.254.0.22:53); the slot's namespace DNATs that to this resolver
on the host. The sandbox is recognised by the query's source address (its namespace-side veth
address). Names the sandbox may not resolve get NXDOMAIN; for names allowed by a domain rule,
the A records of the upstream answer are written into the filter's allow trie for the answer's
TTL (clamped, plus a grace period) before the answer is returned, and the TTL the guest sees is
the clamped one, so it re-resolves before the entry expires. IPv6 answers are withheld unless
the sandbox may use IPv6.
"""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import structlog

from cube_net_ebpf.policy import CompiledPolicy, DomainRule

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Client:
    """What the resolver needs to know about the sandbox that asked."""

    slot_id: str
    ifindex: int
    policy: CompiledPolicy


Lookup = Callable[[str], Client | None]
Learn = Callable[[int, str, int, int, float, str], int]
Audit = Callable[[str, dict[str, Any]], None]


def system_upstreams(resolv_conf: Path = Path("/etc/resolv.conf")) -> tuple[str, ...]:
    servers = []
    try:
        for line in resolv_conf.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] == "nameserver" and ":" not in parts[1]:
                servers.append(parts[1])
    except OSError:
        pass
    return tuple(servers)


class Resolver:
    """UDP and TCP DNS on ``bind:port`` for sandboxes (threads; ``start``/``stop``)."""

    def __init__(self, bind: str, lookup: Lookup, learn: Learn, audit: Audit, *,
                 upstreams: tuple[str, ...], port: int = 53, min_ttl: int = 5,
                 max_ttl: int = 300, grace_s: float = 2.0, timeout_s: float = 2.0) -> None:
        self.bind, self.port = bind, port
        self._lookup, self._learn, self._audit = lookup, learn, audit
        self.upstreams = upstreams
        self.min_ttl, self.max_ttl, self.grace_s, self.timeout_s = min_ttl, max_ttl, grace_s, timeout_s
        self._udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            for sock in (self._udp, self._tcp):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((bind, port))
            self._tcp.listen(64)
        except OSError:  # e.g. the port is taken: leave no open socket behind
            self._udp.close()
            self._tcp.close()
            raise
        self._workers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="cube-dns")
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()

    # -- serving --------------------------------------------------------------------------------

    def start(self) -> None:
        for target, name in ((self._serve_udp, "cube-dns-udp"), (self._serve_tcp, "cube-dns-tcp")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stopping.set()
        for sock in (self._udp, self._tcp):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        for thread in self._threads:
            thread.join(timeout=2)
        self._workers.shutdown(wait=False, cancel_futures=True)

    def _serve_udp(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._udp.recvfrom(4096)
            except OSError:
                return
            self._workers.submit(self._answer_udp, data, peer)

    def _answer_udp(self, data: bytes, peer: tuple[str, int]) -> None:
        reply = self.handle(data, peer[0])
        if reply is not None:
            try:
                self._udp.sendto(reply, peer)
            except OSError:
                pass

    def _serve_tcp(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, peer = self._tcp.accept()
            except OSError:
                return
            self._workers.submit(self._answer_tcp, conn, peer)

    def _answer_tcp(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        with conn:
            conn.settimeout(self.timeout_s)
            try:
                header = _recv_exact(conn, 2)
                data = _recv_exact(conn, struct.unpack("!H", header)[0])
            except (OSError, EOFError):
                return
            reply = self.handle(data, peer[0], tcp=True)
            if reply is not None:
                try:
                    conn.sendall(struct.pack("!H", len(reply)) + reply)
                except OSError:
                    pass

    # -- one query ------------------------------------------------------------------------------

    def handle(self, data: bytes, peer_ip: str, *, tcp: bool = False) -> bytes | None:
        """The answer to one query from ``peer_ip`` (None: not a sandbox, or unparseable)."""
        client = self._lookup(peer_ip)
        if client is None:
            return None
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if not query.question:
            return _rcode(query, dns.rcode.FORMERR)
        question = query.question[0]
        qname = question.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        allowed, rules = client.policy.resolve_verdict(qname)
        if not allowed:
            self._audit(client.slot_id, {"kind": "dns", "verdict": "deny", "name": qname,
                                         "qtype": qtype, "reason": "name not allowed"})
            return _rcode(query, dns.rcode.NXDOMAIN)
        if question.rdtype == dns.rdatatype.AAAA and not client.policy.allow_ipv6:
            return dns.message.make_response(query).to_wire()
        try:
            response = self._forward(query, tcp=tcp)
        except (OSError, dns.exception.DNSException) as exc:
            log.warning("upstream DNS failed", name=qname, error=str(exc))
            return _rcode(query, dns.rcode.SERVFAIL)
        ips = self._learn_answers(client, response, rules, qname)
        self._audit(client.slot_id, {"kind": "dns", "verdict": "allow", "name": qname,
                                     "qtype": qtype, "answers": ips,
                                     "rcode": dns.rcode.to_text(response.rcode())})
        return response.to_wire()

    def _learn_answers(self, client: Client, response: dns.message.Message,
                       rules: tuple[DomainRule, ...], qname: str) -> list[str]:
        ips: list[str] = []
        for rrset in response.answer:
            ttl = max(self.min_ttl, min(self.max_ttl, rrset.ttl))
            rrset.ttl = ttl
            if rrset.rdtype != dns.rdatatype.A:
                continue
            for rdata in rrset:
                address = str(rdata.address)
                ips.append(address)
                for rule in rules:
                    self._learn(client.ifindex, address, rule.proto, rule.port,
                                ttl + self.grace_s, rule.pattern)
        return ips

    def _forward(self, query: dns.message.Message, *, tcp: bool) -> dns.message.Message:
        if not self.upstreams:
            raise OSError("no upstream DNS server configured")
        last: Exception | None = None
        for server in self.upstreams:
            try:
                if tcp:
                    return dns.query.tcp(query, server, timeout=self.timeout_s)
                response = dns.query.udp(query, server, timeout=self.timeout_s,
                                         ignore_unexpected=True)
                if response.flags & dns.flags.TC:
                    return dns.query.tcp(query, server, timeout=self.timeout_s)
                return response
            except (OSError, dns.exception.DNSException) as exc:
                last = exc
        assert last is not None
        raise last


def _rcode(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()


def _recv_exact(conn: socket.socket, size: int) -> bytes:
    buf = b""
    while len(buf) < size:
        chunk = conn.recv(size - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf
