"""Structured logs and traces on the fakes: JSON lines carry the request, team, sandbox and node ids
(also on the node's side of an HTTP call), the request id is taken from ``x-request-id`` or made
and echoed; a create over HTTP to a node is one trace (service -> scheduler -> node -> VMM ->
guest) whose context crosses the node client; tracing off is a shared no-op."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from test_node_contract import TOKEN, served

from cube_core import telemetry
from cube_core._host import PluginHost
from cube_core.app import create_app
from cube_core.config import ClusterSettings, LoadedConfig, TelemetrySettings
from cube_core.embedded import Embedded
from cube_core.log import bound_ids, configure_logging, current_ids
from cube_core.models import Node, SandboxSpec
from cube_core.node import NodeAgent
from cube_core.nodeapi import node_app
from cube_core.nodehttp import HttpNodeClient
from cube_core.nodes import NodeDirectory
from cube_core.service import SandboxService
from cube_core.store import SqliteStore
from cube_core.testing.fakes import FAKE_CONFIG


@pytest.fixture
def json_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Logging configured for JSON into a buffer; call it for the lines so far (parsed)."""
    buffer = io.StringIO()
    saved_config = structlog.get_config()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setattr(sys, "stderr", buffer)
    monkeypatch.delenv("CUBE_LOG_FORMAT", raising=False)
    monkeypatch.delenv("CUBE_LOG_LEVEL", raising=False)
    configure_logging(settings=TelemetrySettings(log_format="json", log_level="debug"))
    try:
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])
        structlog.configure(**saved_config)
        structlog.contextvars.clear_contextvars()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    with telemetry.recorded(InMemorySpanExporter()) as exporter:
        yield exporter


@pytest.fixture
async def master_and_node(plugin_host: Callable[..., PluginHost], cube_config_factory: Callable[..., LoadedConfig],
                          tmp_path: Path) -> AsyncIterator[tuple[SandboxService, NodeAgent]]:
    """A control plane that reaches its one node over HTTP (uvicorn on loopback), on the fakes."""
    store = SqliteStore(tmp_path / "cube.db")
    text = FAKE_CONFIG.format(state_dir=tmp_path / "node").replace("[core]\n", '[core]\nnode_id = "node-a"\n', 1)
    agent = NodeAgent(plugin_host(cube_config_factory(text)), store)
    await agent.start()
    agent.template_ready(await agent.templates.ensure("base"))
    clients: list[HttpNodeClient] = []
    async with served(node_app(agent, token=TOKEN)) as url:
        agent.url = url
        agent.beat()

        def remote(node: Node) -> HttpNodeClient:
            clients.append(HttpNodeClient(node.node_id, node.url or "", TOKEN))
            return clients[-1]

        master = FAKE_CONFIG.format(state_dir=tmp_path / "master")
        service = SandboxService(plugin_host(cube_config_factory(master)), store,
                                 NodeDirectory(store, ClusterSettings(heartbeat_s=1.0, down_after_s=30.0),
                                               remote=remote))
        try:
            yield service, agent
        finally:
            for client in clients:
                await client.aclose()
            await agent.stop()
    store.close()


# -- logs ------------------------------------------------------------------------------------------


async def test_json_lines_carry_the_ids_and_they_end_with_the_operation(
        json_lines: Callable[[], list[dict[str, Any]]], cube: Embedded) -> None:
    with bound_ids(request_id="req-1"):
        sb = await cube.service.create(SandboxSpec(template_id="base", team_id="team-logs"))
        assert current_ids() == {"request_id": "req-1"}  # the operation's ids do not leak out of it
        await cube.service.pause("team-logs", sb.sandbox_id)
        structlog.get_logger("test").info("after")
    assert current_ids() == {}
    lines = json_lines()
    ready = next(line for line in lines if line["event"] == "sandbox ready")
    assert ready["request_id"] == "req-1" and ready["team_id"] == "team-logs"
    assert ready["sandbox_id"] == sb.sandbox_id and ready["node_id"] == sb.node_id
    assert ready["level"] == "info" and ready["timestamp"].endswith("Z") and ready["logger"] == "cube_core.service"
    after = next(line for line in lines if line["event"] == "after")
    assert after["request_id"] == "req-1" and "sandbox_id" not in after and "team_id" not in after


