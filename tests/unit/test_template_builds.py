"""Template builds at start-up: the kernel builds beside the first root filesystem, root
filesystems one at a time in the order configured, and the service serves the first template
while the next one still builds (``/health`` 200 with each template's status)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cube_core import RootfsImage, RootfsRecipe
from cube_core._host import PluginHost
from cube_core.app import create_app
from cube_core.config import LoadedConfig
from cube_core.embedded import Embedded
from cube_core.errors import TemplateError
from cube_core.models import SandboxSpec, TemplateStatus
from cube_core.node import NodeAgent
from cube_core.progress import seconds_left
from cube_core.service import SandboxService
from cube_core.store import SqliteStore
from cube_core.testing.fakes import FAKE_CONFIG


class Gates:
    """Blocks each template's root filesystem build and the kernel build until released."""

    def __init__(self) -> None:
        self.release = {name: asyncio.Event() for name in ("base", "code-interpreter-v1", "kernel")}
        self.started: list[str] = []


def gated(agent: NodeAgent, gates: Gates, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = agent.storage
    real_build = storage.build_rootfs

    async def build_rootfs(recipe: RootfsRecipe, progress: Any = None) -> RootfsImage:
        gates.started.append(recipe.name)
        await gates.release[recipe.name].wait()
        return await real_build(recipe, progress)

    monkeypatch.setattr(storage, "build_rootfs", build_rootfs)
    loop = asyncio.get_running_loop()

    def kernel(setting: str, vmm: Any, progress: Any = None) -> tuple[Path, None]:
        gates.started.append("kernel")
        asyncio.run_coroutine_threadsafe(gates.release["kernel"].wait(), loop).result(timeout=30)
        return Path("/dev/null"), None

    monkeypatch.setattr("cube_core.templates.guest_kernel", kernel)


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_kernel_overlaps_first_rootfs_and_first_template_serves_early(
        plugin_host: Callable[..., PluginHost], cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    text = FAKE_CONFIG.format(state_dir=tmp_path / "state").replace(
        "templates = []", 'templates = ["base", "code-interpreter-v1"]')
    host = plugin_host(cube_config_factory(text))
    store = SqliteStore(tmp_path / "cube.db")
    app = create_app(host, store=store, build_templates=False)
    service: SandboxService = app.state.service
    agent: NodeAgent = app.state.agent
    gates = Gates()
    gated(agent, gates, monkeypatch)
    await agent.start()  # what the app's lifespan does, without its template builds
    await service.start()
    build = asyncio.create_task(agent.ensure_templates(("base", "code-interpreter-v1")))
    try:
        # the kernel and base's root filesystem start together; code-interpreter-v1's waits its turn
        await until(lambda: {"kernel", "base"} <= set(gates.started))
        await asyncio.sleep(0.05)
        assert "code-interpreter-v1" not in gates.started
        gates.release["base"].set()
        await until(lambda: "code-interpreter-v1" in gates.started)  # next rootfs while the kernel builds
        assert not agent.ready.is_set()  # base still waits for the kernel
        gates.release["kernel"].set()
        await asyncio.wait_for(agent.ready.wait(), 10)
        assert store.get_template("base").status == TemplateStatus.READY
        assert store.get_template("code-interpreter-v1").status == TemplateStatus.BUILDING
        assert service.list_nodes()[0].templates == ("base",)  # the node reports what it serves

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://cube") as client:
            health = await client.get("/health")
        assert health.status_code == 200
        assert health.json()["templates"] == {"base": "ready", "code-interpreter-v1": "building"}

        sandbox = await service.create(SandboxSpec(template_id="base", team_id="t1"))  # base serves now
        with pytest.raises(TemplateError, match="building"):
            await service.create(SandboxSpec(template_id="code-interpreter-v1", team_id="t1"))
        await service.kill("t1", sandbox.sandbox_id)

        gates.release["code-interpreter-v1"].set()
        await asyncio.wait_for(build, 10)
        assert store.get_template("code-interpreter-v1").status == TemplateStatus.READY
    finally:
        for event in gates.release.values():
            event.set()
        await asyncio.gather(build, return_exceptions=True)
        await service.stop()
        await agent.stop()


async def test_a_failed_template_does_not_stop_the_others(
        plugin_host: Callable[..., PluginHost], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cube = Embedded(plugin_host(), SqliteStore(tmp_path / "cube.db"))
    real_build = cube.agent.storage.build_rootfs

    async def build_rootfs(recipe: RootfsRecipe, progress: Any = None) -> RootfsImage:
        if recipe.name == "base":
            raise TemplateError("debootstrap exploded")
        return await real_build(recipe, progress)

    monkeypatch.setattr(cube.agent.storage, "build_rootfs", build_rootfs)
    await cube.start()
    try:
        with pytest.raises(TemplateError, match="exploded"):
            await cube.agent.ensure_templates(("base", "code-interpreter-v1"))
        assert cube.agent.ready.is_set()  # code-interpreter-v1 serves
        assert cube.store.get_template("base").status == TemplateStatus.FAILED
        assert cube.store.get_template("code-interpreter-v1").status == TemplateStatus.READY
        assert cube.service.list_nodes()[0].templates == ("code-interpreter-v1",)
    finally:
        await cube.stop()


def test_seconds_left_is_a_linear_estimate() -> None:
    assert seconds_left(100.0, None, now=130.0) is None
    assert seconds_left(100.0, 0.01, now=130.0) is None  # too early to say
    assert seconds_left(100.0, 0.25, now=130.0) == 90
    assert seconds_left(100.0, 1.0, now=130.0) == 0
