"""Lifecycle webhooks in the core: the signature (checked by the Standard Webhooks project's own
Python library, not by our code), the retry schedule on a fake clock, the SSRF guard, team
scoping and sealed secrets, and the outbox: real HTTP to a receiver on loopback, a restart that
resumes pending deliveries, two masters that send an event once."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import standardwebhooks

from cube_core.config import CoreSettings, WebhookSettings
from cube_core.store import SqliteStore
from cube_core.teamwebhooks import TeamWebhooks
from cube_core.webhookdelivery import WebhookDelivery
from cube_core.webhooks import (
    DeliveryStatus,
    DestinationRefusedError,
    WebhookLimitError,
    WebhookNotFoundError,
    WebhookRequestError,
    WebhooksDisabledError,
    destination_problem,
    new_secret,
    retry_delay,
    sign,
    signed_headers,
)

KEY = base64.b64encode(b"k" * 32).decode()
LOOPBACK = WebhookSettings(allow_networks=("127.0.0.0/8",), backoff_s=2, backoff_max_s=60, max_attempts=4,
                           timeout_s=2)


@dataclass(frozen=True)
class FakeEvent:
    id: str
    type: str
    team_id: str | None = "team-a"
    sandbox_id: str | None = "sbx1"
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    data: dict[str, Any] = field(default_factory=dict)


class Clock:
    """Unix seconds that move only when told (starting now: receivers check the timestamp)."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


class Server(ThreadingHTTPServer):
    request_queue_size = 128  # a burst of deliveries is not dropped by a short listen backlog
    daemon_threads = True


class Receiver:
    """An HTTP server on loopback that records each request and answers the next queued status."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.answers: list[tuple[int, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                status, headers = outer.answers.pop(0) if outer.answers else (204, {})
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def events(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.requests]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def secrets_key(monkeypatch: pytest.MonkeyPatch) -> CoreSettings:
    monkeypatch.setenv("CUBE_TEST_SECRETS_KEY", KEY)
    return CoreSettings(secrets_key={"env": "CUBE_TEST_SECRETS_KEY"})


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore(tmp_path / "cube.db")
    yield s
    s.close()


def team_webhooks(store: SqliteStore, core: CoreSettings, settings: WebhookSettings = LOOPBACK) -> TeamWebhooks:
    return TeamWebhooks(store, core, settings)


# -- signature -------------------------------------------------------------------------------------


def test_signature_verifies_with_the_standard_webhooks_library() -> None:
    secret = new_secret()
    body = b'{"type":"sandbox.created","data":{"sandboxId":"x"}}'
    headers = signed_headers(secret, "msg_abc", int(time.time()), body)
    assert standardwebhooks.Webhook(secret).verify(body, headers) == json.loads(body)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(body.replace(b"x", b"y"), headers)  # altered body
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(body, headers)  # another secret
    old = signed_headers(secret, "msg_abc", int(time.time()) - 3600, body)
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(secret).verify(body, old)  # a replay an hour later


def test_signature_matches_the_spec_example_computation() -> None:
    """The spec's scheme written out independently: HMAC-SHA256(key, "id.ts.body"), v1,<base64>."""
    import hashlib
    import hmac

    secret = "whsec_" + base64.b64encode(bytes(range(24))).decode()
    expected = base64.b64encode(hmac.new(bytes(range(24)), b"msg_1.1674087231.{}", hashlib.sha256).digest())
    assert sign(secret, "msg_1", 1674087231, b"{}") == "v1," + expected.decode()
    assert new_secret().startswith("whsec_") and len(base64.b64decode(new_secret()[6:])) == 32


# -- retry schedule and destinations ---------------------------------------------------------------


def test_retry_delay_doubles_up_to_the_cap_with_jitter_and_retry_after() -> None:
    delays = [retry_delay(n, base_s=5, max_s=60, jitter=1.0) for n in range(1, 7)]
    assert delays == [5, 10, 20, 40, 60, 60]
    assert retry_delay(2, base_s=5, max_s=60, jitter=1.2) == pytest.approx(12)
    assert retry_delay(1, base_s=5, max_s=60, jitter=1.0, retry_after_s=30) == 30
    assert retry_delay(1, base_s=5, max_s=60, jitter=1.0, retry_after_s=9999) == 60  # capped


