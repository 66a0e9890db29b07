"""The control plane with two node agents on the fakes (one store, own state dirs, over HTTP): a
create from a snapshot goes to its origin while that node takes sandboxes, to the other node
(which copies the snapshot first) while the origin drains, nowhere while the origin is down;
deleting the snapshot deletes the copy."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from test_node_contract import TOKEN, served

from cube_core._host import PluginHost
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
