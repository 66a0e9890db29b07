"""The control plane with two node agents on the fakes (one store, own state dirs, over HTTP): a
create from a snapshot goes to its origin while that node takes sandboxes, to the other node
(which copies the snapshot first) while the origin drains, nowhere while the origin is down;
deleting the snapshot deletes the copy."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from test_node_contract import TOKEN, served

from cube_core._host import PluginHost
from cube_core.buildspec import BuildPlan, BuildStatus, BuildStep, TemplateBuild
from cube_core.config import ClusterSettings, LoadedConfig
from cube_core.errors import NodeUnavailableError
from cube_core.events import EventBus
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
    events = EventBus()  # one process: the nodes' events (a build ready, ...) reach the control plane
    agents: dict[str, NodeAgent] = {}
    clients: list[HttpNodeClient] = []
    async with contextlib.AsyncExitStack() as stack:
        for name in ("node-a", "node-b"):
            agent = NodeAgent(plugin_host(cube_config_factory(config_of(name, tmp_path / name))), store, events=events)
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
        service = SandboxService(host, store, NodeDirectory(store, CLUSTER, remote=remote), events=events)
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


async def built(service: SandboxService, team: str, ref: str, *commands: str) -> TemplateBuild:
    """A template build from ``base`` on the fakes (a RUN step per command), waited for."""
    template, build = service.template_builds.request(team, ref)
    plan = BuildPlan(from_template="base", steps=tuple(BuildStep(type="RUN", args=(c,)) for c in commands))
    await service.template_builds.start(team, template.template_id, build.build_id, plan)
    for _ in range(500):
        record = service.store.get_build(build.build_id)
        if record is not None and record.status in (BuildStatus.READY, BuildStatus.ERROR):
            assert record.status == BuildStatus.READY, record.reason
            return record
        await asyncio.sleep(0.02)
    raise AssertionError("the build did not end")


async def freed(service: SandboxService, build: TemplateBuild, *files: Path) -> None:
    """Wait (2 s at most) until the control plane freed ``build`` by itself, and ``files`` are gone."""
    for _ in range(100):
        record = service.store.get_build(build.build_id)
        if record is not None and record.freed_at is not None and not any(f.exists() for f in files):
            assert record.snapshot is None
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"build {build.build_id} was not freed, or not all of {files}")


def layers_of(agent: NodeAgent, build: TemplateBuild) -> list[Path]:
    """The build layers ``build`` froze or started from on ``agent`` (its build-layers.json)."""
    index = json.loads((agent.storage.root / "build-layers.json").read_text())
    return sorted({Path(e["path"]) for e in index.values() if build.build_id in e.get("builds", ())})


def layer_at(agent: NodeAgent, build: TemplateBuild, depth: int) -> Path:
    """The layer of ``build``'s step ``depth`` (0: the first) on ``agent``."""
    index = json.loads((agent.storage.root / "build-layers.json").read_text())
    found = {Path(e["path"]) for e in index.values()
             if build.build_id in e.get("builds", ()) and e.get("depth") == str(depth)}
    assert len(found) == 1, index
    return found.pop()


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
    assert await service.template_builds.release(v1.template_id) == []  # (the tag route) two sandboxes run from it
    layers = layers_of(agents[first], v1)
    assert layers and all(p.is_file() for p in layers)
    await service.start()  # frees builds on events from here: the kills free v1, nothing else calls release
    try:
        assert service.store.get_build(v1.build_id).freed_at is None
        for sb in (here, moved, newest):
            await service.kill(team, sb.sandbox_id)
        copies = [a.settings.state_dir / "storage" / "snapshots" / v1.snapshot.snapshot_id for a in agents.values()]
        await freed(service, v1, *layers, *copies)  # v1's build layer goes with it
    finally:
        await service.stop()
    assert v1.snapshot.snapshot_id not in agents[other].report().snapshots
    for agent in agents.values():  # (the fake storage's snapshot_dir() makes the directory)
        assert not (agent.settings.state_dir / "storage" / "snapshots" / v1.snapshot.snapshot_id).exists()
    assert (agents[other].settings.state_dir / "storage" / "snapshots" / v2.snapshot.snapshot_id).exists()