@pytest.mark.parametrize("address", ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.30", "0.0.0.0", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1",
                                     "224.0.0.1", "240.0.0.1"])
def test_only_public_addresses_by_default(address: str) -> None:
    assert destination_problem(ipaddress.ip_address(address), (), ()) is not None


def test_allowed_and_denied_networks() -> None:
    allow = (ipaddress.ip_network("10.20.0.0/24"),)
    deny = (ipaddress.ip_network("10.20.0.5/32"), ipaddress.ip_network("93.184.0.0/16"))
    assert destination_problem(ipaddress.ip_address("93.184.1.1"), (), ()) is None  # public
    assert destination_problem(ipaddress.ip_address("10.20.0.4"), allow, deny) is None
    assert "denied" in (destination_problem(ipaddress.ip_address("10.20.0.5"), allow, deny) or "")
    assert "denied" in (destination_problem(ipaddress.ip_address("93.184.1.1"), allow, deny) or "")


# -- registration ----------------------------------------------------------------------------------


def test_registration_is_team_scoped_and_the_secret_is_sealed(store: SqliteStore, secrets_key: CoreSettings,
                                                              tmp_path: Path) -> None:
    hooks = team_webhooks(store, secrets_key)
    webhook, secret = hooks.create("team-a", "https://hooks.example.com/x", events=["sandbox.created"])
    assert secret is not None and secret.startswith("whsec_")
    assert hooks.secret(webhook) == secret
    assert secret not in (tmp_path / "cube.db").read_bytes().decode(errors="replace")  # sealed at rest
    mine, none = hooks.create("team-a", "https://b.example.com", secret=new_secret())
    assert none is None  # a secret the team chose is not echoed
    with pytest.raises(WebhookNotFoundError):
        hooks.get("team-b", webhook.webhook_id)
    with pytest.raises(WebhookNotFoundError):
        hooks.update("team-b", webhook.webhook_id, enabled=False)
    with pytest.raises(WebhookNotFoundError):
        hooks.delete("team-b", webhook.webhook_id)
    assert [w.webhook_id for w in hooks.list("team-a")] == [webhook.webhook_id, mine.webhook_id]
    assert hooks.list("team-b") == []
    updated = hooks.update("team-a", webhook.webhook_id, events=["sandbox.killed", "sandbox.killed"], name="n")
    assert updated.events == ("sandbox.killed",) and updated.name == "n"
    hooks.delete("team-a", webhook.webhook_id)
    assert [w.webhook_id for w in hooks.list("team-a")] == [mine.webhook_id]


@pytest.mark.parametrize(("url", "field_problem"), [
    ("ftp://x.example.com", "scheme"), ("https://", "no host"), ("https://user:pw@x.example.com", "credentials"),
    ("http://10.0.0.1/x", "private"), ("http://169.254.169.254/latest/meta-data", "link-local"),
    ("http://[::1]:8080/", "loopback"), ("http://localhost:9/", "loopback"),
])
def test_registration_refuses_bad_urls(store: SqliteStore, secrets_key: CoreSettings, url: str,
                                       field_problem: str) -> None:
    hooks = team_webhooks(store, secrets_key, WebhookSettings())
    with pytest.raises(WebhookRequestError, match=field_problem) as caught:
        hooks.create("team-a", url)
    assert caught.value.field == "url"
    if field_problem in ("private", "link-local", "loopback"):
        assert isinstance(caught.value, DestinationRefusedError)


