"""Lifecycle webhooks: records, errors, the Standard Webhooks signature, the retry schedule, and
which destinations a tenant may make the host call.

A team registers webhooks (``/events/webhooks``, :mod:`cube_core.teamwebhooks`); every event of
the service's event bus that names the team and a type the webhook asked for becomes one
:class:`Delivery` in the state store (an outbox), sent and retried by
:mod:`cube_core.webhookdelivery`. Deliveries follow the Standard Webhooks spec
(https://www.standardwebhooks.com, version 1.0.0):

- headers ``webhook-id`` (the delivery's id, the same on every retry: the receiver's idempotency
  key), ``webhook-timestamp`` (integer Unix seconds of this attempt) and ``webhook-signature``
  (``v1,<base64 HMAC-SHA256>`` over ``{webhook-id}.{webhook-timestamp}.{body}``);
- the secret is ``whsec_`` + base64 of 24 to 64 random bytes (the HMAC key is the decoded bytes);
- the body is minified JSON ``{"id", "type", "timestamp", "data"}``, fixed when the delivery is
  recorded, so a retry sends the same bytes.

Errors, all :class:`~cube_core.errors.CubeError`::

    CubeError
    └── WebhookError
        ├── WebhookNotFoundError     (another team's webhook is "not found" too)
        ├── WebhookRequestError      (a field of a registration; names it)
        │   └── DestinationRefusedError  ([webhooks] destinations: SSRF guard)
        ├── WebhookLimitError        ([webhooks] max_per_team)
        └── WebhooksDisabledError    ([core] secrets_key is not set: secrets cannot be sealed)
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import ipaddress
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

from pydantic import Field

from cube_core.errors import CubeError
from cube_core.models import Frozen, utcnow

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32
ID_PREFIX = "wh_"
#: The bus's event types a team may subscribe to (node events are the operator's: no team).
EVENT_TYPES: tuple[str, ...] = (
    "sandbox.created", "sandbox.paused", "sandbox.resumed", "sandbox.killed", "sandbox.expired",
    "sandbox.snapshot", "sandbox.policy_changed", "sandbox.timeout_changed", "template.build_finished",
)

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- records -----------------------------------------------------------------------------------


class Webhook(Frozen):
    """A team's webhook: where its events go. The signing secret is kept only sealed."""

    webhook_id: str
    team_id: str
    name: str = ""
    url: str
    events: tuple[str, ...]
    enabled: bool = True
    sealed_secret: str
    """base64(nonce + AES-256-GCM ciphertext) of the ``whsec_...`` secret under ``[core] secrets_key``."""
    disabled_reason: str | None = None
    """Why Cube turned it off (the receiver answered 410 Gone); ``None`` when the team did."""
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)


