from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cube_core import hookimpl
from cube_core._host import PluginHost
from cube_core.config import LoadedConfig
from cube_core.embedded import Embedded
from cube_core.errors import CubeError, GuestProtocolError, SandboxFailedError, SandboxNotFoundError
from cube_core.models import EgressRule, NetworkPolicy, SandboxSpec, VmHandle
from cube_core.node import NodeAgent
from cube_core.pool import DEFAULT_POLICY, POOL_TEAM
from cube_core.sampling import sampler_of
from cube_core.state import SandboxState
from cube_core.store import SqliteStore
from cube_core.testing.fakes import FakeNetwork


async def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def _pooled(factory: Callable[..., LoadedConfig], size: int) -> LoadedConfig:
    cfg = factory()
    return factory(cfg.text.replace("pool = { size = 0 }", f"pool = {{ size = {size} }}"))


async def test_pool_fills_serves_and_refills(cube_config_factory: Callable[..., LoadedConfig],
                                             tmp_path: Path) -> None:
    host = PluginHost(_pooled(cube_config_factory, 2)).load()
    cube = Embedded(host, SqliteStore(tmp_path / "db"))
    service, agent = cube.service, cube.agent
    assert isinstance(agent.network, FakeNetwork)
    agent.network.trust = "-----BEGIN CERTIFICATE-----\nnode CA\n"
    agent.vmm.aslr = False  # what the kvm VMM says under TCG
    await cube.start()
    try:
        await agent.ensure_templates(("base",))
        await _wait_for(lambda: agent.pool.sizes() == {"base": 2})
        members = service.store.list_sandboxes(team_id=POOL_TEAM)
        assert len(members) == 2 and all(m.state == SandboxState.PAUSED for m in members)
        assert all(not agent.vmm.vms[m.sandbox_id]["running"] for m in members)
        # the node's CA went to each member as it joined (the network driver's guest_trust)
        assert all(agent.vmm.vms[m.sandbox_id]["trust_pem"] == agent.network.trust for m in members)
        assert all(agent.vmm.vms[m.sandbox_id]["aslr"] is False for m in members)  # the VMM's choice
        for m in members:  # prepared in the background, warmed up while running, then paused
            ops = [op for op, vm in agent.vmm.calls if vm == m.sandbox_id]
            assert ops == ["restore", "background", "personalize", "warm_up"], ops

        sb = await service.create(SandboxSpec(template_id="base", team_id="t", env_vars={"X": "1"}))
        assert agent.pool.hits == 1
        vm_id = sb.runtime.vm.vm_id
        assert vm_id in {m.sandbox_id for m in members}  # the sandbox runs in a pool member's VM
        assert sb.sandbox_id == vm_id  # a member joined as its sandbox: the id is the member's
        await agent.until_applied(sb.sandbox_id)  # what the edge waits for before the first request
        assert agent.vmm.vms[vm_id]["running"] and agent.vmm.vms[vm_id]["env"] == {"X": "1"}
        assert agent.vmm.vms[vm_id]["background"] is False  # a user's sandbox at its normal priority
        ops = [op for op, vm in agent.vmm.calls if vm == vm_id]
        assert ops[ops.index("foreground") + 1:] == ["apply"], ops  # raised before it runs again
        await _wait_for(lambda: agent.pool.sizes() == {"base": 2})  # refilled

        await service.kill("t", sb.sandbox_id)
        assert vm_id not in agent.vmm.vms
    finally:
        await cube.stop()
    assert cube.store.list_sandboxes(team_id=POOL_TEAM) == []  # members destroyed on stop
    assert agent.vmm.vms == {}


