"""Fixtures of the core's unit tests: a control plane and its node agent on the fakes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from cube_core._host import PluginHost
from cube_core.embedded import Embedded
from cube_core.service import SandboxService
from cube_core.store import SqliteStore


@pytest.fixture
async def cube(plugin_host: Callable[..., PluginHost], tmp_path: Path) -> AsyncIterator[Embedded]:
    """``cube serve``'s pair on the fake plugins, started, with template ``base`` ready."""
    pair = Embedded(plugin_host(), SqliteStore(tmp_path / "cube.db"))
    await pair.start()
    await pair.agent.ensure_templates(("base",))
    yield pair
    await pair.stop()


@pytest.fixture
def service(cube: Embedded) -> SandboxService:
    return cube.service
