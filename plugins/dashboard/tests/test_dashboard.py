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
from cube_core.buildspec import BuildStatus
from cube_core.config import parse_config
from cube_core.testing.fakes import FAKE_CONFIG

from cube_dashboard import assets, processes, sizes

OPERATOR = "op-" + "x" * 40


@contextlib.asynccontextmanager
async def dashboard(plugin_host: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                    ) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app (its ``state.service`` and ``state.agent``) and a client of it."""
    monkeypatch.setenv("CUBE_TEST_OPERATOR", OPERATOR)
    text = FAKE_CONFIG.format(state_dir=tmp_path / "state").replace(
        "templates = []", 'templates = ["base"]\noperator_token = { env = "CUBE_TEST_OPERATOR" }').replace(
        '[[api]]\nplugin = "fake"', f'[[api]]\nplugin = "dashboard"\noptions = {{ cache = "{tmp_path}/cache" }}')
    app = create_app(plugin_host(parse_config(text)), build_templates=True)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.agent.ready.wait(), timeout=30)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cube.test") as client:
            yield app, client


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
    async with dashboard(plugin_host, tmp_path, monkeypatch) as (app, client):
        yield app.state.service, client


@pytest.fixture
async def cube_app(plugin_host: Callable[..., Any], tmp_path: Path,
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


def section(html: str, heading: str) -> str:
    """The page's part from ``<h2>heading</h2>`` to the next heading."""
    start = html.index(f"<h2>{heading}</h2>")
    end = html.find("<h2>", start + 1)
    return html[start:end if end > 0 else len(html)]


