from __future__ import annotations

import asyncio
import base64
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cube_core.app import create_app
from cube_core.config import parse_config
from e2b_helpers import SECRETS_KEY_ENV, OpenApi, Upstream, e2b_config_text, point_sdk_at, serve

from cube_api_e2b.plugin import E2bApiPlugin


@dataclass
class Cube:
    """One Cube app on the fakes with the e2b plugin, and handy accessors."""

    app: Any
    plugin: E2bApiPlugin
    client: httpx.AsyncClient

    @property
    def service(self) -> Any:
        return self.app.state.service

    @property
    def agent(self) -> Any:
        """The node agent in the app's process (drivers, pool)."""
        return self.app.state.agent

    def key(self, team: str = "team-a") -> str:
        return self.service.create_api_key(team)[1]

    def headers(self, key: str) -> dict[str, str]:
        return {"X-API-Key": key}


@pytest.fixture(scope="session")
def openapi() -> OpenApi:
    return OpenApi()


@pytest.fixture
def cube_factory(plugin_host: Callable[..., Any], tmp_path: Path) -> Callable[..., Any]:
    """``async with cube_factory(options={...}) as cube``: an app with lifespan running, templates ready."""

    @contextlib.asynccontextmanager
    async def make(options: dict[str, Any] | None = None, **kw: Any) -> AsyncIterator[Cube]:
        state = tmp_path / f"state{len(list(tmp_path.iterdir()))}"
        host = plugin_host(parse_config(e2b_config_text(state, options, **kw)))
        app = create_app(host, build_templates=True)
        plugin = host.plugins["api:e2b"]
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app.state.agent.ready.wait(), timeout=30)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://cube.test") as client:
                yield Cube(app=app, plugin=plugin, client=client)
            if plugin.edge is not None:
                await plugin.edge.aclose()

    return make


class App:
    """An app on the fakes whose ``[core] secrets_key`` is set (or not): ``/secrets``, webhooks."""

    def __init__(self, app: Any, client: httpx.AsyncClient, state: Path) -> None:
        self.app, self.client, self.state = app, client, state

    @property
    def service(self) -> Any:
        return self.app.state.service

    def key(self, team: str = "team-a") -> dict[str, str]:
        return {"X-API-Key": self.service.create_api_key(team)[1]}


@pytest.fixture
def make_app(plugin_host: Callable[..., Any], tmp_path: Path,
             monkeypatch: pytest.MonkeyPatch) -> Callable[..., contextlib.AbstractAsyncContextManager[App]]:
    """``async with make_app(secrets_key=True, extra="") as cube``: a fresh random key in
    :data:`SECRETS_KEY_ENV`, named by ``[core] secrets_key`` unless ``secrets_key=False``."""
    monkeypatch.setenv(SECRETS_KEY_ENV, base64.b64encode(os.urandom(32)).decode())

    @contextlib.asynccontextmanager
    async def make(*, secrets_key: bool = True, extra: str = "") -> AsyncIterator[App]:
        state = tmp_path / f"state{len(list(tmp_path.iterdir()))}"
        core = f'secrets_key = {{ env = "{SECRETS_KEY_ENV}" }}' if secrets_key else ""
        host = plugin_host(parse_config(e2b_config_text(state, extra=extra, core=core)))
        app = create_app(host, build_templates=True)
        async with app.router.lifespan_context(app):
            await asyncio.wait_for(app.state.agent.ready.wait(), timeout=30)
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://cube.test") as c:
                yield App(app, c, state)
            edge = host.plugins["api:e2b"].edge
            if edge is not None:
                await edge.aclose()

    return make


@pytest.fixture
async def cube(cube_factory: Callable[..., Any]) -> AsyncIterator[Cube]:
    async with cube_factory() as c:
        yield c


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[Upstream, int]]:
    up = Upstream()
    async with serve(up.app, lifespan="off") as port:
        yield up, port


@pytest.fixture
async def build_env(cube: Cube, monkeypatch: pytest.MonkeyPatch,
                    tmp_path: Path) -> AsyncIterator[tuple[str, str]]:
    """The app served on a loopback port for the e2b SDK (``E2B_API_URL``, ``E2B_API_KEY``: team-a),
    and ``app.txt``, ``dir/a.txt`` in ``tmp_path`` for COPY steps: (url, key)."""
    async with serve(cube.app, lifespan="off") as port:
        key = cube.key()
        point_sdk_at(monkeypatch, port, key)
        (tmp_path / "app.txt").write_text("hello from the host\n")
        (tmp_path / "dir").mkdir()
        (tmp_path / "dir" / "a.txt").write_text("a\n")
        yield f"http://127.0.0.1:{port}", key
