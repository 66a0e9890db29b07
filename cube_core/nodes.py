"""The control plane's view of its nodes: which ones take sandboxes, and a client for each.

Nodes register and heartbeat by writing their report to the state store
(:meth:`cube_core.node.NodeAgent.beat`); this directory reads those records. ``cube serve`` knows
one node, the agent in its own process (``local``); ``cube master`` reaches every node with a URL
through ``remote(node)`` (an HTTP client). Both read the same records, so placement, node-down
handling and routing are one code path in both modes.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import structlog

from cube_core.config import ClusterSettings
from cube_core.errors import NodeUnavailableError
from cube_core.events import EventBus
from cube_core.models import Node, NodeStatus, utcnow
from cube_core.nodeclient import NodeClient
from cube_core.pool import POOL_TEAM
from cube_core.state import SandboxState
from cube_core.store import SandboxTotals, StateStore

log = structlog.get_logger(__name__)

LIVE_STATES = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)


class NodeDirectory:
    def __init__(self, store: StateStore, cluster: ClusterSettings, *, local: NodeClient | None = None,
                 remote: Callable[[Node], NodeClient] | None = None) -> None:
        self.store = store
        self.cluster = cluster
        self.local = local
        self._remote = remote
        self._clients: dict[str, tuple[str, NodeClient]] = {}
        self.events: EventBus | None = None
        """Where node status changes are published (the service sets its bus)."""

    def _reachable(self, node: Node) -> bool:
        if self.local is not None and node.node_id == self.local.node_id:
            return True
        return self._remote is not None and node.url is not None

    def _stale(self, node: Node) -> bool:
        return utcnow() - node.heartbeat_at > timedelta(seconds=self.cluster.down_after_s)

    def records(self) -> list[Node]:
        """Every node this control plane can reach, as last reported."""
        return [n for n in self.store.list_nodes() if self._reachable(n)]

    def get(self, node_id: str) -> Node:
        node = next((n for n in self.store.list_nodes() if n.node_id == node_id), None)
        if node is None or not self._reachable(node):
            raise NodeUnavailableError(node_id=node_id, detail="no such node is registered")
        return node

    def client(self, node_id: str) -> NodeClient:
        """The client of a node that is up or draining; :class:`NodeUnavailableError` otherwise."""
        if self.local is not None and node_id == self.local.node_id:
            return self.local
        node = self.get(node_id)
        if node.status == NodeStatus.DOWN or self._stale(node):
            raise NodeUnavailableError(node_id=node_id, detail=f"no heartbeat since {node.heartbeat_at.isoformat()}")
        cached = self._clients.get(node_id)
        if cached is None or cached[0] != node.url:
            assert self._remote is not None
            cached = (node.url or "", self._remote(node))
            self._clients[node_id] = cached
        return cached[1]

    def placeable(self, live: list[SandboxTotals] | None = None) -> list[Node]:
        """Nodes that take new sandboxes (up, heartbeat fresh), with what the records reserve on
        each right now (so a sandbox placed a moment ago, before the node's next report, counts).
        ``live``: the store's :meth:`~cube_core.store.StateStore.sandbox_totals` of the live states."""
        if live is None:
            live = self.store.sandbox_totals(states=LIVE_STATES)
        out = []
        for node in self.records():
            if node.status != NodeStatus.UP or self._stale(node):
                continue
            mine = [t for t in live if t.node_id == node.node_id]
            out.append(node.evolve(
                cpu_used=sum(t.cpu_count for t in mine if t.state != SandboxState.PAUSED),
                memory_mb_used=sum(t.memory_mb for t in mine),
                sandboxes=sum(t.count for t in mine if t.team_id != POOL_TEAM)))
        return out

    def mark_down(self) -> list[Node]:
        """Mark the nodes whose reports stopped as down; the ones marked now."""
        marked = []
        for node in self.records():
            if node.status != NodeStatus.DOWN and self._stale(node):
                down = node.evolve(status=NodeStatus.DOWN)
                self.store.put_node(down)
                log.warning("node down: no heartbeat", node_id=node.node_id,
                            last_heartbeat=node.heartbeat_at.isoformat())
                marked.append(down)
                if self.events is not None:
                    self.events.emit("node.down", node_id=node.node_id,
                                     last_heartbeat=node.heartbeat_at.isoformat())
        return marked

    async def aclose(self) -> None:
        """Close the remote clients' connections."""
        for _, client in self._clients.values():
            close = getattr(client, "aclose", None)
            if close is not None:
                await close()
        self._clients.clear()

    def set_status(self, node_id: str, status: NodeStatus) -> Node:
        before = self.get(node_id)
        node = before.evolve(status=status)
        self.store.put_node(node)
        if self.events is not None and before.status != status:
            self.events.emit(f"node.{status.value}", node_id=node_id, previous=before.status.value)
        return node
