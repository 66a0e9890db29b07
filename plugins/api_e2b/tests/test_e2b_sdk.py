"""The real ``e2b==2.63.0`` SDK (sync and async) against a real uvicorn server on the fake drivers.

Control-plane calls only (create, get_info, list, set_timeout, pause, connect, kill), plus
``is_running()``, which goes through the edge proxy in single-URL mode to a stand-in envd
``/health`` (the fake network's guest address is moved to 127.0.0.2 so that it can listen on the
real envd port 49983 without clashing with anything on 127.0.0.1).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    NotFoundException,
    Sandbox,
    SandboxException,
    SandboxQuery,
    SandboxState,
)
from e2b_helpers import Upstream, point_sdk_at, serve

SANDBOX_ID = re.compile(r"^[a-z0-9]+$")
ENVD_HOST = "127.0.0.2"


@pytest.fixture
async def sdk_env(cube, monkeypatch):
    """A served Cube with its edge in single-URL mode, and the SDK pointed at it."""
    network = cube.agent.network
    allocate = network.allocate

    async def allocate_on_envd_host(*args, **kwargs):
        nic = await allocate(*args, **kwargs)
        return nic.model_copy(update={"guest_address": ENVD_HOST})

    monkeypatch.setattr(network, "allocate", allocate_on_envd_host)
    envd = Upstream()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(serve(envd.app, host=ENVD_HOST, port=49983, lifespan="off"))
        port = await stack.enter_async_context(serve(cube.app, lifespan="off"))
        key = cube.key()
        point_sdk_at(monkeypatch, port, key)
        yield key


def sync_flow(tag: str) -> None:
    sbx = Sandbox.create(template="base", timeout=60, metadata={"suite": tag}, envs={"A": "1"})
    assert SANDBOX_ID.match(sbx.sandbox_id)
    info = sbx.get_info()
    assert info.state == SandboxState.RUNNING and info.template_id == "base" and info.metadata == {"suite": tag}
    assert timedelta(seconds=50) < info.end_at - datetime.now(UTC) <= timedelta(seconds=60)
    assert sbx.is_running()

    paginator = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}))
    assert [s.sandbox_id for s in paginator.next_items()] == [sbx.sandbox_id]
    assert not paginator.has_next

    sbx.set_timeout(900)
    assert sbx.get_info().end_at - datetime.now(UTC) > timedelta(seconds=890)

    assert sbx.pause() is True
    assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED
    assert sbx.pause() is False  # already paused
    assert not sbx.is_running()  # the edge answers 502 "... was not found" for a paused sandbox
    paused = Sandbox.list(query=SandboxQuery(metadata={"suite": tag}, state=[SandboxState.PAUSED])).next_items()
    assert [s.sandbox_id for s in paused] == [sbx.sandbox_id]

    again = Sandbox.connect(sbx.sandbox_id, timeout=120)
    assert again.sandbox_id == sbx.sandbox_id and again.get_info().state == SandboxState.RUNNING
    assert again.is_running()

    assert sbx.kill() is True
    assert Sandbox.kill(sbx.sandbox_id) is False  # 404 -> False
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id)
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id)


def sync_pagination_and_errors(tag: str) -> None:
    made = {Sandbox.create(metadata={"page": tag}).sandbox_id for _ in range(3)}
    paginator = Sandbox.list(query=SandboxQuery(metadata={"page": tag}), limit=2)
    pages = []
    while paginator.has_next:
        pages.append([s.sandbox_id for s in paginator.next_items()])
    assert [len(p) for p in pages] == [2, 1] and {i for p in pages for i in p} == made
    for sandbox_id in made:
        Sandbox.kill(sandbox_id)
    with pytest.raises(SandboxException, match="404"):
        Sandbox.create(template="no-such-template")
    with pytest.raises(SandboxException, match="400.*timeout"):
        Sandbox.create(timeout=10**9)
    with pytest.raises(AuthenticationException):
        Sandbox.create(api_key="e2b_" + "0" * 40)


async def test_sync_sdk(sdk_env) -> None:
    await asyncio.to_thread(sync_flow, uuid.uuid4().hex)
    await asyncio.to_thread(sync_pagination_and_errors, uuid.uuid4().hex)


async def test_async_sdk(sdk_env) -> None:
    tag = uuid.uuid4().hex
    sbx = await AsyncSandbox.create(template="base", timeout=60, metadata={"suite": tag})
    assert SANDBOX_ID.match(sbx.sandbox_id)
    info = await sbx.get_info()
    assert info.state == SandboxState.RUNNING and info.metadata == {"suite": tag}
    assert await sbx.is_running()
    listed = await AsyncSandbox.list(query=SandboxQuery(metadata={"suite": tag})).next_items()
    assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]
    await sbx.set_timeout(600)
    assert (await sbx.get_info()).end_at - datetime.now(UTC) > timedelta(seconds=590)
    assert await sbx.pause() is True
    assert await sbx.pause() is False
    assert (await AsyncSandbox.get_info(sbx.sandbox_id)).state == SandboxState.PAUSED
    again = await AsyncSandbox.connect(sbx.sandbox_id)
    assert (await again.get_info()).state == SandboxState.RUNNING
    assert await sbx.kill() is True
    assert await AsyncSandbox.kill(sbx.sandbox_id) is False
    assert not await sbx.is_running()
    with pytest.raises(NotFoundException):
        await AsyncSandbox.get_info(sbx.sandbox_id)
    with pytest.raises(AuthenticationException):
        await AsyncSandbox.create(api_key="e2b_" + "1" * 40)
