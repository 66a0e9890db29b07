"""Per-team quotas on the service with the fake drivers: what counts, what frees a slot, overrides."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from cube_core._host import PluginHost
from cube_core.config import QuotaSettings, TeamQuota
from cube_core.embedded import Embedded
from cube_core.errors import ConfigError, QuotaExceededError
from cube_core.models import NetworkPolicy, SandboxSpec
from cube_core.service import SandboxService
from cube_core.store import SqliteStore

QUOTAS = """
[quotas]
max_sandboxes = 2
max_snapshots = 1
max_network_rules = 2

[quotas.teams.big]
max_sandboxes = 4
max_running = 1
"""


@pytest.fixture
async def service(plugin_host: Callable[..., PluginHost], cube_config_factory: Callable[..., Any],
                  tmp_path: Path) -> AsyncIterator[SandboxService]:
    text = cube_config_factory().text + QUOTAS
    cube = Embedded(plugin_host(cube_config_factory(text)), SqliteStore(tmp_path / "cube.db"))
    await cube.start()
    await cube.agent.ensure_templates(("base",))
    yield cube.service
    await cube.stop()


def team(svc: SandboxService, name: str) -> str:
    key, _ = svc.create_api_key(name)
    return key.team_id


def spec(team_id: str, **kw: Any) -> SandboxSpec:
    return SandboxSpec(template_id="base", team_id=team_id, **kw)


async def test_paused_counts_and_killing_frees_a_slot(service: SandboxService) -> None:
    a = team(service, "a")
    first = await service.create(spec(a))
    await service.create(spec(a))
    await service.pause(a, first.sandbox_id)
    with pytest.raises(QuotaExceededError) as info:
        await service.create(spec(a))
    err = info.value
    assert err.limit == 2 and err.current == 2 and err.team == "a" and "paused" in err.message
    assert len(service.list(a)) == 2  # the refused create left nothing behind
    other = team(service, "other")
    await service.create(spec(other))  # another team's quota is its own
    await service.kill(a, first.sandbox_id)  # a paused sandbox's slot comes back when it is killed
    await service.create(spec(a))


async def test_concurrent_creates_cannot_share_the_last_slot(service: SandboxService) -> None:
    a = team(service, "a")
    results = await asyncio.gather(*(service.create(spec(a)) for _ in range(5)), return_exceptions=True)
    made = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, QuotaExceededError)]
    assert len(made) == 2 and len(refused) == 3


async def test_per_team_override_and_running_limit_on_resume(service: SandboxService) -> None:
    big = team(service, "big")
    one = await service.create(spec(big))
    with pytest.raises(QuotaExceededError, match="running"):
        await service.create(spec(big))  # max_running = 1 for this team
    await service.pause(big, one.sandbox_id)
    two = await service.create(spec(big))  # paused: the running slot is free
    with pytest.raises(QuotaExceededError, match="running"):
        await service.resume(big, one.sandbox_id)
    with pytest.raises(QuotaExceededError, match="running"):
        await service.connect(big, one.sandbox_id)
    assert service.get(big, one.sandbox_id).state.value == "paused"  # still paused, intact
    await service.kill(big, two.sandbox_id)
    assert (await service.connect(big, one.sandbox_id)).state.value == "running"


async def test_snapshot_quota_and_fork_all_or_nothing(service: SandboxService) -> None:
    a = team(service, "a")
    sb = await service.create(spec(a))
    ref = await service.snapshot(a, sb.sandbox_id)
    with pytest.raises(QuotaExceededError, match="snapshots"):
        await service.snapshot(a, sb.sandbox_id)
    with pytest.raises(QuotaExceededError, match="snapshots"):
        await service.fork(a, sb.sandbox_id)
    await service.delete_snapshot(a, ref.snapshot_id)
    with pytest.raises(QuotaExceededError, match="sandboxes"):
        await service.fork(a, sb.sandbox_id, count=2)  # 1 + 2 > 2: refused before any work
    assert service.list_snapshots(a) == [] and len(service.list(a)) == 1
    forks = await service.fork(a, sb.sandbox_id, count=1)
    assert len(forks) == 1 and len(service.list_snapshots(a)) == 1


async def test_network_rules_per_policy(service: SandboxService) -> None:
    a = team(service, "a")
    too_many = NetworkPolicy(allow_out=("1.1.1.1", "example.com"), deny_out=("0.0.0.0/0",))
    with pytest.raises(QuotaExceededError, match="egress rules"):
        await service.create(spec(a, network=too_many))
    assert service.list(a) == []
    sb = await service.create(spec(a, network=NetworkPolicy(allow_out=("1.1.1.1",), deny_out=("0.0.0.0/0",))))
    with pytest.raises(QuotaExceededError, match="egress rules"):
        await service.update_network(a, sb.sandbox_id, too_many)
    assert service.get(a, sb.sandbox_id).network.allow_out == ("1.1.1.1",)


def test_team_override_inherits_what_it_does_not_name() -> None:
    settings = QuotaSettings(max_sandboxes=3, max_snapshots=5, teams={"x": TeamQuota(max_sandboxes=10)})
    assert settings.for_team("x") == TeamQuota(max_sandboxes=10, max_snapshots=5)
    assert settings.for_team("y") == TeamQuota(max_sandboxes=3, max_snapshots=5)
    assert QuotaSettings().for_team("z") == TeamQuota()  # no limits by default


def test_bad_quota_config_is_a_config_error(cube_config_factory: Callable[..., Any]) -> None:
    base = cube_config_factory().text
    for bad in ("[quotas]\nmax_sandboxes = -1\n", "[quotas]\nmax_sandbox = 1\n",
                "[quotas.teams.x]\nteams = {}\n"):
        with pytest.raises(ConfigError):
            cube_config_factory(base + bad)
