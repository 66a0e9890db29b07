"""Logs and metrics on the fakes: the node's sampler reads each running sandbox's guest (FakeVmm answers
``observe`` like the guest agent) into the store; the routes read it back, team-scoped, checked against
the spec. Rounds are run by hand (the background sampler waits an hour between rounds here)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Cube
from cube_core.app import create_app
from cube_core.config import parse_config
from cube_core.observations import MetricSample
from cube_core.sampling import Sampler, sampler_of
from cube_core.vmm import VmActivity
from e2b_helpers import e2b_config_text


@pytest.fixture
async def cube(plugin_host: Callable[..., Any], tmp_path: Path) -> AsyncIterator[Cube]:
    text = e2b_config_text(tmp_path / "state").replace(
        "[core]\n", "[core]\nsample_interval_s = 3600\nobservations_keep_s = 86400\n", 1)
    host = plugin_host(parse_config(text))
    app = create_app(host, build_templates=True)
    async with app.router.lifespan_context(app):
        await asyncio.wait_for(app.state.agent.ready.wait(), timeout=30)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cube.test") as client:
            yield Cube(app=app, plugin=host.plugins["api:e2b"], client=client)


def sampler(cube: Cube) -> Sampler:
    found = sampler_of(cube.agent)
    assert found is not None, "the node agent runs no sampler"
    return found


async def create(cube: Cube, key: str) -> str:
    r = await cube.client.post("/v2/sandboxes", json={"templateID": "base"}, headers=cube.headers(key))
    assert r.status_code == 201, r.text
    return str(r.json()["sandboxID"])


def sample(sandbox_id: str, team_id: str, at: datetime, cpu: float) -> MetricSample:
    return MetricSample(sandbox_id=sandbox_id, team_id=team_id, at=at, cpu_count=2, cpu_used_pct=cpu,
                        mem_used=1, mem_total=2, mem_cache=0, disk_used=3, disk_total=4)


async def test_metrics_history_window_and_latest(cube: Cube, openapi: Any) -> None:
    key, other = cube.key("team-a"), cube.key("team-b")
    team = cube.service.authenticate(key).team_id
    h = cube.headers(key)
    sid = await create(cube, key)
    assert await sampler(cube).tick() == 1
    r = await cube.client.get(f"/sandboxes/{sid}/metrics", headers=h)
    openapi.check("GET", "/sandboxes/{sandboxID}/metrics", r)
    [m] = r.json()  # what the guest answered, stamped with the host's clock
    assert (m["cpuCount"], m["cpuUsedPct"], m["memTotal"], m["diskTotal"]) == (2, 12.5, 512 << 20, 2 << 30)
    assert abs(m["timestampUnix"] - datetime.now(UTC).timestamp()) < 60
    assert m["timestamp"].startswith(datetime.fromtimestamp(m["timestampUnix"], UTC).strftime("%Y-%m-%dT%H:%M:%S"))

    t0 = int(datetime.now(UTC).timestamp()) - 100
    cube.service.store.add_metric_samples(
        [sample(sid, team, datetime.fromtimestamp(t0 + 10 * i + 0.75, UTC), float(i)) for i in range(5)])
    r = await cube.client.get(f"/sandboxes/{sid}/metrics", params={"start": t0 + 10, "end": t0 + 30}, headers=h)
    openapi.check("GET", "/sandboxes/{sandboxID}/metrics", r)
    assert [(x["timestampUnix"], x["cpuUsedPct"]) for x in r.json()] == [(t0 + 10, 1), (t0 + 20, 2), (t0 + 30, 3)]
    r = await cube.client.get(f"/sandboxes/{sid}/metrics", params={"start": t0}, headers=h)
    assert len(r.json()) == 6 and r.json()[-1]["cpuUsedPct"] == 12.5  # oldest first, the sampled one last
    r = await cube.client.get(f"/sandboxes/{sid}/metrics", params={"end": t0 - 1}, headers=h)
    assert r.status_code == 200 and r.json() == []
    r = await cube.client.get(f"/sandboxes/{sid}/metrics", params={"start": t0 + 30, "end": t0}, headers=h)
    openapi.check("GET", "/sandboxes/{sandboxID}/metrics", r)
    assert r.status_code == 400 and "start" in r.json()["message"]

    r = await cube.client.get("/sandboxes/metrics", params={"sandbox_ids": f"{sid},nope"}, headers=h)
    openapi.check("GET", "/sandboxes/metrics", r)
    assert list(r.json()["sandboxes"]) == [sid] and r.json()["sandboxes"][sid]["cpuUsedPct"] == 12.5

    # another team: not found, and nothing in the list
    r = await cube.client.get(f"/sandboxes/{sid}/metrics", headers=cube.headers(other))
    openapi.check("GET", "/sandboxes/{sandboxID}/metrics", r)
    assert r.status_code == 404
    r = await cube.client.get("/sandboxes/metrics", params={"sandbox_ids": sid}, headers=cube.headers(other))
    assert r.json() == {"sandboxes": {}}

    # a paused sandbox is not sampled; its history stays
    assert (await cube.client.post(f"/sandboxes/{sid}/pause", headers=h)).status_code == 204
    assert await sampler(cube).tick() == 0
    r = await cube.client.get(f"/sandboxes/{sid}/metrics", params={"start": t0}, headers=h)
    assert len(r.json()) == 6


async def test_logs_of_processes_with_cursor_direction_level_search(cube: Cube, openapi: Any) -> None:
    key, other = cube.key("team-a"), cube.key("team-b")
    h = cube.headers(key)
    sid = await create(cube, key)
    await cube.service.exec(sid, ["echo", "hi"])
    await sampler(cube).tick()
    await sampler(cube).tick()  # a second round adds nothing twice
    r = await cube.client.get(f"/v2/sandboxes/{sid}/logs", headers=h)
    openapi.check("GET", "/v2/sandboxes/{sandboxID}/logs", r)
    logs = r.json()["logs"]
    assert [e["message"] for e in logs] == ["sandbox started", "process started", "process exited"]
    assert logs[0]["fields"] == {"sandbox_id": sid} and logs[2]["fields"] == {"cmd": "echo hi", "exit_code": "0"}
    assert all(e["level"] == "info" for e in logs)

    r = await cube.client.get(f"/v2/sandboxes/{sid}/logs", params={"direction": "backward"}, headers=h)
    openapi.check("GET", "/v2/sandboxes/{sandboxID}/logs", r)
    assert r.json()["logs"] == logs[::-1]
    r = await cube.client.get(f"/v2/sandboxes/{sid}/logs", params={"limit": 1}, headers=h)
    assert r.json()["logs"] == logs[:1]
    cursor = int(datetime.fromisoformat(logs[-1]["timestamp"]).timestamp() * 1000) + 1
    r = await cube.client.get(f"/v2/sandboxes/{sid}/logs", params={"cursor": cursor}, headers=h)
    assert r.json()["logs"] == []  # every entry is before the cursor
    r = await cube.client.get(f"/v2/sandboxes/{sid}/logs", params={"cursor": cursor, "direction": "backward"},
                              headers=h)
    assert r.json()["logs"] == logs[::-1]
    r = await cube.client.get(f"/v2/sandboxes/{sid}/logs", params={"search": "exited"}, headers=h)
    assert r.json()["logs"] == logs[2:]
    r = await cube.client.get(f"/v2/sandboxes/{sid}/logs", params={"level": "warn"}, headers=h)
    assert r.json()["logs"] == []
    for bad in ({"direction": "sideways"}, {"limit": 1001}, {"level": "loud"}, {"cursor": -1}):
        r = await cube.client.get(f"/v2/sandboxes/{sid}/logs", params=bad, headers=h)
        assert r.status_code == 400 and next(iter(bad)) in r.json()["message"], (bad, r.text)  # not in the spec

    r = await cube.client.get(f"/sandboxes/{sid}/logs", params={"start": 0, "limit": 2}, headers=h)
    openapi.check("GET", "/sandboxes/{sandboxID}/logs", r)
    body = r.json()
    assert [x["line"] for x in body["logs"]] == [f"sandbox started sandbox_id={sid}", "process started cmd=echo hi"]
    assert body["logEntries"] == logs[:2]

    # kept after the sandbox ends; never another team's
    assert (await cube.client.delete(f"/sandboxes/{sid}", headers=h)).status_code == 204
    r = await cube.client.get(f"/v2/sandboxes/{sid}/logs", headers=h)
    assert r.status_code == 200 and r.json()["logs"] == logs
    assert (await cube.client.get(f"/sandboxes/{sid}/metrics", headers=h)).status_code == 200
    for path, template in ((f"/v2/sandboxes/{sid}/logs", "/v2/sandboxes/{sandboxID}/logs"),
                           (f"/sandboxes/{sid}/logs", "/sandboxes/{sandboxID}/logs")):
        r = await cube.client.get(path, headers=cube.headers(other))
        openapi.check("GET", template, r)
        assert r.status_code == 404
    r = await cube.client.get("/v2/sandboxes/nope/logs", headers=h)
    assert r.status_code == 404


async def test_retention_drops_old_observations(cube: Cube) -> None:
    key = cube.key()
    team = cube.service.authenticate(key).team_id
    sid = await create(cube, key)
    now = datetime.now(UTC)
    cube.service.store.add_metric_samples([sample(sid, team, now - timedelta(days=2), 1.0),
                                           sample(sid, team, now - timedelta(hours=1), 2.0)])
    assert sampler(cube).prune() == 1  # observations_keep_s = 1 day
    assert [m.cpu_used_pct for m in cube.service.sandbox_metrics(team, sid)] == [2.0]


async def test_team_metrics_and_max(cube: Cube, openapi: Any) -> None:
    key, other = cube.key("team-a"), cube.key("team-b")
    team = cube.service.authenticate(key).team_id
    h = cube.headers(key)
    a, b = await create(cube, key), await create(cube, key)
    await create(cube, other)  # another team's: never counted
    end = int(datetime.now(UTC).timestamp()) // 60 * 60 + 60
    start = end - 300  # 5 minutes: steps of 5 s (the sampling interval is an hour here: one step)
    cube.service.store.add_metric_samples([sample(a, team, datetime.fromtimestamp(start + 10, UTC), 1.0),
                                           sample(b, team, datetime.fromtimestamp(start + 15, UTC), 1.0)])
    r = await cube.client.get(f"/teams/{team}/metrics", params={"start": start, "end": end}, headers=h)
    openapi.check("GET", "/teams/{teamID}/metrics", r)
    points = r.json()
    assert points[0]["timestampUnix"] <= start and points[-1]["timestampUnix"] <= end
    steps = {p["timestampUnix"] for p in points}
    assert len(steps) == len(points) >= 1
    assert max(p["concurrentSandboxes"] for p in points) >= 1
    assert sum(p["sandboxStartRate"] for p in points) > 0  # a and b started in the window

    r = await cube.client.get(f"/teams/{team}/metrics/max",
                              params={"start": start, "end": end, "metric": "concurrent_sandboxes"}, headers=h)
    openapi.check("GET", "/teams/{teamID}/metrics/max", r)
    top = r.json()
    assert top["value"] == max(p["concurrentSandboxes"] for p in points)
    r = await cube.client.get(f"/teams/{team}/metrics/max", params={"metric": "sandbox_start_rate"}, headers=h)
    openapi.check("GET", "/teams/{teamID}/metrics/max", r)
    assert r.json()["value"] > 0  # the last hour: a and b

    for path in (f"/teams/{team}/metrics", f"/sandboxes/{a}/metrics"):  # the widest window there is
        r = await cube.client.get(path, params={"start": 0, "end": 253402300799}, headers=h)
        assert r.status_code == 200 and 1 <= len(r.json()) <= 501, r.text
    r = await cube.client.get(f"/teams/{team}/metrics/max", params={"metric": "cpu"}, headers=h)
    openapi.check("GET", "/teams/{teamID}/metrics/max", r)
    assert r.status_code == 400
    r = await cube.client.get(f"/teams/{team}/metrics", params={"start": end, "end": start}, headers=h)
    openapi.check("GET", "/teams/{teamID}/metrics", r)
    assert r.status_code == 400
    for path, template in ((f"/teams/{team}/metrics", "/teams/{teamID}/metrics"),
                           (f"/teams/{team}/metrics/max?metric=concurrent_sandboxes", "/teams/{teamID}/metrics/max")):
        r = await cube.client.get(path, headers=cube.headers(other))
        openapi.check("GET", template, r)
        assert r.status_code == 403


async def test_events_from_before_the_sandbox_started_are_not_its_log(cube: Cube) -> None:
    """A warm-pool member's warm-up, or the events a snapshot carries, happened before the sandbox
    existed: the sampler stores only what the guest logged from the sandbox's start on."""
    key = cube.key()
    team = cube.service.authenticate(key).team_id
    sid = await create(cube, key)
    vm = cube.service.get(team, sid).runtime.vm
    events = cube.agent.vmm.vms[vm.vm_id]["events"]
    events.append({"seq": len(events) + 1, "ts_ms": int((datetime.now(UTC) - timedelta(hours=1)).timestamp() * 1000),
                   "level": "info", "message": "process started", "fields": {"cmd": "warm-up"}})
    await sampler(cube).tick()
    stored = cube.service.sandbox_logs(team, sid)
    assert [e.message for e in stored] == ["sandbox started"]
    assert sampler(cube).cursors[sid] == len(events)  # read past it all the same


