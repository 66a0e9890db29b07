"""The node's egress HTTP proxy: applies a sandbox's ``network.rules`` header transforms to its
HTTP and HTTPS requests, resolving ``${e2b.secrets.<name>}`` per request, so a secret's value never
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

HTTPS (``https_ports``, a second listener): the ClientHello is peeked, not consumed
(:mod:`.clienthello`). A server name that is a domain of the sandbox's rules, on a connection
to one of that name's addresses, is inspected: TLS ends here with a leaf of the node's egress
CA (:mod:`.egressca`; ALPN http/1.1 only), the request must name the same ``Host``, and it goes
through the same steps 1-3 above, upstream over TLS verified for that name (a failure: 502,
nothing sent). Any other connection (no TLS, no name, another name) is spliced byte for byte.

Each transform and each refusal is an audit event (``kind: http``) of the sandbox, with header
names only, never values.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import h11
import structlog
from cube_core import CubeError, HttpRule, SecretSource

from cube_net_ebpf import clienthello, headerrules
from cube_net_ebpf.egressca import EgressCa
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


@dataclass(frozen=True, slots=True)
class TlsInspection:
    """HTTPS to rule hosts (:mod:`.egressca`): the listener's port, the CA that signs the
    guest-facing certificates and the context that verifies the real servers'."""

    ca: EgressCa
    port: int
    upstream: ssl.SSLContext


def upstream_context(extra_ca_file: Path | None = None) -> ssl.SSLContext:
    """Verifies a rule host's real certificate: the host's trust store, plus ``extra_ca_file``."""
    ctx = ssl.create_default_context()
    if extra_ca_file is not None:
        ctx.load_verify_locations(cafile=str(extra_ca_file))
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]
"""Opens the connection to the original destination (plain TCP, or TLS for the server name)."""


