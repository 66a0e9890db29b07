"""A team's webhooks (``/events/webhooks``): register, list, change, delete, and read the delivery log.

Team-scoped like sandboxes: another team's webhook is "not found". The signing secret is needed
in clear at every attempt (it is an HMAC key), so it cannot be hashed: it is sealed with
``[core] secrets_key`` (AES-256-GCM, the webhook's team and id as associated data, as
:mod:`cube_core.teamsecrets` seals values); without the key every route answers 403. A secret the
team does not give is generated and returned once, by the create.

A URL is checked when registered (scheme, no credentials in it, an address literal against
``[webhooks]`` destinations); a host name is checked at each attempt against every address it
resolves to (:mod:`cube_core.webhookdelivery`).
"""

from __future__ import annotations

import builtins
import ipaddress
from collections.abc import Sequence
from urllib.parse import urlsplit

from cube_core import ids
from cube_core.config import CoreSettings, WebhookSettings
from cube_core.models import utcnow
from cube_core.store import StateStore
from cube_core.teamsecrets import SecretBox, secret_box
from cube_core.webhooks import (
    EVENT_TYPES,
    ID_PREFIX,
    Delivery,
    DestinationRefusedError,
    Webhook,
    WebhookLimitError,
    WebhookNotFoundError,
    WebhookRequestError,
    WebhooksDisabledError,
    destination_problem,
    new_secret,
    secret_key,
)

MAX_URL = 2048
MAX_NAME = 128
SEAL_VERSION = 0  # the associated data's version slot: a webhook's secret has one current value


class TeamWebhooks:
    """The ``/events/webhooks`` operations of every team, on one store."""

    def __init__(self, store: StateStore, settings: CoreSettings, webhooks: WebhookSettings) -> None:
        self.store = store
        self.settings = webhooks
        self._box = secret_box(settings)
        self._allow = webhooks.networks("allow_networks")
        self._deny = webhooks.networks("deny_networks")

    @property
    def box(self) -> SecretBox:
        if self._box is None:
            raise WebhooksDisabledError()
        return self._box

    # -- checks --------------------------------------------------------------------------------

    def check_url(self, url: str) -> str:
        if len(url) > MAX_URL:
            raise WebhookRequestError(field="url", reason=f"at most {MAX_URL} characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise WebhookRequestError(field="url", reason=f"not a URL ({exc})") from exc
        schemes = ("https",) if self.settings.require_https else ("http", "https")
        if parts.scheme not in schemes:
            raise WebhookRequestError(field="url", reason=f"the scheme must be {' or '.join(schemes)}")
        if not parts.hostname:
            raise WebhookRequestError(field="url", reason="no host")
        if parts.username is not None or parts.password is not None:
            raise WebhookRequestError(field="url", reason="credentials in the URL are refused (they would be "
                                      "stored and logged in clear); verify the signature instead")
        if port == 0:
            raise WebhookRequestError(field="url", reason="port 0")
        host = parts.hostname
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = ipaddress.ip_address("127.0.0.1") if host.lower().rstrip(".") == "localhost" else None
        if literal is not None:
            problem = destination_problem(literal, self._allow, self._deny)
            if problem:
                raise DestinationRefusedError(field="url", reason=problem)
        return url

    @staticmethod
    def check_events(events: Sequence[str] | None) -> tuple[str, ...]:
        if events is None:
            return EVENT_TYPES
        unknown = [e for e in events if e not in EVENT_TYPES]
        if unknown:
            raise WebhookRequestError(field="events", reason=f"unknown event type(s) {', '.join(map(repr, unknown))}; "
                                      f"known: {', '.join(EVENT_TYPES)}")
        if not events:
            raise WebhookRequestError(field="events", reason="at least one event type (leave it out for all)")
        return tuple(dict.fromkeys(events))

    @staticmethod
    def check_name(name: str) -> str:
        if len(name) > MAX_NAME:
            raise WebhookRequestError(field="name", reason=f"at most {MAX_NAME} characters")
        return name

    # -- operations ----------------------------------------------------------------------------

    def list(self, team_id: str) -> builtins.list[Webhook]:
        self.box  # noqa: B018 - the same answer on every route when disabled
        return self.store.list_webhooks(team_id)

    def get(self, team_id: str, webhook_id: str) -> Webhook:
        self.box  # noqa: B018
        found = self.store.get_webhook(team_id, webhook_id)
        if found is None:
            raise WebhookNotFoundError(webhook_id=webhook_id)
        return found

    def create(self, team_id: str, url: str, *, events: Sequence[str] | None = None, name: str = "",
               enabled: bool = True, secret: str | None = None) -> tuple[Webhook, str | None]:
        """The webhook, and its secret when it was generated here (shown this once)."""
        box = self.box
        self.check_url(url)
        chosen = self.check_events(events)
        self.check_name(name)
        generated = None
        if secret is None:
            secret = generated = new_secret()
        secret_key(secret)
        if len(self.store.list_webhooks(team_id)) >= self.settings.max_per_team:
            raise WebhookLimitError(limit=self.settings.max_per_team)
        webhook_id = ids.short_id(ID_PREFIX)
        webhook = Webhook(webhook_id=webhook_id, team_id=team_id, name=name, url=url, events=chosen, enabled=enabled,
                          sealed_secret=box.seal(team_id, webhook_id, SEAL_VERSION, secret))
        self.store.put_webhook(webhook)
        return webhook, generated

    def update(self, team_id: str, webhook_id: str, *, url: str | None = None, events: Sequence[str] | None = None,
               name: str | None = None, enabled: bool | None = None, secret: str | None = None) -> Webhook:
        """Replace the fields given; enabling a webhook Cube disabled clears the reason."""
        current = self.get(team_id, webhook_id)
        changes: dict[str, object] = {"updated_at": utcnow()}
        if url is not None:
            changes["url"] = self.check_url(url)
        if events is not None:
            changes["events"] = self.check_events(events)
        if name is not None:
            changes["name"] = self.check_name(name)
        if enabled is not None:
            changes["enabled"] = enabled
            if enabled:
                changes["disabled_reason"] = None
        if secret is not None:
            secret_key(secret)
            changes["sealed_secret"] = self.box.seal(team_id, webhook_id, SEAL_VERSION, secret)
        updated = current.evolve(**changes)
        if not self.store.replace_webhook(updated):  # deleted meanwhile
            raise WebhookNotFoundError(webhook_id=webhook_id)
        return updated

    def delete(self, team_id: str, webhook_id: str) -> None:
        """The webhook and its delivery log; its pending deliveries are not sent."""
        self.box  # noqa: B018
        if not self.store.delete_webhook(team_id, webhook_id):
            raise WebhookNotFoundError(webhook_id=webhook_id)

    def deliveries(self, team_id: str, webhook_id: str, limit: int = 100) -> builtins.list[Delivery]:
        self.get(team_id, webhook_id)
        return self.store.list_deliveries(team_id, webhook_id, limit=limit)

    def secret(self, webhook: Webhook) -> str:
        """The signing secret in clear, for the delivery worker only: no route returns it."""
        return self.box.unseal(webhook.team_id, webhook.webhook_id, SEAL_VERSION, webhook.sealed_secret)
