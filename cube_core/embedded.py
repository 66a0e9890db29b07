"""A control plane and its node agent in one process: what ``cube serve`` runs (and tests).

The control plane reaches the agent through a :class:`~cube_core.nodeclient.LocalNodeClient`,
the same contract ``cube master`` uses over HTTP; both share one state store.
"""

from __future__ import annotations

from cube_core._host import PluginHost
from cube_core.node import NodeAgent
from cube_core.nodeclient import LocalNodeClient
from cube_core.nodes import NodeDirectory
from cube_core.service import SandboxService
from cube_core.store import StateStore


class Embedded:
    def __init__(self, host: PluginHost, store: StateStore) -> None:
        cluster = host.config.data.cluster
        self.store = store
        self.agent = NodeAgent(host, store, heartbeat_s=cluster.heartbeat_s)
        self.service = SandboxService(host, store, NodeDirectory(store, cluster, local=LocalNodeClient(self.agent)))

    async def start(self) -> None:
        """Node first (it reconciles and registers), then the control plane."""
        await self.agent.start()
        await self.service.start()

    async def stop(self) -> None:
        await self.service.stop()
        await self.agent.stop()