async def test_members_wait_paused_with_the_default_policy_written(
        cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path) -> None:
    """A member prepares with egress closed and gets the default policy once paused, so a create
    asking for the default writes no policy; any other policy (or plugin rules) is written."""
    host = PluginHost(_pooled(cube_config_factory, 3)).load()
    cube = Embedded(host, SqliteStore(tmp_path / "db"))
    service, agent = cube.service, cube.agent
    network = agent.network
    running_at_write: list[bool] = []
    update = network.update_policy

    async def spy(nic: Any, policy: NetworkPolicy, extra_rules: Any = ()) -> None:
        vm_id = nic.slot_id.removeprefix("fake-")
        running_at_write.append(bool(agent.vmm.vms.get(vm_id, {}).get("running")))
        await update(nic, policy, extra_rules)

    network.update_policy = spy  # type: ignore[method-assign]
    await cube.start()
    try:
        await agent.ensure_templates(("base",))
        await _wait_for(lambda: agent.pool.sizes() == {"base": 3})
        members = service.store.list_sandboxes(team_id=POOL_TEAM)
        for m in members:
            assert network.slots[m.runtime.nic.slot_id] == DEFAULT_POLICY
        assert [p for _, p, _ in network.updates] == [DEFAULT_POLICY] * 3
        assert running_at_write == [False] * 3  # written while paused: closed while it warmed up
        assert all(not network.slots[s].allow_internet_access for s in network.slots
                   if s not in {m.runtime.nic.slot_id for m in members})  # a refill preparing: closed

        network.updates.clear()
        default = await service.create(SandboxSpec(template_id="base", team_id="t"))
        assert [s for s, _, _ in network.updates if s == default.runtime.nic.slot_id] == []  # nothing written
        assert network.slots[default.runtime.nic.slot_id] == DEFAULT_POLICY

        closed = NetworkPolicy(allow_internet_access=False, allow_out=("198.18.0.1",))
        other = await service.create(SandboxSpec(template_id="base", team_id="t", network=closed))
        assert [(p, r) for s, p, r in network.updates if s == other.runtime.nic.slot_id] == [(closed, ())]
        assert network.slots[other.runtime.nic.slot_id] == closed
    finally:
        await cube.stop()


async def test_plugin_rules_are_written_at_create_on_a_default_policy(
        cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path) -> None:
    host = PluginHost(_pooled(cube_config_factory, 1)).load()
    rule = EgressRule(action="deny", target="198.19.0.0/16")

    class Rules:
        @hookimpl
        def cube_egress_rules(self, spec: SandboxSpec) -> list[EgressRule]:
            return [rule]

    host.register(Rules(), "rules")
    cube = Embedded(host, SqliteStore(tmp_path / "db"))
    await cube.start()
    try:
        await cube.agent.ensure_templates(("base",))
        await _wait_for(lambda: cube.agent.pool.sizes() == {"base": 1})
        sb = await cube.service.create(SandboxSpec(template_id="base", team_id="t"))
        assert cube.agent.pool.hits == 1
        writes = [(p, r) for s, p, r in cube.agent.network.updates if s == sb.runtime.nic.slot_id]
        assert writes[-1] == (DEFAULT_POLICY, (rule,))
    finally:
        await cube.stop()


async def test_pool_members_of_a_crashed_run_are_destroyed(cube_config_factory: Callable[..., LoadedConfig],
                                                            tmp_path: Path) -> None:
    host = PluginHost(_pooled(cube_config_factory, 1)).load()
    first = Embedded(host, SqliteStore(tmp_path / "db"))
    await first.start()
    await first.agent.ensure_templates(("base",))
    await _wait_for(lambda: first.agent.pool.sizes() == {"base": 1})
    first.agent.pool._task.cancel()  # simulate a crash: nothing is cleaned up
    leftover = first.store.list_sandboxes(team_id=POOL_TEAM)[0]
    second = Embedded(host, SqliteStore(tmp_path / "db"))
    await second.start()
    try:
        assert leftover.sandbox_id not in second.agent.vmm.vms
        assert second.store.get_sandbox(leftover.sandbox_id) is None
        assert not (second.agent.storage.root / "disks" / f"{leftover.sandbox_id}.qcow2").exists()
    finally:
        await second.stop()


async def test_pool_warm_up_can_be_turned_off(cube_config_factory: Callable[..., LoadedConfig],
                                              tmp_path: Path) -> None:
    cfg = cube_config_factory()
    host = PluginHost(cube_config_factory(cfg.text.replace(
        "pool = { size = 0 }", "pool = { size = 1, warm_up = false }"))).load()
    cube = Embedded(host, SqliteStore(tmp_path / "db"))
    agent = cube.agent
    await cube.start()
    try:
        await agent.ensure_templates(("base",))
        await _wait_for(lambda: agent.pool.sizes() == {"base": 1})
        assert not [op for op, _ in agent.vmm.calls if op == "warm_up"]
    finally:
        await cube.stop()


