"""The caller's team's lifecycle webhooks: register, list, get, update, delete, and the delivery log.

Served at ``/events/webhooks``, the path of E2B's own webhook API (which its SDKs do not wrap),
with its request fields (``name``, ``url``, ``enabled``, ``events``, ``signatureSecret``). What
differs (docs/webhooks.md): the event types are Cube's (``sandbox.created``, ...), deliveries are
signed the Standard Webhooks way (``webhook-id``/``webhook-timestamp``/``webhook-signature``,
HMAC-SHA256 with a ``whsec_`` secret), a left-out secret is generated and returned once by the
create, and ``GET /events/webhooks/{webhookID}/deliveries`` shows every attempt. Another team's
webhook is 404. Without ``[core] secrets_key`` (secrets are sealed with it) every route answers 403.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from cube_core.webhooks import Delivery, Webhook
from fastapi import APIRouter, Query, Response, Security
from pydantic import Field

from cube_api_e2b.routing import API_KEY_SCHEME, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import Request
from cube_api_e2b.schemas import Response as Out

router = APIRouter(route_class=E2bRoute, tags=["webhooks"], dependencies=[Security(API_KEY_SCHEME)])


class NewWebhook(Request):
    url: str
    name: str = ""
    enabled: bool = True
    events: list[str] | None = None
    """Left out: every event type."""
    signature_secret: str | None = Field(default=None, repr=False)
    """``whsec_<base64 of 24-64 bytes>``; left out: generated and returned once."""


class WebhookUpdate(Request):
    url: str | None = None
    name: str | None = None
    enabled: bool | None = None
    events: list[str] | None = None
    signature_secret: str | None = Field(default=None, repr=False)


class WebhookOut(Out):
    id: str
    team_id: str = Field(alias="teamID")
    name: str
    url: str
    enabled: bool
    events: list[str]
    disabled_reason: str | None = None
    created_at: datetime
    updated_at: datetime
    signature_secret: str | None = None
    """Only in the create's answer, when the secret was generated."""


class AttemptOut(Out):
    at: datetime
    status_code: int | None
    error: str | None
    latency_ms: float


class DeliveryOut(Out):
    id: str
    event_id: str = Field(alias="eventID")
    type: str
    status: str
    attempts: list[AttemptOut]
    next_attempt_at: datetime | None
    created_at: datetime


def webhook_out(webhook: Webhook, secret: str | None = None) -> WebhookOut:
    return WebhookOut(id=webhook.webhook_id, teamID=webhook.team_id, name=webhook.name, url=webhook.url,
                      enabled=webhook.enabled, events=list(webhook.events), disabled_reason=webhook.disabled_reason,
                      created_at=webhook.created_at, updated_at=webhook.updated_at, signature_secret=secret)


def delivery_out(d: Delivery) -> DeliveryOut:
    return DeliveryOut(id=d.delivery_id, eventID=d.event_id, type=d.event_type, status=d.status.value,
                       attempts=[AttemptOut(at=a.at, status_code=a.status_code, error=a.error, latency_ms=a.latency_ms)
                                 for a in d.attempts],
                       next_attempt_at=d.next_attempt_at if d.status == "pending" else None, created_at=d.created_at)


@router.get("/events/webhooks", response_model=list[WebhookOut], response_model_exclude_none=True,
            responses=errors(403, 500), summary="List the team's webhooks")
async def list_webhooks(team: CurrentTeam, service: Service) -> list[WebhookOut]:
    return [webhook_out(w) for w in service.list_webhooks(team.team_id)]


@router.post("/events/webhooks", status_code=201, response_model=WebhookOut, response_model_exclude_none=True,
             responses=errors(403, 429, 500), summary="Register a webhook (a generated secret is shown once)")
async def create_webhook(body: NewWebhook, team: CurrentTeam, service: Service) -> WebhookOut:
    webhook, secret = service.create_webhook(team.team_id, body.url, events=body.events, name=body.name,
                                             enabled=body.enabled, secret=body.signature_secret)
    return webhook_out(webhook, secret)


@router.get("/events/webhooks/{webhook_id}", response_model=WebhookOut, response_model_exclude_none=True,
            responses=errors(403, 404, 500), summary="A webhook's configuration (never its secret)")
async def get_webhook(webhook_id: str, team: CurrentTeam, service: Service) -> WebhookOut:
    return webhook_out(service.get_webhook(team.team_id, webhook_id))


@router.patch("/events/webhooks/{webhook_id}", response_model=WebhookOut, response_model_exclude_none=True,
              responses=errors(403, 404, 500), summary="Replace the fields given")
async def update_webhook(webhook_id: str, body: WebhookUpdate, team: CurrentTeam, service: Service) -> WebhookOut:
    return webhook_out(service.update_webhook(team.team_id, webhook_id, url=body.url, events=body.events,
                                              name=body.name, enabled=body.enabled, secret=body.signature_secret))


@router.delete("/events/webhooks/{webhook_id}", status_code=204, response_class=Response,
               responses=errors(403, 404, 500), summary="Delete a webhook and its delivery log")
async def delete_webhook(webhook_id: str, team: CurrentTeam, service: Service) -> None:
    service.delete_webhook(team.team_id, webhook_id)


@router.get("/events/webhooks/{webhook_id}/deliveries", response_model=list[DeliveryOut],
            responses=errors(403, 404, 500), summary="A webhook's deliveries, newest first, with every attempt")
async def list_deliveries(webhook_id: str, team: CurrentTeam, service: Service,
                          limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> list[DeliveryOut]:
    return [delivery_out(d) for d in service.webhook_deliveries(team.team_id, webhook_id, limit)]