def test_registration_checks_events_secret_https_and_the_team_limit(store: SqliteStore,
                                                                    secrets_key: CoreSettings) -> None:
    hooks = team_webhooks(store, secrets_key, WebhookSettings(require_https=True, max_per_team=1))
    with pytest.raises(WebhookRequestError, match="scheme must be https"):
        hooks.create("team-a", "http://x.example.com")
    with pytest.raises(WebhookRequestError, match="unknown event type"):
        hooks.create("team-a", "https://x.example.com", events=["sandbox.lifecycle.created"])
    with pytest.raises(WebhookRequestError, match="whsec_"):
        hooks.create("team-a", "https://x.example.com", secret="hunter2")
    with pytest.raises(WebhookRequestError, match="24 to 64"):
        hooks.create("team-a", "https://x.example.com", secret="whsec_" + base64.b64encode(b"short").decode())
    hooks.create("team-a", "https://x.example.com")
    with pytest.raises(WebhookLimitError):
        hooks.create("team-a", "https://y.example.com")


def test_without_secrets_key_webhooks_are_disabled(store: SqliteStore) -> None:
    hooks = team_webhooks(store, CoreSettings())
    for call in (lambda: hooks.list("team-a"), lambda: hooks.create("team-a", "https://x.example.com"),
                 lambda: hooks.get("team-a", "wh_x")):
        with pytest.raises(WebhooksDisabledError, match="secrets_key"):
            call()


# -- delivery --------------------------------------------------------------------------------------


def worker(store: SqliteStore, core: CoreSettings, clock: Clock, holder: str = "master-a",
           settings: WebhookSettings = LOOPBACK, **kw: Any) -> WebhookDelivery:
    return WebhookDelivery(store, team_webhooks(store, core, settings), settings, holder, clock=clock,
                           jitter=lambda: 1.0, **kw)


async def test_events_are_delivered_signed_and_filtered(store: SqliteStore, secrets_key: CoreSettings,
                                                        receiver: Receiver) -> None:
    clock = Clock()
    w = worker(store, secrets_key, clock)
    hook, secret = w.webhooks.create("team-a", receiver.url, events=["sandbox.created", "sandbox.killed"])
    assert secret is not None
    w.record(FakeEvent("evt-1", "sandbox.created", data={"templateId": "base"}))
    w.record(FakeEvent("evt-2", "sandbox.paused"))  # not asked for
    w.record(FakeEvent("evt-3", "sandbox.killed", team_id="team-b"))  # another team's
    w.record(FakeEvent("evt-4", "node.down", team_id=None))  # the operator's
    assert await w.run_once() == 1
    (headers, body), = receiver.requests
    event = standardwebhooks.Webhook(secret).verify(body, headers)
    assert event["type"] == "sandbox.created" and event["id"] == "evt-1"
    assert event["data"] == {"teamId": "team-a", "sandboxId": "sbx1", "templateId": "base"}
    (delivery,) = store.list_deliveries("team-a", hook.webhook_id)
    assert headers["webhook-id"] == delivery.delivery_id and delivery.status == DeliveryStatus.DELIVERED
    assert delivery.attempts[0].status_code == 204 and delivery.attempts[0].latency_ms > 0
    assert await w.run_once() == 0  # sent once
    await w.stop()


async def test_stop_ends_a_task_that_swallowed_its_cancel(store: SqliteStore, secrets_key: CoreSettings) -> None:
    """Python 3.11's ``asyncio.wait_for`` can swallow a cancel that lands as the event it waits for
    is set (it returns the result instead), and the worker's loop goes on: ``stop`` cancels again
    until the task has ended (one cancel hung the app's stop in the E2B webhook test)."""
    w = worker(store, secrets_key, Clock())
    swallowed = 0

    async def swallows_one_cancel() -> None:
        nonlocal swallowed
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed += 1

    task = asyncio.create_task(swallows_one_cancel())
    w._tasks.append(task)
    await asyncio.sleep(0)
    stopping = asyncio.create_task(w.stop())
    await asyncio.wait({stopping}, timeout=5)
    try:
        assert stopping.done(), "stop() still waits for a task that swallowed its cancel"
        assert swallowed == 1 and task.cancelled() and not w._tasks
    finally:
        task.cancel()
        stopping.cancel()