@pytest.mark.parametrize("background", [True, False])
async def test_background_refill_waits_for_the_creates_being_served(
        cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        background: bool) -> None:
    """``background_refill`` (the default): the refill does not prepare the next member while a
    create is being served (bounded by ``REFILL_YIELD_MAX_S``), and members are prepared at the
    lowest CPU priority; ``false``: the old way, neither."""
    from cube_core import pool as pool_module

    cfg = cube_config_factory()
    host = PluginHost(cube_config_factory(cfg.text.replace(
        "pool = { size = 0 }", f"pool = {{ size = 1, background_refill = {str(background).lower()} }}"))).load()
    cube = Embedded(host, SqliteStore(tmp_path / "db"))
    agent = cube.agent
    await cube.start()
    try:
        await agent.ensure_templates(("base",))
        await _wait_for(lambda: agent.pool.sizes() == {"base": 1})
        monkeypatch.setattr(pool_module, "REFILL_YIELD_MAX_S", 0.5)
        with agent.pool.serving():  # a create in flight on this node
            taken = agent.pool.take("base")  # ... took the member: the refill wakes
            assert taken is not None
            await asyncio.sleep(0.25)
            assert agent.pool.sizes() == {"base": 0 if background else 1}
            await _wait_for(lambda: agent.pool.sizes() == {"base": 1})  # the bound: not starved
        await agent.destroy(taken)
        backgrounded = [vm for op, vm in agent.vmm.calls if op == "background"]
        assert len(backgrounded) == (2 if background else 0)
    finally:
        await cube.stop()


class Gate:
    """The fake guest's ``apply`` waits until ``open`` is set (or fails with ``error``): what a
    slow guest under emulation does to the create message the node sent without waiting."""

    def __init__(self, agent: NodeAgent) -> None:
        self.open = asyncio.Event()
        self.error: CubeError | None = None
        self.applied: list[dict[str, Any]] = []
        inner = agent.vmm.guest_call

        async def guest_call(vm: VmHandle, op: str, params: dict[str, Any] | None = None, *,
                             timeout: float = 10.0) -> dict[str, Any]:
            if op == "apply":
                await self.open.wait()
                if self.error is not None:
                    raise self.error
                self.applied.append(dict(params or {}))
            return await inner(vm, op, params, timeout=timeout)

        agent.vmm.guest_call = guest_call  # type: ignore[method-assign]


async def _pooled_cube(factory: Callable[..., LoadedConfig], tmp_path: Path, *,
                       identity_at_join: bool = True) -> Embedded:
    cfg = factory()
    text = cfg.text.replace("pool = { size = 0 }",
                            f"pool = {{ size = 2, identity_at_join = {str(identity_at_join).lower()} }}")
    cube = Embedded(PluginHost(factory(text)).load(), SqliteStore(tmp_path / "db"))
    await cube.start()
    await cube.agent.ensure_templates(("base",))
    await _wait_for(lambda: cube.agent.pool.sizes() == {"base": 2})
    return cube


async def test_the_first_request_waits_until_the_guest_applied_the_create(
        cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path) -> None:
    cube = await _pooled_cube(cube_config_factory, tmp_path)
    service, agent = cube.service, cube.agent
    gate = Gate(agent)
    try:
        members = {m.sandbox_id: m for m in service.store.list_sandboxes(team_id=POOL_TEAM)}
        sb = await service.create(SandboxSpec(template_id="base", team_id="t", env_vars={"X": "1"}, secure=True))
        # created (201) before the guest answered: under the member's id and with its token
        assert sb.sandbox_id in members and sb.envd_access_token == members[sb.sandbox_id].envd_access_token
        assert [s.sandbox_id for s in service.store.list_sandboxes(team_id="t")] == [sb.sandbox_id]
        first = asyncio.create_task(service.endpoint(sb.sandbox_id, 49983))
        for _ in range(20):
            await asyncio.sleep(0)
        assert not first.done() and gate.applied == []  # the edge holds it
        gate.open.set()
        record, endpoint = await first
        assert endpoint.host and record.sandbox_id == sb.sandbox_id
        assert agent.vmm.vms[sb.sandbox_id]["env"] == {"X": "1"}  # applied before the request went
        assert gate.applied[0]["keep_token"] is True and isinstance(gate.applied[0]["clock_ns"], int)
        plain = await service.create(SandboxSpec(template_id="base", team_id="t"))
        await service.endpoint(plain.sandbox_id, 49983)
        assert plain.envd_access_token is None and gate.applied[1]["keep_token"] is False  # token cleared
    finally:
        await cube.stop()


