"""The control plane on the fake drivers: status codes and bodies, checked against the vendored spec."""

from __future__ import annotations

import asyncio
import re
import urllib.parse
from datetime import UTC, datetime, timedelta

import cube_core
import pytest
from cube_core import HttpRule, Rejection, VmmError, hookimpl
from e2b_helpers import serve

SANDBOX_ID = re.compile(r"^[a-z0-9]+$")


async def create(cube, key, path="/v2/sandboxes", **body):
    body.setdefault("templateID", "base")
    r = await cube.client.post(path, json=body, headers=cube.headers(key))
    assert r.status_code == 201, r.text
    return r.json()


def assert_error(r, status, *needles, openapi=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert body["code"] == status and isinstance(body["message"], str)
    for needle in needles:
        assert needle in body["message"], body
    assert r.headers["should-retry"] in ("true", "false")
    if openapi is not None:
        errors = list(__import__("openapi_schema_validator").OAS30Validator(
            openapi.spec["components"]["schemas"]["Error"]).iter_errors(body))
        assert not errors, errors


# -- create ----------------------------------------------------------------------------------------


async def test_create_v2_is_secured_and_matches_spec(cube, openapi) -> None:
    key = cube.key()
    r = await cube.client.post("/v2/sandboxes", headers=cube.headers(key), json={
        "templateID": "base", "timeout": 120, "metadata": {"who": "me"}, "envVars": {"A": "1"},
        "autoPause": True, "autoResume": {"enabled": False}, "allow_internet_access": False})
    openapi.check("POST", "/v2/sandboxes", r)
    assert r.status_code == 201
    body = r.json()
    assert SANDBOX_ID.match(body["sandboxID"]) and body["templateID"] == "base"
    assert body["envdAccessToken"] and body["envdVersion"] == "0.4.0"
    assert "domain" not in body and "trafficAccessToken" not in body
    sb = cube.service.get(cube.service.authenticate(key).team_id, body["sandboxID"])
    assert sb.env_vars == {"A": "1"} and sb.auto_pause and not sb.network.allow_internet_access
    assert sb.envd_access_token == body["envdAccessToken"]
    assert timedelta(seconds=110) < sb.end_at - datetime.now(UTC) <= timedelta(seconds=120)


async def test_create_v1_secure_flag(cube, openapi) -> None:
    key = cube.key()
    r = await cube.client.post("/sandboxes", json={"templateID": "base", "secure": False, "timeout": 300,
                                                   "allow_internet_access": True}, headers=cube.headers(key))
    openapi.check("POST", "/sandboxes", r)
    assert "envdAccessToken" not in r.json()
    r = await cube.client.post("/sandboxes", json={"templateID": "base", "secure": True}, headers=cube.headers(key))
    openapi.check("POST", "/sandboxes", r)
    assert r.json()["envdAccessToken"]


async def test_create_default_timeout_and_unknown_template(cube, openapi) -> None:
    key = cube.key()
    body = await create(cube, key)
    sb = cube.service.get(cube.service.authenticate(key).team_id, body["sandboxID"])
    assert timedelta(seconds=290) < sb.end_at - datetime.now(UTC) <= timedelta(seconds=300)
    r = await cube.client.post("/v2/sandboxes", json={"templateID": "nope"}, headers=cube.headers(key))
    openapi.check("POST", "/v2/sandboxes", r)
    assert_error(r, 404, "nope")


async def test_domain_envd_version_and_traffic_token(cube_factory, openapi) -> None:
    async with cube_factory({"domain": "cube.localhost:8443", "envd_version": "0.6.4"}) as cube:
        key = cube.key()
        r = await cube.client.post("/v2/sandboxes", headers=cube.headers(key), json={
            "templateID": "base", "network": {"allowPublicTraffic": False, "allowOut": ["example.com"],
                                              "denyOut": ["10.0.0.0/8"]}})
        openapi.check("POST", "/v2/sandboxes", r)
        body = r.json()
        assert body["domain"] == "cube.localhost:8443" and body["envdVersion"] == "0.6.4"
        assert body["trafficAccessToken"] == cube.plugin.context.tokens.token_for(body["sandboxID"])
        detail = await cube.client.get(f"/sandboxes/{body['sandboxID']}", headers=cube.headers(key))
        openapi.check("GET", "/sandboxes/{sandboxID}", detail)
        assert detail.json()["network"] == {"allowPublicTraffic": False, "allowOut": ["example.com"],
                                            "denyOut": ["10.0.0.0/8"]}
        assert detail.json()["domain"] == "cube.localhost:8443"


@pytest.mark.parametrize(("body", "field"), [
    ({}, "templateID"),
    ({"templateID": 5}, "templateID"),
    ({"templateID": ""}, "templateID"),
    ({"templateID": "base", "timeout": "300"}, "timeout"),
    ({"templateID": "base", "timeout": -1}, "timeout"),
    ({"templateID": "base", "timeout": 10**9}, "timeout"),
    ({"templateID": "base", "metadata": {"a": 1}}, "metadata.a"),
    ({"templateID": "base", "envVars": ["A"]}, "envVars"),
    ({"templateID": "base", "autoPause": "yes"}, "autoPause"),
    ({"templateID": "base", "network": {"allowOut": ["not a host!"]}}, "network.allowOut[0]"),
    ({"templateID": "base", "network": {"denyOut": ["example.com"]}}, "network.denyOut[0]"),
    ({"templateID": "base", "network": {"dnsServers": ["1.1.1.1"]}}, "network.dnsServers"),
    ({"templateID": "base", "network": {"maskRequestHost": "x"}}, "network.maskRequestHost"),
    ({"templateID": "base", "autoResume": {"enabled": True}}, "autoResume.enabled"),
    ({"templateID": "base", "autoResume": {}}, "autoResume.enabled"),
    ({"templateID": "base", "autoPause": True, "autoPauseMemory": False, "autoResume": {"enabled": True}},
     "autoResume.enabled"),
    ({"templateID": "base", "volumeMounts": [{"name": "v", "path": "v"}]}, "volumeMounts[0].path"),
    ({"templateID": "base", "volumeMounts": [{"name": "v"}]}, "volumeMounts[0].path"),
])
async def test_create_bad_fields_are_400_naming_the_field(cube, openapi, body, field) -> None:
    r = await cube.client.post("/v2/sandboxes", json=body, headers=cube.headers(cube.key()))
    openapi.check("POST", "/v2/sandboxes", r)
    assert_error(r, 400, field)
    assert r.headers["should-retry"] == "false"
    assert cube.service.store.list_sandboxes() == []


async def test_malformed_json_is_400(cube, openapi) -> None:
    r = await cube.client.post("/v2/sandboxes", content=b"{not json", headers={
        **cube.headers(cube.key()), "content-type": "application/json"})
    openapi.check("POST", "/v2/sandboxes", r)
    assert_error(r, 400, "body")


# -- auth and teams --------------------------------------------------------------------------------


async def test_auth_missing_bad_revoked_bearer(cube, openapi) -> None:
    key = cube.key()
    r = await cube.client.get("/v2/sandboxes")
    openapi.check("GET", "/v2/sandboxes", r)
    assert_error(r, 401, "API key")
    r = await cube.client.get("/v2/sandboxes", headers={"X-API-Key": "e2b_" + "0" * 40})
    assert_error(r, 401, "invalid")
    r = await cube.client.get("/v2/sandboxes", headers={"X-API-Key": "garbage"})
    assert_error(r, 401, "malformed")
    r = await cube.client.get("/v2/sandboxes", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200
    # auth comes before body validation: no key + bad body is still 401
    r = await cube.client.post("/v2/sandboxes", json={"timeout": "x"})
    assert_error(r, 401)
    with pytest.raises(cube_core.AuthError, match="full key id"):
        cube.service.revoke_api_key(key[:10])  # never by the secret's 24-bit prefix
    r = await cube.client.get("/v2/sandboxes", headers=cube.headers(key))
    assert r.status_code == 200
    key_id = next(k.key_id for k, _ in cube.service.list_api_keys() if key.startswith(k.prefix))
    cube.service.revoke_api_key(key_id)
    r = await cube.client.get("/v2/sandboxes", headers=cube.headers(key))
    assert_error(r, 401, "invalid", openapi=openapi)


async def test_other_team_sees_404(cube, openapi) -> None:
    mine, theirs = cube.key("team-a"), cube.key("team-b")
    sid = (await create(cube, mine))["sandboxID"]
    for method, path, template in [
        ("GET", f"/sandboxes/{sid}", "/sandboxes/{sandboxID}"),
        ("DELETE", f"/sandboxes/{sid}", "/sandboxes/{sandboxID}"),
        ("POST", f"/sandboxes/{sid}/pause", "/sandboxes/{sandboxID}/pause"),
        ("POST", f"/v2/sandboxes/{sid}/connect", "/v2/sandboxes/{sandboxID}/connect"),
        ("POST", f"/sandboxes/{sid}/timeout", "/sandboxes/{sandboxID}/timeout"),
        ("GET", f"/sandboxes/{sid}/metrics", "/sandboxes/{sandboxID}/metrics"),
        ("GET", f"/sandboxes/{sid}/logs", "/sandboxes/{sandboxID}/logs"),
    ]:
        kw = {"json": {"timeout": 10}} if method == "POST" else {}
        r = await cube.client.request(method, path, headers=cube.headers(theirs), **kw)
        openapi.check(method, template, r)
        assert_error(r, 404, sid)
    r = await cube.client.get("/v2/sandboxes", headers=cube.headers(theirs))
    assert r.json() == []
    r = await cube.client.get(f"/sandboxes/{sid}", headers=cube.headers(mine))
    assert r.status_code == 200


# -- list and pagination ---------------------------------------------------------------------------


async def test_list_filters(cube, openapi) -> None:
    key = cube.key()
    a = (await create(cube, key, metadata={"app": "x", "n": "1"}))["sandboxID"]
    b = (await create(cube, key, metadata={"app": "x", "n": "2"}))["sandboxID"]
    c = (await create(cube, key, metadata={"app": "y"}))["sandboxID"]
    await cube.client.post(f"/sandboxes/{b}/pause", headers=cube.headers(key))
    h = cube.headers(key)

    async def ids(**params):
        r = await cube.client.get("/v2/sandboxes", params=params, headers=h)
        openapi.check("GET", "/v2/sandboxes", r)
        assert r.status_code == 200, r.text
        return {s["sandboxID"]: s["state"] for s in r.json()}

    assert await ids() == {a: "running", b: "paused", c: "running"}
    assert await ids(state="paused") == {b: "paused"}
    assert await ids(state="running,paused") == {a: "running", b: "paused", c: "running"}
    # the SDK's encoding: keys/values escaped, pairs form-encoded, sent as one query value
    meta = urllib.parse.urlencode({urllib.parse.quote("app"): urllib.parse.quote("x")})
    assert await ids(metadata=meta) == {a: "running", b: "paused"}
    assert await ids(metadata="app=x&n=2") == {b: "paused"}
    assert await ids(template="base") == {a: "running", b: "paused", c: "running"}
    assert await ids(template="other") == {}
    future = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert await ids(startedAfter=future) == {}
    r = await cube.client.get("/v2/sandboxes", params={"state": "killed"}, headers=h)
    assert_error(r, 400, "state")
    r = await cube.client.get("/v2/sandboxes", params={"order": "up"}, headers=h)
    assert_error(r, 400, "order")
    r = await cube.client.get("/v2/sandboxes", params={"startedAfter": "yesterday"}, headers=h)
    assert_error(r, 400, "startedAfter")
    # v1 lists running sandboxes only
    r = await cube.client.get("/sandboxes", headers=h)
    openapi.check("GET", "/sandboxes", r)
    assert {s["sandboxID"] for s in r.json()} == {a, c}
    r = await cube.client.get("/v2/sandboxes", headers=h)
    assert r.headers["x-total-running"] == "2"


async def test_pagination(cube, openapi) -> None:
    key = cube.key()
    made = [(await create(cube, key))["sandboxID"] for _ in range(5)]
    h = cube.headers(key)
    for order in ("asc", "desc"):
        seen, token, pages = [], None, 0
        while True:
            params = {"limit": 2, "order": order, **({"nextToken": token} if token else {})}
            r = await cube.client.get("/v2/sandboxes", params=params, headers=h)
            openapi.check("GET", "/v2/sandboxes", r)
            page = r.json()
            assert len(page) <= 2
            seen += [s["sandboxID"] for s in page]
            pages += 1
            token = r.headers.get("x-next-token")
            if not token:
                break
        assert pages == 3 and sorted(seen) == sorted(made) and len(set(seen)) == 5
        started = [cube.service.store.get_sandbox(s).started_at for s in seen]
        assert started == sorted(started, reverse=(order == "desc"))
    for bad in ({"limit": 0}, {"limit": 101}, {"limit": "x"}, {"nextToken": "!!!"}, {"nextToken": "e30"}):
        r = await cube.client.get("/v2/sandboxes", params=bad, headers=h)
        openapi.check("GET", "/v2/sandboxes", r)
        assert_error(r, 400, next(iter(bad)))


# -- lifecycle -------------------------------------------------------------------------------------


async def test_kill(cube, openapi) -> None:
    key = cube.key()
    sid = (await create(cube, key))["sandboxID"]
    r = await cube.client.delete(f"/sandboxes/{sid}", headers=cube.headers(key))
    openapi.check("DELETE", "/sandboxes/{sandboxID}", r)
    assert r.status_code == 204
    r = await cube.client.delete(f"/sandboxes/{sid}", headers=cube.headers(key))
    openapi.check("DELETE", "/sandboxes/{sandboxID}", r)
    assert_error(r, 404)
    r = await cube.client.get(f"/sandboxes/{sid}", headers=cube.headers(key))
    assert_error(r, 404)


async def test_timeout_and_refresh(cube, openapi) -> None:
    key = cube.key()
    team = cube.service.authenticate(key).team_id
    sid = (await create(cube, key, timeout=300))["sandboxID"]
    r = await cube.client.post(f"/sandboxes/{sid}/timeout", json={"timeout": 30}, headers=cube.headers(key))
    openapi.check("POST", "/sandboxes/{sandboxID}/timeout", r)
    assert r.status_code == 204
    end = cube.service.get(team, sid).end_at
    assert timedelta(seconds=25) < end - datetime.now(UTC) <= timedelta(seconds=30)  # shortened
    detail = (await cube.client.get(f"/sandboxes/{sid}", headers=cube.headers(key))).json()
    assert datetime.fromisoformat(detail["endAt"]) == end
    r = await cube.client.post(f"/sandboxes/{sid}/refreshes", json={"duration": 10}, headers=cube.headers(key))
    openapi.check("POST", "/sandboxes/{sandboxID}/refreshes", r)
    assert cube.service.get(team, sid).end_at == end  # a refresh never shortens
    r = await cube.client.post(f"/sandboxes/{sid}/refreshes", json={"duration": 600}, headers=cube.headers(key))
    assert r.status_code == 204
    assert cube.service.get(team, sid).end_at - datetime.now(UTC) > timedelta(seconds=590)
    r = await cube.client.post(f"/sandboxes/{sid}/refreshes", json={"duration": 4000}, headers=cube.headers(key))
    assert_error(r, 400, "duration", openapi=openapi)
    r = await cube.client.post(f"/sandboxes/{sid}/timeout", json={}, headers=cube.headers(key))
    assert_error(r, 400, "timeout", openapi=openapi)
    r = await cube.client.post(f"/sandboxes/{sid}/timeout", json={"timeout": 0}, headers=cube.headers(key))
    assert r.status_code == 204
    await cube.service.reap_expired()
    r = await cube.client.get(f"/sandboxes/{sid}", headers=cube.headers(key))
    assert_error(r, 404)  # set_timeout(0) expires at once


async def test_pause_connect_resume(cube, openapi) -> None:
    key = cube.key()
    h = cube.headers(key)
    sid = (await create(cube, key))["sandboxID"]
    r = await cube.client.post(f"/sandboxes/{sid}/resume", json={}, headers=h)
    openapi.check("POST", "/sandboxes/{sandboxID}/resume", r)
    assert_error(r, 409)  # not paused
    r = await cube.client.post(f"/sandboxes/{sid}/pause", json={}, headers=h)
    openapi.check("POST", "/sandboxes/{sandboxID}/pause", r)
    assert r.status_code == 204
    r = await cube.client.post(f"/sandboxes/{sid}/pause", headers=h)
    openapi.check("POST", "/sandboxes/{sandboxID}/pause", r)
    assert_error(r, 409)  # already paused: the SDK returns False
    assert (await cube.client.get(f"/sandboxes/{sid}", headers=h)).json()["state"] == "paused"
    r = await cube.client.post(f"/v2/sandboxes/{sid}/connect", json={"memory": False}, headers=h)
    openapi.check("POST", "/v2/sandboxes/{sandboxID}/connect", r)  # memory dropped: boots from its disk
    assert r.status_code == 201 and r.json()["sandboxID"] == sid and r.json()["envdAccessToken"]
    r = await cube.client.post(f"/v2/sandboxes/{sid}/connect", json={"timeout": 900}, headers=h)
    openapi.check("POST", "/v2/sandboxes/{sandboxID}/connect", r)
    assert r.status_code == 200
    detail = (await cube.client.get(f"/sandboxes/{sid}", headers=h)).json()
    assert detail["state"] == "running"
    assert datetime.fromisoformat(detail["endAt"]) - datetime.now(UTC) > timedelta(seconds=890)
    r = await cube.client.post(f"/sandboxes/{sid}/connect", json={}, headers=h)
    openapi.check("POST", "/sandboxes/{sandboxID}/connect", r)
    assert_error(r, 400, "timeout")  # v1 connect requires it
    r = await cube.client.post(f"/sandboxes/{sid}/connect", json={"timeout": 60}, headers=h)
    openapi.check("POST", "/sandboxes/{sandboxID}/connect", r)
    assert r.status_code == 200
    await cube.client.post(f"/sandboxes/{sid}/pause", json={"memory": True}, headers=h)
    r = await cube.client.post(f"/sandboxes/{sid}/resume", json={"timeout": 60}, headers=h)
    openapi.check("POST", "/sandboxes/{sandboxID}/resume", r)
    assert r.status_code == 201
    r = await cube.client.post(f"/sandboxes/{sid}/pause", json={"memory": False}, headers=h)
    openapi.check("POST", "/sandboxes/{sandboxID}/pause", r)
    assert r.status_code == 204  # filesystem only: its VM ended, its disk kept
    assert cube.service.store.get_sandbox(sid).runtime.disk_only
    r = await cube.client.post(f"/v2/sandboxes/{sid}/connect", json={}, headers=h)
    assert r.status_code == 201 and cube.service.store.get_sandbox(sid).runtime.vm is not None
    r = await cube.client.post("/v2/sandboxes/nope/connect", json={}, headers=h)
    openapi.check("POST", "/v2/sandboxes/{sandboxID}/connect", r)
    assert_error(r, 404)


async def test_network_update_and_audit(cube, openapi) -> None:
    key = cube.key()
    h = cube.headers(key)
    sid = (await create(cube, key, network={"allowOut": ["1.1.1.1"]}))["sandboxID"]
    r = await cube.client.put(f"/sandboxes/{sid}/network", headers=h,
                              json={"allowOut": ["*.example.com", "8.8.8.8/32"], "denyOut": ["0.0.0.0/0"]})
    openapi.check("PUT", "/sandboxes/{sandboxID}/network", r)
    assert r.status_code == 204
    detail = (await cube.client.get(f"/sandboxes/{sid}", headers=h)).json()
    assert detail["network"]["allowOut"] == ["*.example.com", "8.8.8.8/32"]
    assert detail["network"]["denyOut"] == ["0.0.0.0/0"] and detail["allowInternetAccess"] is True
    nic_slot = f"fake-{sid}"
    assert cube.agent.network.slots[nic_slot].allow_out == ("*.example.com", "8.8.8.8/32")
    r = await cube.client.put(f"/sandboxes/{sid}/network", json={"allow_internet_access": False}, headers=h)
    assert r.status_code == 204
    assert cube.agent.network.slots[nic_slot].allow_out == ()  # omitted fields are cleared
    assert cube.agent.network.slots[nic_slot].allow_internet_access is False
    r = await cube.client.put(f"/sandboxes/{sid}/network", json={"denyOut": ["evil.com"]}, headers=h)
    assert_error(r, 400, "denyOut[0]", openapi=openapi)
    r = await cube.client.put(f"/sandboxes/{sid}/network", json={"rules": {}}, headers=h)
    assert r.status_code == 204  # an empty rule set is no rule
    bad = {"a.com": [{"transform": {"headers": {"A": "${e2b.identity.tokens.aws}"}}}]}
    r = await cube.client.put(f"/sandboxes/{sid}/network", json={"rules": bad}, headers=h)
    assert_error(r, 400, "rules.a.com[0].transform.headers.A", "e2b.identity", openapi=openapi)
    for bad in ({"a b": []}, {"a.com": [{"headers": {}}]}, {"a.com": [{"transform": {"headers": {"A": "x\r\ny"}}}]},
                {f"h{i}.com": [{}] * 4 for i in range(65)}):
        r = await cube.client.put(f"/sandboxes/{sid}/network", json={"rules": bad}, headers=h)
        assert_error(r, 400, "rules", openapi=openapi)
    rules = {"API.example.com": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.k}"}}}, {}]}
    r = await cube.client.put(f"/sandboxes/{sid}/network", json={"rules": rules}, headers=h)
    assert r.status_code == 204
    assert cube.agent.network.slots[nic_slot].rules == (
        HttpRule(host="api.example.com", headers={"Authorization": "Bearer ${e2b.secrets.k}"}),
        HttpRule(host="api.example.com"))
    detail = (await cube.client.get(f"/sandboxes/{sid}", headers=h)).json()
    assert detail["network"]["rules"] == {"api.example.com": [
        {"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.k}"}}}, {}]}
    r = await cube.client.get(f"/sandboxes/{sid}/network/audit", params={"limit": 5}, headers=h)
    openapi.check("GET", "/sandboxes/{sandboxID}/network/audit", r)
    assert r.json() == {"sandboxID": sid, "events": []}
    r = await cube.client.get(f"/sandboxes/{sid}/network/audit", params={"limit": 0}, headers=h)
    openapi.check("GET", "/sandboxes/{sandboxID}/network/audit", r)
    assert_error(r, 400, "limit")