class DeliveryStatus(enum.StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    """Given up: attempts used up, the receiver answered 410, or the webhook was disabled."""


class DeliveryAttempt(Frozen):
    at: datetime
    status_code: int | None = None
    """The receiver's answer; ``None`` when there was none (refused, timed out, destination denied)."""
    error: str | None = None
    latency_ms: float = 0.0


class Delivery(Frozen):
    """One event for one webhook, and every attempt to send it."""

    delivery_id: str
    """``msg_...``: the ``webhook-id`` header, derived from the event and the webhook, so every
    master that sees the event records the same delivery (and it is sent once)."""
    webhook_id: str
    team_id: str
    event_id: str
    event_type: str
    payload: str
    """The exact body sent (and signed) on every attempt."""
    status: DeliveryStatus = DeliveryStatus.PENDING
    attempts: tuple[DeliveryAttempt, ...] = ()
    next_attempt_at: datetime
    created_at: datetime = Field(default_factory=utcnow)


class EventLike(Protocol):
    """What a delivery needs of a bus event (``cube_core.events.Event``)."""

    @property
    def id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def at(self) -> datetime: ...
    @property
    def team_id(self) -> str | None: ...
    @property
    def sandbox_id(self) -> str | None: ...
    @property
    def data(self) -> Mapping[str, Any]: ...


# -- errors ------------------------------------------------------------------------------------


class WebhookError(CubeError):
    """A webhook request that cannot be served."""


class WebhookNotFoundError(WebhookError):
    msg_fmt = "webhook {webhook_id!r} not found"


class WebhookRequestError(WebhookError):
    """A registration's field is not acceptable (HTTP 400); names the field."""

    msg_fmt = "{field}: {reason}"


class DestinationRefusedError(WebhookRequestError):
    """The URL's host is (or resolves to) an address ``[webhooks]`` does not allow."""

    msg_fmt = "{field}: {reason}"


class WebhookLimitError(WebhookError):
    msg_fmt = "the team has {limit} webhooks already ([webhooks] max_per_team)"


class WebhooksDisabledError(WebhookError):
    msg_fmt = ("webhooks are disabled on this server: their signing secrets are sealed with a key its operator "
               'must set, [core] secrets_key = {{ env = "CUBE_SECRETS_KEY" }} (32 random bytes in base64, '
               "e.g. `openssl rand -base64 32`)")


# -- signature (Standard Webhooks v1: symmetric) -----------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(os.urandom(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (24 to 64 bytes); ``WebhookRequestError`` otherwise."""
    if not secret.startswith(SECRET_PREFIX):
        raise WebhookRequestError(field="signatureSecret", reason=f"must start with {SECRET_PREFIX!r} "
                                  "(Standard Webhooks secret format), or be left out to get a generated one")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise WebhookRequestError(field="signatureSecret", reason="not valid base64 after whsec_") from exc
    if not 24 <= len(key) <= 64:
        raise WebhookRequestError(field="signatureSecret", reason="24 to 64 random bytes, base64-encoded")
    return key


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value: ``v1,<base64 HMAC-SHA256(id.timestamp.body)>``."""
    mac = hmac.new(secret_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": sign(secret, msg_id, timestamp, body), "content-type": "application/json"}


# -- deliveries of an event --------------------------------------------------------------------


def delivery_id(event_id: str, webhook_id: str) -> str:
    """Derived, so every master recording this event's delivery to this webhook writes the same row."""
    return "msg_" + hashlib.sha256(f"{event_id}\0{webhook_id}".encode()).hexdigest()[:32]


def payload(event: EventLike) -> str:
    data: dict[str, Any] = {}
    if event.team_id is not None:
        data["teamId"] = event.team_id
    if event.sandbox_id is not None:
        data["sandboxId"] = event.sandbox_id
    data.update(event.data)
    body = {"id": event.id, "type": event.type, "timestamp": event.at.isoformat().replace("+00:00", "Z"),
            "data": data}
    return json.dumps(body, separators=(",", ":"), sort_keys=True, default=str)


def deliveries_for(event: EventLike, webhooks: Sequence[Webhook]) -> list[Delivery]:
    """One pending delivery per enabled webhook of the event's team that asked for its type."""
    if event.team_id is None or event.type not in EVENT_TYPES:
        return []
    body = payload(event)
    now = utcnow()
    return [Delivery(delivery_id=delivery_id(event.id, w.webhook_id), webhook_id=w.webhook_id, team_id=w.team_id,
                     event_id=event.id, event_type=event.type, payload=body, next_attempt_at=now, created_at=now)
            for w in webhooks if w.enabled and w.team_id == event.team_id and event.type in w.events]


# -- retry schedule ----------------------------------------------------------------------------


def retry_delay(attempt: int, *, base_s: float, max_s: float, jitter: float,
                retry_after_s: float | None = None) -> float:
    """Seconds before attempt ``attempt + 1`` after failed attempt ``attempt`` (1-based):
    ``base_s * 2**(attempt-1)`` capped at ``max_s``, times ``jitter`` (the caller's random factor,
    0.8-1.2), and never sooner than the receiver's ``Retry-After`` (itself capped at ``max_s``)."""
    delay = float(min(base_s * 2.0 ** (attempt - 1), max_s) * jitter)
    if retry_after_s is not None:
        delay = max(delay, min(retry_after_s, max_s))
    return delay


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` in seconds (the delta form; an HTTP date is ignored)."""
    if value is None or not value.strip().isdigit():
        return None
    return float(value.strip())


# -- destinations (SSRF guard) -----------------------------------------------------------------


def destination_problem(address: IpAddress, allow: Sequence[IpNetwork], deny: Sequence[IpNetwork]) -> str | None:
    """Why the host may not call ``address``, or ``None``. Denied networks win; then the allowed
    ones; otherwise only global unicast addresses (not loopback, private, link-local with the
    cloud metadata service, shared/CGNAT as Cube's guests use, reserved, multicast)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in net for net in deny if net.version == address.version):
        return f"{address} is in a denied network ([webhooks] deny_networks)"
    if any(address in net for net in allow if net.version == address.version):
        return None
    if address.is_global and not address.is_multicast:
        return None
    kind = ("loopback" if address.is_loopback else "link-local" if address.is_link_local else
            "private" if address.is_private else "non-public")
    return f"{address} is a {kind} address; the operator can allow it with [webhooks] allow_networks"
