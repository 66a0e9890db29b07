"""Cube's resolver for sandboxes: the only DNS server a sandbox can reach.

The guest asks its gateway (169.254.0.22:53); the slot's namespace DNATs that to this resolver
on the host. The sandbox is recognised by the query's source address (its namespace-side veth
address). Names the sandbox may not resolve get NXDOMAIN; for names allowed by a domain rule,
the A records of the upstream answer are written into the filter's allow trie for the answer's
TTL (clamped, plus a grace period) before the answer is returned, and the TTL the guest sees is
the clamped one, so it re-resolves before the entry expires. IPv6 answers are withheld unless
the sandbox may use IPv6.

What a sandbox sends is never forwarded as is. Only a standard query (opcode QUERY, not a
response, exactly one question of class IN, no answer or authority records, not AXFR/IXFR) is
accepted, and it is rebuilt from its name, type and RD flag (plus a plain EDNS0 OPT if it had
one): UPDATE, NOTIFY and other opcodes get NOTIMP, zone transfers and other classes REFUSED,
multi-question and malformed messages FORMERR. Addresses in an always-denied range are removed
from every answer and never learned. Each sandbox has a token bucket (``rate``/``burst``) and a
limit of queries in flight; the queue shared by all sandboxes is bounded (beyond it queries are
dropped). TCP connections have their own threads, at most ``tcp_per_sandbox`` per sandbox, and
must deliver the whole query within ``timeout_s``: a sandbox that trickles bytes over TCP ties
up only its own connections.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.opcode
import dns.query
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import structlog

from cube_net_ebpf.dnslimits import Admission, DnsLimits
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
AlwaysDenied = Callable[[str], bool]

HEADER = struct.Struct("!HHHHHH")  # id, flags, qdcount, ancount, nscount, arcount
FLAG_QR = 0x8000
FLAG_RD = 0x0100
REFUSED_TYPES = frozenset({dns.rdatatype.AXFR, dns.rdatatype.IXFR, dns.rdatatype.MAILA,
                           dns.rdatatype.MAILB, dns.rdatatype.OPT, dns.rdatatype.TSIG,
                           dns.rdatatype.TKEY})


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
                 max_ttl: int = 300, grace_s: float = 2.0, timeout_s: float = 2.0,
                 always_denied: AlwaysDenied = lambda _address: False,
                 limits: DnsLimits | None = None) -> None:
        self.bind, self.port = bind, port
        self._lookup, self._learn, self._audit = lookup, learn, audit
        self._always_denied = always_denied
        self.upstreams = upstreams
        self.min_ttl, self.max_ttl, self.grace_s, self.timeout_s = min_ttl, max_ttl, grace_s, timeout_s
        self.limits = limits or DnsLimits()
        self._admission = Admission(self.limits)
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
        self._workers = ThreadPoolExecutor(max_workers=self.limits.workers,
                                           thread_name_prefix="cube-dns")
        self._tcp_workers = ThreadPoolExecutor(max_workers=self.limits.tcp_connections,
                                               thread_name_prefix="cube-dns-tcp")
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
        self._tcp_workers.shutdown(wait=False, cancel_futures=True)

    def _serve_udp(self) -> None:
        while not self._stopping.is_set():
            try:
                data, peer = self._udp.recvfrom(4096)
            except OSError:
                return
            if not peer:  # the socket was shut down
                return
            client = self._lookup(peer[0])
            if client is None:
                continue
            verdict = self._admission.admit(client.slot_id)
            if verdict == "queue_full":
                continue  # dropped: the guest retries
            if verdict != "ok":
                self._limited(client, verdict, data, peer)
                continue
            try:
                self._workers.submit(self._answer_udp, client, data, peer)
            except RuntimeError:  # shutting down
                self._admission.done(client.slot_id)
                return

    def _limited(self, client: Client, verdict: str, data: bytes, peer: tuple[str, int]) -> None:
        """Answer REFUSED to a query over a sandbox's limits (audited at most once a second)."""
        if self._admission.should_report(client.slot_id):
            self._audit(client.slot_id, {"kind": "dns", "verdict": "deny", "reason": verdict})
        reply = _header_reply(data, dns.rcode.REFUSED)
        if reply is not None:
            try:
                self._udp.sendto(reply, peer)
            except OSError:
                pass

    def _answer_udp(self, client: Client, data: bytes, peer: tuple[str, int]) -> None:
        try:
            reply = self.handle(data, peer[0], client=client)
        finally:
            self._admission.done(client.slot_id)
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
            client = self._lookup(peer[0])
            if client is None or not self._admission.open_tcp(client.slot_id):
                conn.close()
                continue
            try:
                self._tcp_workers.submit(self._answer_tcp, client, conn, peer)
            except RuntimeError:  # shutting down
                self._admission.close_tcp(client.slot_id)
                conn.close()
                return

    def _answer_tcp(self, client: Client, conn: socket.socket, peer: tuple[str, int]) -> None:
        try:
            with conn:
                deadline = time.monotonic() + self.timeout_s
                try:
                    header = _recv_exact(conn, 2, deadline)
                    data = _recv_exact(conn, struct.unpack("!H", header)[0], deadline)
                except (OSError, EOFError, TimeoutError):
                    return
                verdict = self._admission.admit(client.slot_id)
                if verdict != "ok":
                    if verdict != "queue_full" and self._admission.should_report(client.slot_id):
                        self._audit(client.slot_id, {"kind": "dns", "verdict": "deny",
                                                     "reason": verdict})
                    reply = _header_reply(data, dns.rcode.REFUSED)
                else:
                    try:
                        reply = self.handle(data, peer[0], tcp=True, client=client)
                    finally:
                        self._admission.done(client.slot_id)
                if reply is not None:
                    try:
                        conn.settimeout(self.timeout_s)
                        conn.sendall(struct.pack("!H", len(reply)) + reply)
                    except OSError:
                        pass
        finally:
            self._admission.close_tcp(client.slot_id)

    # -- one query ------------------------------------------------------------------------------

    def handle(self, data: bytes, peer_ip: str, *, tcp: bool = False,
               client: Client | None = None) -> bytes | None:
        """The answer to one query from ``peer_ip`` (None: not a sandbox, or not a query)."""
        client = client or self._lookup(peer_ip)
        if client is None:
            return None
        checked = _check_query(data)
        if isinstance(checked, tuple):
            rcode, why = checked
            self._audit(client.slot_id, {"kind": "dns", "verdict": "deny", "reason": why})
            return _header_reply(data, rcode)
        query = checked
        question = query.question[0]
        qname = question.name.to_text(omit_final_dot=True).lower()
        qtype = dns.rdatatype.to_text(question.rdtype)
        if question.rdtype in REFUSED_TYPES:
            self._audit(client.slot_id, {"kind": "dns", "verdict": "deny", "name": qname,
                                         "qtype": qtype, "reason": "query type not served"})
            return _rcode(query, dns.rcode.REFUSED)
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
        removed = self._drop_always_denied(response)
        ips = self._learn_answers(client, response, rules, qname)
        event: dict[str, Any] = {"kind": "dns", "verdict": "allow", "name": qname,
                                 "qtype": qtype, "answers": ips,
                                 "rcode": dns.rcode.to_text(response.rcode())}
        if removed:
            event["removed_always_denied"] = removed
        self._audit(client.slot_id, event)
        response.id = query.id
        return response.to_wire()

    def _drop_always_denied(self, response: dns.message.Message) -> list[str]:
        """Remove A/AAAA records in an always-denied range from every section of the answer
        (a name of the sandbox's choosing may point at the metadata service or the host)."""
        removed: list[str] = []
        for section in (response.answer, response.authority, response.additional):
            for rrset in list(section):
                if rrset.rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
                    continue
                keep = [rd for rd in rrset if not self._always_denied(str(rd.address))]
                if len(keep) == len(rrset):
                    continue
                removed += [str(rd.address) for rd in rrset if rd not in keep]
                position = section.index(rrset)
                section.remove(rrset)
                if keep:
                    section.insert(position,
                                   dns.rrset.from_rdata_list(rrset.name, rrset.ttl, keep))
        return removed

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
                if self._always_denied(address):
                    continue  # never learned (and already removed from the answer)
                for rule in rules:
                    self._learn(client.ifindex, address, rule.proto, rule.port,
                                ttl + self.grace_s, rule.pattern)
        return ips

    def addresses(self, name: str) -> set[str]:
        """The IPv4 addresses ``name`` has upstream now (for the egress proxy's check that a
        connection goes to the host its rules name); blocking."""
        response = self._forward(dns.message.make_query(name, dns.rdatatype.A), tcp=False)
        return {str(rdata.address) for rrset in response.answer if rrset.rdtype == dns.rdatatype.A
                for rdata in rrset}

    def _forward(self, query: dns.message.Message, *, tcp: bool) -> dns.message.Message:
        if not self.upstreams:
            raise OSError("no upstream DNS server configured")
        last: Exception | None = None
        for server in self.upstreams:
            try:  # UDP first whatever the guest used; TCP when the answer does not fit
                response = dns.query.udp(query, server, timeout=self.timeout_s,
                                         ignore_unexpected=True)
                if response.flags & dns.flags.TC:
                    return dns.query.tcp(query, server, timeout=self.timeout_s)
                return response
            except (OSError, dns.exception.DNSException) as exc:
                last = exc
        assert last is not None
        raise last