async def test_metrics_from_envd(cube_factory, upstream, openapi) -> None:
    up, port = upstream
    async with cube_factory({"envd_port": port}) as cube:
        key = cube.key()
        h = cube.headers(key)
        sid = (await create(cube, key))["sandboxID"]
        r = await cube.client.get(f"/sandboxes/{sid}/metrics", headers=h)
        openapi.check("GET", "/sandboxes/{sandboxID}/metrics", r)
        [metric] = r.json()
        assert metric["cpuCount"] == 2 and metric["memTotal"] == 512 << 20 and metric["cpuUsedPct"] == 12.5
        assert up.seen_headers[-1]["x-access-token"] == cube.service.get(
            cube.service.authenticate(key).team_id, sid).envd_access_token
        r = await cube.client.get(f"/sandboxes/{sid}/metrics", params={"end": 1000}, headers=h)
        assert r.json() == []  # not sampled yet: only the current sample, read from envd
        r = await cube.client.get("/sandboxes/metrics", params={"sandbox_ids": f"{sid},unknown"}, headers=h)
        openapi.check("GET", "/sandboxes/metrics", r)
        assert list(r.json()["sandboxes"]) == [sid]
        r = await cube.client.get("/sandboxes/metrics", headers=h)
        assert_error(r, 400, "sandbox_ids", openapi=openapi)
        await cube.client.post(f"/sandboxes/{sid}/pause", headers=h)
        r = await cube.client.get(f"/sandboxes/{sid}/metrics", headers=h)
        assert r.status_code == 200 and r.json() == []


