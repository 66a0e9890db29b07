"""A tiny stand-in for Cube's control plane and edge, for driving the real SDKs in tests.

It answers the control-plane calls the SDK makes when creating/connecting/killing a
sandbox, and proxies sandbox traffic (requests carrying ``E2b-Sandbox-Id`` and
``E2b-Sandbox-Port``) to one locally running agent. Use with ``E2B_API_URL`` and
``E2B_SANDBOX_URL`` both pointing at it (single-URL mode, E2B_PROTOCOL.md §2.3).
Runs its own event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from cube_guest import ENVD_VERSION

HOP_HEADERS = {
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
    "trailers", "transfer-encoding", "upgrade", "host", "content-length",
}


@dataclass
class Sandbox:
    sandbox_id: str
    template_id: str
    started: dt.datetime
    end: dt.datetime
    metadata: dict[str, str]
    access_token: str | None


@dataclass
class Gateway:
    envd_port: int
    interpreter_port: int | None
    access_token: str | None = None
    port: int = 0
    sandboxes: dict[str, Sandbox] = field(default_factory=dict)
    init_calls: list[dict[str, Any]] = field(default_factory=list)

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._thread_main, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("gateway did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _thread_main(self, ready: threading.Event) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._setup())
        ready.set()
        self.loop.run_forever()

    async def _setup(self) -> None:
        self.session = aiohttp.ClientSession(
            # No pooling towards the agent: prepare_snapshot closes idle keep-alives.
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None)
        )
        app = web.Application(client_max_size=1 << 34)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        new_aiohttp = tuple(int(x) for x in aiohttp.__version__.split(".")[:2]) >= (3, 9)
        runner_kw: dict[str, Any] = {"shutdown_timeout": 1.0} if new_aiohttp else {}
        site_kw: dict[str, Any] = {} if new_aiohttp else {"shutdown_timeout": 1.0}
        self.runner = web.AppRunner(app, access_log=None, auto_decompress=False, **runner_kw)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, **site_kw)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        async def shutdown() -> None:
            await self.runner.cleanup()
            await self.session.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)

    # -- routing --------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        sandbox_id = request.headers.get("E2b-Sandbox-Id")
        port = request.headers.get("E2b-Sandbox-Port")
        if sandbox_id or port:
            return await self.proxy(request, sandbox_id, port)
        return await self.api(request)

    def _agent_port(self, port: str | None) -> int | None:
        if port == "49983":
            return self.envd_port
        if port == "49999":
            return self.interpreter_port
        return None

    async def proxy(
        self, request: web.Request, sandbox_id: str | None, port: str | None
    ) -> web.StreamResponse:
        if not sandbox_id or not port:
            return web.json_response({"code": 400, "message": "both sandbox headers needed"},
                                     status=400)
        target = self._agent_port(port)
        if sandbox_id not in self.sandboxes:
            return web.json_response(
                {"sandboxId": sandbox_id, "message": "The sandbox was not found", "code": 502},
                status=502,
            )
        if target is None:
            return web.json_response(
                {"sandboxId": sandbox_id, "message": f"The sandbox is running but port is not open", "code": 502},
                status=502,
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        url = f"http://127.0.0.1:{target}{request.rel_url}"
        body: Any = None
        if request.body_exists:
            async def chunks() -> Any:
                async for chunk in request.content.iter_any():
                    yield chunk
            body = chunks()
        try:
            upstream = await self.session.request(
                request.method, url, headers=headers, data=body, allow_redirects=False
            )
        except aiohttp.ClientError as exc:
            return web.json_response({"code": 502, "message": f"port is not open: {exc}"},
                                     status=502)
        resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for k, v in upstream.headers.items():
            if k.lower() not in HOP_HEADERS:
                resp.headers.add(k, v)
        no_body = upstream.status in (204, 304) or request.method == "HEAD"
        if upstream.headers.get("Content-Length") is not None:
            resp.content_length = int(upstream.headers["Content-Length"])
        elif not no_body:
            resp.enable_chunked_encoding()
        try:
            await resp.prepare(request)
            async for chunk in upstream.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
        finally:
            upstream.release()
        return resp

    # -- control plane ----------------------------------------------------------------

    def _sandbox_json(self, sbx: Sandbox) -> dict[str, Any]:
        out: dict[str, Any] = {
            "templateID": sbx.template_id,
            "sandboxID": sbx.sandbox_id,
            "clientID": "cube-test",
            "envdVersion": ENVD_VERSION,
        }
        if sbx.access_token:
            out["envdAccessToken"] = sbx.access_token
        return out

    def _detail_json(self, sbx: Sandbox) -> dict[str, Any]:
        return {
            **self._sandbox_json(sbx),
            "startedAt": sbx.started.isoformat().replace("+00:00", "Z"),
            "endAt": sbx.end.isoformat().replace("+00:00", "Z"),
            "cpuCount": 2,
            "memoryMB": 512,
            "diskSizeMB": 1024,
            "state": "running",
            "metadata": sbx.metadata,
        }

    async def api(self, request: web.Request) -> web.StreamResponse:
        parts = [p for p in request.path.split("/") if p]
        if parts and parts[0] == "v2":
            parts = parts[1:]
        method = request.method
        if parts == ["sandboxes"] and method == "POST":
            body = await request.json()
            now = dt.datetime.now(dt.timezone.utc)
            sbx = Sandbox(
                sandbox_id="i" + secrets.token_hex(10),
                template_id=body.get("templateID", "base"),
                started=now,
                end=now + dt.timedelta(seconds=int(body.get("timeout") or 300)),
                metadata=body.get("metadata") or {},
                access_token=self.access_token,
            )
            env = body.get("envVars") or {}
            if env:
                init = {"envVars": env}
                self.init_calls.append(init)
                headers = {"X-Access-Token": self.access_token} if self.access_token else {}
                async with self.session.post(
                    f"http://127.0.0.1:{self.envd_port}/init", json=init, headers=headers
                ) as r:
                    if r.status >= 300:
                        return web.json_response({"code": 500, "message": "init failed"},
                                                 status=500, headers={"Should-Retry": "false"})
            self.sandboxes[sbx.sandbox_id] = sbx
            return web.json_response(self._sandbox_json(sbx), status=201)
        if parts == ["sandboxes"] and method == "GET":
            return web.json_response([self._detail_json(s) for s in self.sandboxes.values()])
        if len(parts) >= 2 and parts[0] == "sandboxes":
            sbx = self.sandboxes.get(parts[1])
            if sbx is None:
                return web.json_response({"code": 404, "message": "sandbox not found"},
                                         status=404)
            rest = parts[2:]
            if not rest and method == "GET":
                return web.json_response(self._detail_json(sbx))
            if not rest and method == "DELETE":
                del self.sandboxes[sbx.sandbox_id]
                return web.Response(status=204)
            if rest == ["connect"] and method == "POST":
                return web.json_response(self._sandbox_json(sbx), status=200)
            if rest == ["timeout"] and method == "POST":
                body = await request.json()
                sbx.end = dt.datetime.now(dt.timezone.utc) + dt.timedelta(
                    seconds=int(body.get("timeout", 0))
                )
                return web.Response(status=204)
        return web.json_response({"code": 404, "message": f"no route {request.path}"},
                                 status=404)
