"""pytest plugin for Cube and third-party plugin authors (shipped under ``pytest11``).

Fixtures:
- ``cube_config_factory(text=None, **slots)`` -> LoadedConfig built from the fake config;
- ``plugin_host(config=None)`` factory -> a loaded PluginHost with a fresh PluginManager;
- ``register_plugin(obj)`` -> registers ``obj`` on the current host; unregistered on teardown;
- ``cube_app`` -> the FastAPI app on fakes (lifespan running); ``api_client`` -> httpx client;
- ``postgres_server`` (session) -> a throwaway PostgreSQL server (``cube_core.testing.postgres``);
  it fails, never skips, where PostgreSQL is not installed; ``postgres_url`` -> the URL of a
  fresh, empty database on it, dropped after the test.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cube_core._host import PluginHost  # noqa: PLC2701 - the testing package is part of the core
from cube_core.config import LoadedConfig, parse_config
from cube_core.testing.fakes import FAKE_CONFIG
from cube_core.testing.postgres import PostgresMissingError, PostgresServer


@pytest.fixture
def cube_config_factory(tmp_path: Path) -> Callable[..., LoadedConfig]:
    def make(text: str | None = None, **slots: str) -> LoadedConfig:
        body = text if text is not None else FAKE_CONFIG.format(state_dir=tmp_path / "state")
        for slot, name in slots.items():
            body = body.replace(f'[{slot}]\nplugin = "fake"', f'[{slot}]\nplugin = "{name}"')
        return parse_config(body)

    return make


@pytest.fixture
def plugin_host(cube_config_factory: Callable[..., LoadedConfig]) -> Iterator[Callable[..., PluginHost]]:
    hosts: list[PluginHost] = []

    def make(config: LoadedConfig | None = None) -> PluginHost:
        host = PluginHost(config or cube_config_factory()).load()
        hosts.append(host)
        return host

    yield make
    for host in hosts:
        for name in list(host.plugins):
            host.unregister(name)


@pytest.fixture
def register_plugin(plugin_host: Callable[..., PluginHost]) -> Iterator[Callable[[object], PluginHost]]:
    registered: list[tuple[PluginHost, str]] = []
    host_box: list[PluginHost] = []

    def register(obj: object, host: PluginHost | None = None) -> PluginHost:
        if host is None:
            if not host_box:
                host_box.append(plugin_host())
            host = host_box[0]
        name = f"test:{type(obj).__name__}:{id(obj)}"
        host.register(obj, name)
        registered.append((host, name))
        return host

    yield register
    for host, name in registered:
        host.unregister(name)


@pytest.fixture
async def cube_app(plugin_host: Callable[..., PluginHost]) -> AsyncIterator[Any]:
    from cube_core.app import create_app

    app = create_app(plugin_host(), build_templates=False)
    async with app.router.lifespan_context(app):
        yield app


@pytest.fixture
async def api_client(cube_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=cube_app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cube.test") as client:
        yield client


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
    except PostgresMissingError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