async def test_metrics_without_envd_is_empty(cube_factory, openapi) -> None:
    from e2b_helpers import free_port

    async with cube_factory({"envd_port": free_port()}) as cube:  # nothing listens there
        key = cube.key()
        sid = (await create(cube, key))["sandboxID"]
        r = await cube.client.get(f"/sandboxes/{sid}/metrics", headers=cube.headers(key))
        openapi.check("GET", "/sandboxes/{sandboxID}/metrics", r)
        assert r.json() == []


async def test_templates(cube, openapi) -> None:
    key = cube.key()
    r = await cube.client.get("/templates", headers=cube.headers(key))
    openapi.check("GET", "/templates", r)
    [t] = r.json()
    assert t["templateID"] == "base" and t["buildStatus"] == "ready" and t["aliases"] == ["base"]
    r = await cube.client.get("/templates/aliases/base", headers=cube.headers(key))
    openapi.check("GET", "/templates/aliases/{alias}", r)
    assert r.json() == {"templateID": "base", "public": True}
    r = await cube.client.get("/templates/aliases/missing", headers=cube.headers(key))
    openapi.check("GET", "/templates/aliases/{alias}", r)
    assert_error(r, 404, "missing")
    r = await cube.client.get("/templates")
    assert_error(r, 401)


async def test_fork_snapshots_and_delete(cube, openapi) -> None:
    key = cube.key()
    sid = (await create(cube, key))["sandboxID"]
    r = await cube.client.post(f"/sandboxes/{sid}/snapshots", json={"name": "first"}, headers=cube.headers(key))
    openapi.check("POST", "/sandboxes/{sandboxID}/snapshots", r)
    assert r.status_code == 201, r.text
    snap = r.json()
    assert snap["names"] == ["first"] and snap["snapshotID"]
    r = await cube.client.get("/snapshots", params={"sandboxID": sid}, headers=cube.headers(key))
    openapi.check("GET", "/snapshots", r)
    assert [s["snapshotID"] for s in r.json()] == [snap["snapshotID"]]
    other = cube.key("other-team")
    r = await cube.client.get("/snapshots", headers=cube.headers(other))
    assert r.status_code == 200 and r.json() == []

    r = await cube.client.post("/v2/sandboxes", json={"templateID": snap["snapshotID"]}, headers=cube.headers(key))
    assert r.status_code == 201, r.text
    r = await cube.client.post("/v2/sandboxes", json={"templateID": snap["snapshotID"]}, headers=cube.headers(other))
    assert_error(r, 404)

    r = await cube.client.post(f"/sandboxes/{sid}/fork", json={"count": 2}, headers=cube.headers(key))
    openapi.check("POST", "/sandboxes/{sandboxID}/fork", r)
    assert r.status_code == 201, r.text
    forked = [item["sandbox"]["sandboxID"] for item in r.json()]
    assert len(set(forked)) == 2 and sid not in forked
    r = await cube.client.post(f"/sandboxes/{sid}/fork", json={"count": 21}, headers=cube.headers(key))
    assert_error(r, 400, "count")
    r = await cube.client.post("/sandboxes/nope/fork", json={}, headers=cube.headers(key))
    assert_error(r, 404)

    r = await cube.client.delete(f"/templates/{snap['snapshotID']}", headers=cube.headers(other))
    assert_error(r, 404)
    r = await cube.client.delete(f"/templates/{snap['snapshotID']}", headers=cube.headers(key))
    assert r.status_code == 204, r.text
    r = await cube.client.delete(f"/templates/{snap['snapshotID']}", headers=cube.headers(key))
    assert_error(r, 404)


