"""Pure placement functions: score, choose. No I/O, inputs never mutated.

Spreading prefers the node with the most room left after placement (lowest utilisation, the
larger of CPU and memory), so load and blast radius are shared evenly; a node that already holds
the template counts as ``locality_bonus`` less utilised (its snapshot is warm there). Fit and
capacity are the shared arithmetic of ``cube_core.placement``, as for binpack.
"""

from __future__ import annotations

from collections.abc import Sequence

from cube_core import NoCapacityError, Node, SandboxSpec
from cube_core.placement import fits, utilisation


def score(node: Node, spec: SandboxSpec, *, cpu_overcommit: float, memory_overcommit: float,
          reserved_memory_mb: int, locality_bonus: float) -> float:
    """Lower is better: utilisation after placement, minus the locality bonus."""
    bonus = locality_bonus if spec.template_id in node.templates else 0.0
    return utilisation(node, spec, cpu_overcommit=cpu_overcommit, memory_overcommit=memory_overcommit,
                       reserved_memory_mb=reserved_memory_mb) - bonus


def choose(spec: SandboxSpec, nodes: Sequence[Node], *, cpu_overcommit: float = 32.0,
           memory_overcommit: float = 4.0, reserved_memory_mb: int = 1024,
           locality_bonus: float = 0.1) -> Node:
    candidates = [n for n in nodes if fits(n, spec, cpu_overcommit=cpu_overcommit,
                                           memory_overcommit=memory_overcommit,
                                           reserved_memory_mb=reserved_memory_mb)]
    if not candidates:
        raise NoCapacityError(cpu=spec.cpu_count, memory_mb=spec.memory_mb)
    # min() keeps the first of equal keys: ties go to the node listed first.
    return min(candidates, key=lambda n: score(n, spec, cpu_overcommit=cpu_overcommit,
                                               memory_overcommit=memory_overcommit,
                                               reserved_memory_mb=reserved_memory_mb,
                                               locality_bonus=locality_bonus))
