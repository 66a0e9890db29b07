"""The envd HTTP application (port 49983): plain routes plus the Connect services."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import ENVD_VERSION
from .auth import TOKEN_HEADER, json_error, token_middleware
from .connect import Router
from .files_http import FilesHandler
from .filesystem import FilesystemService
from .metrics import MetricsSampler
from .process import ProcessService
from .state import AgentState
from .system import set_clock

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

STATE_KEY = "cube_state"


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One failing request never takes the agent down, and errors stay JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and exc.content_type != "application/json":
            return json_error(exc.status, exc.reason)
        raise
    except ConnectionError:
        raise
    except Exception as exc:
        log.exception("%s %s failed", request.method, request.path)
        return json_error(500, f"internal error: {exc}")


class Envd:
    def __init__(self, state: AgentState, *, allow_clock: bool = True) -> None:
        self.state = state
        self.allow_clock = allow_clock
        self.processes = ProcessService(state)
        self.filesystem = FilesystemService(state)
        self.files = FilesHandler(state)
        self.metrics = MetricsSampler()
        self.router = Router()
        self.processes.register(self.router)
        self.filesystem.register(self.router)

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[error_middleware, token_middleware(self.state)],
            client_max_size=64 << 20,
        )
        app.router.add_get("/health", self.health)
        app.router.add_post("/init", self.init)
        app.router.add_get("/envs", self.envs)
        app.router.add_get("/metrics", self.get_metrics)
        self.files.add_routes(app)
        self.router.add_routes(app)
        app.on_shutdown.append(self._on_shutdown)  # type: ignore[arg-type]  # aiohttp 3.8 stub
        return app

    async def _on_shutdown(self, app: web.Application) -> None:
        self.filesystem.close()

    async def health(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=204, headers={"X-Envd-Version": ENVD_VERSION})

    async def init(self, request: web.Request) -> web.StreamResponse:
        # The middleware already required the current token, if one is set.
        try:
            body = await request.json() if request.can_read_body else {}
        except json.JSONDecodeError:
            return json_error(400, "invalid JSON body")
        if not isinstance(body, dict):
            return json_error(400, "body must be a JSON object")
        env = body.get("envVars")
        if isinstance(env, dict):
            self.state.update_env({str(k): str(v) for k, v in env.items()})
        if "accessToken" in body:
            token = body.get("accessToken")
            self.state.access_token = str(token) if token else None
        if body.get("defaultUser"):
            self.state.default_user = str(body["defaultUser"])
        if body.get("defaultWorkdir"):
            self.state.default_workdir = str(body["defaultWorkdir"])
        stamp = body.get("timestamp")
        if stamp and self.allow_clock:
            try:
                when = dt.datetime.fromisoformat(str(stamp).replace("Z", "+00:00"))
                set_clock(int(when.timestamp() * 1_000_000_000))
            except (ValueError, OSError) as exc:
                log.warning("/init: not setting the clock: %s", exc)
        return web.Response(status=204, headers={"X-Envd-Version": ENVD_VERSION})

    async def envs(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.state.env_vars)

    async def get_metrics(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.metrics.sample())


__all__ = ["TOKEN_HEADER", "Envd", "STATE_KEY"]
