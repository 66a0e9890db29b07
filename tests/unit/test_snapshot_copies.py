"""The control plane with two node agents on the fakes (one store, own state dirs, over HTTP): a
create from a snapshot goes to its origin while that node takes sandboxes, to the other node
(which copies the snapshot first) while the origin drains, nowhere while the origin is down;
deleting the snapshot deletes the copy."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from test_node_contract import TOKEN, served

from cube_core._host import PluginHost
from cube_core.buildspec import BuildPlan, BuildStatus, BuildStep, TemplateBuild
from cube_core.config import ClusterSettings, LoadedConfig
from cube_core.errors import NodeUnavailableError
from cube_core.models import Node, NodeStatus, SandboxSpec
from cube_core.node import NodeAgent
from cube_core.nodeapi import node_app
from cube_core.nodehttp import HttpNodeClient
from cube_core.nodes import NodeDirectory
from cube_core.service import SandboxService
from cube_core.store import SqliteStore
from cube_core.testing.fakes import FAKE_CONFIG

CLUSTER = ClusterSettings(heartbeat_s=1.0, down_after_s=5.0)


def config_of(node_id: str, state_dir: Path) -> str:
    return FAKE_CONFIG.format(state_dir=state_dir).replace("[core]\n", f'[core]\nnode_id = "{node_id}"\n', 1)


@pytest.fixture
async def cluster(plugin_host: Callable[..., PluginHost], cube_config_factory: Callable[..., LoadedConfig],
                  tmp_path: Path) -> AsyncIterator[tuple[SandboxService, dict[str, NodeAgent]]]:
    store = SqliteStore(tmp_path / "cube.db")
    agents: dict[str, NodeAgent] = {}
    clients: list[HttpNodeClient] = []
    async with contextlib.AsyncExitStack() as stack:
        for name in ("node-a", "node-b"):
            agent = NodeAgent(plugin_host(cube_config_factory(config_of(name, tmp_path / name))), store)
            await agent.start()
            agent.template_ready(await agent.templates.ensure("base", rebuild=True))  # each its own build
            agent.url = await stack.enter_async_context(served(node_app(agent, token=TOKEN)))
            agent.beat()
            agents[name] = agent

        def remote(node: Node) -> HttpNodeClient:
            client = HttpNodeClient(node.node_id, node.url or "", TOKEN)
            clients.append(client)
            return client

        host = plugin_host(cube_config_factory(config_of("master", tmp_path / "master")))
        service = SandboxService(host, store, NodeDirectory(store, CLUSTER, remote=remote))
        try:
            yield service, agents
        finally:
            for client in clients:
                await client.aclose()
            for agent in agents.values():
                await agent.stop()
    store.close()


async def test_a_create_from_a_snapshot_follows_its_files(
        cluster: tuple[SandboxService, dict[str, NodeAgent]]) -> None:
    service, agents = cluster
    team = "team-copies"
    source = await service.create(SandboxSpec(template_id="base", team_id=team))
    origin = source.node_id
    other = next(n for n in agents if n != origin)
    snap = await service.snapshot(team, source.sandbox_id)
    assert snap.node_id == origin

    here = await service.create(SandboxSpec(template_id=snap.snapshot_id, team_id=team))
    assert here.node_id == origin and agents[origin].report().snapshots == ()  # nothing copied

    service.nodes.set_status(origin, NodeStatus.DRAINING)
    moved = await service.create(SandboxSpec(template_id=snap.snapshot_id, team_id=team))
    assert moved.node_id == other
    assert moved.runtime.parent_snapshot == snap.snapshot_id
    held = agents[other].report().snapshots
    assert snap.snapshot_id in held and snap.base_state_id in held
    assert agents[other].copied.fetched == (snap.base_state_id, snap.snapshot_id)
    fork = await service.fork(team, moved.sandbox_id)  # the fork's snapshot is on node-b now: stays there
    assert [f.node_id for f in fork] == [other]

    agents[origin].store.put_node(agents[origin].report().evolve(status=NodeStatus.DOWN))
    with pytest.raises(NodeUnavailableError):  # its files cannot be fetched
        await service.create(SandboxSpec(template_id=snap.snapshot_id, team_id=team))
    agents[origin].beat()  # back (a beat keeps draining, but not down)
    service.nodes.set_status(origin, NodeStatus.UP)

    for sb in [source, here, moved, *fork]:
        await service.kill(team, sb.sandbox_id)
    for ref in service.list_snapshots(team):
        if ref.snapshot_id != snap.snapshot_id:
            await service.delete_snapshot(team, ref.snapshot_id)
    agents[other].beat()
    await service.delete_snapshot(team, snap.snapshot_id)
    assert snap.snapshot_id not in agents[other].report().snapshots
    assert not (agents[other].settings.state_dir / "replicas" / other / f"{snap.snapshot_id}.json").exists()


async def built(service: SandboxService, team: str, ref: str, command: str) -> TemplateBuild:
    """A template build from ``base`` on the fakes, waited for."""
    template, build = service.template_builds.request(team, ref)
    plan = BuildPlan(from_template="base", steps=(BuildStep(type="RUN", args=(command,)),))
    await service.template_builds.start(team, template.template_id, build.build_id, plan)
    for _ in range(500):
        record = service.store.get_build(build.build_id)
        if record is not None and record.status in (BuildStatus.READY, BuildStatus.ERROR):
            assert record.status == BuildStatus.READY, record.reason
            return record
        await asyncio.sleep(0.02)
    raise AssertionError("the build did not end")


async def test_an_older_build_follows_its_snapshot_and_copies_are_freed(
        cluster: tuple[SandboxService, dict[str, NodeAgent]]) -> None:
    """v1 built on one node, v2 on the other (the first drains): the first stops serving the
    template; a sandbox of ``name:v1`` goes to v1's node, or, while that one drains, to the other,
    which copies v1's snapshot first; once no tag names v1 and its sandboxes are gone, its files
    go from both nodes."""
    service, agents = cluster
    team, name = "team-tags", "tagged"
    v1 = await built(service, team, f"{name}:v1", "echo v1")
    assert v1.snapshot is not None and v1.node_id is not None
    first, other = v1.node_id, next(n for n in agents if n != v1.node_id)
    service.nodes.set_status(first, NodeStatus.DRAINING)
    v2 = await built(service, team, f"{name}:v2", "echo v2")
    assert v2.node_id == other and v2.snapshot is not None
    service.nodes.set_status(first, NodeStatus.UP)
    for agent in agents.values():
        agent.beat()
    # the first node keeps v1's files for its tag, but no longer serves the template (its newest is v2)
    assert v1.template_id not in agents[first].report().templates
    assert v1.template_id in agents[other].report().templates

    here = await service.create(SandboxSpec(template_id=f"{name}:v1", team_id=team))
    assert here.node_id == first and here.runtime.parent_snapshot == v1.snapshot.snapshot_id
    newest = await service.create(SandboxSpec(template_id=f"{name}:v2", team_id=team))
    assert newest.node_id == other and newest.runtime.parent_snapshot == v2.snapshot.snapshot_id
    service.nodes.set_status(first, NodeStatus.DRAINING)
    moved = await service.create(SandboxSpec(template_id=f"{name}:v1", team_id=team))
    assert moved.node_id == other and moved.runtime.parent_snapshot == v1.snapshot.snapshot_id
    assert v1.snapshot.snapshot_id in agents[other].report().snapshots  # copied from the first node

    service.template_builds.tags.remove(team, name, ("v1",))
    assert await service.template_builds.release() == []  # two sandboxes still run from it
    for sb in (here, moved, newest):
        await service.kill(team, sb.sandbox_id)
    assert await service.template_builds.release() == [v1.build_id]
    assert v1.snapshot.snapshot_id not in agents[other].report().snapshots
    for agent in agents.values():  # (the fake storage's snapshot_dir() makes the directory)
        assert not (agent.settings.state_dir / "storage" / "snapshots" / v1.snapshot.snapshot_id).exists()
    assert (agents[other].settings.state_dir / "storage" / "snapshots" / v2.snapshot.snapshot_id).exists()
