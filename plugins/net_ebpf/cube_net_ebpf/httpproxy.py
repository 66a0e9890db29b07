"""The node's egress HTTP proxy: applies a sandbox's ``network.rules`` header transforms to its
plain-HTTP requests, resolving ``${e2b.secrets.<name>}`` per request, so a secret's value never
enters the guest.

How traffic gets here (:mod:`.nat`): the host table DNATs TCP to ``http_ports`` from the
sandboxes that have rules (their namespace addresses are in the set ``http_rule_slots``) to
this proxy on the resolver address. The eBPF filter on the slot's host link has already judged
the connection's original destination by then, so the proxy is only ever reached for a
destination the sandbox's egress policy allows; it connects to that same original destination
(``SO_ORIGINAL_DST``), never to one the guest names in a header. The sandbox is known by the
connection's source address (its namespace address, after the slot's masquerade).

Per connection (the guest is hostile; every step has a bound):

1. the request head is read with h11, at most ``max_head`` bytes within ``head_timeout_s``;
   garbage or an oversized head gets a 400 and the connection ends;
2. no rule matches (:mod:`.headerrules`): the bytes read so far go to the original
   destination unchanged and both directions are spliced (idle timeout ``idle_s``), so
   anything else on the port (keep-alive, websockets) works as without the proxy;
3. a rule matches: for a domain rule the original destination must be one of the addresses
   the ``Host`` resolves to (else 421: the headers of ``api.example.com`` never go to an
   address the guest chose); the placeholders are resolved through the node's secret source
   (a secret that does not resolve: 502 with the reason, and nothing is sent upstream); the
   request goes upstream with the rules' headers replacing the guest's, ``Connection: close``
   and its body re-framed by h11; the answer is relayed as it comes, and the connection ends
   after it (one request per connection).

Each transform and each refusal is an audit event (``kind: http``) of the sandbox, with header
names only, never values.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import h11
import structlog
from cube_core import CubeError, HttpRule, SecretSource

from cube_net_ebpf import headerrules
from cube_net_ebpf.headerrules import UnresolvedSecret

log = structlog.get_logger(__name__)

SO_ORIGINAL_DST = 80
DROPPED = frozenset({"connection", "keep-alive", "proxy-connection", "upgrade", "expect", "te"})
"""Headers of the guest's request that are not forwarded when the proxy rewrites it."""


@dataclass(frozen=True, slots=True)
class ProxyClient:
    slot_id: str
    rules: tuple[HttpRule, ...]


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    max_head: int = 16 * 1024
    head_timeout_s: float = 10.0
    connect_timeout_s: float = 10.0
    idle_s: float = 60.0
    per_sandbox: int = 32
    total: int = 1024


Lookup = Callable[[str], ProxyClient | None]
Destination = Callable[[socket.socket], tuple[str, int]]
Addresses = Callable[[str], Awaitable[set[str]]]
Audit = Callable[[str, dict[str, Any]], None]


