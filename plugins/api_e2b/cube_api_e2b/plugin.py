"""Plugin object for ``[[api]] plugin = "e2b"`` (thin: config, hooks and delegation)."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Sequence

import httpx
import structlog
from cube_core import CoreSettings, Sandbox, SandboxService, hookimpl
from fastapi import APIRouter
from starlette.types import ASGIApp

from cube_api_e2b.auth import TrafficTokens, load_traffic_secret
from cube_api_e2b.config import E2bConfig
from cube_api_e2b.context import E2bContext, split_host_port
from cube_api_e2b.metrics import ApiMetrics, MetricsServer, start_metrics_server
from cube_api_e2b.nodeedge import NodeEdge
from cube_api_e2b.outbound import tls_context
from cube_api_e2b.proxy import EdgeProxy, EdgeProxyMiddleware, Forwarder
from cube_api_e2b.routes import ROUTERS, SIGNED
from cube_api_e2b.routing import BindContext
from cube_api_e2b.server import HypercornConfig, hypercorn_config, serve
from cube_api_e2b.service import ControlPlane
from cube_api_e2b.tls import TlsFiles, ensure_certificates

log = structlog.get_logger(__name__)


class E2bApiPlugin:
    """The E2B REST control plane (both endpoint generations) and the sandbox edge proxy."""

    Config = E2bConfig

    def __init__(self, config: E2bConfig) -> None:
        self.config = config
        self.settings: CoreSettings | None = None
        self.metrics = ApiMetrics()
        self.context: E2bContext | None = None
        self.edge: EdgeProxy | None = None
        self.metrics_server: MetricsServer | None = None
        self.node_edge: NodeEdge | None = None

    def _context(self, service: ControlPlane) -> E2bContext:
        if self.context is None or self.context.service is not service:
            settings = self.settings or service.settings
            secret = load_traffic_secret(self.config.traffic_token_secret, settings.state_dir)
            self.metrics.bind(service)
            self.context = E2bContext(service=service, config=self.config, settings=settings,
                                      metrics=self.metrics, tokens=TrafficTokens(secret))
            self.edge = EdgeProxy(self.context)
        return self.context

    @hookimpl
    def cube_configure(self, settings: CoreSettings) -> None:
        self.settings = settings

    @hookimpl
    def cube_api_routers(self, service: SandboxService) -> Sequence[APIRouter]:
        """The module-level routers (routes/); the middleware below binds them to this app's context."""
        self._context(service)
        return [*ROUTERS, *SIGNED]

    @hookimpl
    def cube_asgi_middleware(self, service: SandboxService) -> Sequence[Callable[[ASGIApp], ASGIApp]]:
        """The edge proxy outermost (sandbox traffic never reaches routing), then the context binding."""
        ctx = self._context(service)
        assert self.edge is not None
        return [functools.partial(EdgeProxyMiddleware, edge=self.edge, on_startup=self._on_startup,
                                  on_shutdown=self.stop_metrics_server),
                functools.partial(BindContext, ctx=ctx)]

    async def _on_startup(self) -> None:
        if not self.config.metrics_on_startup:
            return
        try:
            await self.start_metrics_server()
        except OSError as exc:
            log.error("cannot start the metrics server", error=str(exc))

    @hookimpl
    def cube_pool_member_warm_up(self, sandbox: Sandbox, address: str) -> Awaitable[None]:
        """Reach envd over the member's network path once before it is paused (under TCG this
        translates the guest's network and HTTP code ahead of the first user request)."""
        return self._warm_envd(sandbox.sandbox_id, address)

    async def _warm_envd(self, sandbox_id: str, address: str) -> None:
        host = f"[{address}]" if ":" in address else address
        try:
            async with httpx.AsyncClient(timeout=30.0, trust_env=False, verify=tls_context()) as http:
                reply = await http.get(f"http://{host}:{self.config.envd_port}/health")
        except httpx.HTTPError as exc:
            log.warning("warm pool: envd not reached", sandbox_id=sandbox_id, error=repr(exc))
            return
        log.debug("warm pool: envd reached", sandbox_id=sandbox_id, status=reply.status_code)

    @hookimpl
    def cube_node_edge(self, resolve: Callable[[str, int], Awaitable[tuple[str, int]]]) -> ASGIApp:
        """``cube node``: forward what the masters' edges send to this node's guests (nodeedge.py)."""
        self.node_edge = NodeEdge(Forwarder(self.config, self.metrics), resolve)
        return self.node_edge

    @hookimpl
    def cube_sandbox_stopped(self, sandbox: Sandbox) -> Awaitable[None] | None:
        return self._forget(sandbox.sandbox_id)

    @hookimpl
    def cube_sandbox_restored(self, sandbox: Sandbox) -> Awaitable[None] | None:
        """Rolled back: connections kept open to the old guest would fail on first use."""
        return self._forget(sandbox.sandbox_id)

    def _forget(self, sandbox_id: str) -> Awaitable[None] | None:
        """Close the sandbox's connections on both sides of the edge (this process may be either)."""
        forwarders = [f for f in (self.edge.forwarder if self.edge else None,
                                  self.node_edge.forwarder if self.node_edge else None) if f is not None]
        if not forwarders:
            return None

        async def forget() -> None:
            for forwarder in forwarders:
                await forwarder.forget(sandbox_id)

        return forget()

    @hookimpl
    def cube_http_server(self, app: ASGIApp, settings: CoreSettings) -> Awaitable[None] | None:
        """Domain mode needs TLS and HTTP/2 (Hypercorn); otherwise let the core use uvicorn."""
        config = self.domain_server_config(settings.host, settings.port)
        return serve(app, config) if config is not None else None

    # -- for the CLI (`cube serve`) ---------------------------------------------------------------

    async def start_metrics_server(self, host: str | None = None, port: int | None = None) -> MetricsServer:
        """Start the Prometheus endpoint (``GET /metrics``) in the running loop; idempotent.

        Defaults: the plugin's ``admin_host``/``admin_port``, else ``[core] host``/``admin_port``.
        The app's lifespan calls it already unless ``metrics_on_startup = false``.
        """
        if self.metrics_server is not None:
            return self.metrics_server
        settings = self.settings or (self.context.settings if self.context else None)
        host = host or self.config.admin_host or (settings.host if settings else "127.0.0.1")
        if port is None:
            port = self.config.admin_port if self.config.admin_port is not None else (
                settings.admin_port if settings else 3001)
        self.metrics_server = await start_metrics_server(self.metrics, host=host, port=port)
        return self.metrics_server

    async def stop_metrics_server(self) -> None:
        server, self.metrics_server = self.metrics_server, None
        if server is not None:
            await server.close()

    def tls_files(self) -> TlsFiles | None:
        """Domain mode: the CA and certificate (created on first use); None without a domain."""
        if self.context is None or self.context.domain_host is None:
            return None
        return ensure_certificates(self.context.tls_dir, self.context.domain_host)

    def domain_server_config(self, host: str, port: int | None) -> HypercornConfig | None:
        """Domain mode: a Hypercorn config serving TLS (h2 + HTTP/1.1) on the domain's port (443 if
        it names none) and plain HTTP on ``port``; None when no domain is configured.

        Call it after ``create_app``; run the app with ``cube_api_e2b.server.run(app, config)``.
        """
        tls = self.tls_files()
        if tls is None or self.context is None or self.context.domain is None:
            return None
        tls_port = split_host_port(self.context.domain)[1] or 443
        return hypercorn_config(host=host, port=port, tls=tls, tls_port=tls_port)
