"""``/events/webhooks`` on the whole app (fake drivers, SQLite): register (a generated secret shown
once, never again), list, get, update, delete, the delivery log; another team gets 404 on every
route; a refused destination is a 400 naming ``url``; without ``[core] secrets_key`` every route
answers 403 saying how to set it."""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

LOOPBACK = '[webhooks]\nallow_networks = ["127.0.0.0/8"]\n'
HOOKS = "/events/webhooks"


@dataclass(frozen=True)
class FakeEvent:
    id: str
    type: str
    team_id: str | None
    sandbox_id: str | None = "sbx1"
    at: datetime = field(default_factory=lambda: datetime.now(UTC))
    data: dict[str, Any] = field(default_factory=dict)


async def test_webhook_lifecycle_and_team_scoping(make_app: Any) -> None:
    async with make_app(extra=LOOPBACK) as cube:
        a, b = cube.key("team-a"), cube.key("team-b")
        made = await cube.client.post(HOOKS, headers=a, json={
            "name": "ops", "url": "http://127.0.0.1:9/hook", "events": ["sandbox.created", "sandbox.killed"]})
        assert made.status_code == 201, made.text
        hook = made.json()
        secret = hook["signatureSecret"]
        assert secret.startswith("whsec_") and hook["enabled"] is True
        assert hook["events"] == ["sandbox.created", "sandbox.killed"] and hook["name"] == "ops"
        hook_id = hook["id"]
        assert hook_id.startswith("wh_") and hook["teamID"] == cube.service.authenticate(a["X-API-Key"]).team_id

        listed = await cube.client.get(HOOKS, headers=a)
        assert [w["id"] for w in listed.json()] == [hook_id] and secret not in listed.text
        got = await cube.client.get(f"{HOOKS}/{hook_id}", headers=a)
        assert got.status_code == 200 and "signatureSecret" not in got.json()

        for method, path, body in (("GET", f"{HOOKS}/{hook_id}", None), ("PATCH", f"{HOOKS}/{hook_id}", {"name": "x"}),
                                   ("DELETE", f"{HOOKS}/{hook_id}", None),
                                   ("GET", f"{HOOKS}/{hook_id}/deliveries", None)):
            other = await cube.client.request(method, path, headers=b, json=body)
            assert other.status_code == 404, (method, path, other.text)
            assert other.json() == {"code": 404, "message": f"webhook {hook_id!r} not found"}
        assert (await cube.client.get(HOOKS, headers=b)).json() == []

        patched = await cube.client.patch(f"{HOOKS}/{hook_id}", headers=a, json={"enabled": False,
                                                                                 "events": ["sandbox.paused"]})
        assert patched.status_code == 200 and patched.json()["enabled"] is False
        assert patched.json()["events"] == ["sandbox.paused"] and patched.json()["name"] == "ops"

        team_a = cube.service.authenticate(a["X-API-Key"]).team_id
        await cube.client.patch(f"{HOOKS}/{hook_id}", headers=a, json={"enabled": True})
        cube.service.webhook_delivery.record(FakeEvent("evt-1", "sandbox.paused", team_a))
        deliveries = await cube.client.get(f"{HOOKS}/{hook_id}/deliveries", headers=a)
        assert deliveries.status_code == 200
        (delivery,) = deliveries.json()
        assert delivery["eventID"] == "evt-1" and delivery["type"] == "sandbox.paused"
        assert delivery["id"].startswith("msg_") and delivery["status"] in ("pending", "delivered")

        gone = await cube.client.delete(f"{HOOKS}/{hook_id}", headers=a)
        assert gone.status_code == 204 and gone.content == b""
        assert (await cube.client.get(f"{HOOKS}/{hook_id}", headers=a)).status_code == 404


async def test_bad_registrations_are_400_naming_the_field(make_app: Any) -> None:
    async with make_app(extra=LOOPBACK) as cube:
        a = cube.key()
        for body, field_name in (({"url": "http://10.0.0.1/x"}, "url"), ({"url": "http://169.254.169.254/"}, "url"),
                                 ({"url": "gopher://x.example.com"}, "url"),
                                 ({"url": "https://x.example.com", "events": ["sandbox.lifecycle.created"]}, "events"),
                                 ({"url": "https://x.example.com", "signatureSecret": "plain"}, "signatureSecret"),
                                 ({"url": 7}, "url"), ({}, "url")):
            answer = await cube.client.post(HOOKS, headers=a, json=body)
            assert answer.status_code == 400, (body, answer.text)
            assert answer.json()["message"].startswith(field_name), answer.text
            assert answer.headers["should-retry"] == "false"
        own = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        made = await cube.client.post(HOOKS, headers=a, json={"url": "https://x.example.com", "signatureSecret": own})
        assert made.status_code == 201 and "signatureSecret" not in made.json()  # the team's own: not echoed
        assert own not in made.text


async def test_without_secrets_key_every_route_is_403(make_app: Any) -> None:
    async with make_app(secrets_key=False, extra=LOOPBACK) as cube:
        a = cube.key()
        for method, path, body in (("GET", HOOKS, None), ("POST", HOOKS, {"url": "https://x.example.com"}),
                                   ("GET", f"{HOOKS}/wh_x", None), ("PATCH", f"{HOOKS}/wh_x", {"name": "n"}),
                                   ("DELETE", f"{HOOKS}/wh_x", None), ("GET", f"{HOOKS}/wh_x/deliveries", None)):
            answer = await cube.client.request(method, path, headers=a, json=body)
            assert answer.status_code == 403, (method, path, answer.text)
            assert "secrets_key" in answer.json()["message"]
        assert (await cube.client.get(HOOKS)).status_code == 401  # no key: not even that
