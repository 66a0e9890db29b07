"""create_app(host) -> FastAPI: the HTTP app; its lifespan starts and stops the service.

The core app only adds ``GET /health``; every other route comes from ``cube_api_routers``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import structlog
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from cube_core._host import PluginHost
from cube_core.service import SandboxService
from cube_core.storage import Progress
from cube_core.store import SqliteStore, StateStore

log = structlog.get_logger(__name__)


def create_app(host: PluginHost, *, store: StateStore | None = None, build_templates: bool = True,
               progress: Progress | None = None) -> FastAPI:
    settings = host.config.data.core
    store = store or SqliteStore(Path(settings.state_dir) / "cube.db")
    service = SandboxService(host, store)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        builder: asyncio.Task[None] | None = None
        if build_templates and settings.templates:
            builder = asyncio.create_task(_build(service, settings.templates, progress))
        else:
            service.ready.set()
        try:
            yield
        finally:
            if builder is not None and not builder.done():
                builder.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await builder
            await service.stop()

    app = FastAPI(title="Cube", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    app.state.host = host

    @app.get("/health", include_in_schema=False)
    async def health() -> JSONResponse:
        if service.ready.is_set():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "starting"}, status_code=503)

    for router in host.hooks.api_routers(service):
        app.include_router(router)
    for factory in reversed(host.hooks.asgi_middleware(service)):
        app.add_middleware(factory)
    return app


async def _build(service: SandboxService, names: tuple[str, ...], progress: Progress | None) -> None:
    try:
        await service.ensure_templates(names, progress)
        log.info("ready", templates=list(names))
    except Exception:
        log.exception("template build failed; /health stays 503")
