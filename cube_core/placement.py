"""Capacity arithmetic that schedulers share: how much a node holds, whether a sandbox fits, how
full the node is after placing it. Pure functions, no I/O, inputs never mutated.

Used by the first-party schedulers (binpack, spread); third-party schedulers may use it too.
"""

from __future__ import annotations

from cube_core.models import Node, SandboxSpec


def capacity(node: Node, *, cpu_overcommit: float, memory_overcommit: float,
             reserved_memory_mb: int) -> tuple[float, float]:
    """(vCPUs, MiB) a node can hold in total."""
    return (node.cpu_total * cpu_overcommit,
            max(0.0, (node.memory_mb_total - reserved_memory_mb) * memory_overcommit))


def fits(node: Node, spec: SandboxSpec, *, cpu_overcommit: float, memory_overcommit: float,
         reserved_memory_mb: int) -> bool:
    """The node is healthy and has room for ``spec`` on both CPU and memory."""
    if not node.healthy:
        return False
    cpu_cap, mem_cap = capacity(node, cpu_overcommit=cpu_overcommit, memory_overcommit=memory_overcommit,
                                reserved_memory_mb=reserved_memory_mb)
    return (node.cpu_used + spec.cpu_count <= cpu_cap
            and node.memory_mb_used + spec.memory_mb <= mem_cap)


def utilisation(node: Node, spec: SandboxSpec, *, cpu_overcommit: float, memory_overcommit: float,
                reserved_memory_mb: int) -> float:
    """max(cpu, memory) fraction of capacity in use once ``spec`` is placed (1.0 for a resource
    with no capacity)."""
    cpu_cap, mem_cap = capacity(node, cpu_overcommit=cpu_overcommit, memory_overcommit=memory_overcommit,
                                reserved_memory_mb=reserved_memory_mb)
    cpu_util = (node.cpu_used + spec.cpu_count) / cpu_cap if cpu_cap else 1.0
    mem_util = (node.memory_mb_used + spec.memory_mb) / mem_cap if mem_cap else 1.0
    return max(cpu_util, mem_util)