async def test_request_id_taken_or_made_and_echoed(plugin_host: Callable[..., PluginHost], tmp_path: Path,
                                                   json_lines: Callable[[], list[dict[str, Any]]]) -> None:
    app = create_app(plugin_host(), store=SqliteStore(tmp_path / "api.db"), build_templates=False)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cube.test") as client:
            given = await client.get("/fake/sandboxes", params={"team": "t"}, headers={"x-request-id": "abc-123"})
            made = await client.get("/fake/sandboxes", params={"team": "t"})
            refused = await client.get("/health", headers={"x-request-id": "two words\t" + "x" * 200})
    assert given.status_code == 200 and given.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32 and made.headers["x-request-id"] != "abc-123"
    assert len(refused.headers["x-request-id"]) == 32


async def test_the_node_logs_with_the_masters_request_id(
        json_lines: Callable[[], list[dict[str, Any]]], master_and_node: tuple[SandboxService, NodeAgent]) -> None:
    service, agent = master_and_node
    with bound_ids(request_id="req-across"):
        sb = await service.create(SandboxSpec(template_id="base", team_id="team-x"))
    node_lines = [line for line in json_lines()
                  if line["logger"].startswith("cube_core.node") and line.get("sandbox_id") == sb.sandbox_id]
    assert node_lines, "the node logged nothing about the sandbox"
    assert all(line.get("request_id") == "req-across" for line in node_lines), node_lines


# -- traces ----------------------------------------------------------------------------------------


def tree(exporter: InMemorySpanExporter) -> dict[str, Any]:
    """name -> parent name (one trace asserted)."""
    finished = exporter.get_finished_spans()
    assert len({s.context.trace_id for s in finished}) == 1, [s.name for s in finished]
    by_id = {s.context.span_id: s for s in finished}
    return {s.name: by_id[s.parent.span_id].name if s.parent and s.parent.span_id in by_id else None
            for s in finished}


async def test_a_create_over_http_is_one_trace(spans: InMemorySpanExporter,
                                               master_and_node: tuple[SandboxService, NodeAgent]) -> None:
    service, _ = master_and_node
    with telemetry.span("client"):
        sb = await service.create(SandboxSpec(template_id="base", team_id="team-trace"))
    parents = tree(spans)
    assert parents["client"] is None
    assert parents["sandbox.create"] == "client"
    assert parents["scheduler.place"] == "sandbox.create"
    assert parents["node POST /node/v1/sandboxes"] == "sandbox.create"  # the context crossed HTTP
    assert parents["node.launch"] == "node POST /node/v1/sandboxes"
    vm = "vmm.restore" if "vmm.restore" in parents else "vmm.boot"
    for child in ("network.allocate", "storage.create_disk", vm, "guest.personalize"):
        assert parents[child] == "node.launch", (child, parents)
    by_name = {s.name: s for s in spans.get_finished_spans()}
    assert by_name["sandbox.create"].attributes["cube.sandbox_id"] == sb.sandbox_id
    assert by_name["sandbox.create"].attributes["cube.team_id"] == "team-trace"
    assert by_name["scheduler.place"].attributes["cube.node_id"] == "node-a"
    server = by_name["node POST /node/v1/sandboxes"]
    assert server.attributes["http.response.status_code"] == 200
    assert server.resource.attributes["service.name"] == "cube"


async def test_embedded_create_and_background_work(spans: InMemorySpanExporter, cube: Embedded) -> None:
    """In one process the node client is a call: the same tree without the HTTP hop; the guest
    calls of background work (the sampler) start no traces of their own."""
    await cube.service.create(SandboxSpec(template_id="base", team_id="team-e"))
    parents = tree(spans)
    assert parents["sandbox.create"] is None and parents["node.launch"] == "sandbox.create"
    assert parents["guest.personalize"] == "node.launch"
    spans.clear()
    with telemetry.child_span("guest.observe"):  # as the sampler's calls: outside any trace
        pass
    assert spans.get_finished_spans() == ()


def test_tracing_off_is_a_shared_noop() -> None:
    assert not telemetry.enabled()
    assert telemetry.span("x", sandbox_id="s") is telemetry.span("y")
    headers: dict[str, str] = {}
    telemetry.inject(headers)
    assert headers == {}
    assert telemetry.configure_tracing(TelemetrySettings(), role="test") is False
