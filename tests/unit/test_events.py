"""The event bus (cube_core.events): delivery, team scoping, slow subscribers, the lifecycle points
the service publishes at, and fan-out between processes over PostgreSQL's NOTIFY/LISTEN."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from cube_core._host import PluginHost
from cube_core.embedded import Embedded
from cube_core.events import LOST, Event, EventBus, Subscription
from cube_core.models import NetworkPolicy, NodeStatus, SandboxSpec
from cube_core.store import SqliteStore
from cube_core.store_postgres import PostgresStore


async def next_of(sub: Subscription, timeout: float = 5.0) -> Event:
    return await asyncio.wait_for(anext(sub), timeout)


async def drain(sub: Subscription) -> list[Event]:
    """Every event already delivered to ``sub``."""
    out = []
    while True:
        try:
            out.append(await asyncio.wait_for(anext(sub), 0.05))
        except TimeoutError:
            return out


async def test_subscribers_get_their_team_operators_get_all() -> None:
    bus = EventBus()
    await bus.start()
    everyone, t1, t2 = bus.subscribe(), bus.subscribe("t1"), bus.subscribe("t2")
    bus.emit("sandbox.created", team_id="t1", sandbox_id="a")
    bus.emit("node.down", node_id="n1")
    bus.emit("sandbox.killed", team_id="t2", sandbox_id="b")
    assert [e.type for e in await drain(everyone)] == ["sandbox.created", "node.down", "sandbox.killed"]
    assert [e.sandbox_id for e in await drain(t1)] == ["a"]
    assert [e.sandbox_id for e in await drain(t2)] == ["b"]
    t1.close()
    bus.emit("sandbox.paused", team_id="t1", sandbox_id="a")
    assert t1 not in bus._subscribers
    with pytest.raises(StopAsyncIteration):
        await next_of(t1)
    await bus.stop()


async def test_ids_sort_in_publishing_order() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    for i in range(50):
        bus.emit("sandbox.created", sandbox_id=str(i))
    got = await drain(sub)
    assert [e.sandbox_id for e in got] == [str(i) for i in range(50)]
    assert [e.id for e in got] == sorted(e.id for e in got) and len({e.id for e in got}) == 50


async def test_a_slow_subscriber_loses_the_oldest_and_is_told() -> None:
    bus = EventBus(buffer=3)
    slow, fast = bus.subscribe(), bus.subscribe()
    seen: list[str] = []
    for i in range(10):  # publish never waits for anyone
        bus.emit("sandbox.created", sandbox_id=str(i))
        seen.append((await next_of(fast)).sandbox_id or "")
    assert seen == [str(i) for i in range(10)]
    lost = await next_of(slow)
    assert lost.type == LOST and lost.data == {"lost": 7}
    assert [e.sandbox_id for e in await drain(slow)] == ["7", "8", "9"]


async def test_publish_from_another_thread_reaches_the_loop() -> None:
    bus = EventBus()
    await bus.start()
    sub = bus.subscribe()
    thread = threading.Thread(target=lambda: bus.emit("node.up", node_id="n"))
    thread.start()
    thread.join()
    assert (await next_of(sub)).type == "node.up"
    await bus.stop()


async def test_the_service_publishes_each_lifecycle_change(cube: Embedded) -> None:
    service = cube.service
    sub = service.events.subscribe("t1")
    other = service.events.subscribe("t2")
    sb = await service.create(SandboxSpec(template_id="base", team_id="t1", auto_pause=False))
    created = await next_of(sub)
    assert (created.type, created.sandbox_id, created.team_id, created.node_id) == (
        "sandbox.created", sb.sandbox_id, "t1", "local")
    assert created.data["state"] == "running" and created.data["template_id"] == "base"
    await service.pause("t1", sb.sandbox_id)
    await service.resume("t1", sb.sandbox_id)
    await service.set_timeout("t1", sb.sandbox_id, 600)
    await service.update_network("t1", sb.sandbox_id, NetworkPolicy(deny_out=("0.0.0.0/0",)))
    snap = await service.snapshot("t1", sb.sandbox_id)
    await service.kill("t1", sb.sandbox_id)
    got = await drain(sub)
    assert [e.type for e in got] == ["sandbox.paused", "sandbox.resumed", "sandbox.timeout_changed",
                                     "sandbox.policy_changed", "sandbox.snapshot", "sandbox.killed"]
    assert got[4].data["snapshot_id"] == snap.snapshot_id
    assert got[5].data["reason"] == "killed" and got[5].data["state"] == "killed"
    assert {e.sandbox_id for e in got} == {sb.sandbox_id}
    assert await drain(other) == []  # another team sees none of it


async def test_expiry_is_published(cube: Embedded) -> None:
    service = cube.service
    sub = service.events.subscribe()
    sb = await service.create(SandboxSpec(template_id="base", team_id="t1", timeout_s=1))
    await asyncio.sleep(1.1)
    # the fixture's own reaper (every second) may have expired it first: either way, once
    assert await service.reap_expired() in (0, 1)
    types = [e.type for e in await drain(sub) if e.sandbox_id == sb.sandbox_id]
    assert types == ["sandbox.created", "sandbox.expired"]


async def test_node_status_changes_are_published(cube: Embedded) -> None:
    service = cube.service
    sub = service.events.subscribe()
    service.nodes.set_status("local", NodeStatus.DRAINING)
    service.nodes.set_status("local", NodeStatus.UP)
    got = [e for e in await drain(sub) if e.type.startswith("node.")]
    assert [(e.type, e.node_id, e.data["previous"]) for e in got] == [
        ("node.draining", "local", "up"), ("node.up", "local", "draining")]
    team = service.events.subscribe("t1")
    service.nodes.set_status("local", NodeStatus.DRAINING)
    assert await drain(team) == []  # node events belong to no team: operators only


async def test_a_node_that_registers_is_up(plugin_host: Callable[..., PluginHost], tmp_path: Path) -> None:
    pair = Embedded(plugin_host(), SqliteStore(tmp_path / "cube.db"))
    sub = pair.events.subscribe()
    await pair.start()
    try:
        ups = [e for e in await drain(sub) if e.type == "node.up"]
        assert [e.node_id for e in ups] == ["local"]
        pair.agent.beat()  # a heartbeat of a node that is up already: nothing new
        assert [e for e in await drain(sub) if e.type == "node.up"] == []
    finally:
        await pair.stop()


# -- several processes: PostgreSQL NOTIFY/LISTEN ----------------------------------------------------


async def test_events_cross_processes_over_postgres(postgres_url: str) -> None:
    """Two buses on one database stand for two masters: each sees the other's events once, and
    its own once (delivered locally, skipped when NOTIFY brings them back)."""
    store_a, store_b = PostgresStore(postgres_url), PostgresStore(postgres_url)
    a, b = EventBus(store_a.event_channel()), EventBus(store_b.event_channel())
    await a.start()
    await b.start()
    try:
        on_a, on_b, team_on_b = a.subscribe(), b.subscribe(), b.subscribe("t1")
        a.emit("sandbox.created", team_id="t1", sandbox_id="x", note="from a")
        b.emit("node.down", node_id="n2")
        got_b = [await next_of(on_b), await next_of(on_b)]
        assert sorted(e.type for e in got_b) == ["node.down", "sandbox.created"]
        from_a = next(e for e in got_b if e.type == "sandbox.created")
        assert from_a.data == {"note": "from a"} and from_a.team_id == "t1"
        got_a = [await next_of(on_a), await next_of(on_a)]
        assert sorted(e.type for e in got_a) == ["node.down", "sandbox.created"]
        assert [e.sandbox_id for e in await drain(team_on_b)] == ["x"]
        assert await drain(on_a) == [] and await drain(on_b) == []  # no echo of one's own
        assert (a.received, b.received) == (1, 1)
    finally:
        await a.stop()
        await b.stop()
        store_a.close()
        store_b.close()


async def test_a_large_event_crosses_without_its_data(postgres_url: str) -> None:
    store = PostgresStore(postgres_url)
    sender, listener = EventBus(store.event_channel()), EventBus(store.event_channel())
    await sender.start()
    await listener.start()
    try:
        sub, local = listener.subscribe(), sender.subscribe()
        sender.emit("template.build_finished", team_id="t", log="x" * 20000)
        assert (await next_of(sub)).data == {"truncated": True}
        assert len((await next_of(local)).data["log"]) == 20000  # this process keeps it whole
    finally:
        await sender.stop()
        await listener.stop()
        store.close()


async def test_a_command_without_a_loop_publishes_to_the_others(postgres_url: str) -> None:
    """`cube node drain` publishes from a CLI process: no loop, no threads; flush sends."""
    store = PostgresStore(postgres_url)
    listener = EventBus(store.event_channel())
    await listener.start()
    try:
        sub = listener.subscribe()

        def command() -> None:
            bus = EventBus(store.event_channel())
            bus.emit("node.draining", node_id="n1")
            bus.flush()

        await asyncio.to_thread(command)
        assert (await next_of(sub)).type == "node.draining"
    finally:
        await listener.stop()
        store.close()
