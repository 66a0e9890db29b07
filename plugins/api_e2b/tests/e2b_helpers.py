"""Test helpers for the E2B API plugin: config on the fakes, a real server, an upstream "sandbox
service", and a validator for the vendored OpenAPI spec."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from cube_core.testing.fakes import FAKE_CONFIG
from openapi_schema_validator import OAS30Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT4
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

OPENAPI_DIR = Path(__file__).resolve().parent.parent / "openapi"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


SECRETS_KEY_ENV = "CUBE_TEST_SECRETS_KEY"
"""The environment variable ``make_app`` (conftest) puts a fresh secrets key in."""


def e2b_config_text(state_dir: Path, options: dict[str, Any] | None = None, *, max_sandboxes: int = 200,
                    pool_size: int = 0, extra: str = "", core: str = "") -> str:
    """The fake config with the e2b API plugin; ``extra``: more TOML appended (e.g. ``[quotas]``);
    ``core``: more lines of ``[core]``."""
    text = "\n".join(line for line in FAKE_CONFIG.format(state_dir=state_dir).splitlines()
                     if not line.startswith("pool ="))
    text = text.replace("templates = []", f'templates = ["base"]\nmax_sandboxes = {max_sandboxes}\n'
                                          f"pool = {{ size = {pool_size} }}\n{core}")
    opts = ", ".join(f"{k} = {toml_value(v)}" for k, v in (options or {}).items())
    text = text.replace('[[api]]\nplugin = "fake"', f'[[api]]\nplugin = "e2b"\noptions = {{ {opts} }}')
    return text + ("\n" + extra if extra else "")


def point_sdk_at(monkeypatch: Any, port: int, key: str) -> None:
    """The e2b SDK's environment for an app served on loopback ``port``, as ``key``'s team."""
    for name in ("E2B_DOMAIN", "E2B_DEBUG", "E2B_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("E2B_API_KEY", key)
    monkeypatch.setenv("E2B_API_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("E2B_SANDBOX_URL", f"http://127.0.0.1:{port}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def serve(app: Any, host: str = "127.0.0.1", port: int = 0, lifespan: str = "on") -> AsyncIterator[int]:
    """Run ``app`` with uvicorn in this event loop; yields the port."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    bound = int(sock.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, lifespan=lifespan, log_config=None, access_log=False,  # type: ignore[arg-type]
                                           timeout_graceful_shutdown=2))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = time.monotonic() + 10
    while not server.started:
        if task.done():
            task.result()
        if time.monotonic() > deadline:
            raise TimeoutError("uvicorn did not start")
        await asyncio.sleep(0.01)
    try:
        yield bound
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)
        sock.close()


# -- an upstream "sandbox service" the edge forwards to -----------------------------------------