async def test_failures_are_retried_with_backoff_then_given_up(store: SqliteStore, secrets_key: CoreSettings,
                                                               receiver: Receiver) -> None:
    clock = Clock()
    w = worker(store, secrets_key, clock)
    hook, secret = w.webhooks.create("team-a", receiver.url)
    receiver.answers = [(500, {}), (302, {"location": "http://127.0.0.1:1/"}), (503, {"retry-after": "7"})]
    w.record(FakeEvent("evt-1", "sandbox.created"))
    assert await w.run_once() == 1  # 500
    assert await w.run_once() == 0  # not due: backoff 2 s
    clock.now += 1.9
    assert await w.run_once() == 0
    clock.now += 0.2
    assert await w.run_once() == 1  # 302: redirects are not followed
    clock.now += 4.1  # 2 * 2 s
    assert await w.run_once() == 1  # 503 with Retry-After: 7
    clock.now += 4.1  # the schedule says 8 s, Retry-After 7: 8 s
    assert await w.run_once() == 0
    clock.now += 4
    assert await w.run_once() == 1  # 204
    (delivery,) = store.list_deliveries("team-a", hook.webhook_id)
    assert [a.status_code for a in delivery.attempts] == [500, 302, 503, 204]
    assert delivery.status == DeliveryStatus.DELIVERED
    ids = {h["webhook-id"] for h, _ in receiver.requests}
    assert ids == {delivery.delivery_id}, "every retry carries the same webhook-id"
    for headers, body in receiver.requests:  # each attempt is signed with its own timestamp
        standardwebhooks.Webhook(secret).verify(body, headers)

    receiver.answers = [(500, {})] * 4
    w.record(FakeEvent("evt-2", "sandbox.killed"))
    for _ in range(4):
        assert await w.run_once() == 1
        clock.now += 60
    assert await w.run_once() == 0
    failed = next(d for d in store.list_deliveries("team-a", hook.webhook_id) if d.event_id == "evt-2")
    assert failed.status == DeliveryStatus.FAILED and len(failed.attempts) == 4  # max_attempts
    await w.stop()


async def test_a_refused_connection_and_a_timeout_are_attempts_too(store: SqliteStore, secrets_key: CoreSettings,
                                                                  receiver: Receiver) -> None:
    clock = Clock()
    w = worker(store, secrets_key, clock, settings=LOOPBACK.model_copy(update={"timeout_s": 0.5}))
    receiver.close()  # nothing listens there any more
    hook, _ = w.webhooks.create("team-a", receiver.url)
    w.record(FakeEvent("evt-1", "sandbox.created"))
    await w.run_once()
    silent = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)  # accepts, never answers
    try:
        w.webhooks.update("team-a", hook.webhook_id, url=f"http://127.0.0.1:{silent.server_address[1]}/")
        clock.now += 3
        await w.run_once()
    finally:
        silent.server_close()
    (delivery,) = store.list_deliveries("team-a", hook.webhook_id)
    assert delivery.status == DeliveryStatus.PENDING and [a.status_code for a in delivery.attempts] == [None, None]
    assert "ConnectError" in (delivery.attempts[0].error or "")
    assert "no answer within 0.5 s" in (delivery.attempts[1].error or "")
    await w.stop()


async def test_410_gone_disables_the_webhook(store: SqliteStore, secrets_key: CoreSettings,
                                             receiver: Receiver) -> None:
    w = worker(store, secrets_key, Clock())
    hook, _ = w.webhooks.create("team-a", receiver.url)
    receiver.answers = [(410, {})]
    w.record(FakeEvent("evt-1", "sandbox.created"))
    await w.run_once()
    (delivery,) = store.list_deliveries("team-a", hook.webhook_id)
    assert delivery.status == DeliveryStatus.FAILED
    disabled = w.webhooks.get("team-a", hook.webhook_id)
    assert not disabled.enabled and disabled.disabled_reason == "the receiver answered 410 Gone"
    assert w.record(FakeEvent("evt-2", "sandbox.created")) == []
    assert w.webhooks.update("team-a", hook.webhook_id, enabled=True).disabled_reason is None
    await w.stop()


