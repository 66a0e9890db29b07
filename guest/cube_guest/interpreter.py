"""The code-interpreter HTTP application (port 49999, E2B_PROTOCOL.md §6)."""

from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import web

from .auth import TOKEN_HEADER
from .envd import error_middleware
from .kernels import DEFAULT_LANGUAGES, ContextManager, UnsupportedLanguage, dumps_line
from .state import AgentState

log = logging.getLogger(__name__)

KEEPALIVE_S = 5.0
START_WAIT_S = 30.0
"""A create, restart or first default-context request returns after at most this long, even
with the kernel still starting (executions wait for it): the SDK gives those requests 60 s."""


class Interpreter:
    def __init__(self, state: AgentState, scratch_dir: str) -> None:
        self.state = state
        self.contexts = ContextManager(state, scratch_dir)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[error_middleware], client_max_size=64 << 20)
        app.router.add_get("/health", self.health)
        app.router.add_post("/execute", self.execute)
        app.router.add_get("/contexts", self.list_contexts)
        app.router.add_post("/contexts", self.create_context)
        app.router.add_delete("/contexts/{id}", self.delete_context)
        app.router.add_post("/contexts/{id}/restart", self.restart_context)
        app.on_shutdown.append(self._on_shutdown)  # type: ignore[arg-type]  # aiohttp 3.8 stub
        return app

    async def warm(self) -> None:
        """Start the default contexts upstream's server starts (python, then javascript where its
        kernel is installed), so they are warm in the template snapshot. Only python's failure
        raises: the others start again on first use."""
        await self.contexts.default("python")
        for language in DEFAULT_LANGUAGES:
            if language != "python" and language in self.contexts.available():
                try:
                    ctx = await self.contexts.default(language)
                    await ctx.warm()
                except Exception:
                    log.exception("default %s context failed to start", language)

    async def _on_shutdown(self, app: web.Application) -> None:
        await self.contexts.shutdown()

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.json_response("OK")

    async def _json_body(self, request: web.Request) -> dict[str, object]:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            raise web.HTTPBadRequest(text=f"invalid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise web.HTTPBadRequest(text="body must be a JSON object")
        return body

    async def execute(self, request: web.Request) -> web.StreamResponse:
        if not self.state.token_ok(request.headers.get(TOKEN_HEADER)):
            return web.Response(status=401, text="unauthorized: invalid access token")
        body = await self._json_body(request)
        code = body.get("code")
        if not isinstance(code, str):
            return web.Response(status=400, text="'code' must be a string")
        context_id = body.get("context_id")
        language = body.get("language")
        if context_id and language:
            return web.Response(
                status=400, text="provide either context_id or language, not both"
            )
        env_vars = body.get("env_vars")
        if env_vars is not None and not isinstance(env_vars, dict):
            return web.Response(status=400, text="'env_vars' must be an object")
        if context_id:
            ctx = self.contexts.get(str(context_id))
            if ctx is None:
                return web.Response(status=404, text=f"context {context_id} not found")
        else:
            try:
                ctx = await self.contexts.default(str(language) if language else None,
                                                  START_WAIT_S)
            except UnsupportedLanguage as exc:
                return web.Response(status=400, text=str(exc))
        job = ctx.submit(code, env_vars)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        resp.enable_chunked_encoding()
        complete = False
        try:
            await resp.prepare(request)
            while True:
                try:
                    line = await asyncio.wait_for(job.lines.get(), KEEPALIVE_S)
                except TimeoutError:
                    await resp.write(dumps_line({"type": "keepalive"}))
                    continue
                if line is None:
                    break
                await resp.write(dumps_line(line))
            complete = True
            await resp.write_eof()
        except ConnectionError:
            log.info("execute: client went away, interrupting context %s", ctx.id)
        finally:
            if not complete:
                asyncio.get_running_loop().create_task(ctx.abandon(job))
        return resp

    async def list_contexts(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([c.describe() for c in self.contexts.contexts.values()])

    async def create_context(self, request: web.Request) -> web.StreamResponse:
        body = await self._json_body(request)
        language = body.get("language")
        cwd = body.get("cwd")
        try:
            ctx = await self.contexts.create(
                str(language) if language else None, str(cwd) if cwd else None, START_WAIT_S
            )
        except UnsupportedLanguage as exc:
            return web.Response(status=400, text=str(exc))
        except (OSError, RuntimeError) as exc:
            return web.Response(status=500, text=f"failed to start the context: {exc}")
        return web.json_response(ctx.describe())

    async def delete_context(self, request: web.Request) -> web.StreamResponse:
        if not await self.contexts.remove(request.match_info["id"]):
            return web.Response(status=404, text="context not found")
        return web.Response(status=204)

    async def restart_context(self, request: web.Request) -> web.StreamResponse:
        ctx = self.contexts.get(request.match_info["id"])
        if ctx is None:
            return web.Response(status=404, text="context not found")
        ctx.begin(restart=True)
        try:
            await ctx.settle(START_WAIT_S)
        except (OSError, RuntimeError) as exc:
            return web.Response(status=500, text=f"failed to restart the context: {exc}")
        return web.Response(status=204)
