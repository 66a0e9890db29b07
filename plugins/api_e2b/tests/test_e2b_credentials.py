"""``/secrets``, ``/api-keys`` and ``/access-tokens`` on the whole app (fake drivers, SQLite).

Every answer is checked against the spec (``openapi.check``); a secret's value never appears in an
answer, an error message or a log line, and is not in the database in clear; a team never sees,
changes or deletes another team's secrets, keys or tokens (404). The real SDK's ``Secret`` /
``AsyncSecret`` run against a served app at the end.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from cube_core.config import parse_config
from cube_core.errors import ConfigError
from cube_core.teamsecrets import SecretBox, parse_key
from e2b_helpers import SECRETS_KEY_ENV as KEY_ENV
from e2b_helpers import OpenApi, e2b_config_text, serve

VALUE = "sk-live-Do-Not-Leak-7f3c9a"  # the secret value: searched for everywhere it must not be


def no_value(response: httpx.Response) -> httpx.Response:
    assert VALUE not in response.text and VALUE.lower() not in response.text.lower()
    return response


# -- secrets ---------------------------------------------------------------------------------------


async def test_secret_lifecycle_never_returns_the_value(make_app: Any, openapi: OpenApi) -> None:
    async with make_app() as cube:
        h = cube.key()
        r = no_value(await cube.client.post("/secrets", headers=h,
                                            json={"name": "OpenAI-Key", "value": VALUE, "metadata": {"env": "prod"}}))
        openapi.check("POST", "/secrets", r)
        assert r.status_code == 201
        created = r.json()
        assert created["name"] == "openai-key" and created["currentVersion"] == 1  # canonical lower-case name
        assert created["secretID"].startswith("sec_") and created["metadata"] == {"env": "prod"}
        sid = created["secretID"]

        for ident in (sid, "openai-key", "OpenAI-Key"):
            r = no_value(await cube.client.get(f"/secrets/{ident}", headers=h))
            openapi.check("GET", "/secrets/{secretID}", r)
            assert r.status_code == 200 and r.json() == created

        r = no_value(await cube.client.post(f"/secrets/{sid}", headers=h, json={"value": VALUE + "-2"}))
        openapi.check("POST", "/secrets/{secretID}", r)
        assert r.status_code == 200
        assert r.json()["currentVersion"] == 2 and r.json()["metadata"] == {"env": "prod"}  # kept when omitted
        r = await cube.client.post("/secrets/openai-key", headers=h, json={"value": VALUE, "metadata": {}})
        assert r.json()["currentVersion"] == 3 and r.json()["metadata"] == {}

        r = no_value(await cube.client.get("/secrets", headers=h))
        openapi.check("GET", "/secrets", r)
        assert [s["secretID"] for s in r.json()] == [sid]

        r = await cube.client.post("/secrets", headers=h, json={"name": "openai-key", "value": "x"})
        openapi.check("POST", "/secrets", r)
        assert r.status_code == 409 and "openai-key" in r.json()["message"]

        r = await cube.client.delete(f"/secrets/{sid}", headers=h)
        openapi.check("DELETE", "/secrets/{secretID}", r)
        assert r.status_code == 204
        for method in ("GET", "DELETE"):
            r = await cube.client.request(method, f"/secrets/{sid}", headers=h)
            openapi.check(method, "/secrets/{secretID}", r)
            assert r.status_code == 404
        r = await cube.client.post("/secrets/openai-key", headers=h, json={"value": "x"})
        assert r.status_code == 404


async def test_secret_list_pages(make_app: Any, openapi: OpenApi) -> None:
    async with make_app() as cube:
        h = cube.key()
        for i in range(5):
            r = await cube.client.post("/secrets", headers=h, json={"name": f"s{i}", "value": "v"})
            assert r.status_code == 201
        r = await cube.client.get("/secrets", headers=h, params={"limit": 2})
        openapi.check("GET", "/secrets", r)
        names, token = [s["name"] for s in r.json()], r.headers.get("X-Next-Token")
        while token:
            r = await cube.client.get("/secrets", headers=h, params={"limit": 2, "nextToken": token})
            names += [s["name"] for s in r.json()]
            token = r.headers.get("X-Next-Token")
        assert names == [f"s{i}" for i in range(5)]
        for params in ({"limit": 0}, {"limit": 101}, {"nextToken": "abc"}):
            r = await cube.client.get("/secrets", headers=h, params=params)
            openapi.check("GET", "/secrets", r)
            assert r.status_code == 400


@pytest.mark.parametrize(("body", "field"), [
    ({"name": "bad name", "value": VALUE}, "name"),
    ({"name": "", "value": VALUE}, "name"),
    ({"name": "x" * 129, "value": VALUE}, "name"),
    ({"name": "sec_abc", "value": VALUE}, "name"),
    ({"name": "ok", "value": 42}, "value"),
    ({"name": "ok"}, "value"),
    ({"name": "ok", "value": VALUE, "metadata": {f"k{i}": "v" for i in range(33)}}, "metadata"),
    ({"name": "ok", "value": VALUE, "metadata": {"k": "v" * 1025}}, "metadata.k"),
    ({"name": "ok", "value": VALUE * 3000}, "value"),
])
async def test_bad_secret_requests_are_400_naming_the_field(make_app: Any, openapi: OpenApi,
                                                           body: dict[str, Any], field: str) -> None:
    async with make_app() as cube:
        r = no_value(await cube.client.post("/secrets", headers=cube.key(), json=body))
        openapi.check("POST", "/secrets", r)
        assert r.status_code == 400 and r.json()["message"].startswith(field), r.text


async def test_a_team_never_sees_another_teams_secrets(make_app: Any) -> None:
    async with make_app() as cube:
        a, b = cube.key("team-a"), cube.key("team-b")
        sid = (await cube.client.post("/secrets", headers=a, json={"name": "db", "value": VALUE})).json()["secretID"]
        assert (await cube.client.get("/secrets", headers=b)).json() == []
        for ident in (sid, "db"):
            assert (await cube.client.get(f"/secrets/{ident}", headers=b)).status_code == 404
            assert (await cube.client.post(f"/secrets/{ident}", headers=b, json={"value": "evil"})).status_code == 404
            assert (await cube.client.delete(f"/secrets/{ident}", headers=b)).status_code == 404
        r = await cube.client.post("/secrets", headers=b, json={"name": "db", "value": "other"})
        assert r.status_code == 201 and r.json()["secretID"] != sid  # names are per team
        r = await cube.client.get(f"/secrets/{sid}", headers=a)
        assert r.status_code == 200 and r.json()["currentVersion"] == 1
        team_a = cube.service.authenticate(a["X-API-Key"]).team_id
        assert cube.service.team_secrets.reveal(team_a, "db") == VALUE  # untouched by team b
        assert (await cube.client.get("/secrets", headers={"X-API-Key": "e2b_" + "0" * 40})).status_code == 401


async def test_sealed_at_rest_and_bound_to_its_record(make_app: Any) -> None:
    async with make_app() as cube:
        h = cube.key()
        await cube.client.post("/secrets", headers=h, json={"name": "db", "value": VALUE})
        await cube.client.post("/secrets/db", headers=h, json={"value": VALUE + "-v2"})
        raw = (cube.state / "cube.db").read_bytes()
        for wal in cube.state.glob("cube.db-wal"):
            raw += wal.read_bytes()
        assert VALUE.encode() not in raw and base64.b64encode(VALUE.encode())[:16] not in raw
        with sqlite3.connect(cube.state / "cube.db") as db:
            (body,) = db.execute("SELECT body FROM secrets WHERE name='db'").fetchone()
        assert VALUE not in body and '"sealed"' in body
        store = cube.service.store
        record = store.get_secret(cube.service.authenticate(h["X-API-Key"]).team_id, "db")
        assert cube.service.team_secrets.box.open(record) == VALUE + "-v2"
        with pytest.raises(ConfigError, match="does not decrypt"):  # a sealed value moved to another record
            cube.service.team_secrets.box.open(record.evolve(team_id="team-x"))
        with pytest.raises(ConfigError, match="does not decrypt"):
            cube.service.team_secrets.box.open(record.evolve(version=1))
        with pytest.raises(ConfigError, match="does not decrypt"):  # another key
            SecretBox(os.urandom(32)).open(record)


async def test_values_never_reach_the_logs(make_app: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        async with make_app() as cube:
            h = cube.key()
            await cube.client.post("/secrets", headers=h, json={"name": "db", "value": VALUE})
            await cube.client.post("/secrets", headers=h, json={"name": "db", "value": VALUE})  # 409
            await cube.client.post("/secrets", headers=h, json={"name": "bad name", "value": VALUE})  # 400
            await cube.client.post("/secrets/db", headers=h, json={"value": VALUE, "metadata": "x"})  # 400
            await cube.client.post("/secrets/nope", headers=h, json={"value": VALUE})  # 404
            await cube.client.post("/secrets", headers=cube.key("b"), json={"name": "db", "value": VALUE})
    assert events or caplog.records  # something was logged, so the check below can fail
    assert VALUE not in repr(events) and VALUE not in caplog.text


async def test_without_a_key_secrets_answer_403_saying_how_to_configure(make_app: Any, openapi: OpenApi) -> None:
    async with make_app(secrets_key=False) as cube:
        h = cube.key()
        for method, path, spec_path, body in (
                ("GET", "/secrets", "/secrets", None),
                ("POST", "/secrets", "/secrets", {"name": "db", "value": VALUE}),
                ("GET", "/secrets/db", "/secrets/{secretID}", None),
                ("POST", "/secrets/db", "/secrets/{secretID}", {"value": VALUE}),
                ("DELETE", "/secrets/db", "/secrets/{secretID}", None)):
            r = no_value(await cube.client.request(method, path, headers=h, json=body))
            openapi.check(method, spec_path, r)
            assert r.status_code == 403 and "secrets_key" in r.json()["message"], r.text
            assert r.headers["Should-Retry"] == "false"


async def test_a_configured_key_that_cannot_be_read_stops_the_start(make_app: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ConfigError, match=f"secrets_key.*{KEY_ENV}"):
        async with make_app():
            pass
    monkeypatch.setenv(KEY_ENV, "not-a-key")
    with pytest.raises(ConfigError, match="32 random bytes"):
        async with make_app():
            pass


def test_key_formats() -> None:
    raw = os.urandom(32)
    assert parse_key(raw.hex()) == raw
    assert parse_key(base64.b64encode(raw).decode()) == raw
    assert parse_key(base64.urlsafe_b64encode(raw).decode() + "\n") == raw
    for bad in ("", "short", base64.b64encode(os.urandom(16)).decode(), "z" * 64):
        with pytest.raises(ConfigError, match="secrets_key") as err:
            parse_key(bad)
        assert bad not in str(err.value) or not bad


def test_a_literal_key_in_the_config_is_refused(tmp_path: Path) -> None:
    text = e2b_config_text(tmp_path).replace("[core]\n", '[core]\nsecrets_key = "c2VjcmV0LWtleQ=="\n', 1)
    with pytest.raises(ConfigError, match="secret reference") as err:
        parse_config(text)
    assert "c2VjcmV0LWtleQ" not in str(err.value)


# -- API keys --------------------------------------------------------------------------------------


async def test_api_keys_of_the_team(make_app: Any, openapi: OpenApi) -> None:
    async with make_app(secrets_key=False) as cube:
        h, other = cube.key("team-a"), cube.key("team-b")
        r = await cube.client.get("/api-keys", headers=h)
        openapi.check("GET", "/api-keys", r)
        assert len(r.json()) == 1 and "key" not in r.json()[0]
        mine = r.json()[0]
        assert mine["mask"]["prefix"] == "e2b_" and h["X-API-Key"].endswith(mine["mask"]["maskedValueSuffix"])

        r = await cube.client.post("/api-keys", headers=h, json={"name": "ci"})
        openapi.check("POST", "/api-keys", r)
        assert r.status_code == 201
        created = r.json()
        new = {"X-API-Key": created["key"]}
        assert created["key"].startswith("e2b_") and created["key"].endswith(created["mask"]["maskedValueSuffix"])
        assert (await cube.client.get("/secrets", headers=new)).status_code == 403  # it authenticates (team a)
        listed = (await cube.client.get("/api-keys", headers=new)).json()
        assert {k["id"] for k in listed} == {mine["id"], created["id"]}
        assert created["key"] not in str(listed)  # shown once

        r = await cube.client.patch(f"/api-keys/{created['id']}", headers=h, json={"name": "ci-2"})
        openapi.check("PATCH", "/api-keys/{apiKeyID}", r)
        assert r.status_code == 200
        assert {k["name"] for k in (await cube.client.get("/api-keys", headers=h)).json()} == {"", "ci-2"}

        for method, body in (("PATCH", {"name": "x"}), ("DELETE", None)):  # another team's key: 404
            r = await cube.client.request(method, f"/api-keys/{created['id']}", headers=other, json=body)
            openapi.check(method, "/api-keys/{apiKeyID}", r)
            assert r.status_code == 404
        assert created["id"] not in str((await cube.client.get("/api-keys", headers=other)).json())

        r = await cube.client.delete(f"/api-keys/{created['id']}", headers=h)
        openapi.check("DELETE", "/api-keys/{apiKeyID}", r)
        assert r.status_code == 204
        assert (await cube.client.get("/api-keys", headers=new)).status_code == 401  # revoked at once
        assert (await cube.client.delete(f"/api-keys/{created['id']}", headers=h)).status_code == 404
        assert [k["id"] for k in (await cube.client.get("/api-keys", headers=h)).json()] == [mine["id"]]
        assert (await cube.client.post("/api-keys", headers=h, json={"name": ""})).status_code == 400


async def test_access_tokens_of_the_team(make_app: Any, openapi: OpenApi) -> None:
    async with make_app(secrets_key=False) as cube:
        h, other = cube.key("team-a"), cube.key("team-b")
        r = await cube.client.post("/access-tokens", headers=h, json={"name": "laptop"})
        openapi.check("POST", "/access-tokens", r)
        assert r.status_code == 201
        token = r.json()
        assert token["token"].startswith("sk_e2b_") and token["token"].endswith(token["mask"]["maskedValueSuffix"])
        assert token["mask"]["valueLength"] == 40 and token["name"] == "laptop"
        r = await cube.client.delete(f"/access-tokens/{token['id']}", headers=other)
        openapi.check("DELETE", "/access-tokens/{accessTokenID}", r)
        assert r.status_code == 404
        r = await cube.client.delete(f"/access-tokens/{token['id']}", headers=h)
        openapi.check("DELETE", "/access-tokens/{accessTokenID}", r)
        assert r.status_code == 204
        assert (await cube.client.delete(f"/access-tokens/{token['id']}", headers=h)).status_code == 404
        with sqlite3.connect(cube.state / "cube.db") as db:
            assert token["token"] not in str(db.execute("SELECT * FROM access_tokens").fetchall())


# -- the real SDK ----------------------------------------------------------------------------------


def sdk_flow(api_key: str, other_key: str) -> None:
    from e2b import Secret, SecretNotFoundException

    info = Secret.create("My-Token", VALUE, metadata={"a": "b"}, api_key=api_key)
    assert info.name == "my-token" and info.version == 1 and info.metadata == {"a": "b"}
    assert Secret.get_info("my-token", api_key=api_key).secret_id == info.secret_id
    assert Secret.exists(info.secret_id, api_key=api_key)
    assert not Secret.exists(info.secret_id, api_key=other_key)  # another team: not found
    updated = Secret.update("my-token", VALUE + "2", api_key=api_key)
    assert updated.version == 2 and updated.metadata == {"a": "b"}
    paginator = Secret.list(limit=1, api_key=api_key)
    assert [s.secret_id for s in paginator.next_items()] == [info.secret_id] and not paginator.has_next
    with pytest.raises(SecretNotFoundException):
        Secret.update("my-token", "x", api_key=other_key)
    assert Secret.destroy("my-token", api_key=other_key) is False
    assert Secret.destroy("my-token", api_key=api_key) is True
    assert Secret.destroy("my-token", api_key=api_key) is False
    with pytest.raises(SecretNotFoundException):
        Secret.get_info(info.secret_id, api_key=api_key)


async def test_sdk_secrets(make_app: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from e2b import AsyncSecret, SecretException

    async with make_app() as cube, serve(cube.app, lifespan="off") as port:
        for name in ("E2B_DOMAIN", "E2B_DEBUG", "E2B_ACCESS_TOKEN", "E2B_API_KEY"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("E2B_API_URL", f"http://127.0.0.1:{port}")
        a, b = cube.key("team-a")["X-API-Key"], cube.key("team-b")["X-API-Key"]
        await asyncio.to_thread(sdk_flow, a, b)
        info = await AsyncSecret.create("async-one", VALUE, api_key=a)
        assert (await AsyncSecret.get_info("async-one", api_key=a)).secret_id == info.secret_id
        assert [s.name for s in await AsyncSecret.list(api_key=a).next_items()] == ["async-one"]
        with pytest.raises(SecretException, match="already exists"):
            await AsyncSecret.create("async-one", VALUE, api_key=a)
        assert await AsyncSecret.destroy(info.secret_id, api_key=a) is True

    async with make_app(secrets_key=False) as cube, serve(cube.app, lifespan="off") as port:
        monkeypatch.setenv("E2B_API_URL", f"http://127.0.0.1:{port}")
        with pytest.raises(SecretException, match="secrets_key"):
            await AsyncSecret.create("x", VALUE, api_key=cube.key()["X-API-Key"])


# -- secrets in network rules ----------------------------------------------------------------------


async def test_network_rules_resolve_only_the_sandbox_teams_secrets(make_app: Any) -> None:
    """A sandbox's rules keep their placeholders (the API and the records never hold a value);
    the node's secret source, given a slot, reads the secret of that slot's sandbox's team only."""
    from cube_core.credentials import CredentialNotFoundError
    async with make_app() as cube:
        a, b = cube.key("team-a"), cube.key("team-b")
        for h, name, value in ((a, "api-key", VALUE), (b, "b-only", "b")):
            r = await cube.client.post("/secrets", headers=h, json={"name": name, "value": value})
            assert r.status_code == 201
        rules = {"api.example.com": [{"transform": {"headers": {"Authorization": "Bearer ${e2b.secrets.api-key}"}}}]}
        r = no_value(await cube.client.post("/v2/sandboxes", headers=a, json={
            "templateID": "base", "network": {"allowOut": ["api.example.com"], "rules": rules}}))
        assert r.status_code == 201, r.text
        sid = r.json()["sandboxID"]
        detail = no_value(await cube.client.get(f"/sandboxes/{sid}", headers=a)).json()
        assert detail["network"]["rules"] == rules
        network = cube.app.state.agent.network
        (slot,) = [s for s, p in network.slots.items() if p.rules]
        assert await network.secrets(slot, "api-key") == VALUE
        assert await network.secrets(slot, "API-KEY") == VALUE  # names are case-insensitive
        for name in ("b-only", "missing"):
            with pytest.raises(CredentialNotFoundError, match=name):
                await network.secrets(slot, name)
        with pytest.raises(CredentialNotFoundError):
            await network.secrets("no-such-slot", "api-key")