async def test_a_guest_that_does_not_apply_the_create_is_failed(
        cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path) -> None:
    cube = await _pooled_cube(cube_config_factory, tmp_path)
    service, agent = cube.service, cube.agent
    gate = Gate(agent)
    gate.error = GuestProtocolError(vm_id="x", reason="invalid apply reply")
    try:
        sb = await service.create(SandboxSpec(template_id="base", team_id="t"))
        gate.open.set()
        with pytest.raises(SandboxFailedError):
            await service.endpoint(sb.sandbox_id, 49983)
        await _wait_for(lambda: (r := service.store.get_sandbox(sb.sandbox_id)) is not None
                        and r.state == SandboxState.ERROR)
        assert sb.sandbox_id not in agent.vmm.vms  # its VM is stopped
        with pytest.raises(SandboxFailedError):
            service.get("t", sb.sandbox_id)
    finally:
        await cube.stop()


async def test_without_identity_at_join_a_create_personalizes_the_member(
        cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path) -> None:
    cube = await _pooled_cube(cube_config_factory, tmp_path, identity_at_join=False)
    service, agent = cube.service, cube.agent
    assert isinstance(agent.network, FakeNetwork)
    agent.network.trust = "-----BEGIN CERTIFICATE-----\nnode CA\n"
    try:
        sb = await service.create(SandboxSpec(template_id="base", team_id="t", env_vars={"X": "1"}))
        vm_id = sb.runtime.vm.vm_id if sb.runtime.vm else ""
        assert vm_id.startswith("pool") and sb.sandbox_id != vm_id  # the control plane's id
        assert [op for op, vm in agent.vmm.calls if vm == vm_id][-1] == "personalize"
        assert agent.vmm.vms[vm_id]["env"] == {"X": "1"}  # done when create returns
        assert agent.vmm.vms[vm_id]["trust_pem"] == agent.network.trust  # the node's CA, at create
        assert agent.vmm.vms[vm_id]["aslr"] is True  # the fake VMM's default, at create
    finally:
        await cube.stop()


class ResumeGate:
    """The fake VMM's ``resume`` waits until ``open`` is set: what a QMP ``cont`` does on a busy
    host (its answer needs the member's QEMU main loop to run). Every VM operation and guest call
    is written to ``log`` as it completes."""

    def __init__(self, agent: NodeAgent) -> None:
        self.open = asyncio.Event()
        self.log: list[tuple[str, str]] = []
        vmm = agent.vmm
        resume, pause, snapshot, shutdown, guest_call = vmm.resume, vmm.pause, vmm.snapshot, vmm.shutdown, \
            vmm.guest_call

        async def gated_resume(vm: VmHandle) -> None:
            await self.open.wait()
            await resume(vm)
            self.log.append(("resume", vm.vm_id))

        async def logged_pause(vm: VmHandle) -> None:
            await pause(vm)
            self.log.append(("pause", vm.vm_id))

        async def logged_snapshot(vm: VmHandle, target_dir: Path) -> Any:
            self.log.append(("snapshot", vm.vm_id))
            return await snapshot(vm, target_dir)

        async def logged_shutdown(vm: VmHandle, *, timeout: float = 10.0) -> None:
            self.log.append(("shutdown", vm.vm_id))
            await shutdown(vm, timeout=timeout)

        async def logged_guest_call(vm: VmHandle, op: str, params: dict[str, Any] | None = None, *,
                                    timeout: float = 10.0) -> dict[str, Any]:
            reply = await guest_call(vm, op, params, timeout=timeout)  # the fake fails a paused VM's call
            self.log.append((op, vm.vm_id))
            return reply

        vmm.resume = gated_resume  # type: ignore[method-assign]
        vmm.pause = logged_pause  # type: ignore[method-assign]
        vmm.snapshot = logged_snapshot  # type: ignore[method-assign]
        vmm.shutdown = logged_shutdown  # type: ignore[method-assign]
        vmm.guest_call = logged_guest_call  # type: ignore[method-assign]

    def of(self, vm_id: str) -> list[str]:
        return [op for op, vm in self.log if vm == vm_id]


async def _held_back(task: asyncio.Task[Any]) -> None:
    for _ in range(50):
        await asyncio.sleep(0)
    assert not task.done(), "the operation did not wait for the sandbox's start"


