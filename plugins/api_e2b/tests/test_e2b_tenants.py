"""Team B plays the attacker against team A on the fakes: every route with A's ids is a 404, and
per-team quotas answer 429 with the E2B error body.

(The real-server version of a representative subset is tests/e2e/test_e2e_tenants.py.)
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from test_e2b_routes import assert_error, create


def check(openapi: Any, method: str, template: str, r: Any) -> None:
    """Check ``r`` against the spec where the spec documents that status (the vendored E2B spec omits
    some, e.g. 404 on DELETE /templates/{id}); the E2B error body is checked by assert_error anyway."""
    op = openapi.spec["paths"].get(template, {}).get(method.lower())
    if op is not None and str(r.status_code) in op["responses"]:
        openapi.check(method, template, r)


@pytest.fixture
async def victim(cube: Any) -> dict[str, Any]:
    """Team A: one running sandbox, one paused sandbox, one snapshot, a network policy."""
    a = cube.key("team-a")
    running = (await create(cube, a, network={"allowOut": ["1.1.1.1"], "denyOut": ["0.0.0.0/0"]}))["sandboxID"]
    paused = (await create(cube, a))["sandboxID"]
    r = await cube.client.post(f"/sandboxes/{paused}/pause", headers=cube.headers(a))
    assert r.status_code == 204
    r = await cube.client.post(f"/sandboxes/{running}/snapshots", json={"name": "a-snap"}, headers=cube.headers(a))
    assert r.status_code == 201, r.text
    return {"key": a, "running": running, "paused": paused, "snapshot": r.json()["snapshotID"]}


async def test_team_b_gets_404_on_every_route_with_team_a_ids(cube, openapi, victim) -> None:
    b = cube.key("team-b")
    hb = cube.headers(b)
    own = (await create(cube, b))["sandboxID"]  # B's own sandbox, for routes that take two ids
    run, paused, snap = victim["running"], victim["paused"], victim["snapshot"]
    attacks: list[tuple[str, str, str, dict[str, Any] | None, str]] = [
        ("GET", f"/sandboxes/{run}", "/sandboxes/{sandboxID}", None, run),
        ("DELETE", f"/sandboxes/{run}", "/sandboxes/{sandboxID}", None, run),
        ("DELETE", f"/sandboxes/{paused}", "/sandboxes/{sandboxID}", None, paused),
        ("POST", f"/sandboxes/{run}/timeout", "/sandboxes/{sandboxID}/timeout", {"timeout": 1}, run),
        ("POST", f"/sandboxes/{run}/refreshes", "/sandboxes/{sandboxID}/refreshes", {"duration": 60}, run),
        ("POST", f"/sandboxes/{run}/pause", "/sandboxes/{sandboxID}/pause", None, run),
        ("POST", f"/sandboxes/{paused}/resume", "/sandboxes/{sandboxID}/resume", {"timeout": 60}, paused),
        ("POST", f"/sandboxes/{paused}/connect", "/sandboxes/{sandboxID}/connect", {"timeout": 60}, paused),
        ("POST", f"/v2/sandboxes/{paused}/connect", "/v2/sandboxes/{sandboxID}/connect", {"timeout": 60}, paused),
        ("POST", f"/v2/sandboxes/{run}/connect", "/v2/sandboxes/{sandboxID}/connect", {}, run),
        ("PUT", f"/sandboxes/{run}/network", "/sandboxes/{sandboxID}/network", {"allowOut": ["8.8.8.8"]}, run),
        ("GET", f"/sandboxes/{run}/network/audit", "/sandboxes/{sandboxID}/network/audit", None, run),
        ("GET", f"/sandboxes/{run}/metrics", "/sandboxes/{sandboxID}/metrics", None, run),
        ("GET", f"/sandboxes/{run}/logs", "/sandboxes/{sandboxID}/logs", None, run),
        ("GET", f"/v2/sandboxes/{run}/logs", "/v2/sandboxes/{sandboxID}/logs", None, run),
        ("POST", f"/sandboxes/{run}/fork", "/sandboxes/{sandboxID}/fork", {"count": 1}, run),
        ("POST", f"/sandboxes/{run}/snapshots", "/sandboxes/{sandboxID}/snapshots", {"name": "stolen"}, run),
        ("POST", f"/sandboxes/{run}/rollback", "/sandboxes/{sandboxID}/rollback", {"snapshotID": snap}, snap),
        # B's own sandbox rolled back onto A's snapshot: the snapshot is not B's
        ("POST", f"/sandboxes/{own}/rollback", "/sandboxes/{sandboxID}/rollback", {"snapshotID": snap}, snap),
        ("DELETE", f"/templates/{snap}", "/templates/{templateID}", None, snap),
        ("POST", "/v2/sandboxes", "/v2/sandboxes", {"templateID": snap}, snap),  # create from A's snapshot
        ("POST", "/sandboxes", "/sandboxes", {"templateID": snap}, snap),
    ]
    for method, path, template, body, needle in attacks:
        r = await cube.client.request(method, path, headers=hb, **({"json": body} if body is not None else {}))
        check(openapi, method, template, r)
        assert_error(r, 404, needle, openapi=openapi)
        assert r.headers["should-retry"] == "false"

    # the routes that list or batch: A's things are simply absent
    r = await cube.client.get("/sandboxes/metrics", params={"sandbox_ids": f"{run},{paused}"}, headers=hb)
    assert r.status_code == 200 and r.json() == {"sandboxes": {}}
    for path in ("/v2/sandboxes", "/sandboxes"):
        listed = {s["sandboxID"] for s in (await cube.client.get(path, headers=hb)).json()}
        assert listed <= {own}, listed
    r = await cube.client.get("/v2/sandboxes", params={"state": "paused"}, headers=hb)
    assert r.json() == []
    for params in ({}, {"sandboxID": run}, {"name": "a-snap"}):
        r = await cube.client.get("/snapshots", params=params, headers=hb)
        openapi.check("GET", "/snapshots", r)
        assert r.status_code == 200 and r.json() == [], (params, r.json())

    # ... and nothing of A's changed
    ha = cube.headers(victim["key"])
    r = await cube.client.get(f"/sandboxes/{run}", headers=ha)
    assert r.status_code == 200 and r.json()["state"] == "running"
    assert (await cube.client.get(f"/sandboxes/{paused}", headers=ha)).json()["state"] == "paused"
    team_a = cube.service.authenticate(victim["key"]).team_id
    sb = cube.service.get(team_a, run)
    assert sb.network.allow_out == ("1.1.1.1",)
    assert (sb.end_at - datetime.now(UTC)).total_seconds() > 200  # B's 1 s timeout did not land
    assert [s.snapshot_id for s in cube.service.list_snapshots(team_a)] == [snap]
    assert cube.service.list(cube.service.authenticate(b).team_id) == [cube.service.get(
        cube.service.authenticate(b).team_id, own)]  # no fork, no create from A's snapshot landed with B


QUOTAS = '[quotas]\nmax_sandboxes = 2\nmax_snapshots = 1\nmax_network_rules = 2\n'


async def test_quotas_answer_429_with_the_e2b_body(cube_factory, openapi, tmp_path) -> None:
    async with cube_factory(extra=QUOTAS) as cube:
        a, b = cube.key("team-a"), cube.key("team-b")
        ha = cube.headers(a)
        first = (await create(cube, a))["sandboxID"]
        second = (await create(cube, a))["sandboxID"]
        assert (await cube.client.post(f"/sandboxes/{first}/pause", headers=ha)).status_code == 204
        for path in ("/v2/sandboxes", "/sandboxes"):
            r = await cube.client.post(path, json={"templateID": "base"}, headers=ha)
            check(openapi, "POST", path, r)
            assert_error(r, 429, "quota of 2 sandboxes", "paused", openapi=openapi)
            assert r.headers["should-retry"] == "false" and "retry-after" not in r.headers
        r = await cube.client.post(f"/sandboxes/{second}/fork", json={"count": 1}, headers=ha)
        assert_error(r, 429, "quota", openapi=openapi)
        (await create(cube, b))  # team B is not affected by A's quota
        # freeing a slot (killing the paused one) lets the next create in
        assert (await cube.client.delete(f"/sandboxes/{first}", headers=ha)).status_code == 204
        third = (await create(cube, a))["sandboxID"]
        # snapshots: one allowed; deleting it frees the slot
        r = await cube.client.post(f"/sandboxes/{third}/snapshots", json={}, headers=ha)
        assert r.status_code == 201, r.text
        snap = r.json()["snapshotID"]
        r = await cube.client.post(f"/sandboxes/{third}/snapshots", json={}, headers=ha)
        check(openapi, "POST", "/sandboxes/{sandboxID}/snapshots", r)
        assert_error(r, 429, "snapshots", openapi=openapi)
        assert (await cube.client.delete(f"/templates/{snap}", headers=ha)).status_code == 204
        assert (await cube.client.post(f"/sandboxes/{third}/snapshots", json={}, headers=ha)).status_code == 201
        # egress rules per policy, on create and on update
        r = await cube.client.post("/v2/sandboxes", json={"templateID": "base", "network": {
            "allowOut": ["1.1.1.1", "2.2.2.2"], "denyOut": ["0.0.0.0/0"]}}, headers=cube.headers(b))
        assert_error(r, 429, "egress rules", openapi=openapi)
        r = await cube.client.put(f"/sandboxes/{third}/network", json={
            "allowOut": ["1.1.1.1", "2.2.2.2"], "denyOut": ["0.0.0.0/0"]}, headers=ha)
        check(openapi, "PUT", "/sandboxes/{sandboxID}/network", r)
        assert_error(r, 429, "egress rules", openapi=openapi)


async def test_served_schema_documents_the_quota_answers(cube) -> None:
    paths = cube.app.openapi()["paths"]
    for method, path in [("post", "/v2/sandboxes"), ("post", "/sandboxes"), ("post", "/sandboxes/{sandbox_id}/resume"),
                         ("post", "/v2/sandboxes/{sandbox_id}/connect"), ("post", "/sandboxes/{sandbox_id}/connect"),
                         ("put", "/sandboxes/{sandbox_id}/network"), ("post", "/sandboxes/{sandbox_id}/fork"),
                         ("post", "/sandboxes/{sandbox_id}/snapshots")]:
        assert "429" in paths[path][method]["responses"], (method, path)
