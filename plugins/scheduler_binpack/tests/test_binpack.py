from __future__ import annotations

import pytest
from cube_core import NoCapacityError, Node, SandboxSpec
from cube_core.testing.contract import SchedulerContract

from cube_scheduler_binpack.binpack import choose
from cube_scheduler_binpack.config import BinpackConfig
from cube_scheduler_binpack.plugin import BinpackScheduler


class TestBinpackContract(SchedulerContract):
    @pytest.fixture
    def driver(self) -> BinpackScheduler:
        # the contract's nodes are sized for reservations without overcommit
        return BinpackScheduler(BinpackConfig(reserved_memory_mb=0, memory_overcommit=1.0))


def spec(mem: int = 512, cpu: int = 1, template: str = "base") -> SandboxSpec:
    return SandboxSpec(template_id=template, team_id="t", memory_mb=mem, cpu_count=cpu)


def test_prefers_the_fuller_node_that_fits() -> None:
    nodes = [Node(node_id="empty", cpu_total=8, memory_mb_total=16384),
             Node(node_id="busy", cpu_total=8, memory_mb_total=16384, memory_mb_used=12000)]
    assert choose(spec(), nodes, reserved_memory_mb=0).node_id == "busy"


def test_cpu_overcommit_limits_placement() -> None:
    nodes = [Node(node_id="n", cpu_total=1, memory_mb_total=65536, cpu_used=4)]
    with pytest.raises(NoCapacityError):
        choose(spec(cpu=1), nodes, cpu_overcommit=4.0, reserved_memory_mb=0)
    assert choose(spec(cpu=1), nodes, cpu_overcommit=5.0, reserved_memory_mb=0).node_id == "n"


def test_reserved_memory_is_kept_free() -> None:
    nodes = [Node(node_id="n", cpu_total=4, memory_mb_total=1500)]
    with pytest.raises(NoCapacityError):
        choose(spec(mem=600), nodes, reserved_memory_mb=1000, memory_overcommit=1.0)


def test_template_locality_breaks_ties() -> None:
    nodes = [Node(node_id="cold", cpu_total=4, memory_mb_total=8192),
             Node(node_id="warm", cpu_total=4, memory_mb_total=8192, templates=("code-interpreter-v1",))]
    assert choose(spec(template="code-interpreter-v1"), nodes, reserved_memory_mb=0).node_id == "warm"
    assert choose(spec(template="base"), nodes, reserved_memory_mb=0).node_id == "cold"


def test_defaults_hold_fifty_running_sandboxes_on_two_cores() -> None:
    """The microVM defaults: 50 running 512 MiB sandboxes plus paused pool members fit a 2-core,
    24 GiB host (they did not with 4 vCPUs per core and no memory overcommit)."""
    node = Node(node_id="n", cpu_total=2, memory_mb_total=24_000, cpu_used=50, memory_mb_used=50 * 512 + 1536)
    assert BinpackScheduler(BinpackConfig()).place(spec(), [node]).node_id == "n"
    full = node.model_copy(update={"cpu_used": 64})
    with pytest.raises(NoCapacityError):
        BinpackScheduler(BinpackConfig()).place(spec(), [full])