async def test_the_create_answers_before_the_member_resumes(
        cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path) -> None:
    """The QMP ``cont`` is not on the create's path: the create answers with the member still
    paused; the sandbox's start resumes it, then sends the create message, and the first request
    waits for both."""
    cube = await _pooled_cube(cube_config_factory, tmp_path)
    service, agent = cube.service, cube.agent
    gate = ResumeGate(agent)
    try:
        sb = await service.create(SandboxSpec(template_id="base", team_id="t", env_vars={"X": "1"}))
        assert sb.state == SandboxState.RUNNING and not agent.vmm.vms[sb.sandbox_id]["running"]
        assert agent.starting(sb.sandbox_id)
        assert sb.sandbox_id not in {s.sandbox_id for s in sampler_of(agent).sandboxes()}  # metrics: next round
        first = asyncio.create_task(service.endpoint(sb.sandbox_id, 49983))
        await _held_back(first)
        gate.open.set()
        await first
        assert gate.of(sb.sandbox_id) == ["resume", "apply"] and agent.vmm.vms[sb.sandbox_id]["env"] == {"X": "1"}
        assert not agent.starting(sb.sandbox_id)
    finally:
        gate.open.set()
        await cube.stop()


async def _pause(service: Any, sid: str) -> None:
    await service.pause("t", sid)


async def _snapshot(service: Any, sid: str) -> None:
    await service.snapshot("t", sid)


async def _exec(service: Any, sid: str) -> None:
    await service.exec(sid, ["true"])


async def _network(service: Any, sid: str) -> None:
    await service.update_network("t", sid, NetworkPolicy(allow_internet_access=False))


async def _audit(service: Any, sid: str) -> None:
    await service.network_audit("t", sid)


@pytest.mark.parametrize(("operation", "after"), [
    (_pause, ["resume", "apply", "pause"]),
    (_snapshot, ["resume", "apply", "pause", "snapshot", "resume"]),
    (_exec, ["resume", "apply", "exec"]),
    (_network, ["resume", "apply"]),
    (_audit, ["resume", "apply"]),
], ids=["pause", "snapshot", "exec", "network", "audit"])
async def test_every_operation_on_a_sandbox_orders_after_its_start(
        cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path,
        operation: Callable[[Any, str], Any], after: list[str]) -> None:
    cube = await _pooled_cube(cube_config_factory, tmp_path)
    service, agent = cube.service, cube.agent
    gate = ResumeGate(agent)
    try:
        sb = await service.create(SandboxSpec(template_id="base", team_id="t"))
        assert sb.runtime.nic is not None
        slot = sb.runtime.nic.slot_id

        def writes() -> int:
            return sum(1 for s, _, _ in agent.network.updates if s == slot)

        written = writes()  # the default policy, at pool join
        task = asyncio.create_task(operation(service, sb.sandbox_id))
        await _held_back(task)
        assert gate.of(sb.sandbox_id) == [] and writes() == written
        gate.open.set()
        await task
        assert gate.of(sb.sandbox_id)[:len(after)] == after, gate.log
        assert writes() == written + (1 if operation is _network else 0)
    finally:
        gate.open.set()
        await cube.stop()


async def test_a_kill_during_the_start_ends_the_start_first(
        cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path) -> None:
    cube = await _pooled_cube(cube_config_factory, tmp_path)
    service, agent = cube.service, cube.agent
    gate = ResumeGate(agent)
    try:
        sb = await service.create(SandboxSpec(template_id="base", team_id="t"))
        start = agent._starting[sb.sandbox_id]
        await service.kill("t", sb.sandbox_id)  # the resume never answers: the kill does not wait for it
        assert start.done() and gate.of(sb.sandbox_id) == ["shutdown"] and sb.sandbox_id not in agent.vmm.vms
        assert service.store.get_sandbox(sb.sandbox_id).state == SandboxState.KILLED
        with pytest.raises(SandboxNotFoundError):
            await service.endpoint(sb.sandbox_id, 49983)
    finally:
        gate.open.set()
        await cube.stop()


async def test_node_stop_waits_for_a_start_in_flight(
        cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path) -> None:
    """The VMs outlive their node agent: none may be left paused half-way through its start."""
    cube = await _pooled_cube(cube_config_factory, tmp_path)
    service, agent = cube.service, cube.agent
    gate = ResumeGate(agent)
    sb = await service.create(SandboxSpec(template_id="base", team_id="t"))
    stopping = asyncio.create_task(agent.stop())
    await _held_back(stopping)
    gate.open.set()
    await stopping
    assert gate.of(sb.sandbox_id)[:2] == ["resume", "apply"] and not agent.starting(sb.sandbox_id)
    await cube.stop()
