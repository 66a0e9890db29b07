"""The edge proxy: sandbox traffic to ``service.endpoint(sandbox_id, port)``, before any routing.

:class:`EdgeProxyMiddleware` is a pure ASGI middleware around the whole app. A request is sandbox
traffic when it carries **both** ``E2b-Sandbox-Id`` and ``E2b-Sandbox-Port`` (single-URL mode, and
every SDK request in domain mode too), or when its ``Host`` is ``<port>-<sandboxID>.<domain>``
(domain mode, E2B_PROTOCOL.md §4.1-§4.2). Everything else goes to the app (the control plane).

* HTTP/1.1 or HTTP/2 in, HTTP/1.1 to the sandbox; request and response bodies are streamed chunk by
  chunk, never buffered whole, and the response is flushed as it arrives.
* WebSockets are relayed message by message to ``ws://<sandbox>:<port>``.
* ``service.endpoint`` names the hop (:class:`~cube_core.nodeclient.Endpoint`): the guest itself
  (``via`` None, ``cube serve``), or the edge of the node agent that runs it (``via``: its base URL),
  to which the request goes unchanged plus the endpoint's headers (cluster token, sandbox id and
  port). That node runs :class:`cube_api_e2b.nodeedge.NodeEdge`, which forwards to its guest through
  the same :class:`Forwarder`. A node that cannot be reached is a 502 "The sandbox could not be
  reached: its node is unavailable" (not "not found": the sandbox may be fine).
* A paused sandbox created with auto-resume is resumed for the request (after the access checks
  below): the first requests wait for one resume (``service.wake``), then go. Without auto-resume a
  paused sandbox is 502 "... was not found", as E2B's edge answers (docs/lifecycle.md).
* Errors use the texts the SDK matches (§4.4): 502 "... was not found", 502 "... port is not open".
* Access control (§4.3): on non-envd ports a sandbox with a traffic token requires
  ``E2B-Traffic-Access-Token``; on the envd port a secured sandbox requires ``X-Access-Token`` except
  where envd itself allows otherwise (``GET /health``, signed ``/files``); control-plane-only envd
  routes (``/init``) are refused.
* The client's credentials for Cube never reach a guest: ``X-API-Key``, ``Cookie`` and
  ``Authorization`` are removed (on the envd port only the SDK's user selector
  ``Authorization: Basic base64("<user>:")``, which carries no secret, is passed on). Nor do the
  cluster hop's headers (``x-cube-cluster-token`` ...): stripped from whatever a client sends.
* When a sandbox stops, its connections are closed (requests still open fail, as upstream); a Connect
  stream still open ends with an ``unavailable`` end-of-stream error (as E2B's edge ends it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from http.cookiejar import CookieJar, DefaultCookiePolicy
from typing import Any

import httpx
import structlog
from cube_core import CubeError, Sandbox, SandboxState
from cube_core.nodeclient import Endpoint
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from cube_api_e2b.auth import ACCESS_TOKEN_HEADER, TRAFFIC_TOKEN_HEADER
from cube_api_e2b.config import E2bConfig
from cube_api_e2b.connect_stream import EnvelopeTracker, end_of_stream_error, is_connect_stream
from cube_api_e2b.context import E2bContext, split_host_port
from cube_api_e2b.errors import (
    NODE_UNREACHABLE,
    PORT_NOT_OPEN,
    SANDBOX_NOT_FOUND,
    SANDBOX_UNREACHABLE,
    edge_error_body,
    edge_error_for,
)
from cube_api_e2b.metrics import ApiMetrics
from cube_api_e2b.outbound import tls_context

log = structlog.get_logger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

SANDBOX_ID_HEADER = b"e2b-sandbox-id"
SANDBOX_PORT_HEADER = b"e2b-sandbox-port"
SANDBOX_ID_RE = re.compile(r"^[a-z0-9]+$")
PORT_RE = re.compile(r"^[0-9]{1,5}$")  # ASCII only: str.isdigit() also accepts '²', which int() refuses
#: Request headers that carry the client's Cube credentials (API key, browser session): never forwarded.
CREDENTIALS = frozenset({"x-api-key", "authorization", "cookie"})
#: Headers of the master -> node hop (``cube_core.nodeclient.Endpoint.headers``): dropped from every
#: request (a client cannot inject them; the cluster token never reaches a guest) before a hop adds its own.
CLUSTER_TOKEN_HEADER = "x-cube-cluster-token"
NODE_SANDBOX_ID_HEADER = "x-cube-sandbox-id"
NODE_SANDBOX_PORT_HEADER = "x-cube-sandbox-port"
CLUSTER_HEADERS = frozenset({CLUSTER_TOKEN_HEADER, NODE_SANDBOX_ID_HEADER, NODE_SANDBOX_PORT_HEADER})
FORWARDED = ("x-forwarded-for", "x-forwarded-proto", "x-forwarded-host")
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection", "te",
    "trailer", "transfer-encoding", "upgrade", "http2-settings",
})
WS_HANDSHAKE = frozenset({
    "host", "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions", "sec-websocket-protocol",
    "sec-websocket-accept", "content-length",
})
RESPONSE_DROP = HOP_BY_HOP | {"date", "server"}
ENVD_OPEN = (("GET", "/health"),)
WS_MAX_MESSAGE_BYTES = 16 << 20  # a guest's websocket message above this closes the socket (1009)
ENVD_SIGNABLE = ("/files",)


#: A ``/files`` URL (``download_url()``/``upload_url()``) that names no sandbox: single-URL mode.
BARE_FILES_URL = (
    "this /files URL names no sandbox: in single-URL mode (E2B_SANDBOX_URL) send it with the "
    "E2b-Sandbox-Id and E2b-Sandbox-Port: 49983 headers, or use domain mode (E2B_DOMAIN), whose "
    "signed URLs work as they are")


class EdgeRequestError(Exception):
    """A request addressed to a sandbox that cannot be routed as given (answered 400)."""


@dataclass(frozen=True)
class Target:
    sandbox_id: str
    port: int


def parse_port(raw: str) -> int:
    if not PORT_RE.match(raw) or not 0 < int(raw) < 65536:
        raise EdgeRequestError(f"invalid sandbox port {raw[:16]!r}: expected 1-65535")
    return int(raw)


def is_user_selector(value: str) -> bool:
    """``Basic base64("<user>:")`` with an empty password: how the SDK tells envd which user acts."""
    scheme, _, encoded = value.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return False
    try:
        user, sep, password = base64.b64decode(encoded.strip(), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    return bool(sep and user and not password)


def target_of(headers: list[tuple[bytes, bytes]], domain_host: str | None) -> Target | None:
    """Where a request goes, or None when it is control-plane traffic.

    The E2B headers win when present (a self-hosted edge may prefer them, §4.2); otherwise the Host
    label ``<port>-<sandboxID>`` under the configured domain.
    """
    sandbox_id = port = host = None
    for name, value in headers:
        if name == SANDBOX_ID_HEADER:
            sandbox_id = value.decode("latin-1").strip()
        elif name == SANDBOX_PORT_HEADER:
            port = value.decode("latin-1").strip()
        elif name == b"host" and host is None:
            host = value.decode("latin-1")
    if sandbox_id is not None or port is not None:
        if not sandbox_id or not port:
            raise EdgeRequestError("both E2b-Sandbox-Id and E2b-Sandbox-Port are required")
        return Target(sandbox_id, parse_port(port))
    if domain_host and host:
        name_only = split_host_port(host)[0]
        suffix = "." + domain_host
        if name_only.endswith(suffix):
            label = name_only[: -len(suffix)]
            if "." not in label and "-" in label:
                raw_port, _, sandbox = label.partition("-")
                if PORT_RE.match(raw_port) and SANDBOX_ID_RE.match(sandbox):
                    return Target(sandbox, parse_port(raw_port))
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return str(value.decode("latin-1"))
    return None


def forwarded_headers(scope: Scope, drop: frozenset[str] = HOP_BY_HOP, *,
                      envd: bool = False, relay: bool = False) -> list[tuple[bytes, bytes]]:
    """The client's headers minus hop-by-hop ones, Cube credentials and the cluster hop's headers,
    plus X-Forwarded-*; ``Host`` is kept. ``envd``: the envd port, where the SDK's user selector is
    kept. ``relay``: the client is a master's edge (node side), whose X-Forwarded-* are passed on as
    they are (the guest sees the real client, not the master)."""
    connection_tokens = {t.strip().lower() for t in (_header(scope, b"connection") or "").split(",") if t.strip()}
    out: list[tuple[bytes, bytes]] = []
    has_host = False
    for key, value in scope.get("headers", []):
        name = key.decode("latin-1").lower()
        if name in drop or name in connection_tokens or name.startswith(":") or name in CLUSTER_HEADERS:
            continue
        if name in CREDENTIALS and not (envd and name == "authorization"
                                        and is_user_selector(value.decode("latin-1"))):
            continue
        if name == "host":
            has_host = True
        if name in FORWARDED and not relay:
            continue
        out.append((key, value))
    if relay:
        return out
    client = scope.get("client")
    prior = _header(scope, b"x-forwarded-for")
    if client:
        out.append((b"x-forwarded-for", (f"{prior}, {client[0]}" if prior else str(client[0])).encode()))
    scheme = str(scope.get("scheme", "http")).replace("ws", "http", 1)
    out.append((b"x-forwarded-proto", scheme.encode()))
    host = _header(scope, b"host")
    if host:
        out.append((b"x-forwarded-host", host.encode("latin-1")))
    elif not has_host and scope.get("server"):
        server_host, server_port = scope["server"]
        out.append((b"host", f"{server_host}:{server_port}".encode()))
    return out


async def send_edge_error(send: Send, status: int, message: str, sandbox_id: str | None = None) -> None:
    body = edge_error_body(status, message, sandbox_id)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def endpoint_url(endpoint: Endpoint, raw_path: bytes, query: bytes = b"", *, websocket: bool = False) -> httpx.URL:
    """The URL of one request to ``endpoint``: the guest's ``host:port`` itself, or (``via`` set) the
    node agent's base URL, with the request's raw path and query appended unchanged."""
    target = raw_path + (b"?" + query if query else b"")
    if endpoint.via is None:
        url = httpx.URL(scheme="http", host=endpoint.host, port=endpoint.port, raw_path=target)
    else:
        base = httpx.URL(endpoint.via)
        url = base.copy_with(raw_path=base.raw_path.rstrip(b"/") + target)
    if websocket:
        url = url.copy_with(scheme="wss" if url.scheme == "https" else "ws")
    return url


def endpoint_headers(endpoint: Endpoint) -> list[tuple[bytes, bytes]]:
    """The headers the hop to ``endpoint`` adds (cluster token, sandbox id and port for a node)."""
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in endpoint.headers]


async def deny_websocket(scope: Scope, send: Send, status: int, message: str, sandbox_id: str | None) -> None:
    if "websocket.http.response" in scope.get("extensions", {}):
        body = edge_error_body(status, message, sandbox_id)
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
    else:
        await send({"type": "websocket.close", "code": 1011 if status >= 500 else 1008, "reason": message[:120]})


def _refusal_message(exc: InvalidStatus, via: bool) -> str:
    """What to tell the client when the websocket handshake was answered with an HTTP error: a
    node's own edge answer (JSON ``message``) is passed on; a guest's answer is not read."""
    status = exc.response.status_code
    if via:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            message = json.loads(exc.response.body or b"")["message"]
            if isinstance(message, str) and message:
                return message
    return f"the sandbox refused the websocket ({status})"


def _unreachable(endpoint: Endpoint) -> str:
    """The answer when nothing listens at ``endpoint``: the guest's port is not open, or (via a
    node) the node agent is down, which says nothing about the sandbox's port."""
    return PORT_NOT_OPEN if endpoint.via is None else NODE_UNREACHABLE


