"""``GET /events`` over real HTTP (uvicorn): a team's key follows its team's events, the operator
token every team's and the nodes'; no key or a wrong one is a 401; ``type`` filters."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from cube_core import SandboxSpec
from e2b_helpers import serve

OPERATOR = "o" * 40


async def messages(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The SSE messages of ``response`` as ``{"id", "event", "data"}`` (comments skipped)."""
    fields: dict[str, Any] = {}
    async for line in response.aiter_lines():
        if not line:
            if fields:
                yield fields
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = json.loads(value) if name == "data" else value


async def collect(url: str, headers: dict[str, str], want: int, started: asyncio.Event,
                  params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=10) as http, http.stream("GET", url, headers=headers, params=params) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        started.set()
        async for message in messages(r):
            out.append(message)
            if len(out) == want:
                return out
    return out


@pytest.fixture
def operator_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("CUBE_TEST_OPERATOR_TOKEN", OPERATOR)
    return 'operator_token = { env = "CUBE_TEST_OPERATOR_TOKEN" }'


async def test_team_and_operator_streams(cube_factory: Callable[..., Any], operator_env: str) -> None:
    async with cube_factory(core=operator_env) as cube, serve(cube.app, lifespan="off") as port:
        url = f"http://127.0.0.1:{port}/events"
        key_a, key_b = cube.key("team-a"), cube.key("team-b")
        team_a = cube.service.authenticate(key_a).team_id
        team_b = cube.service.authenticate(key_b).team_id
        ready = [asyncio.Event() for _ in range(4)]
        tasks = [
            asyncio.create_task(collect(url, {"X-API-Key": key_a}, 2, ready[0])),
            asyncio.create_task(collect(url, {"Authorization": f"Bearer {OPERATOR}"}, 3, ready[1])),
            asyncio.create_task(collect(url, {"X-API-Key": key_b}, 1, ready[2])),
            asyncio.create_task(collect(url, {"X-API-Key": OPERATOR}, 1, ready[3],
                                        params={"type": "sandbox.killed"})),
        ]
        await asyncio.wait_for(asyncio.gather(*(r.wait() for r in ready)), 10)
        a = await cube.service.create(SandboxSpec(template_id="base", team_id=team_a))
        b = await cube.service.create(SandboxSpec(template_id="base", team_id=team_b))
        await cube.service.kill(team_a, a.sandbox_id)
        got_a, got_op, got_b, killed = await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert [(m["event"], m["data"]["sandbox_id"]) for m in got_a] == [
        ("sandbox.created", a.sandbox_id), ("sandbox.killed", a.sandbox_id)]
    assert [m["data"]["team_id"] for m in got_a] == [team_a, team_a]
    assert got_a[0]["id"] == got_a[0]["data"]["id"] and got_a[0]["id"] < got_a[1]["id"]
    assert [m["data"]["sandbox_id"] for m in got_op] == [a.sandbox_id, b.sandbox_id, a.sandbox_id]
    assert [(m["event"], m["data"]["sandbox_id"]) for m in got_b] == [("sandbox.created", b.sandbox_id)]
    assert [(m["event"], m["data"]["sandbox_id"]) for m in killed] == [("sandbox.killed", a.sandbox_id)]


async def test_no_key_or_a_bad_one_is_401(cube_factory: Callable[..., Any], operator_env: str) -> None:
    async with cube_factory(core=operator_env) as cube:
        for headers in ({}, {"X-API-Key": "e2b_" + "0" * 40}, {"Authorization": "Bearer " + "o" * 39}):
            r = await cube.client.get("/events", headers=headers)
            assert r.status_code == 401, headers


async def test_without_an_operator_token_configured_it_is_only_a_key(cube: Any) -> None:
    r = await cube.client.get("/events", headers={"X-API-Key": ""})
    assert r.status_code == 401
