"""Each router on its own: mounted in a bare FastAPI app, served with a small control-plane double.

No core, no plugin host: ``mount()`` adds one module-level router, binds an ``E2bContext`` around
the double (``BindContext``) and overrides the ``get_service`` dependency with it, so these tests
pin what one route does with what the control plane answers. The whole app is tested in
test_e2b_routes.py (and against the real SDK in test_e2b_sdk.py).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from cube_core import (
    AuthError,
    CoreSettings,
    NetworkPolicy,
    NodeUnavailableError,
    Sandbox,
    SandboxNotFoundError,
    SandboxSpec,
    SandboxState,
    SnapshotRef,
    Team,
    Template,
    TemplateNotFoundError,
    TemplateStatus,
)
from cube_core.models import Node
from cube_core.nodeclient import Endpoint
from fastapi import APIRouter, FastAPI

from cube_api_e2b.auth import TrafficTokens
from cube_api_e2b.config import E2bConfig
from cube_api_e2b.context import E2bContext
from cube_api_e2b.metrics import ApiMetrics
from cube_api_e2b.routes import ROUTERS, lifecycle, sandboxes, snapshots, templates
from cube_api_e2b.routing import BindContext, get_service
from cube_api_e2b.service import ControlPlane

KEY = "e2b_" + "1" * 40
TEAM = Team(team_id="team-a", name="a")
NOW = datetime.now(UTC)


class Double:
    """The control plane as the routes see it: sandboxes and snapshots of one team, calls recorded."""

    def __init__(self, tmp: Path) -> None:
        self.settings = CoreSettings(state_dir=tmp)
        self.sandboxes: dict[str, Sandbox] = {}
        self.snapshots: list[SnapshotRef] = []
        self.calls: list[tuple[object, ...]] = []
        self.down: set[str] = set()  # sandboxes whose node is unavailable

    def add(self, sandbox_id: str, state: SandboxState = SandboxState.RUNNING, *, minutes: int = 5,
            **kw: object) -> Sandbox:
        sb = Sandbox.model_validate({"sandbox_id": sandbox_id, "template_id": "base", "team_id": TEAM.team_id,
                                     "state": state, "started_at": NOW, "end_at": NOW + timedelta(minutes=minutes),
                                     **kw})
        self.sandboxes[sandbox_id] = sb
        return sb

    def authenticate(self, secret: str | None) -> Team:
        if secret != KEY:
            raise AuthError("invalid API key")
        return TEAM

    def get(self, team_id: str, sandbox_id: str) -> Sandbox:
        if sandbox_id in self.down:
            raise NodeUnavailableError(node_id="node-b", detail="missed heartbeats for 10 s")
        sb = self.sandboxes.get(sandbox_id)
        if sb is None or sb.team_id != team_id:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return sb

    def list(self, team_id: str, *, states: tuple[SandboxState, ...] | None = None,
             metadata: dict[str, str] | None = None) -> Sequence[Sandbox]:
        self.calls.append(("list", states, metadata))
        return [s for s in self.sandboxes.values() if s.team_id == team_id and (not states or s.state in states)]

    async def create(self, spec: SandboxSpec) -> Sandbox:
        self.calls.append(("create", spec))
        return self.add("new1", env_vars=dict(spec.env_vars), envd_access_token="tok")

    async def kill(self, team_id: str, sandbox_id: str) -> None:
        self.get(team_id, sandbox_id)
        self.calls.append(("kill", sandbox_id))

    async def pause(self, team_id: str, sandbox_id: str, *, memory: bool = True) -> Sandbox:
        self.calls.append(("pause", sandbox_id, memory))
        return self.get(team_id, sandbox_id)

    async def resume(self, team_id: str, sandbox_id: str, timeout_s: int | None = None) -> Sandbox:
        return self.get(team_id, sandbox_id)

    async def connect(self, team_id: str, sandbox_id: str, timeout_s: int | None = None, *,
                      memory: bool = True) -> Sandbox:
        call = ("connect", sandbox_id, timeout_s)
        self.calls.append(call if memory else (*call, "reboot"))
        return self.add(sandbox_id, SandboxState.RUNNING)

    async def set_timeout(self, team_id: str, sandbox_id: str, timeout_s: int) -> Sandbox:
        self.calls.append(("set_timeout", sandbox_id, timeout_s))
        return self.get(team_id, sandbox_id)

    def find(self, sandbox_id: str) -> Sandbox:
        raise SandboxNotFoundError(sandbox_id=sandbox_id)

    async def wake(self, sandbox_id: str) -> Sandbox:
        raise SandboxNotFoundError(sandbox_id=sandbox_id)

    async def endpoint(self, sandbox_id: str, port: int) -> tuple[Sandbox, Endpoint]:
        raise SandboxNotFoundError(sandbox_id=sandbox_id)

    async def update_network(self, team_id: str, sandbox_id: str, policy: NetworkPolicy) -> Sandbox:
        return self.get(team_id, sandbox_id)

    async def network_audit(self, team_id: str, sandbox_id: str,
                            limit: int = 1000) -> builtins.list[dict[str, object]]:
        return []

    async def snapshot(self, team_id: str, sandbox_id: str, *, name: str | None = None) -> SnapshotRef:
        raise NotImplementedError

    def list_snapshots(self, team_id: str, sandbox_id: str | None = None) -> builtins.list[SnapshotRef]:
        return [r for r in self.snapshots if sandbox_id is None or r.sandbox_id == sandbox_id]

    async def delete_snapshot(self, team_id: str, snapshot_id: str) -> None:
        raise NotImplementedError

    async def fork(self, team_id: str, sandbox_id: str, count: int = 1,
                   timeout_s: int | None = None) -> builtins.list[Sandbox]:
        raise NotImplementedError

    async def rollback(self, team_id: str, sandbox_id: str, snapshot_id: str) -> Sandbox:
        raise NotImplementedError

    def list_templates(self, team_id: str | None = None) -> builtins.list[Template]:
        return [Template(template_id="base", aliases=("base",), status=TemplateStatus.READY)]

    def get_template(self, template_id_or_alias: str, team_id: str | None = None) -> Template:
        for template in self.list_templates():
            if template_id_or_alias in (template.template_id, *template.aliases):
                return template
        raise TemplateNotFoundError(template=template_id_or_alias)

    def count_by_state(self) -> dict[str, int]:
        return {"creating": 0, "running": 3, "paused": 1}

    def pool_sizes(self) -> dict[str, int]:
        return {"base": 2, "code-interpreter-v1": 1}

    def list_nodes(self) -> list[Node]:
        return [Node(node_id="n1", cpu_total=8, memory_mb_total=16384, cpu_used=3, memory_mb_used=2048, sandboxes=4)]


def _typed(double: Double) -> ControlPlane:
    return double  # mypy: the double has every member of the Protocol


@pytest.fixture
def double(tmp_path: Path) -> Double:
    return Double(tmp_path)


def mount(router: APIRouter, service: Double, **config: object) -> httpx.AsyncClient:
    app = FastAPI()
    app.include_router(router)
    ctx = E2bContext(service=_typed(service), config=E2bConfig.model_validate(config), settings=service.settings,
                     metrics=ApiMetrics(), tokens=TrafficTokens(b"s" * 32))
    app.add_middleware(BindContext, ctx=ctx)
    app.dependency_overrides[get_service] = lambda: service
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cube.test",
                             headers={"X-API-Key": KEY})


def test_no_route_dependency_runs_in_the_thread_pool() -> None:
    """FastAPI runs a plain ``def`` dependency in its thread pool: three such per request made a
    create at c=50 wait ~250 ms for thread round trips (docs/bench.md, "Session 22"). Every
    dependency of every E2B route (and every route itself) is a coroutine."""
    import inspect

    def is_coroutine_callable(call: object) -> bool:  # a function, or an object with async __call__
        return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(type(call).__call__)

    def calls(dependant: object) -> list[object]:
        found = []
        for sub in getattr(dependant, "dependencies", []):
            found.append(sub.call)
            found.extend(calls(sub))
        return found

    checked = 0
    for router in ROUTERS:
        for route in router.routes:
            dependant = route.dependant  # type: ignore[attr-defined]
            for call in [dependant.call, *calls(dependant)]:
                assert is_coroutine_callable(call), (route.path, call)
                checked += 1
    assert checked > 3 * len(ROUTERS)


async def test_auth_comes_first_on_every_router(double: Double) -> None:
    """A bad key is a 401 before the body is parsed (a bad body with a good key is a 400)."""
    for router in ROUTERS:
        async with mount(router, double) as client:
            for route in router.routes:
                path = route.path.replace("{sandbox_id}", "x").replace("{template_id}", "x").replace("{alias}", "x")
                for method in route.methods:
                    r = await client.request(method, path, content=b"{not json", headers={"X-API-Key": "e2b_bad"})
                    assert r.status_code == 401, (method, path, r.text)
                    assert r.json() == {"code": 401, "message": "invalid API key"}


async def test_connect_answers_201_only_when_it_resumed(double: Double) -> None:
    double.add("run", SandboxState.RUNNING)
    double.add("zzz", SandboxState.PAUSED)
    async with mount(lifecycle.router, double, max_timeout_s=600) as client:
        r = await client.post("/v2/sandboxes/run/connect", json={"timeout": 30})
        assert r.status_code == 200 and r.json()["sandboxID"] == "run"
        r = await client.post("/v2/sandboxes/zzz/connect", json={"timeout": 30})
        assert r.status_code == 201
        assert ("connect", "zzz", 30) in double.calls
        double.add("zzz", SandboxState.PAUSED)
        r = await client.post("/v2/sandboxes/zzz/connect", json={"timeout": 30, "memory": False})
        assert r.status_code == 201 and ("connect", "zzz", 30, "reboot") in double.calls  # boots from its disk
        r = await client.post("/sandboxes/run/connect", json={"timeout": 601})
        assert r.status_code == 400 and r.json()["message"].startswith("timeout: must be at most 600")
        r = await client.post("/v2/sandboxes/nope/connect", json={})
        assert r.status_code == 404


async def test_node_unavailable_is_503_service_busy(double: Double) -> None:
    """A sandbox on a node that is down: 503 with the node in the message (the SDK raises
    ServiceBusyException with it), not a 404, and no Should-Retry (a create is not idempotent)."""
    double.add("far")
    double.down.add("far")
    async with mount(sandboxes.router, double) as client:
        r = await client.get("/sandboxes/far")
    assert r.status_code == 503, r.text
    assert r.json() == {"code": 503, "message": "node node-b is unavailable: missed heartbeats for 10 s",
                        "error_code": "sandbox_node_unavailable"}
    assert r.headers["should-retry"] == "false"


async def test_refresh_never_shortens(double: Double) -> None:
    double.add("a", minutes=10)
    async with mount(sandboxes.router, double) as client:
        assert (await client.post("/sandboxes/a/refreshes", json={"duration": 60})).status_code == 204
        assert not [c for c in double.calls if c[0] == "set_timeout"]
        assert (await client.post("/sandboxes/a/refreshes", json={"duration": 3600})).status_code == 204
        assert ("set_timeout", "a", 3600) in double.calls


async def test_list_v2_filters_and_headers(double: Double) -> None:
    for i in range(3):
        double.add(f"r{i}", SandboxState.RUNNING)
    double.add("p0", SandboxState.PAUSED)
    async with mount(sandboxes.router, double) as client:
        r = await client.get("/v2/sandboxes", params={"state": "running,paused", "limit": 2,
                                                      "metadata": "k=v&a=b"})
        assert r.status_code == 200 and len(r.json()) == 2
        assert r.headers["X-Total-Running"] == "3" and r.headers["X-Next-Token"]
        assert double.calls[-1] == ("list", (SandboxState.RUNNING, SandboxState.PAUSED), {"k": "v", "a": "b"})
        r = await client.get("/v2/sandboxes", params={"state": "paused"})
        assert [s["sandboxID"] for s in r.json()] == ["p0"] and "X-Total-Running" not in r.headers
        r = await client.get("/v2/sandboxes", params={"state": "killed"})
        assert r.status_code == 400 and r.json()["message"].startswith("state: 'killed'")


async def test_create_refuses_what_cube_cannot_do(double: Double) -> None:
    async with mount(sandboxes.router, double, default_timeout_s=42) as client:
        r = await client.post("/v2/sandboxes", json={"templateID": "base", "mcp": {"x": {}}})
        assert r.status_code == 400 and r.json()["message"].startswith("mcp:")
        assert not [c for c in double.calls if c[0] == "create"]
        r = await client.post("/v2/sandboxes", json={"templateID": "base", "envVars": {"A": "1"}})
        assert r.status_code == 201 and r.json()["envdAccessToken"] == "tok"
        spec = next(c[1] for c in double.calls if c[0] == "create")
        assert isinstance(spec, SandboxSpec)
        assert (spec.team_id, spec.timeout_s, spec.secure, dict(spec.env_vars)) == ("team-a", 42, True, {"A": "1"})


async def test_snapshot_list_pages(double: Double) -> None:
    double.snapshots = [SnapshotRef(snapshot_id=f"s{i}", template_id="base", sandbox_id="a" if i < 3 else "b",
                                    names=(f"n{i}",)) for i in range(5)]
    async with mount(snapshots.router, double) as client:
        r = await client.get("/snapshots", params={"limit": 2})
        assert [s["snapshotID"] for s in r.json()] == ["s0", "s1"] and r.headers["X-Next-Token"] == "2"
        r = await client.get("/snapshots", params={"limit": 2, "nextToken": "4"})
        assert [s["snapshotID"] for s in r.json()] == ["s4"] and "X-Next-Token" not in r.headers
        r = await client.get("/snapshots", params={"sandboxID": "a", "name": "n1"})
        assert [s["snapshotID"] for s in r.json()] == ["s1"]
        r = await client.get("/snapshots", params={"nextToken": "-1"})
        assert r.status_code == 400 and r.json()["message"].startswith("nextToken:")


async def test_template_routes(double: Double) -> None:
    async with mount(templates.router, double) as client:
        r = await client.get("/templates/aliases/base")
        assert r.status_code == 200 and r.json() == {"templateID": "base", "public": True}
        r = await client.get("/templates/aliases/nope")
        assert r.status_code == 404 and "nope" in r.json()["message"]
        r = await client.get("/templates")
        assert [t["templateID"] for t in r.json()] == ["base"] and r.json()[0]["buildStatus"] == "ready"


async def test_unbound_router_is_a_server_error(double: Double) -> None:
    """Without BindContext the routes refuse to run (no context, no authentication)."""
    app = FastAPI()
    app.include_router(templates.router)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://cube.test") as client:
        r = await client.get("/templates", headers={"X-API-Key": KEY})
    assert r.status_code == 500


def test_metrics_ask_the_control_plane(double: Double) -> None:
    metrics = ApiMetrics()
    metrics.bind(_typed(double))
    text = metrics.render().decode()
    assert 'cube_sandboxes{state="running"} 3.0' in text and 'cube_sandboxes{state="paused"} 1.0' in text
    assert 'cube_sandboxes{state="creating"} 0.0' in text and "cube_warm_pool_members 3.0" in text
    assert 'cube_nodes{status="up"} 1.0' in text and 'cube_nodes{status="down"} 0.0' in text
    assert 'cube_node_vcpus{kind="used",node="n1"} 3.0' in text and 'cube_node_sandboxes{node="n1"} 4.0' in text
    assert 'cube_node_memory_bytes{kind="total",node="n1"} 1.7179869184e+10' in text  # 16 GiB