async def test_an_idle_sandbox_is_asked_every_idle_interval(cube: Cube, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the VMM's count (FakeVmm.busy, ``VmmDriver.activity``): a sandbox whose VM the VMM
    counts idle since two rounds before its guest's last answer is not asked until
    ``sample_idle_interval_s`` (60 s here) after that answer, which is stored again each round with
    the host's CPU count; the VMM finding it busy asks it again until an answer two rounds after
    that, and so does that interval passing; a VM the VMM cannot tell about is asked every round."""
    import cube_core.sampling as sampling

    clock = [1000.0]
    monkeypatch.setattr(sampling.time, "monotonic", lambda: clock[0])
    key = cube.key("team-a")
    sid = await create(cube, key)
    vm = cube.service.store.get_sandbox(sid).runtime.vm
    vmm, s = cube.agent.vmm, sampler(cube)
    s.interval_s, s.idle_interval_s = 5, 60  # rounds by hand, as if every 5 s

    def asks() -> int:
        return sum(1 for op, vm_id in vmm.calls if op == "observe" and vm_id == vm.vm_id)

    def cpu_pcts() -> list[float]:
        return [m.cpu_used_pct for m in cube.service.store.metric_samples(sid)]

    assert await s.tick() == 1 and asks() == 1  # the VMM cannot tell: asked (at 1000)
    for pct in (0.2, 0.4):  # idle by the VMM's count since 990: the last answer carried forward
        clock[0] += 5
        vmm.busy[vm.vm_id] = VmActivity(cpu_pct=pct, idle_since=990.0)
        assert await s.tick() == 1 and asks() == 1
    assert cpu_pcts() == [12.5, 0.1, 0.2]  # the guest's answer, then the host's count / 2 vCPUs
    clock[0] += 5  # 1015
    vmm.busy[vm.vm_id] = VmActivity(cpu_pct=4.0, idle_since=1015.0)  # the VMM found it busy
    assert await s.tick() == 1 and asks() == 2
    vmm.busy[vm.vm_id] = VmActivity(cpu_pct=0.1, idle_since=1015.0)
    clock[0] += 5
    assert await s.tick() == 1 and asks() == 3  # idle again, but its last answer was taken 0 s after
    clock[0] += 5
    assert await s.tick() == 1 and asks() == 4  # ... 5 s after: one round more
    clock[0] += 5
    assert await s.tick() == 1 and asks() == 4  # answered 10 s after: carried
    clock[0] += 54
    assert await s.tick() == 1 and asks() == 4  # idle, answered 59 s ago
    clock[0] += 1
    assert await s.tick() == 1 and asks() == 5  # 60 s since its last answer
    assert len(cpu_pcts()) == 9
    del vmm.busy[vm.vm_id]
    clock[0] += 5
    assert await s.tick() == 1 and asks() == 6  # the VMM cannot tell any more: every round

    s.idle_interval_s = 0  # [core] sample_idle_interval_s = 0: every round, whatever the count
    vmm.busy[vm.vm_id] = VmActivity(cpu_pct=0.1, idle_since=0.0)
    for n in (7, 8):
        clock[0] += 5
        assert await s.tick() == 1 and asks() == n
