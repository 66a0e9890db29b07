"""Sending webhook deliveries: from the event bus to the outbox, from the outbox to the receivers.

Each control plane runs one :class:`WebhookDelivery`:

1. **Record.** It follows the event bus (every team) and records one pending
   :class:`~cube_core.webhooks.Delivery` per matching webhook in the state store. The delivery's
   id is derived from the event and the webhook, so several masters that all see an event (the
   bus fans out over PostgreSQL) record it once.
2. **Send.** It claims due deliveries (``StateStore.claim_deliveries``: ``FOR UPDATE SKIP LOCKED``
   on PostgreSQL, one ``BEGIN IMMEDIATE`` transaction on SQLite) for a lease longer than one
   attempt, POSTs each signed body, and writes the attempt (status code, error, latency) back
   while it still holds the claim. A 2xx delivers it; anything else (3xx included: redirects are
   not followed, a timeout, a refused connection, a destination the SSRF guard refuses) is retried
   with exponential backoff and jitter (``[webhooks]``), honouring ``Retry-After``, until
   ``max_attempts``; a 410 Gone gives up at once and disables the webhook, as Standard Webhooks
   recommends.
3. **Resume.** Pending deliveries live in the store: a master that starts again drops its own old
   claims and sends what is due; a master that died holding claims loses them when the lease ends.

The host name of a URL is resolved at each attempt and every address is checked against
``[webhooks]`` (:func:`cube_core.webhooks.destination_problem`); the request then goes to the
checked address (the ``Host`` header and TLS name stay the URL's), so a name that changes its
answer between check and connect (DNS rebinding) cannot point the host elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import random
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import httpx
import structlog

from cube_core.config import WebhookSettings
from cube_core.store import StateStore
from cube_core.teamwebhooks import TeamWebhooks
from cube_core.webhooks import (
    Delivery,
    DeliveryAttempt,
    DeliveryStatus,
    EventLike,
    IpAddress,
    Webhook,
    deliveries_for,
    destination_problem,
    parse_retry_after,
    retry_delay,
    signed_headers,
)

log = structlog.get_logger(__name__)

Resolver = Callable[[str, int], Awaitable[list[IpAddress]]]
BATCH = 16
LOST = "stream.lost"  # what a bus subscription yields after it dropped events (cube_core.events)
USER_AGENT = "Cube-Webhooks/1 (+https://www.standardwebhooks.com)"


class Refused(Exception):
    """The destination is not allowed; the attempt fails without a request."""


async def resolve(host: str, port: int) -> list[IpAddress]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    out: list[IpAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in out:
            out.append(address)
    return out


class WebhookDelivery:
    """See the module. ``clock`` (Unix seconds), ``jitter``, ``resolver`` and ``verify`` (the TLS
    trust; default: the system's CAs) are for tests."""

    def __init__(self, store: StateStore, webhooks: TeamWebhooks, settings: WebhookSettings, holder: str, *,
                 clock: Callable[[], float] = time.time, jitter: Callable[[], float] | None = None,
                 resolver: Resolver = resolve, keep_s: float = 7 * 86400,
                 verify: ssl.SSLContext | bool = True) -> None:
        self.store = store
        self.webhooks = webhooks
        self.settings = settings
        self.holder = holder
        self.clock = clock
        self.jitter = jitter or (lambda: random.uniform(0.8, 1.2))
        self.resolver = resolver
        self.keep_s = keep_s
        self.verify = verify
        self.lease_s = settings.timeout_s + 30.0
        self._allow = settings.networks("allow_networks")
        self._deny = settings.networks("deny_networks")
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._client: httpx.AsyncClient | None = None

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, events: AsyncIterator[EventLike] | None) -> None:
        """Resume what is pending (this holder's old claims are dropped), then follow ``events``."""
        released = self.store.release_deliveries(self.holder)
        if released:
            log.info("webhook deliveries resumed after a restart", claims_dropped=released)
        self._tasks.append(asyncio.create_task(self._work(), name="cube-webhook-delivery"))
        if events is not None:
            self._tasks.append(asyncio.create_task(self._follow(events), name="cube-webhook-events"))

    async def stop(self) -> None:
        for task in self._tasks:
            # cancelled again until it ends: Python 3.11's wait_for can swallow a cancel that
            # lands as the event it waits for is set (record() during the stop), and the loop
            # would go on
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        self.store.release_deliveries(self.holder)  # in-flight ones: sent again by whoever runs next

    async def _follow(self, events: AsyncIterator[EventLike]) -> None:
        try:
            async for event in events:
                if event.type == LOST:
                    log.warning("webhook deliveries lost: the event bus dropped events this master fell behind on",
                                lost=event.data.get("lost"))
                    continue
                try:
                    self.record(event)
                except Exception:
                    log.exception("recording webhook deliveries failed", event_id=event.id, event_type=event.type)
        finally:
            close = getattr(events, "close", None)  # a bus Subscription: unregister it
            if callable(close):
                close()

    async def _work(self) -> None:
        last_prune = 0.0
        while True:
            try:
                sent = await self.run_once()
                if self.clock() - last_prune > 3600:
                    last_prune = self.clock()
                    self.store.prune_deliveries(self.now() - timedelta(seconds=self.keep_s))
            except Exception:
                log.exception("webhook delivery round failed")
                sent = 0
            if sent < BATCH:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=self.settings.poll_s)
                self._wake.clear()

    # -- recording and sending -------------------------------------------------------------------

    def record(self, event: EventLike) -> list[Delivery]:
        """The deliveries ``event`` makes (recorded once, whoever records them first)."""
        if event.team_id is None:
            return []
        deliveries = deliveries_for(event, self.store.list_webhooks(event.team_id))
        if deliveries:
            deliveries = [d.evolve(next_attempt_at=self.now(), created_at=self.now()) for d in deliveries]
            self.store.add_deliveries(deliveries)
            self._wake.set()
        return deliveries

    async def run_once(self) -> int:
        """Claim the due deliveries (up to a batch) and make one attempt of each; how many."""
        claimed = self.store.claim_deliveries(self.holder, self.now(), BATCH, self.lease_s)
        if claimed:
            await asyncio.gather(*(self._attempt(d) for d in claimed))
        return len(claimed)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False, verify=self.verify,
                                             timeout=httpx.Timeout(self.settings.timeout_s),
                                             headers={"user-agent": USER_AGENT})
        return self._client

    async def _attempt(self, delivery: Delivery) -> None:
        webhook = self.store.get_webhook(delivery.team_id, delivery.webhook_id)
        if webhook is None:  # deleted while claimed: its rows are gone too
            return
        at = self.now()
        if not webhook.enabled:
            attempt = DeliveryAttempt(at=at, error="the webhook is disabled")
            self._finish(delivery.evolve(status=DeliveryStatus.FAILED, attempts=(*delivery.attempts, attempt)))
            return
        started = time.perf_counter()
        status_code: int | None = None
        error: str | None = None
        retry_after: float | None = None
        try:
            status_code, retry_after = await self._post(webhook, delivery)
            if not 200 <= status_code < 300:
                error = f"the receiver answered {status_code}"
        except Refused as exc:
            error = f"destination refused: {exc}"
        except httpx.TimeoutException:
            error = f"no answer within {self.settings.timeout_s:g} s"
        except (httpx.HTTPError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        attempt = DeliveryAttempt(at=at, status_code=status_code, error=error,
                                  latency_ms=round((time.perf_counter() - started) * 1000, 1))
        attempts = (*delivery.attempts, attempt)
        if error is None:
            done = delivery.evolve(status=DeliveryStatus.DELIVERED, attempts=attempts)
        elif status_code == 410:
            done = delivery.evolve(status=DeliveryStatus.FAILED, attempts=attempts)
            self._disable(webhook, "the receiver answered 410 Gone")
        elif len(attempts) >= self.settings.max_attempts:
            done = delivery.evolve(status=DeliveryStatus.FAILED, attempts=attempts)
        else:
            delay = retry_delay(len(attempts), base_s=self.settings.backoff_s, max_s=self.settings.backoff_max_s,
                                jitter=self.jitter(), retry_after_s=retry_after)
            done = delivery.evolve(attempts=attempts, next_attempt_at=at + timedelta(seconds=delay))
        log.info("webhook delivery attempt", webhook_id=webhook.webhook_id, team_id=webhook.team_id,
                 delivery_id=delivery.delivery_id, event_type=delivery.event_type, attempt=len(attempts),
                 status_code=status_code, error=error, latency_ms=attempt.latency_ms, outcome=done.status.value)
        self._finish(done)

    def _finish(self, delivery: Delivery) -> None:
        if not self.store.finish_delivery(delivery, self.holder):
            log.warning("webhook delivery outcome dropped: its claim was lost", delivery_id=delivery.delivery_id)

    def _disable(self, webhook: Webhook, reason: str) -> None:
        self.store.replace_webhook(webhook.evolve(enabled=False, disabled_reason=reason))
        log.warning("webhook disabled", webhook_id=webhook.webhook_id, team_id=webhook.team_id, reason=reason)

    async def _post(self, webhook: Webhook, delivery: Delivery) -> tuple[int, float | None]:
        url = httpx.URL(webhook.url)
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(host)]
        except ValueError:
            try:
                addresses = await self.resolver(host, port)
            except OSError as exc:
                raise Refused(f"{host} does not resolve ({exc})") from exc
        if not addresses:
            raise Refused(f"{host} has no address")
        for address in addresses:  # every answer, not only the one used: a later attempt may get another
            problem = destination_problem(address, self._allow, self._deny)
            if problem:
                raise Refused(problem)
        body = delivery.payload.encode()
        headers = signed_headers(self.webhooks.secret(webhook), delivery.delivery_id, int(self.clock()), body)
        headers["host"] = url.netloc.decode("ascii")
        pinned = url.copy_with(host=str(addresses[0]))
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        async with self._http().stream("POST", pinned, content=body, headers=headers,
                                       extensions=extensions) as response:
            return response.status_code, parse_retry_after(response.headers.get("retry-after"))
