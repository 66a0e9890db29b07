"""Plugin object for ``[scheduler] plugin = "spread"`` (thin: config and hook only)."""

from __future__ import annotations

from collections.abc import Sequence

from cube_core import Node, SandboxSpec, Scheduler, hookimpl

from cube_scheduler_spread.config import SpreadConfig
from cube_scheduler_spread.spread import choose


class SpreadScheduler(Scheduler):
    def __init__(self, config: SpreadConfig) -> None:
        self.config = config

    def place(self, spec: SandboxSpec, nodes: Sequence[Node]) -> Node:
        c = self.config
        return choose(spec, nodes, cpu_overcommit=c.cpu_overcommit, memory_overcommit=c.memory_overcommit,
                      reserved_memory_mb=c.reserved_memory_mb, locality_bonus=c.locality_bonus)


class SpreadPlugin:
    """Spread placement onto the least-utilised node, with template locality."""

    Config = SpreadConfig

    def __init__(self, config: SpreadConfig) -> None:
        self.scheduler = SpreadScheduler(config)

    @hookimpl
    def cube_scheduler(self) -> Scheduler:
        return self.scheduler