# -- capacity and failures: Should-Retry -------------------------------------------------------------


async def test_capacity_is_503_should_retry(cube_factory, openapi) -> None:
    async with cube_factory({"retry_after_s": 2}, max_sandboxes=1) as cube:
        key = cube.key()
        await create(cube, key)
        r = await cube.client.post("/v2/sandboxes", json={"templateID": "base"}, headers=cube.headers(key))
        openapi.check("POST", "/v2/sandboxes", r)
        assert_error(r, 503)
        assert r.json()["error_code"] == "sandbox_capacity_unavailable"
        assert r.headers["should-retry"] == "true" and r.headers["retry-after"] == "2"


class Admission:
    def __init__(self, retryable: bool) -> None:
        self.retryable = retryable

    @hookimpl
    def cube_admit_sandbox(self, spec):
        return Rejection(reason="quota of team reached", retryable=self.retryable)


@pytest.mark.parametrize(("retryable", "status"), [(True, 429), (False, 403)])
async def test_admission_rejection(cube, openapi, retryable, status) -> None:
    name = f"test-admission-{retryable}"
    cube.app.state.host.register(Admission(retryable), name)
    try:
        r = await cube.client.post("/v2/sandboxes", json={"templateID": "base"}, headers=cube.headers(cube.key()))
    finally:
        cube.app.state.host.unregister(name)
    openapi.check("POST", "/v2/sandboxes", r)
    assert_error(r, status, "quota")
    assert r.headers["should-retry"] == ("true" if retryable else "false")


