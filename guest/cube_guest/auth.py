"""Access-token checks and the acting user of a request (E2B_PROTOCOL.md §5.1, §5.2)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from .state import AgentState

TOKEN_HEADER = "X-Access-Token"
UNAUTHORIZED_MESSAGE = (
    "unauthorized access, please provide a valid access token or method signing if supported"
)
# Routes reachable without the access token (the /files routes may use a signature).
OPEN_PATHS = frozenset({"/health"})
SIGNABLE_PATHS = frozenset({"/files"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def basic_auth_user(headers: Mapping[str, str]) -> str | None:
    """The username of ``Authorization: Basic base64("<user>:")``, if present."""
    raw = headers.get("Authorization", "")
    scheme, _, value = raw.partition(" ")
    if scheme.lower() != "basic" or not value:
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=False).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    return decoded.partition(":")[0] or None


def json_error(status: int, message: str) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"code": status, "message": message}),
        content_type="application/json",
    )


Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def token_middleware(state: AgentState) -> Middleware:
    """Require ``X-Access-Token`` when the sandbox has one (envd port only)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if (
            state.access_token
            and path not in OPEN_PATHS
            and path not in SIGNABLE_PATHS  # /files checks token or signature itself
            and not state.token_ok(request.headers.get(TOKEN_HEADER))
        ):
            return json_error(401, UNAUTHORIZED_MESSAGE)
        return await handler(request)

    return middleware
