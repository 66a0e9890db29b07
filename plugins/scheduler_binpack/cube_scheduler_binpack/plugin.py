"""Plugin object for ``[scheduler] plugin = "binpack"`` (thin: config and hook only)."""

from __future__ import annotations

from collections.abc import Sequence

from cube_core import Node, SandboxSpec, Scheduler, hookimpl

from cube_scheduler_binpack.binpack import choose
from cube_scheduler_binpack.config import BinpackConfig


class BinpackScheduler(Scheduler):
    def __init__(self, config: BinpackConfig) -> None:
        self.config = config

    def place(self, spec: SandboxSpec, nodes: Sequence[Node]) -> Node:
        c = self.config
        return choose(spec, nodes, cpu_overcommit=c.cpu_overcommit, memory_overcommit=c.memory_overcommit,
                      reserved_memory_mb=c.reserved_memory_mb, locality_bonus=c.locality_bonus)


class BinpackPlugin:
    """Bin-packing placement on CPU and memory, with template locality."""

    Config = BinpackConfig

    def __init__(self, config: BinpackConfig) -> None:
        self.scheduler = BinpackScheduler(config)

    @hookimpl
    def cube_scheduler(self) -> Scheduler:
        return self.scheduler