class Forwarder:
    """The one forwarding path of sandbox traffic (HTTP, streamed both ways, and websockets) to an
    :class:`~cube_core.nodeclient.Endpoint`: used by the edge proxy of the control plane, and by the
    node edge that a ``cube node`` runs for its guests. Keeps one HTTP connection pool per sandbox."""

    def __init__(self, config: E2bConfig, metrics: ApiMetrics) -> None:
        self.config = config
        self.metrics = metrics
        self._clients: dict[str, httpx.AsyncClient] = {}
        self._websockets: dict[str, set[ClientConnection]] = {}

    # -- life cycle ------------------------------------------------------------------------------

    def _client(self, sandbox_id: str) -> httpx.AsyncClient:
        client = self._clients.get(sandbox_id)
        if client is None:
            cfg = self.config
            client = httpx.AsyncClient(
                timeout=httpx.Timeout(cfg.proxy_idle_timeout_s, connect=cfg.proxy_connect_timeout_s),
                limits=httpx.Limits(max_connections=cfg.proxy_max_connections, max_keepalive_connections=20),
                cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),  # never keep cookies
                follow_redirects=False, trust_env=False, verify=tls_context())
            self._clients[sandbox_id] = client
        return client

    async def forget(self, sandbox_id: str) -> None:
        """The sandbox is gone: close its websockets and its connection pool.

        Closing the pool breaks the requests still in flight, which then end with an error (an
        aborted connection, or a 502 if no answer had started) instead of hanging or looking complete.
        """
        for ws in self._websockets.pop(sandbox_id, set()):
            with contextlib.suppress(Exception):
                await ws.close(code=1012, reason="sandbox stopped")
        client = self._clients.pop(sandbox_id, None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def aclose(self) -> None:
        for sandbox_id in list({*self._clients, *self._websockets}):
            await self.forget(sandbox_id)

    # -- HTTP ------------------------------------------------------------------------------------

    async def http(self, target: Target, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send, *,
                   relay: bool = False) -> None:
        """Forward one HTTP request to ``endpoint`` and stream the answer back.

        ``relay``: the request comes from a master's edge (node side), whose ``X-Forwarded-*`` are kept."""
        metrics = self.metrics.edge_requests
        raw_path = scope.get("raw_path") or str(scope.get("path", "/")).encode()
        url = endpoint_url(endpoint, raw_path, scope.get("query_string") or b"")
        headers = forwarded_headers(scope, envd=target.port == self.config.envd_port, relay=relay)
        headers += endpoint_headers(endpoint)
        length = _header(scope, b"content-length")
        chunked = "chunked" in (_header(scope, b"transfer-encoding") or "").lower()
        # HTTP/2 bodies come without Content-Length or chunked framing: treat them as streamed
        # unless the method carries no body.
        h2_body = scope.get("http_version") == "2" and str(scope.get("method")) not in ("GET", "HEAD", "OPTIONS")
        has_body = chunked or (length is not None and length != "0") or (length is None and h2_body)
        body_done = asyncio.Event()

        async def request_body() -> AsyncIterator[bytes]:
            try:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ConnectionAbortedError("client went away while sending the body")
                    chunk = message.get("body", b"")
                    if chunk:
                        yield chunk
                    if not message.get("more_body", False):
                        return
            finally:
                body_done.set()

        content: Any = request_body() if has_body else (b"" if length == "0" else None)
        if not has_body:
            body_done.set()
        request = httpx.Request(str(scope.get("method", "GET")), url, headers=headers, content=content)
        client = self._client(target.sandbox_id)
        try:
            response = await client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout):
            metrics.labels("http", "port_not_open" if endpoint.via is None else "node_unreachable").inc()
            await send_edge_error(send, 502, _unreachable(endpoint), target.sandbox_id)
            return
        except httpx.HTTPError as exc:
            metrics.labels("http", "unreachable").inc()
            log.info("edge: upstream failed", sandbox_id=target.sandbox_id, port=target.port, via=endpoint.via,
                     error=repr(exc))
            await send_edge_error(send, 502, f"{SANDBOX_UNREACHABLE}: {type(exc).__name__}", target.sandbox_id)
            return
        try:
            out_headers = [(k, v) for k, v in response.headers.raw if k.decode("latin-1").lower() not in RESPONSE_DROP]
            await send({"type": "http.response.start", "status": response.status_code, "headers": out_headers})
            metrics.labels("http", "forwarded").inc()
            await self._pump_response(response, receive, send, body_done, target.sandbox_id)
        finally:
            await response.aclose()

    async def _pump_response(self, response: httpx.Response, receive: Receive, send: Send,
                             body_done: asyncio.Event, sandbox_id: str) -> None:
        """Copy the body as it arrives; stop early (and close upstream) if the client goes away.

        A Connect stream the sandbox leaves unfinished (it stopped) ends with an ``unavailable``
        end-of-stream error, as E2B's edge ends it; any other body is aborted.
        """

        client_failed = False
        envelopes = EnvelopeTracker() if is_connect_stream(response.headers.get("content-type")) else None

        async def end_connect_stream() -> bool:
            if envelopes is None or envelopes.ended or not envelopes.at_boundary:
                return False
            message = f"the connection to sandbox {sandbox_id} ended before the stream completed"
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": end_of_stream_error("unavailable", message),
                            "more_body": False})
            return True

        async def to_client(message: Message) -> None:
            nonlocal client_failed
            try:
                await send(message)
            except OSError:  # the client went away (uvicorn: ClientDisconnected)
                client_failed = True
                raise

        async def pump() -> None:
            async for chunk in response.aiter_raw():
                if chunk:
                    if envelopes is not None:
                        envelopes.feed(chunk)
                    await to_client({"type": "http.response.body", "body": chunk, "more_body": True})
            await to_client({"type": "http.response.body", "body": b"", "more_body": False})

        async def client_gone() -> None:
            await body_done.wait()
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return

        if response.headers.get("content-length") is not None:
            # a bounded body ends by itself: copy it inline (cheaper than two tasks per request)
            try:
                await pump()
            except Exception as exc:
                if client_failed or await end_connect_stream():
                    return
                raise ConnectionAbortedError(f"upstream stream failed: {exc!r}") from exc
            return
        pump_task = asyncio.ensure_future(pump())
        gone_task = asyncio.ensure_future(client_gone())
        try:
            done, _ = await asyncio.wait({pump_task, gone_task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (pump_task, gone_task):
                if not t.done():
                    t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await gone_task
        if pump_task in done:
            failure = pump_task.exception()
            if failure is not None and not client_failed and not await end_connect_stream():
                # upstream broke mid-body: abort the client connection rather than end the body cleanly
                raise ConnectionAbortedError(f"upstream stream failed: {failure!r}") from failure
        else:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pump_task

    # -- WebSocket -------------------------------------------------------------------------------

    async def websocket(self, target: Target, endpoint: Endpoint, scope: Scope, receive: Receive, send: Send, *,
                        relay: bool = False) -> None:
        """Relay one websocket to ``endpoint``; the client's ``websocket.connect`` was received already."""
        metrics = self.metrics.edge_requests
        raw_path = scope.get("raw_path") or str(scope.get("path", "/")).encode()
        uri = str(endpoint_url(endpoint, raw_path, scope.get("query_string") or b"", websocket=True))
        headers = [(k.decode("latin-1"), v.decode("latin-1"))
                   for k, v in forwarded_headers(scope, HOP_BY_HOP | WS_HANDSHAKE,
                                                 envd=target.port == self.config.envd_port, relay=relay)
                   + endpoint_headers(endpoint)]
        subprotocols: Any = list(scope.get("subprotocols") or []) or None
        try:
            upstream = await ws_connect(
                uri, additional_headers=headers, subprotocols=subprotocols, compression=None,
                open_timeout=self.config.proxy_connect_timeout_s, ping_interval=None,
                max_size=WS_MAX_MESSAGE_BYTES, max_queue=4, user_agent_header=None)
        except (OSError, TimeoutError):
            metrics.labels("websocket", "port_not_open" if endpoint.via is None else "node_unreachable").inc()
            await deny_websocket(scope, send, 502, _unreachable(endpoint), target.sandbox_id)
            return
        except InvalidStatus as exc:
            metrics.labels("websocket", "refused").inc()
            await deny_websocket(scope, send, exc.response.status_code,
                                  _refusal_message(exc, endpoint.via is not None), target.sandbox_id)
            return
        except InvalidHandshake as exc:
            metrics.labels("websocket", "unreachable").inc()
            await deny_websocket(scope, send, 502, f"{SANDBOX_UNREACHABLE}: {exc}", target.sandbox_id)
            return
        self._websockets.setdefault(target.sandbox_id, set()).add(upstream)
        metrics.labels("websocket", "forwarded").inc()
        try:
            await send({"type": "websocket.accept", "subprotocol": upstream.subprotocol})
            await self._relay(upstream, receive, send)
        finally:
            self._websockets.get(target.sandbox_id, set()).discard(upstream)
            await upstream.close()

    async def _relay(self, upstream: ClientConnection, receive: Receive, send: Send) -> None:
        async def client_to_sandbox() -> None:
            while True:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    await upstream.close(code=int(message.get("code", 1000)))
                    return
                if message.get("bytes") is not None:
                    await upstream.send(message["bytes"])
                elif message.get("text") is not None:
                    await upstream.send(message["text"])

        async def sandbox_to_client() -> None:
            try:
                async for data in upstream:
                    if isinstance(data, bytes):
                        await send({"type": "websocket.send", "bytes": data})
                    else:
                        await send({"type": "websocket.send", "text": data})
            except ConnectionClosed:
                pass
            sent = upstream.protocol.close_sent  # 1009: we closed it, the guest's message was too big
            code = 1009 if sent is not None and sent.code == 1009 else upstream.close_code or 1000
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1000 if code in (1005, 1006) else code,
                            "reason": upstream.close_reason or ""})

        tasks = [asyncio.ensure_future(client_to_sandbox()), asyncio.ensure_future(sandbox_to_client())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t


class EdgeProxy:
    """Routes sandbox traffic on the control plane: access checks, then :class:`Forwarder` to
    ``service.endpoint(...)`` (the guest itself, or its node's edge). One per app."""

    def __init__(self, ctx: E2bContext) -> None:
        self.ctx = ctx
        self.forwarder = Forwarder(ctx.config, ctx.metrics)

    async def forget(self, sandbox_id: str) -> None:
        await self.forwarder.forget(sandbox_id)

    async def aclose(self) -> None:
        await self.forwarder.aclose()

    async def _resolve(self, target: Target, scope: Scope) -> tuple[Endpoint | None, int, str]:
        """(endpoint, 0, "") where to go, or (None, status, message): an error to answer. A
        sandbox just created from the warm pool answers once its guest applied the create."""
        try:
            sb = self.ctx.service.find(target.sandbox_id)
        except CubeError as exc:
            status, message = edge_error_for(exc)
            return None, status, message
        denied = self._check_access(sb, target, scope)
        if denied is not None:
            return None, *denied
        if sb.state == SandboxState.PAUSED and not sb.auto_resume:
            return None, 502, f"{SANDBOX_NOT_FOUND} (it is paused; connect to it to resume it)"
        try:
            if sb.state == SandboxState.PAUSED:
                await self.ctx.service.wake(target.sandbox_id)  # the first request waits for the resume
            sb, endpoint = await self.ctx.service.endpoint(target.sandbox_id, target.port)
        except CubeError as exc:
            status, message = edge_error_for(exc)
            return None, status, message
        if sb.state == SandboxState.PAUSED:  # paused again meanwhile
            return None, 502, f"{SANDBOX_NOT_FOUND} (it is paused; connect to it to resume it)"
        return endpoint, 0, ""

    def _check_access(self, sb: Sandbox, target: Target, scope: Scope) -> tuple[int, str] | None:
        """The edge's access rules (module docstring), checked before a paused sandbox is woken:
        (status, message) when the request is refused."""
        method = str(scope.get("method", "GET")).upper()
        path = str(scope.get("path", "/"))
        if target.port == self.ctx.config.envd_port:
            if path in self.ctx.config.blocked_envd_paths:
                return 403, f"{path} is reserved for the control plane"
            token = sb.envd_access_token
            if token and (method, path) not in ENVD_OPEN and path not in ENVD_SIGNABLE:
                presented = _header(scope, ACCESS_TOKEN_HEADER.encode())
                if presented is None or not hmac.compare_digest(presented.encode("latin-1"), token.encode()):
                    return 401, "unauthorized access, please provide a valid access token"
        elif not sb.network.allow_public_traffic:
            presented = _header(scope, TRAFFIC_TOKEN_HEADER.encode())
            if not self.ctx.tokens.check(sb.sandbox_id, presented):
                return 403, f"missing or invalid {TRAFFIC_TOKEN_HEADER} for this sandbox"
        return None

    async def http(self, target: Target, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint, status, message = await self._resolve(target, scope)
        if endpoint is None:
            self.ctx.metrics.edge_requests.labels("http", str(status)).inc()
            await send_edge_error(send, status, message, target.sandbox_id)
            return
        await self.forwarder.http(target, endpoint, scope, receive, send)

    async def websocket(self, target: Target, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        endpoint, status, message = await self._resolve(target, {**scope, "method": "GET"})
        if endpoint is None:
            self.ctx.metrics.edge_requests.labels("websocket", str(status)).inc()
            await deny_websocket(scope, send, status, message, target.sandbox_id)
            return
        await self.forwarder.websocket(target, endpoint, scope, receive, send)


class EdgeProxyMiddleware:
    """Pure ASGI middleware: sandbox traffic to :class:`EdgeProxy`, the rest to the wrapped app.

    Added through the ``cube_asgi_middleware`` hook, so it runs before FastAPI routing. It also
    hooks the app's lifespan: ``on_startup`` runs once the app has started, ``on_shutdown`` before it
    reports stopped, and every connection pool is closed then.
    """

    def __init__(self, app: ASGIApp, edge: EdgeProxy, on_startup: Callable[[], Awaitable[None]] | None = None,
                 on_shutdown: Callable[[], Awaitable[None]] | None = None) -> None:
        self.app = app
        self.edge = edge
        self.on_startup = on_startup
        self.on_shutdown = on_shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self.app(scope, receive, self._lifespan_send(send))
            return
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            target = target_of(scope.get("headers", []), self.edge.ctx.domain_host)
        except EdgeRequestError as exc:
            if kind == "http":
                await send_edge_error(send, 400, str(exc))
            else:
                await send({"type": "websocket.close", "code": 1008, "reason": str(exc)[:120]})
            return
        if target is None:
            if kind == "http" and scope.get("path") == "/files":  # envd's route: never the control plane's
                await send_edge_error(send, 400, BARE_FILES_URL)
                return
            await self.app(scope, receive, send)
        elif kind == "http":
            await self.edge.http(target, scope, receive, send)
        else:
            await self.edge.websocket(target, scope, receive, send)

    def _lifespan_send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete" and self.on_startup is not None:
                await self.on_startup()
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                try:
                    if self.on_shutdown is not None:
                        await self.on_shutdown()
                finally:
                    await self.edge.aclose()
            await send(message)

        return wrapped
