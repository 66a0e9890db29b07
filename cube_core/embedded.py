"""A control plane and its node agent in one process: what ``cube serve`` runs (and tests).

The control plane reaches the agent through a :class:`~cube_core.nodeclient.LocalNodeClient`,
the same contract ``cube master`` uses over HTTP; both share one state store. The agent reads
secrets from the control plane in process (:class:`~cube_core.nodesecrets.PlacedSecrets`), as
a ``cube node`` asks a master over HTTP.
"""

from __future__ import annotations

from cube_core._host import PluginHost
from cube_core.events import EventBus
from cube_core.node import NodeAgent
from cube_core.nodeclient import LocalNodeClient
from cube_core.nodes import NodeDirectory
from cube_core.nodesecrets import PlacedSecrets
from cube_core.service import SandboxService
from cube_core.store import StateStore


class Embedded:
    def __init__(self, host: PluginHost, store: StateStore) -> None:
        cluster = host.config.data.cluster
        self.store = store
        self.events = EventBus(store.event_channel())
        """One bus for both: the node publishes what it does on its own (builds, its status)."""
        self.agent = NodeAgent(host, store, heartbeat_s=cluster.heartbeat_s, events=self.events)
        self.service = SandboxService(host, store, NodeDirectory(store, cluster, local=LocalNodeClient(self.agent)),
                                      events=self.events)
        self.agent.secrets = PlacedSecrets(store, self.service.team_secrets, cluster).reveal
        """The agent's egress proxy reads secrets from this control plane, in process, with the
        checks a master makes for its nodes."""

    async def start(self) -> None:
        """Node first (it reconciles and registers), then the control plane."""
        await self.events.start()
        await self.agent.start()
        await self.service.start()

    async def stop(self) -> None:
        await self.service.stop()
        await self.agent.stop()
        await self.events.stop()