async def test_failed_create_is_500_should_not_retry(cube, openapi, monkeypatch) -> None:
    async def broken(*args, **kwargs):
        raise VmmError("guest did not answer personalize")

    monkeypatch.setattr(cube.agent.vmm, "guest_call", broken)
    r = await cube.client.post("/v2/sandboxes", json={"templateID": "base"}, headers=cube.headers(cube.key()))
    openapi.check("POST", "/v2/sandboxes", r)
    assert_error(r, 500, "personalize")
    assert r.headers["should-retry"] == "false" and r.json()["error_code"] == "sandbox_create_failed"
    failed = cube.service.store.list_sandboxes(states=None)[0]  # cleaned up, recorded as failed with why
    assert failed.state.value == "error" and failed.runtime.vm is None and failed.runtime.nic is None
    assert failed.error is not None and "personalize" in failed.error


# -- OpenAPI and metrics -----------------------------------------------------------------------------


async def test_routes_in_openapi_json(cube) -> None:
    r = await cube.client.get("/openapi.json")
    paths = r.json()["paths"]
    for path in ("/sandboxes", "/v2/sandboxes", "/sandboxes/{sandbox_id}", "/v2/sandboxes/{sandbox_id}/connect",
                 "/sandboxes/{sandbox_id}/network/audit", "/templates", "/templates/aliases/{alias}"):
        assert path in paths, path
    assert "X-API-Key" in r.text
    schema = r.json()["components"]["schemas"]["NewSandboxV2"]
    assert "templateID" in schema["properties"] and schema["required"] == ["templateID"]