async def test_a_freed_build_takes_the_layers_only_it_used(
        cluster: tuple[SandboxService, dict[str, NodeAgent]]) -> None:
    """v1 runs steps a, b; v2 a (cached: v1's layer), c; v3 a, d. v2 takes v1's tag ``default``
    and v3 v2's: once ready, each rebuild frees the build it took the last tag from (the
    ``template.build_finished`` event), and with it the layer only that build used (b, then c);
    a's layer stays for the newest build, whose chain it is in."""
    service, agents = cluster
    team, name = "team-layers", "layered"
    await service.start()
    try:
        v1 = await built(service, team, name, "echo a", "echo b")
        agent = agents[v1.node_id or ""]
        a, b = layer_at(agent, v1, 0), layer_at(agent, v1, 1)
        v2 = await built(service, team, name, "echo a", "echo c")
        assert v2.node_id == v1.node_id and v2.steps_cached == 1
        assert layer_at(agent, v2, 0) == a
        c = layer_at(agent, v2, 1)
        await freed(service, v1, b)
        assert a.is_file() and c.is_file()
        v3 = await built(service, team, name, "echo a", "echo d")
        await freed(service, v2, c)
        assert a.is_file()
        assert all(p.is_file() for p in layers_of(agent, v3))
        assert service.store.get_build(v3.build_id).snapshot is not None
    finally:
        await service.stop()


async def test_a_control_plane_that_starts_frees_what_a_crash_left(
        cluster: tuple[SandboxService, dict[str, NodeAgent]]) -> None:
    """A tag removed while no control plane freed builds (it crashed before the route's release):
    the sweep when a control plane takes the reaper lease at start frees the build."""
    service, agents = cluster
    team, name = "team-crash", "crashed"
    v1 = await built(service, team, f"{name}:v1", "echo v1")
    await built(service, team, f"{name}:v2", "echo v2")
    service.template_builds.tags.remove(team, name, ("v1",))  # and no release: the master died here
    assert service.store.get_build(v1.build_id).freed_at is None
    await service.start()
    try:
        record = service.store.get_build(v1.build_id)
        assert record.freed_at is not None and record.snapshot is None  # before start() returned
    finally:
        await service.stop()


async def test_a_filesystem_snapshot_boots_where_its_disk_is(
        cluster: tuple[SandboxService, dict[str, NodeAgent]]) -> None:
    """A filesystem snapshot (``memory=False``: a disk layer, no VM state) boots a new sandbox
    from a disk over that layer on its node; while that node drains, on the other, which copies the
    disk layers first (no memory files to copy)."""
    service, agents = cluster
    team = "team-fs"
    source = await service.create(SandboxSpec(template_id="base", team_id=team))
    origin = source.node_id or ""
    other = next(n for n in agents if n != origin)
    snap = await service.snapshot(team, source.sandbox_id, memory=False)
    assert snap.vm_state is None and snap.disk is not None and snap.node_id == origin
    here = await service.create(SandboxSpec(template_id=snap.snapshot_id, team_id=team))
    assert here.node_id == origin and here.runtime.parent_snapshot == snap.snapshot_id
    assert here.runtime.disk is not None and here.runtime.disk.path.read_text() == str(snap.disk.path)
    service.nodes.set_status(origin, NodeStatus.DRAINING)
    moved = await service.create(SandboxSpec(template_id=snap.snapshot_id, team_id=team))
    assert moved.node_id == other and moved.runtime.parent_snapshot == snap.snapshot_id
    copy = agents[other].local_snapshot(snap.snapshot_id)
    assert copy is not None and copy.vm_state is None and copy.disk is not None
    assert moved.runtime.disk is not None and moved.runtime.disk.path.read_text() == str(copy.disk.path)
    service.nodes.set_status(origin, NodeStatus.UP)
    for sb in (source, here, moved):
        await service.kill(team, sb.sandbox_id)
    await service.delete_snapshot(team, snap.snapshot_id)
    assert snap.snapshot_id not in agents[other].report().snapshots
