"""ASGI middleware of every Cube HTTP app (API and node): the request id and the request's span.

The request id is the caller's ``x-request-id`` when it is a sane token, else a new one; it is
bound for the request's log lines (``request_id``) and echoed in the answer's ``x-request-id``.
With tracing on (:mod:`cube_core.telemetry`) the request is a server span that continues the
caller's trace (``traceparent``: a master's call to a node). :func:`request_ms` is how long the
current request has been in the app (a route's log line says where its time went).
"""

from __future__ import annotations

import time
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cube_core import telemetry
from cube_core.log import REQUEST_ID_HEADER, bound_ids, request_id_from

_HEADER = REQUEST_ID_HEADER.encode()
_ENTERED: ContextVar[float | None] = ContextVar("cube_request_entered", default=None)


def request_ms() -> float | None:
    """Milliseconds since the current request entered the app (None outside a request)."""
    entered = _ENTERED.get()
    return None if entered is None else round((time.perf_counter() - entered) * 1000, 1)


class RequestContext:
    """``RequestContext(app, name="api")``: see the module; ``name`` prefixes the span names."""

    def __init__(self, app: ASGIApp, name: str = "api") -> None:
        self.app = app
        self.name = name

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        _ENTERED.set(time.perf_counter())  # this request's own task: no reset needed
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        request_id = request_id_from(headers.get(REQUEST_ID_HEADER))
        echoed = (_HEADER, request_id.encode())
        method = str(scope.get("method", "GET"))
        status: list[int] = []

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status.append(int(message["status"]))
                message = {**message, "headers": [*message.get("headers", ()), echoed]}
            await send(message)

        with bound_ids(request_id=request_id), \
                telemetry.server_span(f"{self.name} {method}", headers, request_id=request_id,
                                      **{"http.request.method": method, "url.path": scope.get("path", "")}):
            try:
                await self.app(scope, receive, send_with_id)
            finally:
                route = scope.get("route")
                template = getattr(route, "path", None)
                telemetry.set_attributes(**{"http.response.status_code": status[0] if status else None,
                                            "http.route": template})
                if template:
                    telemetry.rename_current(f"{self.name} {method} {template}")