async def test_prometheus_metrics(cube) -> None:
    import httpx

    key = cube.key()
    sid = (await create(cube, key))["sandboxID"]
    await create(cube, key)
    await cube.client.post(f"/sandboxes/{sid}/pause", headers=cube.headers(key))
    await cube.client.get("/v2/sandboxes")  # a 401
    server = await cube.plugin.start_metrics_server(host="127.0.0.1", port=0)
    try:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"http://127.0.0.1:{server.port}/metrics")
            assert (await client.get(f"http://127.0.0.1:{server.port}/nope")).status_code == 404
    finally:
        await cube.plugin.stop_metrics_server()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'cube_sandboxes{state="running"} 1.0' in text
    assert 'cube_sandboxes{state="paused"} 1.0' in text
    assert "cube_sandbox_create_seconds_count 2.0" in text
    assert 'cube_api_errors_total{error="AuthError",status="401"} 1.0' in text
    assert 'cube_api_requests_total{method="POST",route="/v2/sandboxes",status="201"} 2.0' in text


async def test_with_warm_pool(cube_factory, openapi) -> None:
    async with cube_factory(pool_size=2) as cube:
        for _ in range(250):  # the pool fills, then the node's next heartbeat reports it
            if 'cube_warm_pool_members 2.0' in cube.plugin.metrics.render().decode():
                break
            await asyncio.sleep(0.02)
        assert 'cube_warm_pool_members 2.0' in cube.plugin.metrics.render().decode()
        key = cube.key()
        body = await create(cube, key, network={"allowOut": ["9.9.9.9"]})
        r = await cube.client.get("/v2/sandboxes", headers=cube.headers(key))
        openapi.check("GET", "/v2/sandboxes", r)
        assert [s["sandboxID"] for s in r.json()] == [body["sandboxID"]]
        text = cube.plugin.metrics.render().decode()
        assert 'cube_sandboxes{state="running"} 1.0' in text and 'cube_sandboxes{state="paused"} 0.0' in text


