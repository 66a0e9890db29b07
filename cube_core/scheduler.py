"""The scheduler contract: pick a node for a sandbox."""

from __future__ import annotations

import abc
from collections.abc import Sequence

from cube_core.models import Node, SandboxSpec


class Scheduler(abc.ABC):
    @abc.abstractmethod
    def place(self, spec: SandboxSpec, nodes: Sequence[Node]) -> Node:
        """Return the node that should run ``spec``; raise ``NoCapacityError`` when none fits.
        Pure: no I/O, no mutation of ``nodes``."""
