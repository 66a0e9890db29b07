"""Connect protocol v1 with the JSON codec, served over aiohttp (E2B_PROTOCOL.md §5.5).

Only what the E2B SDKs use: unary calls (``application/json``), server streams and
client streams (``application/connect+json``, 5-byte envelopes, a final end-of-stream
message). No compression, no binary protobuf, no gRPC.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

STREAM_CONTENT_TYPE = "application/connect+json"
UNARY_CONTENT_TYPE = "application/json"
FLAG_END_STREAM = 0x02
FLAG_COMPRESSED = 0x01
MAX_MESSAGE_BYTES = 64 << 20
DEFAULT_KEEPALIVE_S = 90.0

CODE_TO_STATUS: dict[str, int] = {
    "canceled": 499,
    "unknown": 500,
    "invalid_argument": 400,
    "deadline_exceeded": 504,
    "not_found": 404,
    "already_exists": 409,
    "permission_denied": 403,
    "resource_exhausted": 429,
    "failed_precondition": 400,
    "aborted": 409,
    "out_of_range": 400,
    "unimplemented": 501,
    "internal": 500,
    "unavailable": 503,
    "data_loss": 500,
    "unauthenticated": 401,
}

Message = dict[str, Any]


class ConnectError(Exception):
    """An RPC failure with a Connect error code (``not_found``, ``invalid_argument`` ...)."""

    def __init__(self, code: str, message: str) -> None:
        if code not in CODE_TO_STATUS:
            raise ValueError(f"unknown connect code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return CODE_TO_STATUS[self.code]

    def to_json(self) -> Message:
        return {"code": self.code, "message": self.message}


def encode_envelope(message: Message, flags: int = 0) -> bytes:
    payload = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", flags, len(payload)) + payload


def decode_envelopes(data: bytes) -> list[tuple[int, Message]]:
    """Split a complete body into (flags, message) pairs."""
    out: list[tuple[int, Message]] = []
    pos = 0
    while pos < len(data):
        if len(data) - pos < 5:
            raise ConnectError("invalid_argument", "truncated envelope header")
        flags, size = struct.unpack_from(">BI", data, pos)
        pos += 5
        if len(data) - pos < size:
            raise ConnectError("invalid_argument", "truncated envelope")
        out.append((flags, _decode_message(flags, data[pos : pos + size])))
        pos += size
    return out


def _decode_message(flags: int, payload: bytes) -> Message:
    if flags & FLAG_COMPRESSED:
        raise ConnectError("unimplemented", "compressed messages are not supported")
    try:
        msg = json.loads(payload or b"{}")
    except ValueError as exc:
        raise ConnectError("invalid_argument", f"invalid JSON message: {exc}") from exc
    if not isinstance(msg, dict):
        raise ConnectError("invalid_argument", "message must be a JSON object")
    return msg


async def iter_request_envelopes(request: web.Request) -> AsyncIterator[Message]:
    """Yield the messages of a streaming request body as they arrive (client streams)."""
    content = request.content
    while True:
        try:
            header = await content.readexactly(5)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise ConnectError("invalid_argument", "truncated envelope header") from exc
            return
        flags, size = struct.unpack(">BI", header)
        if size > MAX_MESSAGE_BYTES:
            raise ConnectError("resource_exhausted", "message too large")
        try:
            payload = await content.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            raise ConnectError("invalid_argument", "truncated envelope") from exc
        msg = _decode_message(flags, payload)
        if flags & FLAG_END_STREAM:
            return
        yield msg


# --- JSON mapping helpers (proto3 JSON: accept camelCase and original names) ---


def field_value(msg: Mapping[str, Any], json_name: str, proto_name: str | None = None) -> Any:
    if json_name in msg:
        return msg[json_name]
    if proto_name is not None and proto_name in msg:
        return msg[proto_name]
    return None


def as_int(value: Any, default: int = 0) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise ConnectError("invalid_argument", f"invalid integer {value!r}") from exc


def as_bytes(value: Any) -> bytes:
    if value is None:
        return b""
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", "bytes field must be a base64 string")
    text = value.replace("-", "+").replace("_", "/")
    text += "=" * (-len(text) % 4)
    try:
        return base64.b64decode(text, validate=False)
    except ValueError as exc:
        raise ConnectError("invalid_argument", "invalid base64") from exc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def parse_timeout(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("Connect-Timeout-Ms")
    if not raw:
        return None
    try:
        ms = int(raw)
    except ValueError as exc:
        raise ConnectError("invalid_argument", f"invalid Connect-Timeout-Ms {raw!r}") from exc
    return ms / 1000.0 if ms > 0 else None


def keepalive_interval(headers: Mapping[str, str]) -> float:
    raw = headers.get("Keepalive-Ping-Interval")
    try:
        value = float(raw) if raw else DEFAULT_KEEPALIVE_S
    except ValueError:
        value = DEFAULT_KEEPALIVE_S
    return max(value, 1.0)


# --- Server side ----------------------------------------------------------------


@dataclass
class Call:
    """What a handler knows about the RPC it is serving."""

    request: web.Request
    timeout: float | None
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> Mapping[str, str]:
        return self.request.headers


class ServerStream:
    """The response side of a server stream: 200, envelopes, then end-of-stream."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self._response = web.StreamResponse(
            status=200, headers={"Content-Type": STREAM_CONTENT_TYPE}
        )
        self._response.enable_chunked_encoding()
        self._prepared = False
        self._closed = False

    async def _prepare(self) -> None:
        if not self._prepared:
            self._prepared = True
            await self._response.prepare(self._request)

    async def send(self, message: Message) -> None:
        await self._prepare()
        await self._response.write(encode_envelope(message))

    async def finish(self, error: ConnectError | None = None) -> web.StreamResponse:
        if self._closed:
            return self._response
        self._closed = True
        await self._prepare()
        end: Message = {"error": error.to_json()} if error else {}
        try:
            await self._response.write(encode_envelope(end, FLAG_END_STREAM))
            await self._response.write_eof()
        except ConnectionError:
            log.debug("client went away before end of stream")
        return self._response


