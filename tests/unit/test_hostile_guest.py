"""A guest is root in its VM and may answer anything: the service validates every reply before it
touches a record, stops the sandbox whose guest broke the protocol (state ``error`` with the
reason) and keeps serving every other team. Teardown runs every step whatever one of them raises."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from cube_core._host import PluginHost
from cube_core.config import LoadedConfig
from cube_core.embedded import Embedded
from cube_core.errors import GuestProtocolError, GuestTimeoutError, SandboxFailedError, SandboxNotFoundError
from cube_core.models import SandboxRuntime, SandboxSpec, VmHandle
from cube_core.node import NodeAgent
from cube_core.pool import POOL_TEAM
from cube_core.service import SandboxService
from cube_core.state import SandboxState
from cube_core.store import SqliteStore


def spec(team: str, **kw: Any) -> SandboxSpec:
    return SandboxSpec(template_id="base", team_id=team, **kw)


def hostile(agent: NodeAgent, monkeypatch: pytest.MonkeyPatch, op: str, answer: object) -> list[str]:
    """Make every guest whose VM id is in the returned list answer ``op`` with ``answer``."""
    bad: list[str] = []
    honest = agent.vmm.guest_call

    async def guest_call(vm: VmHandle, name: str, params: dict[str, Any] | None = None, *,
                         timeout: float = 10.0) -> Any:
        reply = await honest(vm, name, params, timeout=timeout)
        if name == op and (vm.vm_id in bad or "*" in bad):
            return answer
        return reply

    monkeypatch.setattr(agent.vmm, "guest_call", guest_call)
    return bad


def assert_nothing_left(agent: NodeAgent, *, keep: int = 0) -> None:
    assert len(agent.network.slots) == keep
    assert len(list((agent.storage.root / "disks").glob("*"))) == keep
    assert len(agent._live) == keep


BAD_PERSONALIZE = [
    {"boot_id": {}},  # the example: used to poison the store (every later create: 500)
    {"boot_id": []},
    {"boot_id": 42},
    {"boot_id": None},
    {},
    {"boot_id": "x" * 10_000},
    {"boot_id": "../../etc/passwd"},
    {"boot_id": "ok", "timings_ms": []},
    {"boot_id": "ok", "timings_ms": {"a": "slow"}},
    {"boot_id": "ok", "timings_ms": {"a": float("nan")}},
    {"boot_id": "ok", "timings_ms": {str(i): 1 for i in range(1000)}},
    ["boot_id", "x"],
    "boot_id",
    None,
]


@pytest.mark.parametrize("answer", BAD_PERSONALIZE, ids=[repr(a)[:40] for a in BAD_PERSONALIZE])
async def test_bad_personalize_reply_fails_only_that_create(cube: Embedded, service: SandboxService,
                                                            monkeypatch: pytest.MonkeyPatch, answer: object) -> None:
    hostile(cube.agent, monkeypatch, "personalize", answer).append("*")
    with pytest.raises(GuestProtocolError, match="invalid personalize reply"):
        await service.create(spec("evil"))
    [failed] = service.store.list_sandboxes(team_id="evil", states=None)
    assert failed.state == SandboxState.ERROR and failed.runtime == SandboxRuntime()
    assert failed.error is not None and "broke the control protocol: invalid personalize reply" in failed.error
    assert "x" * 100 not in failed.error  # the guest's values never reach the record
    with pytest.raises(SandboxFailedError, match="was stopped: guest of .* broke the control protocol"):
        service.get("evil", failed.sandbox_id)
    assert_nothing_left(cube.agent)

    monkeypatch.undo()  # the guests behave again: every team is served, the store reads fine
    good = await service.create(spec("good"))
    assert good.state == SandboxState.RUNNING and good.boot_id
    assert [s.sandbox_id for s in service.list("good")] == [good.sandbox_id]
    assert service.list("evil") == []
    assert service.count_by_state()["running"] == 1


async def test_records_are_validated_on_every_change(service: SandboxService) -> None:
    sb = await service.create(spec("t1"))
    with pytest.raises(ValidationError):
        sb.evolve(boot_id={})
    with pytest.raises(ValidationError):
        sb.evolve(state="exploded")
    assert sb.evolve(boot_id="b1").boot_id == "b1"


async def test_bad_sync_clock_reply_stops_that_sandbox_only(cube: Embedded, service: SandboxService,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    evil = await service.create(spec("evil"))
    good = await service.create(spec("good"))
    bad = hostile(cube.agent, monkeypatch, "sync_clock", {"behind_ms": "a while"})
    bad.append(evil.runtime.vm.vm_id)
    for sb in (evil, good):
        await service.pause(sb.team_id, sb.sandbox_id)
    with pytest.raises(GuestProtocolError, match="invalid sync_clock reply"):
        await service.resume("evil", evil.sandbox_id)
    record = service.store.get_sandbox(evil.sandbox_id)
    assert record is not None and record.state == SandboxState.ERROR and "sync_clock" in (record.error or "")
    assert evil.runtime.vm.vm_id not in cube.agent.vmm.vms  # its VM is gone
    with pytest.raises(SandboxFailedError):
        await service.connect("evil", evil.sandbox_id)

    resumed = await service.resume("good", good.sandbox_id)  # the other team is unaffected
    assert resumed.state == SandboxState.RUNNING
    assert_nothing_left(cube.agent, keep=1)


async def test_silent_guest_on_resume_is_only_a_warning(cube: Embedded, service: SandboxService,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sb = await service.create(spec("t1"))

    async def silent(vm: VmHandle, op: str, params: dict[str, Any] | None = None, *,
                     timeout: float = 10.0) -> Any:
        raise GuestTimeoutError(vm_id=vm.vm_id, timeout=timeout)

    await service.pause("t1", sb.sandbox_id)
    monkeypatch.setattr(cube.agent.vmm, "guest_call", silent)
    assert (await service.resume("t1", sb.sandbox_id)).state == SandboxState.RUNNING  # clock sync is best effort


async def test_bad_reply_on_rollback_stops_that_sandbox(cube: Embedded, service: SandboxService,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    sb = await service.create(spec("evil"))
    ref = await service.snapshot("evil", sb.sandbox_id)
    hostile(cube.agent, monkeypatch, "personalize", {"boot_id": {"nested": True}}).append("*")
    with pytest.raises(GuestProtocolError):
        await service.rollback("evil", sb.sandbox_id, ref.snapshot_id)
    record = service.store.get_sandbox(sb.sandbox_id)
    assert record is not None and record.state == SandboxState.ERROR
    assert_nothing_left(cube.agent)
    assert cube.agent.vmm.vms == {}


async def test_bad_exec_reply(cube: Embedded, service: SandboxService, monkeypatch: pytest.MonkeyPatch) -> None:
    sb = await service.create(spec("t1"))
    assert (await service.exec(sb.sandbox_id, ["echo", "hi"]))["stdout"] == "echo hi"
    hostile(cube.agent, monkeypatch, "exec", {"exit_code": "zero", "stdout": 1}).append("*")
    with pytest.raises(GuestProtocolError, match="invalid exec reply"):
        await service.exec(sb.sandbox_id, ["true"])
    with pytest.raises(SandboxFailedError, match="invalid exec reply"):  # its sandbox was stopped
        service.get("t1", sb.sandbox_id)
    assert_nothing_left(cube.agent)


@pytest.mark.parametrize("broken", ["vm", "nic", "disk"])
async def test_teardown_runs_every_step_whatever_one_raises(cube: Embedded, service: SandboxService,
                                                            monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    sb = await service.create(spec("t1"))
    vm_id = sb.runtime.vm.vm_id
    target, name = {"vm": (cube.agent.vmm, "shutdown"), "nic": (cube.agent.network, "release"),
                    "disk": (cube.agent.storage, "delete_disk")}[broken]
    real = getattr(target, name)

    async def explode(*args: Any, **kwargs: Any) -> None:
        await real(*args, **kwargs)  # (so that the test leaves nothing behind)
        raise RuntimeError(f"{broken} teardown exploded")  # not a CubeError

    monkeypatch.setattr(target, name, explode)
    await service.kill("t1", sb.sandbox_id)
    record = service.store.get_sandbox(sb.sandbox_id)
    assert record is not None and record.state == SandboxState.KILLED
    assert record.error == f"{broken}: RuntimeError: {broken} teardown exploded"
    assert vm_id not in cube.agent.vmm.vms
    assert_nothing_left(cube.agent)
    with pytest.raises(SandboxNotFoundError):
        service.get("t1", sb.sandbox_id)


async def test_pool_member_with_a_bad_warm_up_reply_is_destroyed(cube_config_factory: Callable[..., LoadedConfig],
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = cube_config_factory()
    host = PluginHost(cube_config_factory(cfg.text.replace("pool = { size = 0 }", "pool = { size = 1 }"))).load()
    cube = Embedded(host, SqliteStore(tmp_path / "db"))
    hostile(cube.agent, monkeypatch, "warm_up", {"ms": "49983; rm -rf /"}).append("*")
    await cube.start()
    try:
        await cube.agent.ensure_templates(("base",))
        deadline = asyncio.get_running_loop().time() + 5
        while not [op for op, _ in cube.agent.vmm.calls if op == "shutdown"]:
            assert asyncio.get_running_loop().time() < deadline, "the bad member was not destroyed"
            await asyncio.sleep(0.01)
        assert cube.agent.pool.sizes() == {"base": 0}
        monkeypatch.undo()
        sb = await cube.service.create(spec("t1"))  # a pool miss still creates
        assert sb.state == SandboxState.RUNNING
    finally:
        await cube.stop()
    assert cube.store.list_sandboxes(team_id=POOL_TEAM) == []
