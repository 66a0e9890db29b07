"""The node side of the edge: how a ``cube node`` forwards the sandbox traffic a master's edge sends it.

A master's :class:`~cube_api_e2b.proxy.EdgeProxy` does the client-facing work (API routing, access
tokens, paused sandboxes), then sends the request unchanged to the node that runs the sandbox
(``Endpoint.via``) with three headers: ``x-cube-cluster-token`` (checked by the node's server before
this app sees the request), ``x-cube-sandbox-id`` and ``x-cube-sandbox-port``. :class:`NodeEdge` (the
app of the ``cube_node_edge`` hook) reads the last two, asks the node where that port of its guest
is (``resolve``), and forwards through the same :class:`~cube_api_e2b.proxy.Forwarder` as the master:
HTTP streamed both ways, websockets, the same error answers. The three headers never reach the guest;
the master's ``X-Forwarded-*`` are passed on as they are.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from cube_core import CubeError
from cube_core.nodeclient import Endpoint

from cube_api_e2b.errors import edge_error_for
from cube_api_e2b.proxy import (
    NODE_SANDBOX_ID_HEADER,
    NODE_SANDBOX_PORT_HEADER,
    EdgeRequestError,
    Forwarder,
    Receive,
    Scope,
    Send,
    Target,
    deny_websocket,
    parse_port,
    send_edge_error,
)

Resolve = Callable[[str, int], Awaitable[tuple[str, int]]]
NODE_SANDBOX_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def node_target(headers: list[tuple[bytes, bytes]]) -> Target:
    """The sandbox and port a master's edge names in ``x-cube-sandbox-id`` / ``x-cube-sandbox-port``."""
    sandbox_id = port = None
    for name, value in headers:
        if name == NODE_SANDBOX_ID_HEADER.encode():
            sandbox_id = value.decode("latin-1").strip()
        elif name == NODE_SANDBOX_PORT_HEADER.encode():
            port = value.decode("latin-1").strip()
    if not sandbox_id or not port:
        raise EdgeRequestError(f"both {NODE_SANDBOX_ID_HEADER} and {NODE_SANDBOX_PORT_HEADER} are required")
    if not NODE_SANDBOX_ID_RE.match(sandbox_id):
        raise EdgeRequestError(f"invalid {NODE_SANDBOX_ID_HEADER} {sandbox_id[:32]!r}")
    return Target(sandbox_id, parse_port(port))


class NodeEdge:
    """ASGI app (``http`` and ``websocket`` scopes; ``lifespan`` closes the connection pools)."""

    def __init__(self, forwarder: Forwarder, resolve: Resolve) -> None:
        self.forwarder = forwarder
        self.resolve = resolve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        if kind not in ("http", "websocket"):
            return
        if kind == "websocket" and (await receive())["type"] != "websocket.connect":
            return
        metrics = self.forwarder.metrics.edge_requests
        sandbox_id: str | None = None
        try:
            target = node_target(scope.get("headers", []))
            sandbox_id = target.sandbox_id
            host, port = await self.resolve(target.sandbox_id, target.port)
        except (EdgeRequestError, CubeError) as exc:
            status, message = (400, str(exc)) if isinstance(exc, EdgeRequestError) else edge_error_for(exc)
            metrics.labels(kind, str(status)).inc()
            if kind == "http":
                await send_edge_error(send, status, message, sandbox_id)
            else:
                await deny_websocket(scope, send, status, message, sandbox_id)
            return
        endpoint = Endpoint(host=host, port=port)
        if kind == "http":
            await self.forwarder.http(target, endpoint, scope, receive, send, relay=True)
        else:
            await self.forwarder.websocket(target, endpoint, scope, receive, send, relay=True)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.forwarder.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return
