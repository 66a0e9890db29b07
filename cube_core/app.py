"""create_app(host) -> FastAPI: the HTTP app; its lifespan starts and stops the service.

The core app only adds ``GET /health``; every other route comes from ``cube_api_routers``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import structlog
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from cube_core._host import PluginHost
from cube_core.embedded import Embedded
from cube_core.node import NodeAgent
from cube_core.progress import LaneFactory
from cube_core.store import StateStore, open_store

log = structlog.get_logger(__name__)


def create_app(host: PluginHost, *, store: StateStore | None = None, build_templates: bool = True,
               progress: LaneFactory | None = None) -> FastAPI:
    """``progress(name)``: the progress lane of the kernel or template ``name`` being built."""
    settings = host.config.data.core
    owns_store = store is None  # then it is closed when the app stops
    store = store or open_store(settings)
    cube = Embedded(host, store)
    agent, service = cube.agent, cube.service

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await cube.start()
        builder: asyncio.Task[None] | None = None
        if build_templates and settings.templates:
            builder = asyncio.create_task(_build(agent, settings.templates, progress))
        else:
            agent.ready.set()
        try:
            yield
        finally:
            if builder is not None and not builder.done():
                builder.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await builder
            await cube.stop()
            if owns_store:
                store.close()

    app = FastAPI(title="Cube", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.state.agent = agent
    app.state.host = host

    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        """200 once a template serves (others may still build: ``templates`` tells), else 503."""
        templates = {t.template_id: t.status.value for t in service.list_templates()
                     if t.template_id in settings.templates}
        if agent.ready.is_set():
            return JSONResponse({"status": "ok", "templates": templates})
        return JSONResponse({"status": "starting", "templates": templates}, status_code=503)

    for router in host.hooks.api_routers(service):
        app.include_router(router)
    for factory in reversed(host.hooks.asgi_middleware(service)):
        app.add_middleware(factory)
    return app


async def _build(agent: NodeAgent, names: tuple[str, ...], progress: LaneFactory | None) -> None:
    try:
        await agent.ensure_templates(names, progress)
        log.info("ready", templates=list(names))
    except Exception:
        log.exception("template build failed; /health stays 503 unless another template serves")