async def test_real_server_metrics_port_default(cube_factory) -> None:
    from e2b_helpers import free_port

    port = free_port()
    async with cube_factory({"admin_port": port}) as cube:
        server = await cube.plugin.start_metrics_server()
        try:
            assert server.port == port
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            data = await reader.read()
            writer.close()
            assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"ok\n")
            assert await cube.plugin.start_metrics_server() is server  # idempotent
        finally:
            await cube.plugin.stop_metrics_server()


async def test_served_by_uvicorn(cube) -> None:
    """The same routes through a real HTTP server (not only the in-process transport)."""
    import httpx

    async with serve(cube.app, lifespan="off") as port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.post("/v2/sandboxes", json={"templateID": "base"}, headers=cube.headers(cube.key()))
    assert r.status_code == 201 and SANDBOX_ID.match(r.json()["sandboxID"])


async def test_a_filesystem_snapshot_boots_new_sandboxes_from_its_disk(cube, openapi) -> None:
    """``"memory": false`` (the SDK's ``mode="filesystem"``): the disk layer only; a sandbox
    created from it is a cold boot of a disk over that layer (a new sandbox), the source runs on."""
    key = cube.key()
    sid = (await create(cube, key))["sandboxID"]
    r = await cube.client.post(f"/sandboxes/{sid}/snapshots", json={"memory": False}, headers=cube.headers(key))
    openapi.check("POST", "/sandboxes/{sandboxID}/snapshots", r)
    assert r.status_code == 201, r.text
    ref = cube.service.store.get_snapshot(r.json()["snapshotID"])
    assert ref.vm_state is None and ref.disk is not None and ref.sandbox_id == sid
    assert cube.service.store.get_sandbox(sid).state.value == "running"
    r = await cube.client.post("/v2/sandboxes", json={"templateID": ref.snapshot_id}, headers=cube.headers(key))
    assert r.status_code == 201, r.text
    child = cube.service.store.get_sandbox(r.json()["sandboxID"])
    assert child.sandbox_id != sid and child.runtime.parent_snapshot == ref.snapshot_id
    assert child.runtime.disk.path.read_text() == str(ref.disk.path)  # (a fake disk holds its base's path)
    assert ("boot", child.sandbox_id) in cube.agent.vmm.calls  # booted, not restored
    r = await cube.client.post(f"/sandboxes/{sid}/rollback", json={"snapshotID": ref.snapshot_id},
                               headers=cube.headers(key))
    assert r.status_code >= 400, r.text  # no memory to roll a sandbox back to
