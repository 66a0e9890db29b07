"""The control plane's node directory (placement candidates, node-down marking, clients) and the
node commands (`cube nodes`, `cube node drain/undrain`), on the fakes and a SQLite store."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from cube_core.config import ClusterSettings
from cube_core.errors import ConfigError, NodeUnavailableError
from cube_core.models import Node, NodeStatus, Sandbox, utcnow
from cube_core.nodeclient import Endpoint, LocalNodeClient
from cube_core.nodes import NodeDirectory
from cube_core.state import SandboxState
from cube_core.store import SqliteStore
from cube_core.testing.fakes import FAKE_CONFIG

CLUSTER = ClusterSettings(heartbeat_s=1.0, down_after_s=5.0)


class Remote:
    """A stand-in client: the directory only hands it out."""

    def __init__(self, node: Node) -> None:
        self.node_id = node.node_id
        self.url = node.url

    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        return Endpoint(host="node", port=port, via=self.url)


def node(node_id: str, **kw: object) -> Node:
    return Node(node_id=node_id, url=f"http://{node_id}:7070", cpu_total=2, memory_mb_total=4096, **kw)


@pytest.fixture
def store(tmp_path: Path) -> SqliteStore:
    return SqliteStore(tmp_path / "cube.db")


def test_placeable_nodes_are_up_fresh_and_counted_from_the_records(store: SqliteStore) -> None:
    store.put_node(node("up", cpu_used=99, memory_mb_used=99))  # a stale report: usage comes from records
    store.put_node(node("draining", status=NodeStatus.DRAINING))
    store.put_node(node("down", status=NodeStatus.DOWN))
    store.put_node(node("silent", heartbeat_at=utcnow() - timedelta(seconds=60)))
    store.put_node(Node(node_id="no-url", cpu_total=1, memory_mb_total=1))  # not reachable by HTTP
    now = utcnow()
    for i, state in enumerate((SandboxState.RUNNING, SandboxState.PAUSED, SandboxState.KILLED)):
        store.put_sandbox(Sandbox(sandbox_id=f"s{i}", template_id="base", team_id="t", state=state, started_at=now,
                                  end_at=now, node_id="up", cpu_count=2, memory_mb=512))
    directory = NodeDirectory(store, CLUSTER, remote=Remote)
    [up] = directory.placeable()
    assert (up.node_id, up.cpu_used, up.memory_mb_used, up.sandboxes) == ("up", 2, 1024, 2)
    assert {n.node_id for n in directory.records()} == {"up", "draining", "down", "silent"}


def test_silent_nodes_are_marked_down_once_and_refuse_clients(store: SqliteStore) -> None:
    store.put_node(node("silent", heartbeat_at=utcnow() - timedelta(seconds=60)))
    store.put_node(node("fresh"))
    directory = NodeDirectory(store, CLUSTER, remote=Remote)
    assert [n.node_id for n in directory.mark_down()] == ["silent"]
    assert directory.mark_down() == []
    with pytest.raises(NodeUnavailableError) as failed:
        directory.client("silent")
    assert failed.value.node_id == "silent" and "heartbeat" in failed.value.detail
    with pytest.raises(NodeUnavailableError, match="no such node"):
        directory.client("nobody")
    first = directory.client("fresh")
    assert directory.client("fresh") is first  # one client per node, kept
    store.put_node(node("fresh").evolve(url="http://elsewhere:7070"))
    assert directory.client("fresh") is not first  # a node that moved gets a new client


def test_the_local_node_is_reached_in_process(store: SqliteStore, plugin_host, tmp_path: Path) -> None:
    from cube_core.node import NodeAgent

    agent = NodeAgent(plugin_host(), store)
    directory = NodeDirectory(store, CLUSTER, local=LocalNodeClient(agent))
    assert directory.client("local").node_id == "local"
    store.put_node(node("other"))
    assert directory.records() == []  # without a remote factory only this process's node counts
    with pytest.raises(NodeUnavailableError):
        directory.client("other")


def test_cluster_token_is_required_and_long(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="required"):
        ClusterSettings().secret()
    monkeypatch.setenv("CUBE_TEST_TOKEN", "short")
    with pytest.raises(ConfigError, match="32 characters"):
        ClusterSettings(token={"env": "CUBE_TEST_TOKEN"}).secret()
    monkeypatch.setenv("CUBE_TEST_TOKEN", "x" * 40)
    assert ClusterSettings(token={"env": "CUBE_TEST_TOKEN"}).secret() == "x" * 40
    with pytest.raises(ValueError, match="twice heartbeat_s"):
        ClusterSettings(heartbeat_s=5, down_after_s=6)


def test_cube_nodes_and_drain(run_cube, tmp_path: Path) -> None:
    config = tmp_path / "plugins.toml"
    config.write_text(FAKE_CONFIG.format(state_dir=tmp_path / "state"))
    store = SqliteStore(tmp_path / "state" / "cube.db")
    store.put_node(node("node-a"))
    store.put_node(node("node-b", status=NodeStatus.DOWN))
    store.close()
    listed = run_cube("nodes", "--json", "--config", str(config))
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["status"] for line in listed.stdout.splitlines()] == ["up", "down"]
    assert run_cube("node", "drain", "node-a", "--config", str(config)).returncode == 0
    table = run_cube("nodes", "--config", str(config))
    assert "draining" in table.stdout
    refused = run_cube("node", "undrain", "node-b", "--config", str(config))
    assert refused.returncode == 2 and "down" in refused.stderr
    missing = run_cube("node", "drain", "node-z", "--config", str(config))
    assert missing.returncode == 2 and "node-a" in missing.stderr  # names the known ones
    assert run_cube("node", "undrain", "node-a", "--config", str(config)).returncode == 0
    assert json.loads(run_cube("nodes", "--json", "--config", str(config)).stdout.splitlines()[0])["status"] == "up"