async def test_snapshots_show_as_a_tree_with_rollback_and_fork(cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    team, key = service.create_api_key("team-a")
    other, _ = service.create_api_key("team-b")
    sb = await service.create(SandboxSpec(template_id="base", team_id=team.team_id, metadata={"app": "t"}))
    theirs = await service.create(SandboxSpec(template_id="base", team_id=other.team_id))
    foreign = await service.snapshot(other.team_id, theirs.sandbox_id)
    base = service.get_template("base").snapshot.snapshot_id
    a = await service.snapshot(team.team_id, sb.sandbox_id, name="first")
    b = await service.snapshot(team.team_id, sb.sandbox_id)
    await service.rollback(team.team_id, sb.sandbox_id, a.snapshot_id)
    c = await service.snapshot(team.team_id, sb.sandbox_id)
    assert (a.parent_id, b.parent_id, c.parent_id) == (base, base, a.snapshot_id)
    csrf = await sign_in(client, key)
    snaps = section((await client.get(f"/dashboard/sandboxes/{sb.sandbox_id}")).text, "Snapshots")
    assert '<ul class="tree"' in snaps and f"template snapshot <code>{base}</code>" in snaps
    # c is nested in a's item, which closes before its sibling b's
    pos = {s.snapshot_id: snaps.index(f'<li data-snapshot="{s.snapshot_id}">') for s in (a, b, c)}
    assert pos[a.snapshot_id] < pos[c.snapshot_id] < pos[b.snapshot_id]
    a_item = snaps[pos[a.snapshot_id]:pos[b.snapshot_id]]
    assert a_item.count("<ul>") == 1 and "current base" in a_item and "first" in a_item
    assert snaps.count("Roll back</button>") == 3 and snaps.count("Fork from here</button>") == 3
    assert foreign.snapshot_id not in snaps

    async def act(action: str, **form: str) -> str:
        r = await client.post(f"/dashboard/sandboxes/{sb.sandbox_id}/{action}",
                              data={"csrf": csrf, "next": f"/dashboard/sandboxes/{sb.sandbox_id}", **form})
        assert r.status_code == 303, r.text
        return r.headers["location"]

    assert "rolled+back" in await act("rollback", snapshot_id=b.snapshot_id)
    assert service.get(team.team_id, sb.sandbox_id).runtime.parent_snapshot == b.snapshot_id
    assert "Forked" in await act("fork", snapshot_id=c.snapshot_id)
    [forked] = [s for s in service.list(team.team_id) if s.sandbox_id != sb.sandbox_id]
    assert forked.runtime.parent_snapshot == c.snapshot_id and forked.metadata == {"app": "t"}
    # a snapshot of another sandbox (here: another team's) is "not found"; nothing is created
    assert "not+found" in (await act("fork", snapshot_id=foreign.snapshot_id)).lower()
    assert "not+found" in (await act("rollback", snapshot_id=foreign.snapshot_id)).lower()
    assert len(service.list(team.team_id)) == 2 and len(service.list(other.team_id)) == 1


async def test_processes_are_listed_and_a_paused_sandbox_is_not_woken(
        cube_app: tuple[Any, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch) -> None:
    app, client = cube_app
    service, vmm = app.state.service, app.state.agent.vmm
    team, key = service.create_api_key("team-a")
    sb = await service.create(SandboxSpec(template_id="base", team_id=team.team_id))
    honest = vmm.guest_call
    listed: list[Any] = []

    async def guest_call(vm: Any, op: str, params: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
        if op == "exec" and (params or {}).get("cmd") == processes.COMMAND:
            listed.append(vm.vm_id)
            return {"exit_code": 0, "stdout": "1\t0\troot\t9000\t/sbin/cube-init\n"
                    "42\t1\tuser\t2048\tpython3 app.py --port 8000\nnot a process line\n", "stderr": ""}
        return await honest(vm, op, params, **kw)

    monkeypatch.setattr(vmm, "guest_call", guest_call)
    await sign_in(client, key)
    procs = section((await client.get(f"/dashboard/sandboxes/{sb.sandbox_id}")).text, "Processes")
    assert len(listed) == 1
    assert "<td>42</td><td>1</td><td>user</td><td>2.0 MiB</td><td><code>python3 app.py --port 8000</code>" in procs
    assert procs.count("<tr><td>") == 2
    await service.pause(team.team_id, sb.sandbox_id)
    procs = section((await client.get(f"/dashboard/sandboxes/{sb.sandbox_id}")).text, "Processes")
    assert "paused: no processes listed" in procs and len(listed) == 1
    assert service.get(team.team_id, sb.sandbox_id).state == SandboxState.PAUSED  # not woken


def test_a_processes_listing_parses_the_guest_output() -> None:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, *processes.COMMAND[1:]], capture_output=True, text=True, check=True)
    found = processes.parse(out.stdout)
    assert found and all(p.pid > 0 and p.cmd for p in found)
    assert processes.parse("x\ty\n1\t\troot\t?\tsh\n") == [
        processes.Process(pid=1, ppid=None, user="root", rss_kb=None, cmd="sh")]


async def test_templates_show_their_size_on_disk(cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    await sign_in(client, OPERATOR)
    html = (await client.get("/dashboard/templates")).text
    found = re.search(r'data-testid="disk-base">image ([^,]+), snapshot ([^<]+)<', html)
    assert found, html
    tpl = service.get_template("base")
    files = [tpl.snapshot.vm_state.memory_file, tpl.snapshot.vm_state.device_state, tpl.snapshot.disk.path]
    expected = sum(p.stat().st_blocks * 512 for p in set(files))
    assert found.group(2) == sizes.human(expected) != "unknown"
    assert found.group(1) == (sizes.human(tpl.rootfs_bytes) if tpl.rootfs_bytes else "unknown")
    # a remote node's files are not read: unknown
    remote = [n.evolve(url="http://node-b:9000") for n in service.list_nodes()]
    assert sizes.template_size(tpl, remote).snapshot is None
    assert sizes.human(3 << 30) == "3.0 GiB" and sizes.human(512) == "512 B"


async def test_a_published_template_is_shown_to_another_team_without_its_builds(
        cube: tuple[Any, httpx.AsyncClient]) -> None:
    service, client = cube
    _, key_a = service.create_api_key("team-a")
    template, build = service.template_builds.request(service.authenticate(key_a).team_id, "pub-tpl")
    service.store.put_template(template.model_copy(update={"status": service.get_template("base").status,
                                                           "published": True}))
    service.store.put_build(build.model_copy(update={"status": BuildStatus.READY}))
    await sign_in(client, key_a)
    mine = (await client.get("/dashboard/templates")).text
    assert "pub-tpl" in mine and "published" in mine and build.build_id[:8] in mine
    _, key_b = service.create_api_key("team-b")
    await client.post("/dashboard/logout", data={"csrf": hidden(mine)})
    await sign_in(client, key_b)
    theirs = (await client.get("/dashboard/templates")).text
    assert "pub-tpl" in theirs and "another team" in theirs
    assert build.build_id[:8] not in theirs  # its builds are team-a's
