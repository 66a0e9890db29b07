"""Pure placement functions: fit, score, choose. No I/O, inputs never mutated.

Bin-packing prefers the fullest node that still fits (so empty nodes stay empty and can be
drained), with a bonus for nodes that already hold the template (its snapshot is warm there).
The capacity and fit arithmetic is shared with other schedulers in ``cube_core.placement``.
"""

from __future__ import annotations

from collections.abc import Sequence

from cube_core import NoCapacityError, Node, SandboxSpec
from cube_core.placement import fits, utilisation


def score(node: Node, spec: SandboxSpec, *, cpu_overcommit: float, memory_overcommit: float,
          reserved_memory_mb: int, locality_bonus: float) -> float:
    """Higher is better: utilisation after placement (the tighter the pack, the higher), plus
    the locality bonus."""
    bonus = locality_bonus if spec.template_id in node.templates else 0.0
    return utilisation(node, spec, cpu_overcommit=cpu_overcommit, memory_overcommit=memory_overcommit,
                       reserved_memory_mb=reserved_memory_mb) + bonus


def choose(spec: SandboxSpec, nodes: Sequence[Node], *, cpu_overcommit: float = 32.0,
           memory_overcommit: float = 4.0, reserved_memory_mb: int = 1024,
           locality_bonus: float = 0.25) -> Node:
    candidates = [n for n in nodes if fits(n, spec, cpu_overcommit=cpu_overcommit,
                                           memory_overcommit=memory_overcommit,
                                           reserved_memory_mb=reserved_memory_mb)]
    if not candidates:
        raise NoCapacityError(cpu=spec.cpu_count, memory_mb=spec.memory_mb)
    # Ties go to the node listed first (stable, deterministic).
    return max(candidates, key=lambda n: score(n, spec, cpu_overcommit=cpu_overcommit,
                                               memory_overcommit=memory_overcommit,
                                               reserved_memory_mb=reserved_memory_mb,
                                               locality_bonus=locality_bonus))
