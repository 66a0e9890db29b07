"""The dashboard on the fake drivers (no VMs): sign-in, session cookie, CSRF on every action, team
scoping, the operator's view, actions reaching the service, the chart library's cache. The browser
test against real guests is tests/e2e/test_e2e_dashboard.py."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from cube_core import SandboxSpec, SandboxState
from cube_core.app import create_app
from cube_core.config import parse_config
from cube_core.testing.fakes import FAKE_CONFIG

from cube_dashboard import assets

OPERATOR = "op-" + "x" * 40


@contextlib.asynccontextmanager
async def dashboard(plugin_host: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    ) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    monkeypatch.setenv("CUBE_TEST_OPERATOR", OPERATOR)
    text = FAKE_CONFIG.format(state_dir=tmp_path / "state").replace(
        "templates = []", 'templates = ["base"]\noperator_token = { env = "CUBE_TEST_OPERATOR" }').replace(
        '[[api]]\nplugin = "fake"', f'[[api]]\nplugin = "dashboard"\noptions = {{ cache = "{tmp_path}/cache" }}')
    app = create_app(plugin_host(parse_config(text)), build_templates=True)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.agent.ready.wait(), timeout=30)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cube.test") as client:
            yield app.state.service, client


def hidden(html: str, name: str = "csrf") -> str:
    found = re.search(rf'name="{name}" value="([^"]+)"', html)
    assert found, html[:2000]
    return found.group(1)


async def sign_in(client: httpx.AsyncClient, secret: str) -> str:
    """Sign in; the session's CSRF token."""
    form = await client.get("/dashboard/login")
    r = await client.post("/dashboard/login", data={"csrf": hidden(form.text), "secret": secret})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard/sandboxes", r.headers
    page = await client.get("/dashboard/sandboxes")
    assert page.status_code == 200
    return hidden(page.text)