class Upstream:
    """Starlette app that plays a server inside a sandbox; records what it saw."""

    def __init__(self) -> None:
        self.upload_arrivals: list[float] = []
        self.disconnected = asyncio.Event()
        self.seen_headers: list[dict[str, str]] = []
        self.app = Starlette(routes=[
            Route("/stream", self.stream),
            Route("/upload", self.upload, methods=["POST"]),
            Route("/echo", self.echo, methods=["POST", "PUT"]),
            Route("/download", self.download),
            Route("/headers", self.headers, methods=["GET", "POST"]),
            Route("/forever", self.forever),
            Route("/health", self.health),
            Route("/metrics", self.metrics),
            Route("/init", self.health, methods=["POST"]),
            Route("/status/{code:int}", self.status),
            WebSocketRoute("/ws", self.websocket),
        ])

    async def stream(self, request: Request) -> StreamingResponse:
        n = int(request.query_params.get("n", "3"))
        delay = float(request.query_params.get("delay", "0.3"))

        async def body() -> AsyncIterator[bytes]:
            for i in range(n):
                yield f"chunk {i} {time.monotonic()}\n".encode()
                await asyncio.sleep(delay)

        return StreamingResponse(body(), media_type="text/plain")

    async def upload(self, request: Request) -> JSONResponse:
        total = 0
        digest = hashlib.sha256()
        async for chunk in request.stream():
            if chunk:
                self.upload_arrivals.append(time.monotonic())
                total += len(chunk)
                digest.update(chunk)
        return JSONResponse({"bytes": total, "sha256": digest.hexdigest(), "arrivals": self.upload_arrivals})

    async def echo(self, request: Request) -> Response:
        return Response(await request.body(), media_type="application/octet-stream")

    async def download(self, request: Request) -> StreamingResponse:
        size = int(request.query_params["size"])

        async def body() -> AsyncIterator[bytes]:
            left, block = size, 0
            while left > 0:
                chunk = hashlib.sha256(str(block).encode()).digest() * 2048  # 64 KiB
                yield chunk[:left]
                left -= len(chunk[:left])
                block += 1

        return StreamingResponse(body(), media_type="application/octet-stream")

    async def headers(self, request: Request) -> JSONResponse:
        seen = {k: v for k, v in request.headers.items()}
        self.seen_headers.append(seen)
        return JSONResponse(seen, headers={"set-cookie": "a=1", "x-upstream": "yes"})

    async def forever(self, request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"first\n"
                while True:
                    await asyncio.sleep(3600)
                    yield b"never\n"
            finally:
                self.disconnected.set()

        return StreamingResponse(body(), media_type="text/plain")

    async def health(self, request: Request) -> Response:
        return Response(status_code=204)

    async def status(self, request: Request) -> Response:
        return Response(f"status {request.path_params['code']}", status_code=request.path_params["code"])

    async def metrics(self, request: Request) -> JSONResponse:
        self.seen_headers.append(dict(request.headers.items()))
        return JSONResponse({"ts": int(time.time()), "cpu_count": 2, "cpu_used_pct": 12.5, "mem_total": 512 << 20,
                             "mem_used": 100 << 20, "mem_cache": 10 << 20, "disk_used": 1 << 30,
                             "disk_total": 4 << 30})

    async def websocket(self, ws: WebSocket) -> None:
        offered = ws.scope.get("subprotocols") or []
        await ws.accept(subprotocol="echo.v1" if "echo.v1" in offered else None)
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                if message.get("text") is not None:
                    if message["text"] == "close-me":
                        await ws.close(code=4001, reason="asked to")
                        return
                    await ws.send_text("echo:" + message["text"])
                elif message.get("bytes") is not None:
                    await ws.send_bytes(b"echo:" + message["bytes"])
        except WebSocketDisconnect:
            return


# -- OpenAPI -------------------------------------------------------------------------------------


class OpenApi:
    """The vendored E2B spec plus Cube's addendum (v2 create/connect from SDK 2.63.0, extensions)."""

    def __init__(self) -> None:
        spec = yaml.safe_load((OPENAPI_DIR / "e2b.yml").read_text())
        extra = yaml.safe_load((OPENAPI_DIR / "cube.yml").read_text())
        for path, ops in extra["paths"].items():
            spec["paths"].setdefault(path, {}).update(ops)
        for kind, items in extra.get("components", {}).items():
            spec["components"].setdefault(kind, {}).update(items)
        self.spec = spec
        self.registry: Registry = Registry().with_resource(
            "urn:e2b", Resource.from_contents(spec, default_specification=DRAFT4))

    def operation(self, method: str, path: str) -> dict[str, Any]:
        try:
            return dict(self.spec["paths"][path][method.lower()])
        except KeyError:
            raise AssertionError(f"{method} {path} is not in the spec") from None

    def check(self, method: str, path: str, response: httpx.Response) -> None:
        """Assert that ``response`` is a documented answer of ``method path`` and matches its schema."""
        op = self.operation(method, path)
        status = str(response.status_code)
        assert status in op["responses"], f"{method} {path}: status {status} is not documented: {response.text}"
        declared = op["responses"][status]
        if "$ref" in declared:
            declared = self._resolve(declared["$ref"])
        content = declared.get("content", {}).get("application/json")
        if content is None:
            assert response.content == b"", f"{method} {path} {status} must have no body, got {response.content!r}"
            return
        assert response.headers.get("content-type", "").startswith("application/json")
        pointer = self._pointer_of(method, path, status, op["responses"][status])
        validator = OAS30Validator({"$ref": pointer}, registry=self.registry)
        errors = sorted(validator.iter_errors(response.json()), key=lambda e: list(e.path))
        assert not errors, f"{method} {path} {status}: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)

    def _resolve(self, ref: str) -> dict[str, Any]:
        node: Any = self.spec
        for part in ref.lstrip("#/").split("/"):
            node = node[part.replace("~1", "/").replace("~0", "~")]
        return dict(node)

    def _pointer_of(self, method: str, path: str, status: str, declared: dict[str, Any]) -> str:
        if "$ref" in declared:
            return "urn:e2b" + declared["$ref"] + "/content/application~1json/schema"
        escaped = path.replace("~", "~0").replace("/", "~1")
        return f"urn:e2b#/paths/{escaped}/{method.lower()}/responses/{status}/content/application~1json/schema"
