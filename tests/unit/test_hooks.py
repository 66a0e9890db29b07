"""One test per hookspec (tests/docs/test_hooks_documented.py checks that each exists)."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pluggy
import pytest

from cube_core import (
    AdmissionRejectedError,
    Check,
    EgressRule,
    NetworkDriver,
    Rejection,
    Sandbox,
    SandboxSpec,
    Scheduler,
    SnapshotRef,
    StopReason,
    StorageDriver,
    VmmDriver,
    hookimpl,
)
from cube_core._host import PluginHost
from cube_core.app import create_app
from cube_core.config import LoadedConfig
from cube_core.embedded import Embedded
from cube_core.service import SandboxService
from cube_core.store import SqliteStore


def test_hook_cube_addhooks(register_plugin: Callable[..., PluginHost]) -> None:
    spec_module = types.ModuleType("extra_specs")
    marker = pluggy.HookspecMarker("cube")

    def cube_extra_thing(x: int) -> int:
        """An extra hook added by a plugin."""

    spec_module.cube_extra_thing = marker(cube_extra_thing)  # type: ignore[attr-defined]

    class Adds:
        @hookimpl
        def cube_addhooks(self, pluginmanager: pluggy.PluginManager) -> None:
            pluginmanager.add_hookspecs(spec_module)

    class Uses:
        @hookimpl
        def cube_extra_thing(self, x: int) -> int:
            return x * 2

    host = register_plugin(Adds())
    register_plugin(Uses(), host)
    assert host.pm.hook.cube_extra_thing(x=21) == [42]


def test_hook_cube_configure(register_plugin: Callable[..., PluginHost]) -> None:
    seen: list[Any] = []

    class Late:
        @hookimpl
        def cube_configure(self, settings: Any) -> None:
            seen.append(settings)

    host = register_plugin(Late())  # registered after load: historic call still reaches it
    assert seen == [host.config.data.core]


def test_hook_cube_vmm_driver(plugin_host: Callable[..., PluginHost]) -> None:
    assert isinstance(plugin_host().hooks.vmm_driver(), VmmDriver)


def test_hook_cube_network_driver(plugin_host: Callable[..., PluginHost]) -> None:
    assert isinstance(plugin_host().hooks.network_driver(), NetworkDriver)


def test_hook_cube_storage_driver(plugin_host: Callable[..., PluginHost]) -> None:
    assert isinstance(plugin_host().hooks.storage_driver(), StorageDriver)


def test_hook_cube_scheduler(plugin_host: Callable[..., PluginHost]) -> None:
    assert isinstance(plugin_host().hooks.scheduler(), Scheduler)


async def test_hook_cube_api_routers(register_plugin: Callable[..., PluginHost]) -> None:
    from fastapi import APIRouter

    class Routes:
        @hookimpl
        def cube_api_routers(self, service: Any) -> list[Any]:
            router = APIRouter()

            @router.get("/extra")
            async def extra() -> dict[str, int]:
                return {"templates": len(service.list_templates())}

            return [router]

    import httpx

    app = create_app(register_plugin(Routes()), build_templates=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/extra")).json() == {"templates": 0}
        assert (await client.get("/fake/sandboxes", params={"team": "x"})).json() == []


async def test_hook_cube_asgi_middleware(register_plugin: Callable[..., PluginHost]) -> None:
    import httpx

    def tagger(app: Any) -> Any:
        async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
            async def tag(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (b"x-wrapped", b"yes")]
                await send(message)

            await app(scope, receive, tag)

        return wrapped

    class Mw:
        @hookimpl
        def cube_asgi_middleware(self, service: Any) -> list[Any]:
            return [tagger]

    app = create_app(register_plugin(Mw()), build_templates=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get("/health")
    assert response.headers["x-wrapped"] == "yes"


async def test_hook_cube_egress_rules(cube: Embedded, service: SandboxService) -> None:
    seen: list[SandboxSpec] = []

    class Rules:
        @hookimpl
        def cube_egress_rules(self, spec: SandboxSpec) -> list[EgressRule]:
            seen.append(spec)
            return [EgressRule(action="deny", target="198.18.0.0/15")]

    service.host.register(Rules(), "rules")
    try:
        captured: dict[str, Any] = {}
        original = cube.agent.network.allocate

        async def spy(owner_id: str, policy: Any, extra_rules: Any = ()) -> Any:
            captured["rules"] = list(extra_rules)
            return await original(owner_id, policy, extra_rules)

        cube.agent.network.allocate = spy  # type: ignore[method-assign]
        await service.create(SandboxSpec(template_id="base", team_id="t"))
        assert captured["rules"] == [EgressRule(action="deny", target="198.18.0.0/15")]
        assert seen and seen[0].team_id == "t"
    finally:
        service.host.unregister("rules")


async def test_hook_cube_admit_sandbox(service: SandboxService) -> None:
    class Quota:
        @hookimpl
        def cube_admit_sandbox(self, spec: SandboxSpec) -> Rejection | None:
            return Rejection(reason="quota exceeded") if spec.metadata.get("big") else None

    service.host.register(Quota(), "quota")
    try:
        with pytest.raises(AdmissionRejectedError, match="quota exceeded"):
            await service.create(SandboxSpec(template_id="base", team_id="t", metadata={"big": "1"}))
        assert (await service.create(SandboxSpec(template_id="base", team_id="t"))).state.value == "running"
    finally:
        service.host.unregister("quota")


async def test_hook_cube_sandbox_created(service: SandboxService) -> None:
    seen: list[str] = []

    class Watcher:
        @hookimpl
        def cube_sandbox_created(self, sandbox: Sandbox) -> Any:
            async def later() -> None:
                seen.append(sandbox.sandbox_id)
            return later()

    class Broken:
        @hookimpl
        def cube_sandbox_created(self, sandbox: Sandbox) -> None:
            raise RuntimeError("notification hooks must not break creates")

    service.host.register(Watcher(), "watcher")
    service.host.register(Broken(), "broken")
    try:
        sb = await service.create(SandboxSpec(template_id="base", team_id="t"))
        assert seen == [sb.sandbox_id]
    finally:
        service.host.unregister("watcher")
        service.host.unregister("broken")


async def test_hook_cube_sandbox_stopped(service: SandboxService) -> None:
    seen: list[tuple[str, StopReason, str]] = []

    class Watcher:
        @hookimpl
        def cube_sandbox_stopped(self, sandbox: Sandbox, reason: StopReason) -> None:
            seen.append((sandbox.sandbox_id, reason, sandbox.state.value))

    service.host.register(Watcher(), "watcher")
    try:
        sb = await service.create(SandboxSpec(template_id="base", team_id="t"))
        await service.kill("t", sb.sandbox_id)
        timed = await service.create(SandboxSpec(template_id="base", team_id="t", timeout_s=0))
        await service.reap_expired()
        assert seen == [(sb.sandbox_id, StopReason.KILLED, "killed"),
                        (timed.sandbox_id, StopReason.TIMEOUT, "killed")]
    finally:
        service.host.unregister("watcher")


async def test_hook_cube_snapshot_taken(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host()
    seen: list[str] = []

    class Watcher:
        @hookimpl
        def cube_snapshot_taken(self, sandbox: Sandbox, snapshot: SnapshotRef) -> Any:
            async def later() -> None:
                seen.append(snapshot.snapshot_id)
            return later()

    host.register(Watcher(), "watcher")
    from cube_core.models import utcnow
    from cube_core.state import SandboxState

    sb = Sandbox(sandbox_id="s", template_id="base", team_id="t", state=SandboxState.RUNNING,
                 started_at=utcnow(), end_at=utcnow())
    await host.hooks.snapshot_taken(sb, SnapshotRef(snapshot_id="snap1", template_id="base"))
    assert seen == ["snap1"]


async def test_hook_cube_sandbox_restored(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host()
    seen: list[tuple[str, str]] = []

    class Watcher:
        @hookimpl
        def cube_sandbox_restored(self, sandbox: Sandbox, snapshot: SnapshotRef) -> Any:
            async def later() -> None:
                seen.append((sandbox.sandbox_id, snapshot.snapshot_id))
            return later()

    class Broken:
        @hookimpl
        def cube_sandbox_restored(self) -> Any:
            raise RuntimeError("a notification must not break the rollback")

    host.register(Watcher(), "watcher")
    host.register(Broken(), "broken")
    from cube_core.models import utcnow
    from cube_core.state import SandboxState

    sb = Sandbox(sandbox_id="s", template_id="base", team_id="t", state=SandboxState.RUNNING,
                 started_at=utcnow(), end_at=utcnow())
    await host.hooks.sandbox_restored(sb, SnapshotRef(snapshot_id="snap1", template_id="base"))
    assert seen == [("s", "snap1")]


async def test_hook_cube_http_server(register_plugin: Callable[..., PluginHost]) -> None:
    host = register_plugin(object())  # a host on the fakes: nobody serves, the core uses uvicorn
    assert host.hooks.http_server(app=None, settings=host.config.data.core) is None

    served: list[tuple[Any, int]] = []

    class Server:
        @hookimpl
        def cube_http_server(self, app: Any, settings: Any) -> Any:
            async def serve() -> None:
                served.append((app, settings.port))
            return serve()

    register_plugin(Server(), host)
    awaitable = host.hooks.http_server(app="the-app", settings=host.config.data.core)
    assert awaitable is not None
    await awaitable
    assert served == [("the-app", host.config.data.core.port)]


def test_hook_cube_doctor_checks(plugin_host: Callable[..., PluginHost]) -> None:
    host = plugin_host()

    class Healthy:
        @hookimpl
        def cube_doctor_checks(self) -> list[Check]:
            return [Check("thing", "ok", "present"), Check("other", "fail", "absent", "install it")]

    class Broken:
        @hookimpl
        def cube_doctor_checks(self) -> list[Check]:
            raise RuntimeError("probe crashed")

    host.register(Healthy(), "extension:healthy")
    host.register(Broken(), "extension:broken")
    checks = host.hooks.doctor_checks()
    assert ("vmm:fake", "vmm") in [(src, c.name) for src, c in checks]
    assert ("extension:healthy", Check("other", "fail", "absent", "install it")) in checks
    broken = [c for src, c in checks if src == "extension:broken"]
    assert len(broken) == 1 and broken[0].status == "fail" and "probe crashed" in broken[0].detail


async def test_hook_cube_pool_member_warm_up(cube_config_factory: Callable[..., LoadedConfig],
                                             tmp_path: Path) -> None:
    """Each pool member is handed to the plugins with its address while its VM still runs (after
    the guest's own warm-up, before the pause); a plugin that raises does not cost the member."""
    cfg = cube_config_factory()
    host = PluginHost(cube_config_factory(cfg.text.replace("pool = { size = 0 }", "pool = { size = 1 }"))).load()
    cube = Embedded(host, SqliteStore(tmp_path / "db"))
    seen: list[tuple[str, str, str, bool, list[str]]] = []

    class Warmer:
        @hookimpl
        async def cube_pool_member_warm_up(self, sandbox: Sandbox, address: str) -> None:
            vm = cube.agent.vmm.vms[sandbox.sandbox_id]
            ops = [op for op, vm_id in cube.agent.vmm.calls if vm_id == sandbox.sandbox_id]
            seen.append((sandbox.team_id, sandbox.template_id, address, vm["running"], ops))

    class Broken:
        @hookimpl
        def cube_pool_member_warm_up(self, sandbox: Sandbox, address: str) -> None:
            raise RuntimeError("warm-up exploded")

    host.register(Warmer(), "extension:warmer")
    host.register(Broken(), "extension:broken")
    await cube.start()
    try:
        await cube.agent.ensure_templates(("base",))
        deadline = asyncio.get_running_loop().time() + 5
        while cube.agent.pool.sizes() != {"base": 1}:
            assert asyncio.get_running_loop().time() < deadline, "the pool did not fill"
            await asyncio.sleep(0.01)
        assert seen == [("__pool__", "base", "127.0.0.1", True, ["restore", "background", "personalize",
                                                                      "warm_up"])]
    finally:
        await cube.stop()


async def test_hook_cube_node_edge(register_plugin: Callable[..., PluginHost]) -> None:
    """``cube node`` asks for the edge app once, with its resolver; the first app returned wins."""
    host = register_plugin(object())  # a host on the fakes: no plugin forwards sandbox traffic
    assert host.hooks.node_edge(resolve=lambda sandbox_id, port: ("127.0.0.1", port)) is None

    class Edge:
        @hookimpl
        def cube_node_edge(self, resolve: Callable[[str, int], tuple[str, int]]) -> Any:
            async def app(scope: Any, receive: Any, send: Any) -> None:
                headers = dict(scope["headers"])
                guest = resolve(headers[b"x-cube-sandbox-id"].decode(), int(headers[b"x-cube-sandbox-port"]))
                await send({"type": "http.response.start", "status": 200, "headers": []})
                await send({"type": "http.response.body", "body": f"{guest[0]}:{guest[1]}".encode()})
            return app

    class Declines:
        @hookimpl
        def cube_node_edge(self, resolve: Callable[[str, int], tuple[str, int]]) -> Any:
            return None

    register_plugin(Edge(), host)
    register_plugin(Declines(), host)
    resolved: list[tuple[str, int]] = []

    def resolve(sandbox_id: str, port: int) -> tuple[str, int]:
        resolved.append((sandbox_id, port))
        return "10.11.0.2", port

    app = host.hooks.node_edge(resolve=resolve)
    assert app is not None
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://node") as client:
        r = await client.get("/x", headers={"x-cube-sandbox-id": "sbx1", "x-cube-sandbox-port": "49983"})
    assert r.text == "10.11.0.2:49983" and resolved == [("sbx1", 49983)]