class HttpProxy:
    def __init__(self, bind: str, port: int, lookup: Lookup, addresses: Addresses, audit: Audit,
                 limits: ProxyLimits | None = None, destination: Destination | None = None,
                 tls: TlsInspection | None = None) -> None:
        self.bind = bind
        self.port = port
        self.lookup = lookup
        self.addresses = addresses
        self.audit = audit
        self.limits = limits or ProxyLimits()
        self.destination = destination or original_destination
        """Where a redirected connection was going (tests give their own)."""
        self.tls = tls
        self.tls_port = tls.port if tls is not None else 0
        self.secrets: SecretSource | None = None
        self._server: asyncio.Server | None = None
        self._tls_sock: socket.socket | None = None
        self._tls_tasks: set[asyncio.Task[None]] = set()
        self._open: dict[str, int] = {}
        self._total = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, self.bind, self.port,
                                                  limit=self.limits.max_head)
        if not self.port:
            self.port = self._server.sockets[0].getsockname()[1]
        if self.tls is not None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.bind, self.tls.port))
                sock.listen(256)
                sock.setblocking(False)
            except OSError:
                sock.close()
                await self.close()
                raise
            self._tls_sock = sock
            self.tls_port = sock.getsockname()[1]
            self._spawn(self._accept_tls_forever(sock))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        for task in list(self._tls_tasks):
            task.cancel()
        if self._tls_sock is not None:
            self._tls_sock.close()
            self._tls_sock = None

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tls_tasks.add(task)
        task.add_done_callback(self._tls_tasks.discard)

    # -- admission (shared by both listeners) ----------------------------------------------------

    def _admit(self, peer: Any) -> ProxyClient | None:
        client = self.lookup(peer[0]) if peer else None
        if client is None or self._total >= self.limits.total \
                or self._open.get(client.slot_id, 0) >= self.limits.per_sandbox:
            return None
        self._total += 1
        self._open[client.slot_id] = self._open.get(client.slot_id, 0) + 1
        return client

    def _leave(self, client: ProxyClient) -> None:
        self._total -= 1
        self._open[client.slot_id] -= 1
        if not self._open[client.slot_id]:
            del self._open[client.slot_id]

    # -- plain HTTP ------------------------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        client = self._admit(writer.get_extra_info("peername"))
        if client is None:
            writer.close()
            return
        try:
            dst = self.destination(writer.get_extra_info("socket"))
            await self._serve(client, reader, writer, dst, self._plain(dst), default_host=dst[0])
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            log.debug("egress proxy connection ended", error=repr(exc))
        finally:
            self._leave(client)
            writer.close()

    def _plain(self, dst: tuple[str, int]) -> Connect:
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.wait_for(asyncio.open_connection(*dst), self.limits.connect_timeout_s)
        return connect

    # -- HTTPS -----------------------------------------------------------------------------------

    async def _accept_tls_forever(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(sock)
            except OSError as exc:
                if sock.fileno() < 0:
                    return
                log.warning("egress proxy: accept failed", error=repr(exc))
                await asyncio.sleep(0.1)
                continue
            conn.setblocking(False)
            self._spawn(self._accept_tls(conn, peer))

    async def _accept_tls(self, conn: socket.socket, peer: Any) -> None:
        """A connection to an HTTPS port: peek its ClientHello; a server name of one of the
        sandbox's domain rules is inspected (TLS ends here with a leaf of the node CA, and the
        requests go through :meth:`_serve` to the real server over verified TLS); anything else
        (no TLS, no or another name) is spliced to the destination byte for byte."""
        assert self.tls is not None
        client = self._admit(peer)
        if client is None:
            conn.close()
            return
        writer: asyncio.StreamWriter | None = None
        try:
            dst = self.destination(conn)
            name = await self._peek_server_name(conn)
            if name is None or not any(headerrules.host_matches(d, name)
                                       for d in headerrules.domains_of(client.rules)):
                reader, writer = await asyncio.open_connection(sock=conn)
                await self._passthrough(reader, writer, self._plain(dst), b"")
                return
            reader, writer = await self._tls_server(conn, name, client, dst)
            try:
                await self._check_address(name, dst)
            except Refused as refused:
                self._event(client, "deny", name, dst, reason=refused.reason)
                await self._reply(writer, refused.status, refused.reason)
                return
            await self._serve(client, reader, writer, dst, self._tls_upstream(dst, name),
                              default_host=name, server_name=name)
        except (OSError, TimeoutError, h11.ProtocolError) as exc:
            log.debug("egress proxy TLS connection ended", error=repr(exc))
        finally:
            self._leave(client)
            if writer is not None:
                writer.close()
            else:
                conn.close()

    async def _peek_server_name(self, conn: socket.socket) -> str | None:
        """The ClientHello's server name, read without consuming a byte (``MSG_PEEK``), within
        ``head_timeout_s``; ``None`` for no name, not TLS, or nothing sent in time (a protocol
        where the server speaks first)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.head_timeout_s
        seen = -1
        while True:
            try:
                data = conn.recv(clienthello.MAX_HELLO + 64, socket.MSG_PEEK)
            except BlockingIOError:
                data = None
            if data is not None:
                if not data:
                    return None
                try:
                    hello = clienthello.parse(data)
                except clienthello.NotTls:
                    return None
                if hello is not None:
                    return hello.server_name
            left = deadline - loop.time()
            if left <= 0:
                return None
            if data is not None and len(data) == seen:
                await asyncio.sleep(min(0.01, left))  # part of a hello is queued: readable stays true
                continue
            seen = len(data) if data is not None else seen
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(conn.fileno(), _wake, ready)
            try:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready, left)
            finally:
                loop.remove_reader(conn.fileno())

    async def _tls_server(self, conn: socket.socket, name: str, client: ProxyClient,
                          dst: tuple[str, int]) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        assert self.tls is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=self.limits.max_head, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol, conn, ssl=self.tls.ca.server_context(name),
                ssl_handshake_timeout=self.limits.head_timeout_s)
        except (ssl.SSLError, ConnectionError, TimeoutError) as exc:
            self._event(client, "deny", name, dst, reason=f"TLS handshake with the sandbox failed "
                                                           f"(does it trust the node's egress CA?): {exc}")
            raise
        return reader, asyncio.StreamWriter(transport, protocol, reader, loop)

    def _tls_upstream(self, dst: tuple[str, int], name: str) -> Connect:
        assert self.tls is not None
        context = self.tls.upstream

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(*dst, ssl=context, server_hostname=name,
                                            ssl_handshake_timeout=self.limits.connect_timeout_s),
                    self.limits.connect_timeout_s)
            except ssl.SSLCertVerificationError as exc:
                raise Refused(502, f"the certificate of {name} at {dst[0]}:{dst[1]} did not verify "
                                   f"({exc.verify_message}); the request was not sent") from exc
            except ssl.SSLError as exc:
                raise Refused(502, f"TLS with {name} at {dst[0]}:{dst[1]} failed ({exc.reason}); "
                                   "the request was not sent") from exc
        return connect

    # -- the request path both share -------------------------------------------------------------

    async def _serve(self, client: ProxyClient, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, dst: tuple[str, int], connect: Connect, *,
                     default_host: str, server_name: str | None = None) -> None:
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
        if server_name is not None and host not in ("", server_name):
            reason = f"Host {host!r} is not the TLS server name {server_name!r}"
            self._event(client, "deny", host, dst, reason=reason)
            await self._reply(writer, 421, reason)
            return
        host = host or (server_name or "")
        rules = headerrules.matching(client.rules, host, dst[0])
        if not rules:
            await self._passthrough(reader, writer, connect, bytes(raw))
            return
        try:
            extra = await self._transform(client, rules, host, dst)
            up_reader, up_writer = await connect()
        except Refused as refused:
            self._event(client, "deny", host, dst, reason=refused.reason)
            await self._reply(writer, refused.status, refused.reason)
            return
        self._event(client, "transform", host, dst, headers=sorted(extra))
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers.raw_items()
                   if k.lower().decode("latin-1") not in DROPPED]
        if not any(k.lower() == "host" for k, _ in headers):
            headers.append(("Host", default_host))
        headers = headerrules.apply(headers, extra) + [("Connection", "close")]
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

    async def _check_address(self, host: str, dst: tuple[str, int]) -> None:
        """Refuse unless ``dst`` is one of the addresses ``host`` resolves to now."""
        try:
            known = await self.addresses(host)
        except (OSError, CubeError) as exc:
            raise Refused(502, f"could not resolve {host} to check the destination: {exc}") from exc
        if dst[0] not in known:
            raise Refused(421, f"{dst[0]} is not an address of {host}: the network rules of "
                               f"{host} apply only to connections to its own addresses")

    async def _transform(self, client: ProxyClient, rules: list[HttpRule], host: str,
                         dst: tuple[str, int]) -> dict[str, str]:
        if headerrules.domains_of(rules):
            await self._check_address(host, dst)
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
                           connect: Connect, head: bytes) -> None:
        up_reader, up_writer = await connect()
        try:
            if head:
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


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


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
