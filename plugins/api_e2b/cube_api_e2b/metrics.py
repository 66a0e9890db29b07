"""Prometheus metrics of the API and the edge, served as text on a separate admin port.

Each plugin instance has its own registry (several apps may live in one process, e.g. in tests).
``cube_sandboxes{state=...}``, ``cube_warm_pool_members`` and the ``cube_node*`` gauges are asked of the
control plane at scrape time (``count_by_state()``, ``pool_sizes()``, ``list_nodes()``), so they are
exact even for sandboxes that the timeout reaper paused or killed. docs/metrics.md documents every
metric (a test checks it against a live scrape). The admin server runs in the caller's event
loop because the store may only be used from one loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import structlog
from cube_core import SandboxState
from cube_core.models import NodeStatus, utcnow
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cube_api_e2b.service import ControlPlane

log = structlog.get_logger(__name__)

CREATE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
REPORTED_STATES = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)


class SandboxStateCollector(Collector):
    """``cube_sandboxes{state}`` (live sandboxes of every team), ``cube_warm_pool_members`` and the
    nodes' reports (``cube_nodes{status}``, ``cube_node_*{node}``), read at scrape time."""

    def __init__(self) -> None:
        self.service: ControlPlane | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("cube_sandboxes", "Live sandboxes by state (all teams)", labels=["state"])
        pool = GaugeMetricFamily("cube_warm_pool_members", "Restored, paused VMs waiting in the warm pool")
        counts = {state.value: 0 for state in REPORTED_STATES}
        members = 0
        if self.service is not None:
            by_state = self.service.count_by_state()
            counts = {state: by_state.get(state, 0) for state in counts}
            members = sum(self.service.pool_sizes().values())
        for state, count in counts.items():
            family.add_metric([state], count)
        pool.add_metric([], members)
        yield family
        yield pool
        yield from self._nodes()

    def _nodes(self) -> Iterator[GaugeMetricFamily]:
        nodes = self.service.list_nodes() if self.service is not None else []
        by_status = GaugeMetricFamily("cube_nodes", "Registered nodes by status", labels=["status"])
        for status in NodeStatus:
            by_status.add_metric([status.value], sum(1 for n in nodes if n.status == status))
        cpus = GaugeMetricFamily("cube_node_vcpus", "A node's vCPUs: total, and reserved by its running sandboxes",
                                 labels=["node", "kind"])
        memory = GaugeMetricFamily("cube_node_memory_bytes", "A node's memory for sandboxes: total, and "
                                   "reserved by its live sandboxes and warm-pool members", labels=["node", "kind"])
        sandboxes = GaugeMetricFamily("cube_node_sandboxes", "Live sandboxes on a node (paused included)",
                                      labels=["node"])
        age = GaugeMetricFamily("cube_node_heartbeat_age_seconds", "Seconds since a node last reported",
                                labels=["node"])
        now = utcnow()
        for n in nodes:
            cpus.add_metric([n.node_id, "total"], n.cpu_total)
            cpus.add_metric([n.node_id, "used"], n.cpu_used)
            memory.add_metric([n.node_id, "total"], n.memory_mb_total * 2**20)
            memory.add_metric([n.node_id, "used"], n.memory_mb_used * 2**20)
            sandboxes.add_metric([n.node_id], n.sandboxes)
            age.add_metric([n.node_id], max(0.0, (now - n.heartbeat_at).total_seconds()))
        yield from (by_status, cpus, memory, sandboxes, age)


class ApiMetrics:
    """The metrics one E2B API plugin instance records."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.sandboxes = SandboxStateCollector()
        self.registry.register(self.sandboxes)
        self.create_seconds = Histogram(
            "cube_sandbox_create_seconds", "Time to answer a successful sandbox create",
            buckets=CREATE_BUCKETS, registry=self.registry)
        self.requests = Counter("cube_api_requests", "Control-plane requests answered",
                                ["method", "route", "status"], registry=self.registry)
        self.errors = Counter("cube_api_errors", "Control-plane error answers, by status and error class",
                              ["status", "error"], registry=self.registry)
        self.edge_requests = Counter("cube_edge_requests", "Requests the edge proxy routed to a sandbox, by outcome",
                                     ["kind", "outcome"], registry=self.registry)

    def bind(self, service: ControlPlane) -> None:
        self.sandboxes.service = service

    def render(self) -> bytes:
        return generate_latest(self.registry)


@dataclass
class MetricsServer:
    """A running admin server; ``await close()`` stops it."""

    server: asyncio.Server
    host: str
    port: int

    async def close(self) -> None:
        self.server.close()
        with contextlib.suppress(Exception):
            await self.server.wait_closed()


async def start_metrics_server(metrics: ApiMetrics, *, host: str = "127.0.0.1", port: int = 3001) -> MetricsServer:
    """Serve ``GET /metrics`` (Prometheus text) and ``GET /health`` on ``host:port`` (0 = any free port).

    Call it from the event loop that runs the app (``cube serve`` does it next to the API server).
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            method, target, *_ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
            path = target.split("?", 1)[0]
            if method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"method not allowed\n"
            elif path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.render()
            elif path == "/health":
                status, ctype, body = "200 OK", "text/plain", b"ok\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode("latin-1"))
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError,
                ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, host, port)
    bound: Any = server.sockets[0].getsockname()
    log.info("metrics server listening", host=host, port=bound[1])
    return MetricsServer(server=server, host=host, port=int(bound[1]))