@pytest.fixture
async def cube(plugin_host: Callable[..., Any], tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    async with dashboard(plugin_host, tmp_path, monkeypatch) as pair:
        yield pair


async def test_nothing_is_visible_without_signing_in(cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    await service.create(SandboxSpec(template_id="base", team_id="t1"))
    for path in ("/dashboard", "/dashboard/sandboxes", "/dashboard/templates", "/dashboard/nodes", "/dashboard/start"):
        r = await client.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/dashboard/login", path
    assert (await client.get("/dashboard/events")).status_code == 401
    sb = service.list_all()[0]
    r = await client.post(f"/dashboard/sandboxes/{sb.sandbox_id}/kill", data={"csrf": "x"})
    assert r.status_code == 401
    assert service.list_all() == [sb]


async def test_a_bad_secret_or_a_forged_login_does_not_sign_in(cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    form = await client.get("/dashboard/login")
    r = await client.post("/dashboard/login", data={"csrf": hidden(form.text), "secret": "e2b_" + "0" * 40})
    assert r.status_code == 303 and "notice=" in r.headers["location"] and "cube_dashboard" not in r.cookies
    _, key = service.create_api_key("team-a")
    r = await client.post("/dashboard/login", data={"csrf": "forged", "secret": key})
    assert r.status_code == 303 and r.headers["location"].startswith("/dashboard/login?notice=")
    assert (await client.get("/dashboard/sandboxes")).status_code == 303


async def test_session_cookie_flags(cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    _, key = service.create_api_key("team-a")
    form = await client.get("/dashboard/login")
    r = await client.post("/dashboard/login", data={"csrf": hidden(form.text), "secret": key})
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith("cube_dashboard="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    assert key not in cookie  # the session id only


async def test_a_team_sees_and_acts_on_its_own_only(cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    team_a, key_a = service.create_api_key("team-a")
    team_b, _ = service.create_api_key("team-b")
    mine = await service.create(SandboxSpec(template_id="base", team_id=team_a.team_id, metadata={"app": "x"}))
    theirs = await service.create(SandboxSpec(template_id="base", team_id=team_b.team_id))
    csrf = await sign_in(client, key_a)
    page = (await client.get("/dashboard/sandboxes")).text
    assert mine.sandbox_id in page and theirs.sandbox_id not in page
    assert (await client.get(f"/dashboard/sandboxes/{theirs.sandbox_id}")).text.count("Not found") >= 1
    r = await client.post(f"/dashboard/sandboxes/{theirs.sandbox_id}/kill", data={"csrf": csrf})
    assert r.status_code == 303 and "not+found" in r.headers["location"].lower()
    assert service.get(team_b.team_id, theirs.sandbox_id).state == SandboxState.RUNNING
    # filters
    assert mine.sandbox_id in (await client.get("/dashboard/sandboxes?meta=app%3Dx")).text
    assert mine.sandbox_id not in (await client.get("/dashboard/sandboxes?meta=app%3Dy")).text
    assert mine.sandbox_id not in (await client.get("/dashboard/sandboxes?state=paused")).text
    assert mine.sandbox_id in (await client.get("/dashboard/sandboxes?template=base")).text


async def test_every_action_needs_the_csrf_token(cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    team, key = service.create_api_key("team-a")
    sb = await service.create(SandboxSpec(template_id="base", team_id=team.team_id))
    csrf = await sign_in(client, key)
    for action in ("pause", "resume", "kill", "timeout", "snapshot", "rollback", "fork"):
        for data in ({}, {"csrf": "wrong"}):
            r = await client.post(f"/dashboard/sandboxes/{sb.sandbox_id}/{action}", data=data)
            assert r.status_code == 403, (action, data)
    r = await client.post(f"/dashboard/sandboxes/{sb.sandbox_id}/kill", data={"csrf": csrf},
                          headers={"Origin": "http://evil.test"})
    assert r.status_code == 403
    assert service.get(team.team_id, sb.sandbox_id).state == SandboxState.RUNNING
    r = await client.post("/dashboard/logout", data={"csrf": "wrong"})  # not signed out by a forgery
    assert r.status_code == 403 and (await client.get("/dashboard/sandboxes")).status_code == 200
    r = await client.post("/dashboard/logout", data={"csrf": csrf})
    assert r.status_code == 303 and (await client.get("/dashboard/sandboxes")).status_code == 303


async def test_actions_reach_the_service(cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    team, key = service.create_api_key("team-a")
    sb = await service.create(SandboxSpec(template_id="base", team_id=team.team_id, timeout_s=60))
    csrf = await sign_in(client, key)
    events = service.events.subscribe(team.team_id)

    async def act(action: str, **form: str) -> str:
        r = await client.post(f"/dashboard/sandboxes/{sb.sandbox_id}/{action}", data={"csrf": csrf, **form})
        assert r.status_code == 303, r.text
        return r.headers["location"]

    await act("pause")
    assert service.get(team.team_id, sb.sandbox_id).state == SandboxState.PAUSED
    await act("resume")
    await act("timeout", seconds="3600")
    left = (service.get(team.team_id, sb.sandbox_id).end_at - sb.started_at).total_seconds()
    assert left > 3000
    await act("snapshot")
    [snap] = service.list_snapshots(team.team_id, sb.sandbox_id)
    detail = (await client.get(f"/dashboard/sandboxes/{sb.sandbox_id}")).text
    assert snap.snapshot_id in detail and "Roll back" in detail
    await act("rollback", snapshot_id=snap.snapshot_id, next=f"/dashboard/sandboxes/{sb.sandbox_id}")
    assert (await act("kill", next="https://evil.test/")) .startswith("/dashboard/sandboxes?notice=Killed")
    assert service.list(team.team_id) == []
    types = []
    while True:
        try:
            types.append((await asyncio.wait_for(anext(events), 0.1)).type)
        except TimeoutError:
            break
    assert types == ["sandbox.paused", "sandbox.resumed", "sandbox.timeout_changed", "sandbox.snapshot",
                     "sandbox.killed"]


async def test_the_operator_sees_and_acts_on_every_team(cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    a = await service.create(SandboxSpec(template_id="base", team_id="team-x"))
    b = await service.create(SandboxSpec(template_id="base", team_id="team-y"))
    csrf = await sign_in(client, OPERATOR)
    page = (await client.get("/dashboard/sandboxes")).text
    assert a.sandbox_id in page and b.sandbox_id in page and "operator (all teams)" in page
    r = await client.post(f"/dashboard/sandboxes/{b.sandbox_id}/kill", data={"csrf": csrf})
    assert r.status_code == 303
    assert [s.sandbox_id for s in service.list_all()] == [a.sandbox_id]
    nodes = (await client.get("/dashboard/nodes")).text
    assert "local" in nodes and "<meter" in nodes
    assert "base" in (await client.get("/dashboard/templates")).text
    start = (await client.get("/dashboard/start")).text
    assert "E2B_API_URL=http://cube.test" in start and "Sandbox.create" in start


async def test_a_revoked_key_ends_its_session(cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    key_record, key = service.create_api_key("team-a")
    await sign_in(client, key)
    service.revoke_api_key(key_record.key_id)
    assert (await client.get("/dashboard/sandboxes")).status_code == 303


def test_the_chart_library_is_fetched_once_and_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = assets.ensure(tmp_path)
    assert directory == assets.asset_dir(tmp_path)
    js = (directory / "uplot.js").read_text()
    assert "uPlot" in js and len(js) > 20_000
    monkeypatch.setenv("PATH", "/nonexistent")  # cached: npm is not run again
    assert assets.ensure(tmp_path) == directory
    with pytest.raises(assets.AssetError, match="npm is not installed"):
        assets.ensure(tmp_path / "elsewhere")


def test_the_set_up_step_fetches_into_the_cache_and_only_warns_without_npm(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """``make serve``/``make test`` run ``python -m cube_dashboard.assets``: a server then fetches nothing."""
    assert assets.main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == str(assets.asset_dir(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")
    assert assets.main([str(tmp_path)]) == 0  # cached
    assert assets.main([str(tmp_path / "elsewhere")]) == 1
    assert "without charts" in capsys.readouterr().err