async def test_a_name_resolving_to_a_refused_address_is_not_called(store: SqliteStore, secrets_key: CoreSettings,
                                                                  receiver: Receiver) -> None:
    """The check runs on every address the name resolves to, at each attempt (DNS rebinding)."""
    answers = {"hooks.example.com": [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.0.0.7")]}

    async def resolver(host: str, port: int) -> list[Any]:
        return answers[host]

    clock = Clock()
    w = worker(store, secrets_key, clock, resolver=resolver)
    port = receiver.url.split(":")[2].split("/")[0]
    hook, _ = w.webhooks.create("team-a", f"http://hooks.example.com:{port}/hook")
    w.record(FakeEvent("evt-1", "sandbox.created"))
    await w.run_once()
    assert receiver.requests == []
    (delivery,) = store.list_deliveries("team-a", hook.webhook_id)
    assert "destination refused: 10.0.0.7 is a private address" in (delivery.attempts[0].error or "")
    answers["hooks.example.com"] = [ipaddress.ip_address("127.0.0.1")]
    clock.now += 3
    await w.run_once()
    (headers, _), = receiver.requests  # sent to the checked address, with the URL's Host
    assert headers["host"] == f"hooks.example.com:{port}"
    await w.stop()


async def test_pending_deliveries_survive_a_restart(tmp_path: Path, secrets_key: CoreSettings,
                                                    receiver: Receiver) -> None:
    clock = Clock()
    store = SqliteStore(tmp_path / "cube.db")
    w = worker(store, secrets_key, clock)
    hook, secret = w.webhooks.create("team-a", receiver.url)
    receiver.answers = [(503, {})]
    w.record(FakeEvent("evt-1", "sandbox.created"))
    w.record(FakeEvent("evt-2", "sandbox.paused"))
    store.claim_deliveries("master-a", w.now(), 1, lease_s=600)  # in flight when the master stopped
    await w.run_once()  # evt-2's first attempt fails: pending, due in 2 s
    store.close()  # the master is gone (no stop(): it died)

    store = SqliteStore(tmp_path / "cube.db")
    clock.now += 3
    again = worker(store, secrets_key, clock)
    await again.start(None)  # drops master-a's old claims
    for _ in range(400):  # up to 20 s: under load (e2e beside it) 2.5 s was not always enough
        if len(receiver.requests) == 3:
            break
        await asyncio.sleep(0.05)
    await again.stop()
    assert sorted(e["id"] for e in receiver.events()) == ["evt-1", "evt-2", "evt-2"]
    assert {d.status for d in store.list_deliveries("team-a", hook.webhook_id)} == {DeliveryStatus.DELIVERED}
    for headers, body in receiver.requests:
        standardwebhooks.Webhook(secret).verify(body, headers)
    store.close()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_two_masters_send_an_event_once(tmp_path: Path, secrets_key: CoreSettings, receiver: Receiver,
                                              backend: str, request: pytest.FixtureRequest) -> None:
    """Both see the event on the bus and record it; the derived id and the claims make one request."""
    clock = Clock()
    if backend == "sqlite":
        stores: list[Any] = [SqliteStore(tmp_path / "cube.db"), SqliteStore(tmp_path / "cube.db")]
    else:
        from cube_core.store_postgres import PostgresStore

        url = request.getfixturevalue("postgres_url")
        stores = [PostgresStore(url), PostgresStore(url)]
    a, b = worker(stores[0], secrets_key, clock, "master-a"), worker(stores[1], secrets_key, clock, "master-b")
    a.webhooks.create("team-a", receiver.url)
    events = [FakeEvent(f"evt-{n}", "sandbox.created") for n in range(20)]
    for event in events:
        a.record(event)
        b.record(event)
    await asyncio.gather(a.run_once(), b.run_once(), a.run_once(), b.run_once())
    for _ in range(5):  # an attempt that failed on this busy box is retried
        clock.now += 60
        await asyncio.gather(a.run_once(), b.run_once())
    assert sorted(e["id"] for e in receiver.events()) == sorted(e.id for e in events)  # each once
    for w, s in ((a, stores[0]), (b, stores[1])):
        await w.stop()
        s.close()


# -- the service: its own lifecycle events reach a receiver ------------------------------------------


async def test_the_services_lifecycle_events_are_delivered(plugin_host: Any, cube_config_factory: Any,
                                                           secrets_key: CoreSettings, tmp_path: Path,
                                                           receiver: Receiver) -> None:
    """Create, pause, resume, snapshot and kill on the fakes: each event of the bus is delivered once,
    signed, stamped in the order it happened (the delivery worker runs in the service, not driven
    by the test; deliveries of one batch go out concurrently, so arrival order is not promised)."""
    from cube_core import SandboxSpec
    from cube_core.embedded import Embedded
    from cube_core.testing.fakes import FAKE_CONFIG

    text = FAKE_CONFIG.format(state_dir=tmp_path / "state").replace(
        "[core]\n", '[core]\nsecrets_key = { env = "CUBE_TEST_SECRETS_KEY" }\n', 1)
    text += '\n[webhooks]\nallow_networks = ["127.0.0.0/8"]\n'
    pair = Embedded(plugin_host(cube_config_factory(text)), SqliteStore(tmp_path / "cube.db"))
    await pair.start()
    try:
        await pair.agent.ensure_templates(("base",))
        service = pair.service
        _, secret = service.create_webhook("team-a", receiver.url)
        other, _ = service.create_webhook("team-b", receiver.url)
        sb = await service.create(SandboxSpec(template_id="base", team_id="team-a"))
        await service.pause("team-a", sb.sandbox_id)
        await service.resume("team-a", sb.sandbox_id)
        await service.snapshot("team-a", sb.sandbox_id)
        await service.kill("team-a", sb.sandbox_id)
        wanted = ["sandbox.created", "sandbox.paused", "sandbox.resumed", "sandbox.snapshot", "sandbox.killed"]
        for _ in range(400):
            if len(receiver.requests) >= len(wanted):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)  # nothing more comes
        assert secret is not None
        hook = standardwebhooks.Webhook(secret)
        got = [hook.verify(body, headers) for headers, body in receiver.requests]
        assert sorted(e["type"] for e in got) == sorted(wanted)  # each once
        by_time = sorted(got, key=lambda e: datetime.fromisoformat(e["timestamp"]))
        assert [e["type"] for e in by_time] == wanted  # stamped when it happened
        assert {e["data"]["sandboxId"] for e in got} == {sb.sandbox_id}
        assert service.webhook_deliveries("team-b", other.webhook_id) == []  # another team's events: none
    finally:
        await pair.stop()
        pair.store.close()


async def test_https_goes_to_the_checked_address_with_the_urls_tls_name(store: SqliteStore, secrets_key: CoreSettings,
                                                                      tmp_path: Path) -> None:
    """The request is pinned to the resolved, checked address, yet TLS still verifies the URL's host
    name (SNI and certificate check use it): a certificate for another name fails."""
    import ssl

    from cube_api_e2b.tls import ensure_certificates

    files = ensure_certificates(tmp_path / "tls", "hooks.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(files.cert, files.key)
    receiver = Receiver()
    receiver.server.socket = server_ctx.wrap_socket(receiver.server.socket, server_side=True)
    port = receiver.server.server_address[1]

    async def resolver(host: str, port: int) -> list[Any]:
        return [ipaddress.ip_address("127.0.0.1")]

    trust = ssl.create_default_context(cafile=str(files.ca_cert))
    try:
        w = worker(store, secrets_key, Clock(), resolver=resolver, verify=trust)
        good, _ = w.webhooks.create("team-a", f"https://api.hooks.test:{port}/hook")
        bad, _ = w.webhooks.create("team-a", f"https://wrong.example.org:{port}/hook")
        w.record(FakeEvent("evt-1", "sandbox.created"))
        await w.run_once()
        (headers, _), = receiver.requests
        assert headers["host"] == f"api.hooks.test:{port}"
        assert store.list_deliveries("team-a", good.webhook_id)[0].status == DeliveryStatus.DELIVERED
        (refused,) = store.list_deliveries("team-a", bad.webhook_id)
        assert "CERTIFICATE_VERIFY_FAILED" in (refused.attempts[0].error or ""), refused.attempts[0].error
        await w.stop()
    finally:
        receiver.close()