def _check_query(data: bytes) -> dns.message.Message | tuple[dns.rcode.Rcode, str]:
    """The guest's message rebuilt as a single-question standard query, or (rcode, why) to
    refuse it with."""
    if len(data) < HEADER.size:
        return dns.rcode.FORMERR, "malformed query"
    _id, flags, qdcount, ancount, nscount, _arcount = HEADER.unpack_from(data)
    if flags & FLAG_QR:
        return dns.rcode.FORMERR, "not a query"
    opcode = (flags >> 11) & 0xF
    if opcode != dns.opcode.QUERY:
        return dns.rcode.NOTIMP, f"opcode {dns.opcode.to_text(dns.opcode.Opcode(opcode))} not served"
    if qdcount != 1:
        return dns.rcode.FORMERR, f"{qdcount} questions (exactly one is served)"
    if ancount or nscount:
        return dns.rcode.FORMERR, "a query with answer or authority records"
    try:
        original = dns.message.from_wire(data)
    except dns.exception.DNSException:
        return dns.rcode.FORMERR, "malformed query"
    question = original.question[0]
    if question.rdclass != dns.rdataclass.IN:
        return dns.rcode.REFUSED, f"class {dns.rdataclass.to_text(question.rdclass)} not served"
    query = dns.message.make_query(question.name, question.rdtype, dns.rdataclass.IN,
                                   use_edns=0 if original.edns >= 0 else False,
                                   payload=1232)
    query.id = original.id
    query.flags = dns.flags.RD if original.flags & dns.flags.RD else 0
    return query


def _header_reply(data: bytes, rcode: dns.rcode.Rcode) -> bytes | None:
    """A bare reply (header only, no records) with ``rcode`` to whatever ``data`` was; None if it
    has no header or is itself a response."""
    if len(data) < HEADER.size:
        return None
    qid, flags = struct.unpack_from("!HH", data)
    if flags & FLAG_QR:
        return None
    flags = FLAG_QR | (flags & (0x7800 | FLAG_RD)) | int(rcode)
    return HEADER.pack(qid, flags, 0, 0, 0, 0)


def _rcode(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()


def _recv_exact(conn: socket.socket, size: int, deadline: float) -> bytes:
    """Exactly ``size`` bytes, all of them before ``deadline`` (monotonic): a peer that sends
    slowly does not extend it."""
    buf = b""
    while len(buf) < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        conn.settimeout(left)
        chunk = conn.recv(size - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return buf