class Refused(Exception):  # noqa: N818
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def original_destination(sock: socket.socket) -> tuple[str, int]:
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class HttpProxy:
    def __init__(self, bind: str, port: int, lookup: Lookup, addresses: Addresses, audit: Audit,
                 limits: ProxyLimits | None = None, destination: Destination | None = None) -> None:
        self.bind = bind
        self.port = port
        self.lookup = lookup
        self.addresses = addresses
        self.audit = audit
        self.limits = limits or ProxyLimits()
        self.destination = destination or original_destination
        """Where a redirected connection was going (tests give their own)."""
        self.secrets: SecretSource | None = None
        self._server: asyncio.Server | None = None
        self._open: dict[str, int] = {}
        self._total = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.bind, self.port,
                                                  limit=self.limits.max_head)
        if not self.port:
            self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("socket")
        client = self.lookup(peer[0]) if peer else None
        try:
            if client is None or self._total >= self.limits.total \
                    or self._open.get(client.slot_id, 0) >= self.limits.per_sandbox:
                return
            dst = self.destination(sock)
            self._total += 1
            self._open[client.slot_id] = self._open.get(client.slot_id, 0) + 1
            try:
                await self._serve(client, reader, writer, dst)
            finally:
                self._total -= 1
                self._open[client.slot_id] -= 1
                if not self._open[client.slot_id]:
                    del self._open[client.slot_id]
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            log.debug("egress proxy connection ended", error=repr(exc))
        finally:
            writer.close()

    async def _serve(self, client: ProxyClient, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, dst: tuple[str, int]) -> None:
        guest = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head)
        raw = bytearray()
        deadline = time.monotonic() + self.limits.head_timeout_s
        try:
            while True:
                event = guest.next_event()
                if event is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), max(deadline - time.monotonic(), 0))
                    raw += data
                    guest.receive_data(data)
                    continue
                break
        except h11.RemoteProtocolError as exc:
            await self._reply(writer, 400, f"not an HTTP request this proxy accepts: {exc}")
            return
        if not isinstance(event, h11.Request):
            return
        if len(raw) - len(guest.trailing_data[0]) > self.limits.max_head:
            await self._reply(writer, 400, f"the request head is over {self.limits.max_head} bytes")
            return
        host = headerrules.request_host(_header(event, b"host"))
        rules = headerrules.matching(client.rules, host, dst[0])
        if not rules:
            await self._passthrough(reader, writer, dst, bytes(raw))
            return
        try:
            extra = await self._transform(client, rules, host, dst)
        except Refused as refused:
            self._event(client, "deny", host, dst, reason=refused.reason)
            await self._reply(writer, refused.status, refused.reason)
            return
        self._event(client, "transform", host, dst, headers=sorted(extra))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()
                   if k.lower().decode("latin-1") not in DROPPED]
        if not any(k.lower() == "host" for k, _ in headers):
            headers.append(("Host", dst[0]))
        headers = headerrules.apply(headers, extra) + [("Connection", "close")]
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*dst),
                                                      self.limits.connect_timeout_s)
        try:
            upstream = h11.Connection(h11.CLIENT)
            up_writer.write(upstream.send(h11.Request(method=event.method, target=event.target,
                                                      headers=headers)) or b"")
            if guest.they_are_waiting_for_100_continue:
                writer.write(guest.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
            while True:
                part = guest.next_event()
                if part is h11.NEED_DATA:
                    data = await asyncio.wait_for(reader.read(65536), self.limits.idle_s)
                    guest.receive_data(data)
                elif isinstance(part, h11.Data):
                    up_writer.write(upstream.send(h11.Data(data=part.data)) or b"")
                    await up_writer.drain()
                elif isinstance(part, h11.EndOfMessage):
                    up_writer.write(upstream.send(h11.EndOfMessage()) or b"")
                    await up_writer.drain()
                    break
                else:
                    return
            await _pipe(up_reader, writer, self.limits.idle_s)
        finally:
            up_writer.close()

    async def _transform(self, client: ProxyClient, rules: list[HttpRule], host: str,
                         dst: tuple[str, int]) -> dict[str, str]:
        if headerrules.domains_of(rules):
            try:
                known = await self.addresses(host)
            except (OSError, CubeError) as exc:
                raise Refused(502, f"could not resolve {host} to check the destination: {exc}") from exc
            if dst[0] not in known:
                raise Refused(421, f"{dst[0]} is not an address of {host}: the network rules of "
                                   f"{host} apply only to connections to its own addresses")
        source = self.secrets

        async def resolve(name: str) -> str:
            if source is None:
                raise UnresolvedSecret(name, "secrets cannot be read on this node")
            try:
                return await source(client.slot_id, name)
            except CubeError as exc:
                raise UnresolvedSecret(name, str(exc)) from exc

        try:
            return await headerrules.resolve_headers(rules, resolve)
        except UnresolvedSecret as exc:
            raise Refused(502, f"network rule for {host}: {exc}; the request was not sent") from exc

    async def _passthrough(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           dst: tuple[str, int], head: bytes) -> None:
        up_reader, up_writer = await asyncio.wait_for(asyncio.open_connection(*dst),
                                                      self.limits.connect_timeout_s)
        try:
            up_writer.write(head)
            await up_writer.drain()
            await asyncio.gather(_pipe(reader, up_writer, self.limits.idle_s),
                                 _pipe(up_reader, writer, self.limits.idle_s))
        finally:
            up_writer.close()

    def _event(self, client: ProxyClient, verdict: str, host: str, dst: tuple[str, int],
               **fields: Any) -> None:
        self.audit(client.slot_id, {"kind": "http", "ts": datetime.now(UTC).isoformat(timespec="milliseconds"),
                                    "verdict": verdict, "host": host, "dst": dst[0], "port": dst[1],
                                    **fields})

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, status: int, message: str) -> None:
        body = f"cube egress proxy: {message}\n".encode()
        reason = {400: "Bad Request", 421: "Misdirected Request", 502: "Bad Gateway"}.get(status, "Error")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body)
        with contextlib.suppress(OSError):
            await writer.drain()


def _header(request: h11.Request, name: bytes) -> str | None:
    for key, value in request.headers:
        if key == name:
            return str(value.decode("latin-1"))
    return None


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, idle_s: float) -> None:
    try:
        while True:
            data = await asyncio.wait_for(src.read(65536), idle_s)
            if not data:
                break
            dst.write(data)
            await dst.drain()
    except (OSError, TimeoutError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if dst.can_write_eof():
                dst.write_eof()