UnaryHandler = Callable[[Call, Message], Awaitable[Message]]
StreamHandler = Callable[[Call, Message, ServerStream], Awaitable[None]]
ClientStreamHandler = Callable[[Call, AsyncIterator[Message]], Awaitable[Message]]


@dataclass
class Method:
    kind: str  # "unary" | "server_stream" | "client_stream"
    handler: UnaryHandler | StreamHandler | ClientStreamHandler


def unary_error_response(err: ConnectError) -> web.Response:
    return web.json_response(err.to_json(), status=err.http_status)


class Router:
    """Maps ``/<package>.<Service>/<Method>`` to handlers and runs them."""

    def __init__(self) -> None:
        self.methods: dict[str, Method] = {}

    def unary(self, path: str, handler: UnaryHandler) -> None:
        self.methods[path] = Method("unary", handler)

    def server_stream(self, path: str, handler: StreamHandler) -> None:
        self.methods[path] = Method("server_stream", handler)

    def client_stream(self, path: str, handler: ClientStreamHandler) -> None:
        self.methods[path] = Method("client_stream", handler)

    def add_routes(self, app: web.Application) -> None:
        for path in self.methods:
            app.router.add_post(path, self.dispatch)

    async def dispatch(self, request: web.Request) -> web.StreamResponse:
        method = self.methods[request.path]
        try:
            timeout = parse_timeout(request.headers)
        except ConnectError as err:
            return unary_error_response(err)
        call = Call(request=request, timeout=timeout)
        if method.kind == "unary":
            return await self._run_unary(call, method)
        if method.kind == "server_stream":
            return await self._run_server_stream(call, method)
        return await self._run_client_stream(call, method)

    async def _run_unary(self, call: Call, method: Method) -> web.StreamResponse:
        handler: UnaryHandler = method.handler  # type: ignore[assignment]
        try:
            body = await call.request.read()
            msg = _decode_message(0, body)
            if call.timeout is not None:
                result = await asyncio.wait_for(handler(call, msg), call.timeout)
            else:
                result = await handler(call, msg)
        except ConnectError as err:
            return unary_error_response(err)
        except TimeoutError:
            return unary_error_response(ConnectError("deadline_exceeded", "deadline exceeded"))
        except Exception as exc:  # one bad request never kills the agent
            log.exception("unary %s failed", call.request.path)
            return unary_error_response(ConnectError("internal", str(exc)))
        return web.json_response(result)

    async def _run_server_stream(
        self, call: Call, method: Method
    ) -> web.StreamResponse:
        handler: StreamHandler = method.handler  # type: ignore[assignment]
        stream = ServerStream(call.request)
        error: ConnectError | None = None
        try:
            body = await call.request.read()
            envelopes = decode_envelopes(body)
            msg = envelopes[0][1] if envelopes else {}
            await handler(call, msg, stream)
        except ConnectError as err:
            error = err
        except ConnectionError as exc:
            log.debug("stream %s: client went away: %s", call.request.path, exc)
            return stream._response
        except Exception as exc:
            log.exception("stream %s failed", call.request.path)
            error = ConnectError("internal", str(exc))
        return await stream.finish(error)

    async def _run_client_stream(
        self, call: Call, method: Method
    ) -> web.StreamResponse:
        handler: ClientStreamHandler = method.handler  # type: ignore[assignment]
        stream = ServerStream(call.request)
        error: ConnectError | None = None
        try:
            result = await handler(call, iter_request_envelopes(call.request))
            await stream.send(result)
        except ConnectError as err:
            error = err
        except ConnectionError as exc:
            log.debug("client stream %s: client went away: %s", call.request.path, exc)
            return stream._response
        except Exception as exc:
            log.exception("client stream %s failed", call.request.path)
            error = ConnectError("internal", str(exc))
        return await stream.finish(error)
