"""A real ``cube serve`` (fake drivers, the E2B API) with ``[telemetry] otlp_endpoint`` sends its
spans over OTLP/HTTP to a receiver on loopback: a tiny HTTP server that decodes the protobuf
export requests with opentelemetry-proto. A create through the API is one trace from the request
to the guest call; the request id is on the request's span; the process's last spans are flushed
when it stops."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from cube_core.testing.fakes import FAKE_CONFIG

CUBE = str(Path(sys.executable).with_name("cube"))


class Receiver:
    """OTLP/HTTP trace receiver: every span of every request, with its resource attributes."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.requests = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                ok = self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
                if ok:
                    receiver.add(ExportTraceServiceRequest.FromString(body))
                answer = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if ok else 400)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, request: ExportTraceServiceRequest) -> None:
        with self.lock:
            self.requests += 1
            for resource_spans in request.resource_spans:
                resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        attributes = {a.key: _value(a.value) for a in span.attributes}
                        self.spans.append({"name": span.name, "trace": span.trace_id.hex(), "id": span.span_id.hex(),
                                           "parent": span.parent_span_id.hex() or None, "attributes": attributes,
                                           "resource": resource})

    def names(self) -> set[str]:
        with self.lock:
            return {s["name"] for s in self.spans}


def _value(value: Any) -> Any:
    return getattr(value, value.WhichOneof("value")) if value.WhichOneof("value") else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    rec = Receiver()
    thread = threading.Thread(target=rec.server.serve_forever, daemon=True)
    thread.start()
    yield rec
    rec.server.shutdown()
    rec.server.server_close()


def test_a_real_cube_serve_exports_the_create_trace(receiver: Receiver, tmp_path: Path) -> None:
    port, admin = free_port(), free_port()
    text = FAKE_CONFIG.format(state_dir=tmp_path / "state")
    text = text.replace("templates = []", f'templates = ["base"]\nport = {port}\nadmin_port = {admin}')
    text = text.replace('[[api]]\nplugin = "fake"', '[[api]]\nplugin = "e2b"')
    text += f'\n[telemetry]\notlp_endpoint = "{receiver.url}"\nlog_format = "json"\n'
    config = tmp_path / "plugins.toml"
    config.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    key = subprocess.run([CUBE, "keys", "create", "--team", "otel", "--config", str(config)], env=env,
                         capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen([CUBE, "serve", "--config", str(config)], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "cube serve did not become healthy"
            time.sleep(0.2)
        r = httpx.post(f"{url}/v2/sandboxes", json={"templateID": "base"},
                       headers={"X-API-Key": key, "x-request-id": "otlp-create-1"}, timeout=30)
        assert r.status_code == 201 and r.headers["x-request-id"] == "otlp-create-1", r.text
        sid = r.json()["sandboxID"]
        deadline = time.monotonic() + 15  # batched: sent within about a second
        while "api POST /v2/sandboxes" not in receiver.names() and time.monotonic() < deadline:
            time.sleep(0.1)
        killed = httpx.delete(f"{url}/sandboxes/{sid}", headers={"X-API-Key": key}, timeout=30)
        assert killed.status_code == 204
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        log.close()
    spans = receiver.spans
    trace = next(s["trace"] for s in spans if s["name"] == "api POST /v2/sandboxes")
    in_trace = {s["id"]: s for s in spans if s["trace"] == trace}
    parent = {s["name"]: in_trace[s["parent"]]["name"] if s["parent"] in in_trace else None for s in in_trace.values()}
    assert parent["api POST /v2/sandboxes"] is None
    assert parent["sandbox.create"] == "api POST /v2/sandboxes"
    assert parent["scheduler.place"] == "sandbox.create"
    assert parent["node.launch"] == "sandbox.create"
    assert parent["guest.personalize"] == "node.launch"
    root = next(s for s in in_trace.values() if s["name"] == "api POST /v2/sandboxes")
    assert root["attributes"]["cube.request_id"] == "otlp-create-1"
    assert root["attributes"]["http.response.status_code"] == 201
    assert root["resource"]["service.name"] == "cube" and root["resource"]["cube.role"] == "serve"
    # the kill's request span too (in a later batch, or flushed as the process stopped)
    assert any(s["name"] == "api DELETE /sandboxes/{sandbox_id}" for s in spans), sorted(receiver.names())
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.startswith("{")]
    ready = next(line for line in lines if line.get("event") == "sandbox ready")
    assert ready["request_id"] == "otlp-create-1" and ready["sandbox_id"] == sid
