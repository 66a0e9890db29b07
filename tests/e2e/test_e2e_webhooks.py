"""Lifecycle webhooks end to end: a real ``cube serve``, real guests, the real E2B SDK, and receivers
on loopback (the e2e config allows ``127.0.0.0/8`` in ``[webhooks]``, with 1 s backoff).

A webhook registered through ``/events/webhooks`` gets signed ``sandbox.created``, ``paused``,
``resumed`` and ``killed`` deliveries for a sandbox the SDK drives, each verified with the
Standard Webhooks library; a receiver that fails first (503) gets the retry with the same
``webhook-id``; a delivery still pending when ``cube serve`` stops (its receiver is down) is
delivered after the restart."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
import standardwebhooks
from cube_e2e import CubeServer, free_port
from e2b import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

HOOKS = "/events/webhooks"


class Server(ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True


class Receiver:
    """Records every POST (headers, raw body); answers 503 to the first attempt of each delivery
    of an event type in ``fail_first`` (deliveries go out concurrently: the type picks which), else 204."""

    def __init__(self, port: int | None = None, fail_first: tuple[str, ...] = ()) -> None:
        self.port = port or free_port()
        self.requests: list[tuple[dict[str, str], bytes, float]] = []
        self.failed: set[str] = set()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                outer.requests.append((headers, body, time.time()))
                status = 204
                if json.loads(body)["type"] in fail_first and headers["webhook-id"] not in outer.failed:
                    outer.failed.add(headers["webhook-id"])
                    status = 503
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = Server(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def verified(self, secret: str) -> list[tuple[dict[str, str], dict[str, Any]]]:
        """Every request, checked with the Standard Webhooks library (raises on a bad signature)."""
        hook = standardwebhooks.Webhook(secret)
        return [(headers, hook.verify(body, headers)) for headers, body, _ in self.requests]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def register(server: CubeServer, url: str, events: list[str]) -> tuple[str, str]:
    answer = httpx.post(f"{server.url}{HOOKS}", headers={"X-API-Key": server.key_a}, timeout=30,
                        json={"name": "e2e", "url": url, "events": events})
    assert answer.status_code == 201, answer.text
    return answer.json()["id"], answer.json()["signatureSecret"]


def deliveries(server: CubeServer, webhook_id: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{server.url}{HOOKS}/{webhook_id}/deliveries", headers={"X-API-Key": server.key_a},
                       timeout=30)
    assert answer.status_code == 200, answer.text
    return list(answer.json())


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    made: list[Receiver] = []
    yield made
    for r in made:
        r.close()
    # (webhooks registered here are deleted by the tests; the server's state is temporary anyway)


def test_signed_lifecycle_events_and_a_retry(e2b_env: CubeServer, receivers: list[Receiver]) -> None:
    receiver = Receiver(fail_first=("sandbox.created",))  # fails first: the created event is retried
    receivers.append(receiver)
    webhook_id, secret = register(e2b_env, receiver.url,
                                  ["sandbox.created", "sandbox.paused", "sandbox.resumed", "sandbox.killed"])
    try:
        sbx = Sandbox.create(template="base", timeout=120)
        sandbox_id = sbx.sandbox_id
        try:
            sbx.pause()
            again = Sandbox.connect(sandbox_id)  # resumes it
            assert again.commands.run("echo alive").stdout.strip() == "alive"
        finally:
            sbx.kill()

        def types() -> list[str]:
            return [event["type"] for _, event in receiver.verified(secret)
                    if event["data"].get("sandboxId") == sandbox_id]

        wanted = ["sandbox.created", "sandbox.paused", "sandbox.resumed", "sandbox.killed"]
        wait_for("the four lifecycle events, created twice (503, then the retry)",
                 lambda: all(t in types() for t in wanted) and types().count("sandbox.created") == 2)
        wait_for("the delivery log to show them delivered", lambda: sum(
            d["status"] == "delivered" for d in deliveries(e2b_env, webhook_id)) == len(wanted))
        got = receiver.verified(secret)  # every one signed: verify() raised otherwise
        first_created = [h for h, e in got if e["type"] == "sandbox.created" and e["data"]["sandboxId"] == sandbox_id]
        assert len(first_created) == 2, "the 503 was retried"
        assert first_created[0]["webhook-id"] == first_created[1]["webhook-id"]
        mine = {e["type"]: datetime.fromisoformat(e["timestamp"])
                for _, e in got if e["data"].get("sandboxId") == sandbox_id}
        assert sorted(wanted, key=lambda t: mine[t]) == wanted, mine  # stamped in the order they happened
        log = {d["type"]: d for d in deliveries(e2b_env, webhook_id) if d["status"] == "delivered"}
        assert [a["statusCode"] for a in log["sandbox.created"]["attempts"]] == [503, 204]
        assert all(a["latencyMs"] > 0 for d in log.values() for a in d["attempts"])
    finally:
        httpx.delete(f"{e2b_env.url}{HOOKS}/{webhook_id}", headers={"X-API-Key": e2b_env.key_a}, timeout=30)


def test_a_pending_delivery_is_sent_after_a_restart(e2b_env: CubeServer, receivers: list[Receiver]) -> None:
    port = free_port()
    webhook_id, secret = register(e2b_env, f"http://127.0.0.1:{port}/hook", ["sandbox.created"])
    sandbox_id = None
    try:
        sbx = Sandbox.create(template="base", timeout=300)  # nothing listens on the port yet
        sandbox_id = sbx.sandbox_id

        def failed_once() -> bool:
            log = deliveries(e2b_env, webhook_id)
            return bool(log) and log[0]["status"] == "pending" and len(log[0]["attempts"]) >= 1

        wait_for("a failed first attempt", failed_once)
        (pending,) = deliveries(e2b_env, webhook_id)
        assert pending["attempts"][0]["statusCode"] is None and pending["attempts"][0]["error"]

        e2b_env.stop(signal.SIGTERM)
        stopped_at = time.time()
        receiver = Receiver(port=port)
        receivers.append(receiver)
        e2b_env.start()
        wait_for("the delivery after the restart", lambda: len(receiver.requests) >= 1)
        (headers, event), = [(h, e) for h, e in receiver.verified(secret) if e["data"]["sandboxId"] == sandbox_id]
        assert event["type"] == "sandbox.created" and headers["webhook-id"] == pending["id"]
        assert receiver.requests[0][2] > stopped_at
        (done,) = deliveries(e2b_env, webhook_id)
        assert done["status"] == "delivered" and done["attempts"][-1]["statusCode"] == 204
        assert json.loads(receiver.requests[0][1])["id"] == pending["eventID"]
    finally:
        if sandbox_id is not None:
            try:
                Sandbox.kill(sandbox_id)
            except Exception:
                pass
        httpx.delete(f"{e2b_env.url}{HOOKS}/{webhook_id}", headers={"X-API-Key": e2b_env.key_a}, timeout=30)
