"""The HTTP apps of the three commands; each app's lifespan starts and stops what it runs.

- :func:`create_app` (``cube serve``): control plane + node agent in one process.
- :func:`create_master_app` (``cube master``): control plane only; nodes over HTTP. It also
  serves its nodes under ``/cluster/v1`` (:mod:`cube_core.masterapi`: the secrets a node's egress
  proxy needs).
- :func:`create_node_app` (``cube node``): node agent only, serving masters (``/node/v1``) and the
  sandbox traffic they forward.

The API apps add only ``GET /health`` (and a master's ``/cluster/v1``); every other route comes
from ``cube_api_routers``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

import structlog
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from cube_core._host import PluginHost
from cube_core.embedded import Embedded
from cube_core.masterapi import cluster_router
from cube_core.models import Node, NodeStatus
from cube_core.node import NodeAgent
from cube_core.nodeapi import edge_resolver, node_app
from cube_core.nodehttp import HttpNodeClient
from cube_core.nodes import NodeDirectory
from cube_core.nodesecrets import MasterSecrets, PlacedSecrets
from cube_core.progress import LaneFactory
from cube_core.requestctx import RequestContext
from cube_core.service import SandboxService
from cube_core.store import StateStore, open_store

log = structlog.get_logger(__name__)

Lifespan = Callable[[], contextlib.AbstractAsyncContextManager[None]]


def create_app(host: PluginHost, *, store: StateStore | None = None, build_templates: bool = True,
               progress: LaneFactory | None = None) -> FastAPI:
    """``progress(name)``: the progress lane of the kernel or template ``name`` being built."""
    settings = host.config.data.core
    owns_store = store is None  # then it is closed when the app stops
    store = store or open_store(settings)
    cube = Embedded(host, store)
    agent, service = cube.agent, cube.service

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        await cube.start()
        try:
            async with _building(agent, build_templates, progress):
                yield
        finally:
            await cube.stop()
            if owns_store:
                store.close()

    def health() -> tuple[bool, dict[str, object]]:
        templates = {t.template_id: t.status.value for t in service.list_templates()
                     if t.template_id in settings.templates}
        return agent.ready.is_set(), {"templates": templates}

    app = _api_app(host, service, lifespan, health)
    app.state.agent = agent
    return app


def create_master_app(host: PluginHost, *, store: StateStore | None = None) -> FastAPI:
    """The control plane alone: it reaches every registered node over HTTP with the cluster token."""
    settings = host.config.data.core
    cluster = host.config.data.cluster
    token = cluster.secret()
    owns_store = store is None
    store = store or open_store(settings)

    def remote(node: Node) -> HttpNodeClient:
        assert node.url is not None
        return HttpNodeClient(node.node_id, node.url, token)

    service = SandboxService(host, store, NodeDirectory(store, cluster, remote=remote))
    secrets = PlacedSecrets(store, service.team_secrets, cluster)

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.stop()
            await service.nodes.aclose()
            if owns_store:
                store.close()

    def health() -> tuple[bool, dict[str, object]]:
        nodes = service.list_nodes()
        return True, {"nodes": {n.node_id: n.status.value for n in nodes},
                      "nodes_up": sum(1 for n in nodes if n.status == NodeStatus.UP)}

    app = _api_app(host, service, lifespan, health)
    app.include_router(cluster_router(secrets, token))  # what nodes ask (behind the cluster token)
    return app


def create_node_app(host: PluginHost, *, store: StateStore | None = None, build_templates: bool = True,
                    progress: LaneFactory | None = None) -> ASGIApp:
    """The node agent alone, for masters: its API under ``/node/v1`` and the sandbox traffic the
    masters' edge proxies forward, both behind the cluster token."""
    settings = host.config.data
    token = settings.cluster.secret()
    owns_store = store is None
    store = store or open_store(settings.core)
    masters = MasterSecrets(settings.cluster.masters, token, settings.cluster)
    agent = NodeAgent(host, store, url=settings.node.advertised(), heartbeat_s=settings.cluster.heartbeat_s,
                      secrets=masters.reveal)
    inner = node_app(agent, token=token, edge=host.hooks.node_edge(edge_resolver(agent)))
    if settings.core.secrets_key is not None:
        log.warning("[core] secrets_key is not used by cube node: a node asks a master for each secret; "
                    "remove the key from this node's config (with it, this host could read every team's secrets)")
    if not settings.cluster.masters:
        log.warning("[cluster] masters is not set: secrets in network rules will not resolve on this node")

    @contextlib.asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        await agent.start()
        try:
            async with _building(agent, build_templates, progress):
                yield
        finally:
            await agent.stop()
            await masters.aclose()
            if owns_store:
                store.close()

    return _with_lifespan(inner, lifespan, agent)


# -- shared parts ----------------------------------------------------------------------------------


def _api_app(host: PluginHost, service: SandboxService, lifespan: Lifespan,
             health: Callable[[], tuple[bool, dict[str, object]]]) -> FastAPI:
    @contextlib.asynccontextmanager
    async def app_lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with lifespan():
            yield

    app = FastAPI(title="Cube", version="0.2.0", lifespan=app_lifespan)
    app.state.service = service
    app.state.host = host

    @app.get("/health", include_in_schema=False)
    async def get_health() -> JSONResponse:
        """200 once sandboxes can be served (``cube serve``: a template serves, others may still
        build), else 503."""
        ok, details = health()
        return JSONResponse({"status": "ok" if ok else "starting", **details}, status_code=200 if ok else 503)

    for router in host.hooks.api_routers(service):
        app.include_router(router)
    for factory in reversed(host.hooks.asgi_middleware(service)):
        app.add_middleware(factory)
    app.add_middleware(RequestContext, name="api")  # outermost: the edge's lines carry the request id too
    return app


@contextlib.asynccontextmanager
async def _building(agent: NodeAgent, build: bool, progress: LaneFactory | None) -> AsyncIterator[None]:
    """Build the configured templates in the background while the app serves."""
    names = agent.settings.templates
    if not (build and names):
        agent.ready.set()
        yield
        return
    builder = asyncio.create_task(_build(agent, names, progress))
    try:
        yield
    finally:
        if not builder.done():
            builder.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await builder


async def _build(agent: NodeAgent, names: tuple[str, ...], progress: LaneFactory | None) -> None:
    try:
        await agent.ensure_templates(names, progress)
        log.info("ready", templates=list(names))
    except Exception:
        log.exception("template build failed; /health stays 503 unless another template serves")


def _with_lifespan(inner: ASGIApp, lifespan: Lifespan, agent: NodeAgent) -> ASGIApp:
    """``inner`` with the ASGI lifespan protocol driving ``lifespan`` (and ``app.state.agent``)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await inner(scope, receive, send)
            return
        message = await receive()
        assert message["type"] == "lifespan.startup"
        context = lifespan()
        try:
            await context.__aenter__()
        except BaseException as exc:
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            raise
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        try:
            await context.__aexit__(None, None, None)
        finally:
            await send({"type": "lifespan.shutdown.complete"})

    app.agent = agent  # type: ignore[attr-defined]
    return app
