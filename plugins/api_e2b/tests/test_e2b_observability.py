"""Logs and traces through the E2B API (the plugin on the fakes): the request id from
``x-request-id`` (or made) is echoed and on the JSON lines with the team and sandbox; a create is
one trace from the API request down to the guest."""

from __future__ import annotations

import io
import json
import logging
import sys

import pytest
import structlog
from cube_core import telemetry
from cube_core.config import TelemetrySettings
from cube_core.log import configure_logging
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


@pytest.fixture
def json_lines(monkeypatch):
    buffer = io.StringIO()
    saved_config, root = structlog.get_config(), logging.getLogger()
    saved = root.handlers[:], root.level
    monkeypatch.setattr(sys, "stderr", buffer)
    monkeypatch.delenv("CUBE_LOG_FORMAT", raising=False)
    configure_logging(settings=TelemetrySettings(log_format="json"))
    try:
        yield lambda: [json.loads(line) for line in buffer.getvalue().splitlines() if line.strip()]
    finally:
        root.handlers, _ = saved
        root.setLevel(saved[1])
        structlog.configure(**saved_config)
        structlog.contextvars.clear_contextvars()


async def test_request_id_echoed_and_on_the_lines(cube, json_lines) -> None:
    key = cube.key("team-obs")
    r = await cube.client.post("/v2/sandboxes", json={"templateID": "base"},
                               headers={**cube.headers(key), "x-request-id": "create-42"})
    assert r.status_code == 201 and r.headers["x-request-id"] == "create-42"
    sid = r.json()["sandboxID"]
    killed = await cube.client.delete(f"/sandboxes/{sid}", headers=cube.headers(key))
    made = killed.headers["x-request-id"]
    assert killed.status_code == 204 and len(made) == 32
    lines = json_lines()
    ready = next(line for line in lines if line["event"] == "sandbox ready")
    team_id = cube.service.store.get_sandbox(sid).team_id
    assert ready["request_id"] == "create-42" and ready["sandbox_id"] == sid and ready["team_id"] == team_id
    stopped = [line for line in lines if line.get("request_id") == made]
    assert stopped and all(line["sandbox_id"] == sid and line["team_id"] == team_id for line in stopped)


async def test_a_create_is_one_trace_from_the_api_to_the_guest(cube) -> None:
    key = cube.key()
    with telemetry.recorded(InMemorySpanExporter()) as spans:
        r = await cube.client.post("/v2/sandboxes", json={"templateID": "base"}, headers=cube.headers(key))
    assert r.status_code == 201
    finished = spans.get_finished_spans()
    assert len({s.context.trace_id for s in finished}) == 1
    by_id = {s.context.span_id: s for s in finished}
    parent = {s.name: by_id[s.parent.span_id].name if s.parent else None for s in finished}
    api = "api POST /v2/sandboxes"
    assert parent[api] is None
    assert parent["sandbox.create"] == api and parent["scheduler.place"] == "sandbox.create"
    assert parent["node.launch"] == "sandbox.create" and parent["guest.personalize"] == "node.launch"
    root = next(s for s in finished if s.name == api)
    assert root.attributes["http.response.status_code"] == 201 and root.attributes["http.route"] == "/v2/sandboxes"
    assert root.attributes["cube.request_id"] == r.headers["x-request-id"]
