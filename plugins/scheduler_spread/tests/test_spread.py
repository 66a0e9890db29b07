from __future__ import annotations

import pytest
from cube_core import NoCapacityError, Node, NodeStatus, SandboxSpec
from cube_core.testing.contract import SchedulerContract

from cube_scheduler_spread.config import SpreadConfig
from cube_scheduler_spread.plugin import SpreadScheduler
from cube_scheduler_spread.spread import choose


class TestSpreadContract(SchedulerContract):
    @pytest.fixture
    def driver(self) -> SpreadScheduler:
        # the contract's nodes are sized for reservations without overcommit
        return SpreadScheduler(SpreadConfig(reserved_memory_mb=0, memory_overcommit=1.0))


def spec(mem: int = 512, cpu: int = 1, template: str = "base") -> SandboxSpec:
    return SandboxSpec(template_id=template, team_id="t", memory_mb=mem, cpu_count=cpu)


def test_prefers_the_emptier_node() -> None:
    nodes = [Node(node_id="busy", cpu_total=8, memory_mb_total=16384, memory_mb_used=12000),
             Node(node_id="empty", cpu_total=8, memory_mb_total=16384)]
    assert choose(spec(), nodes, reserved_memory_mb=0).node_id == "empty"


def test_utilisation_is_the_fuller_of_cpu_and_memory() -> None:
    # "cpu-bound": memory nearly free but CPU 3/4 used; "mem-half": CPU free, memory half used
    nodes = [Node(node_id="cpu-bound", cpu_total=4, memory_mb_total=16384, cpu_used=12),
             Node(node_id="mem-half", cpu_total=4, memory_mb_total=16384, memory_mb_used=8192)]
    assert choose(spec(), nodes, cpu_overcommit=4.0, memory_overcommit=1.0,
                  reserved_memory_mb=0).node_id == "mem-half"


def test_capacity_options_change_the_choice() -> None:
    # a: 2 cores, 4 vCPUs used; b: 8 cores, 8 GiB with 4 GiB used. With 4 vCPUs per core a is
    # 5/8 CPU-full and b is ~1/2 memory-full; with 32 vCPUs per core a is nearly empty.
    nodes = [Node(node_id="b", cpu_total=8, memory_mb_total=8192, memory_mb_used=4096),
             Node(node_id="a", cpu_total=2, memory_mb_total=65536, cpu_used=4)]
    assert choose(spec(), nodes, cpu_overcommit=4.0, memory_overcommit=1.0,
                  reserved_memory_mb=0).node_id == "b"
    assert choose(spec(), nodes, cpu_overcommit=32.0, memory_overcommit=1.0,
                  reserved_memory_mb=0).node_id == "a"


def test_reserved_memory_counts_against_room() -> None:
    # equal use; "small" has less memory left once 3000 MiB are reserved
    nodes = [Node(node_id="small", cpu_total=4, memory_mb_total=4096, memory_mb_used=512),
             Node(node_id="large", cpu_total=4, memory_mb_total=6144, memory_mb_used=2048)]
    assert choose(spec(), nodes, memory_overcommit=1.0, reserved_memory_mb=0).node_id == "small"
    assert choose(spec(), nodes, memory_overcommit=1.0, reserved_memory_mb=3000).node_id == "large"


def test_skips_nodes_that_do_not_fit_or_are_unhealthy() -> None:
    nodes = [Node(node_id="sick", cpu_total=64, memory_mb_total=262144, status=NodeStatus.DOWN),
             Node(node_id="tiny", cpu_total=64, memory_mb_total=256),
             Node(node_id="busy", cpu_total=1, memory_mb_total=2048, memory_mb_used=1024)]
    assert choose(spec(), nodes, memory_overcommit=1.0, reserved_memory_mb=0).node_id == "busy"


def test_no_capacity_names_the_request() -> None:
    nodes = [Node(node_id="n", cpu_total=1, memory_mb_total=65536, cpu_used=4),
             Node(node_id="sick", cpu_total=64, memory_mb_total=65536, status=NodeStatus.DOWN)]
    with pytest.raises(NoCapacityError) as info:
        choose(spec(cpu=1), nodes, cpu_overcommit=4.0, reserved_memory_mb=0)
    assert (info.value.cpu, info.value.memory_mb) == (1, 512)
    with pytest.raises(NoCapacityError):
        choose(spec(), [])


def test_ties_go_to_the_node_listed_first() -> None:
    a = Node(node_id="a", cpu_total=4, memory_mb_total=8192)
    b = Node(node_id="b", cpu_total=4, memory_mb_total=8192)
    assert choose(spec(), [a, b], reserved_memory_mb=0).node_id == "a"
    assert choose(spec(), [b, a], reserved_memory_mb=0).node_id == "b"


def test_template_locality_is_a_small_bonus() -> None:
    # utilisation after placement: cold 0.25, warm-close 0.3125, warm-far 0.5 (memory, no overcommit)
    cold = Node(node_id="cold", cpu_total=8, memory_mb_total=8192, memory_mb_used=1536)
    warm_close = Node(node_id="warm-close", cpu_total=8, memory_mb_total=8192, memory_mb_used=2048,
                      templates=("code-interpreter-v1",))
    warm_far = Node(node_id="warm-far", cpu_total=8, memory_mb_total=8192, memory_mb_used=3584,
                    templates=("code-interpreter-v1",))
    opts = {"memory_overcommit": 1.0, "reserved_memory_mb": 0}
    # 0.3125 - 0.1 < 0.25: the warm node wins when it is only a little fuller
    assert choose(spec(template="code-interpreter-v1"), [cold, warm_close], **opts).node_id == "warm-close"
    # 0.5 - 0.1 > 0.25: the bonus does not outweigh real load
    assert choose(spec(template="code-interpreter-v1"), [cold, warm_far], **opts).node_id == "cold"
    # no bonus for another template, nor with the bonus switched off
    assert choose(spec(template="base"), [cold, warm_close], **opts).node_id == "cold"
    assert choose(spec(template="code-interpreter-v1"), [cold, warm_close], locality_bonus=0.0,
                  **opts).node_id == "cold"


def test_inputs_are_not_mutated() -> None:
    nodes = [Node(node_id="a", cpu_total=4, memory_mb_total=8192, templates=("base",)),
             Node(node_id="b", cpu_total=4, memory_mb_total=8192, status=NodeStatus.DOWN)]
    before = [n.model_copy(deep=True) for n in nodes]
    choose(spec(), nodes, reserved_memory_mb=0)
    assert nodes == before


def test_config_defaults_match_the_plugin_defaults() -> None:
    c = SpreadConfig()
    assert (c.cpu_overcommit, c.memory_overcommit, c.reserved_memory_mb, c.locality_bonus) == (
        32.0, 4.0, 1024, 0.1)
    node = Node(node_id="n", cpu_total=2, memory_mb_total=24_000, cpu_used=63)
    assert SpreadScheduler(c).place(spec(), [node]).node_id == "n"
    with pytest.raises(NoCapacityError):
        SpreadScheduler(c).place(spec(), [node.model_copy(update={"cpu_used": 64})])
