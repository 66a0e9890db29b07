"""The operator commands of the real ``cube`` command line (subprocesses) against a Cube app on the
fakes with the E2B API, served by uvicorn on loopback: ``cube sandbox ls|inspect|logs|exec|kill``,
``cube template ls``, ``--json`` on each, JSON progress events off a terminal, and the SSE parser
of ``cube events``."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import uvicorn

from cube_core._host import PluginHost
from cube_core.app import create_app
from cube_core.cli_events import parse_sse
from cube_core.config import parse_config
from cube_core.testing.fakes import FAKE_CONFIG

CUBE = str(Path(sys.executable).with_name("cube"))


def e2b_config(state_dir: Path) -> str:
    text = FAKE_CONFIG.format(state_dir=state_dir)
    text = text.replace("templates = []", 'templates = ["base"]\nsample_interval_s = 0.2\n'
                                          'operator_token = { env = "CUBE_TEST_OPERATOR_TOKEN" }')
    return text.replace('[[api]]\nplugin = "fake"', '[[api]]\nplugin = "e2b"\noptions = { metrics_on_startup = false }')


@dataclass
class Server:
    url: str
    config: Path
    key: str
    app: object

    async def cube(self, *args: str, timeout: float = 60) -> tuple[int, str, str]:
        proc = await asyncio.create_subprocess_exec(
            CUBE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "COLUMNS": "250", "CUBE_CONFIG": str(self.config)})
        stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout)
        assert proc.returncode is not None
        return proc.returncode, stdout.decode(), stderr.decode()


OPERATOR = "operator-token-0123456789abcdef0123456789"


@pytest.fixture
async def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Server]:
    monkeypatch.setenv("CUBE_TEST_OPERATOR_TOKEN", OPERATOR)
    config = tmp_path / "plugins.toml"
    config.write_text(e2b_config(tmp_path / "state"))
    host = PluginHost(parse_config(config.read_text(), path=config)).load()
    app = create_app(host)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_config=None, access_log=False))
    task = asyncio.create_task(uv.serve(sockets=[sock]))
    while not uv.started:
        assert not task.done(), task.result()
        await asyncio.sleep(0.02)
    await asyncio.wait_for(app.state.agent.ready.wait(), 30)
    key = app.state.service.create_api_key("team-cli")[1]
    try:
        yield Server(url=f"http://127.0.0.1:{port}", config=config, key=key, app=app)
    finally:
        uv.should_exit = True
        await task
        for name in list(host.plugins):
            host.unregister(name)


async def new_sandbox(server: Server) -> str:
    async with httpx.AsyncClient(base_url=server.url) as client:
        r = await client.post("/v2/sandboxes", json={"templateID": "base", "envVars": {"TOKEN": "s3cret"}},
                              headers={"X-API-Key": server.key})
    assert r.status_code == 201, r.text
    return str(r.json()["sandboxID"])


async def test_sandbox_commands(server: Server) -> None:
    sid = await new_sandbox(server)
    code, out, err = await server.cube("sandbox", "ls", "--json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["sandbox_id"] for r in rows] == [sid] and rows[0]["state"] == "running"
    code, out, _ = await server.cube("sandbox", "ls")
    assert code == 0 and sid in out and "running" in out

    code, out, err = await server.cube("sandbox", "inspect", sid, "--json")
    assert code == 0, err
    detail = json.loads(out)
    assert detail["sandbox_id"] == sid and detail["env_vars"] == {"TOKEN": "***"}
    assert "envd_access_token" not in detail and "s3cret" not in out
    code, out, _ = await server.cube("sandbox", "inspect", sid)
    assert code == 0 and "template_id" in out and "s3cret" not in out
    code, _, err = await server.cube("sandbox", "inspect", "nosuchsandbox")
    assert code == 2 and "not found" in err and "Traceback" not in err

    for _ in range(100):  # the node samples the guest's log every 0.2 s
        code, out, err = await server.cube("sandbox", "logs", sid, "--json")
        if out.strip():
            break
        await asyncio.sleep(0.2)
    assert code == 0 and out.strip(), err
    entries = [json.loads(line) for line in out.splitlines()]
    assert all(e["sandbox_id"] == sid and e["message"] for e in entries)

    url = ["--url", server.url]
    code, out, err = await server.cube("sandbox", "exec", sid, *url, "--key", server.key, "--", "echo", "hi")
    assert code == 0 and out == "echo hi", (code, out, err)  # the fake guest answers with the command line
    code, out, err = await server.cube("sandbox", "exec", sid, *url, "--key", server.key, "--json", "--", "true")
    assert code == 0 and json.loads(out)["exitCode"] == 0, err

    code, _, err = await server.cube("sandbox", "kill", sid, *url, "--key", "")
    assert code == 2 and "API key" in err, err
    other = server.app.state.service.create_api_key("team-other")[1]  # type: ignore[attr-defined]
    code, _, err = await server.cube("sandbox", "kill", sid, *url, "--key", other)
    assert code == 2 and "404" in err, err  # another team's key: not found
    code, out, err = await server.cube("sandbox", "kill", sid, *url, "--key", server.key, "--json")
    assert code == 0 and json.loads(out) == {"sandbox_id": sid, "killed": True}, err
    code, out, _ = await server.cube("sandbox", "ls", "--json")
    assert out.strip() == ""
    code, out, _ = await server.cube("sandbox", "ls", "--json", "--all")
    assert json.loads(out)["state"] == "killed"


async def follow_until(server: Server, *args: str) -> tuple[int, str, str]:
    """``cube events ARGS --count 1`` while sandboxes are created (one a second) until it prints."""
    proc = await asyncio.create_subprocess_exec(
        CUBE, "events", "--url", server.url, "--count", "1", *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "COLUMNS": "250"})
    try:
        for _ in range(30):
            await new_sandbox(server)
            try:
                await asyncio.wait_for(proc.wait(), 1.0)
                break
            except TimeoutError:
                pass
    finally:
        if proc.returncode is None:
            proc.kill()
    stdout, stderr = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


async def test_events_follow_the_stream(server: Server) -> None:
    code, out, err = await follow_until(server, "--key", server.key, "--json", "--type", "sandbox.")
    assert code == 0, err
    event = json.loads(out)
    team_id = server.app.state.service.store.get_sandbox(event["sandbox_id"]).team_id  # type: ignore[attr-defined]
    assert event["type"] == "sandbox.created" and event["team_id"] == team_id
    code, out, err = await follow_until(server, "--token", OPERATOR)  # every team's, as a line
    assert code == 0 and "sandbox.created" in out and "sandbox=" in out, (out, err)
    code, _, err = await server.cube("events", "--url", server.url, "--key", "e2b_" + "0" * 40)
    assert code == 2 and "401" in err, err


async def test_template_ls_json(server: Server) -> None:
    code, out, err = await server.cube("template", "ls", "--json")
    assert code == 0, err
    templates = {t["template_id"]: t for t in map(json.loads, out.splitlines())}
    assert templates["base"]["status"] == "ready"


def test_template_build_reports_json_progress_off_a_terminal(run_cube, tmp_path: Path) -> None:
    config = tmp_path / "plugins.toml"
    config.write_text(FAKE_CONFIG.format(state_dir=tmp_path / "state"))
    result = run_cube("template", "build", "base", "--config", str(config), "--json", env={"CUBE_LOG_FORMAT": ""})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["template_id"] == "base"
    events = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["task"] == "template base" and progress[-1]["percent"] == 100


def test_sse_parser() -> None:
    lines = [": keep-alive", "id: 1", "event: message", 'data: {"type": "sandbox.created"}', "",
             "retry: 1000", "id: 2", "data: a", "data: b", "", "", "event: lagged", "data: lost 3", ""]
    assert list(parse_sse(iter(lines))) == [("1", "message", '{"type": "sandbox.created"}'), ("2", "message", "a\nb"),
                                            ("2", "lagged", "lost 3")]
