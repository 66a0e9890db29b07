"""SandboxService: the only object API plugins call.

It records every sandbox in the state store, drives the slot drivers (scheduler → network →
storage → vmm) and fires the lifecycle hooks. Team scoping lives here: a team never sees another
team's sandboxes (they are reported as not found).
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import functools
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import structlog

from cube_core import ids, keys
from cube_core._host import PluginHost
from cube_core.config import CoreSettings
from cube_core.errors import (
    AdmissionRejectedError,
    CubeError,
    GuestProtocolError,
    InvalidStateError,
    NoCapacityError,
    SandboxFailedError,
    SandboxNotFoundError,
    SnapshotInUseError,
    SnapshotNotFoundError,
    TemplateError,
    TemplateNotFoundError,
    UnsupportedOperation,
)
from cube_core.guest import guest_call
from cube_core.meminfo import total_memory_mb
from cube_core.models import (
    ApiKey,
    DiskHandle,
    ExecReply,
    NetworkPolicy,
    NicHandle,
    Node,
    PersonalizeReply,
    Sandbox,
    SandboxSpec,
    SnapshotRef,
    StopReason,
    SyncClockReply,
    Team,
    Template,
    TemplateStatus,
    VmHandle,
    VmSpec,
    VmState,
    utcnow,
)
from cube_core.network import NetworkDriver
from cube_core.pool import POOL_TEAM, WarmPool
from cube_core.quotas import Quotas
from cube_core.scheduler import Scheduler
from cube_core.state import SandboxState, check_transition, require
from cube_core.storage import Progress, StorageDriver
from cube_core.store import StateStore
from cube_core.templates import TemplateBuilder
from cube_core.vmm import CAP_PAUSE, CAP_REATTACH, CAP_SNAPSHOT, VmmDriver

log = structlog.get_logger(__name__)

LIVE_STATES = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)


@dataclass
class Runtime:
    """The live resources of one sandbox on this node."""

    vm: VmHandle | None = None
    disk: DiskHandle | None = None
    nic: NicHandle | None = None

    def dump(self) -> dict[str, Any]:
        return {k: v.model_dump(mode="json") for k, v in
                (("vm", self.vm), ("disk", self.disk), ("nic", self.nic)) if v is not None}

    @classmethod
    def load(cls, data: dict[str, Any]) -> Runtime:
        return cls(vm=VmHandle.model_validate(data["vm"]) if "vm" in data else None,
                   disk=DiskHandle.model_validate(data["disk"]) if "disk" in data else None,
                   nic=NicHandle.model_validate(data["nic"]) if "nic" in data else None)


class SandboxService:
    """Create, find, change and stop sandboxes; manage templates, teams and API keys."""

    def __init__(self, host: PluginHost, store: StateStore) -> None:
        self.host = host
        self.store = store
        self.settings: CoreSettings = host.config.data.core
        self.vmm: VmmDriver = host.hooks.vmm_driver()
        self.network: NetworkDriver = host.hooks.network_driver()
        self.storage: StorageDriver = host.hooks.storage_driver()
        self.scheduler: Scheduler = host.hooks.scheduler()
        self.quotas = Quotas(host.config.data.quotas, store)
        self.templates = TemplateBuilder(store=store, storage=self.storage, vmm=self.vmm,
                                         network=self.network, kernel_setting=self.settings.kernel)
        self._live: dict[str, Runtime] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self.pool = WarmPool(settings=self.settings.pool, store=store, vmm=self.vmm, network=self.network,
                             storage=self.storage, destroy=self._free, node_id=self.settings.node_id,
                             warm_up=host.hooks.pool_member_warm_up)
        self.ready = asyncio.Event()
        self._start_gate = asyncio.Semaphore(self.settings.max_parallel_starts)
        """FIFO: asyncio wakes a semaphore's waiters in the order they came."""

    # -- lifecycle of the service -------------------------------------------------------------

    async def start(self) -> None:
        for driver in (self.storage, self.network, self.vmm):
            await driver.start()
        self._refresh_node()
        await self._recover()
        await self.pool.start()
        self._reaper = asyncio.create_task(self._reap_forever(), name="cube-timeout-reaper")

    async def stop(self) -> None:
        await self.pool.stop()
        if self._reaper:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        for driver in (self.vmm, self.network, self.storage):
            await driver.close()

    async def ensure_templates(self, names: tuple[str, ...],
                               lanes: Callable[[str], Progress] | None = None) -> None:
        """Build (or reuse) ``names`` at once: the kernel beside the first root filesystem, root
        filesystems one after the other in this order. The service is ready (``/health`` 200) as
        soon as the first template serves; the others keep building (creates from them get 503
        until they are ready)."""

        async def one(name: str) -> None:
            template = await self.templates.ensure(name, lanes(name) if lanes else None,
                                                   kernel_progress=kernel_lane)
            self.pool.watch(template)
            self._refresh_node()
            self.ready.set()
            log.info("template serving", template=name)

        kernel_lane = lanes("kernel") if lanes else None
        results = await asyncio.gather(*(one(name) for name in names), return_exceptions=True)
        failed = [(n, r) for n, r in zip(names, results, strict=True) if isinstance(r, BaseException)]
        for name, exc in failed:
            log.error("template build failed", template=name, error=str(exc))
        if failed:
            raise failed[0][1]

    async def _recover(self) -> None:
        """Re-attach to VMs of sandboxes recorded live; clean up the expired and the lost."""
        now = utcnow()
        for sb in self.store.list_sandboxes(states=LIVE_STATES):
            if sb.team_id == POOL_TEAM:
                continue  # the pool destroys its own leftovers
            runtime = Runtime.load(sb.runtime)
            alive = False
            if runtime.vm is not None and CAP_REATTACH in self.vmm.capabilities:
                try:
                    runtime.vm = await self.vmm.reattach(runtime.vm)
                    alive = True
                except CubeError as exc:
                    log.warning("cannot re-attach sandbox", sandbox_id=sb.sandbox_id, error=str(exc))
            elif runtime.vm is not None:
                alive = await self.vmm.is_alive(runtime.vm)
            self._live[sb.sandbox_id] = runtime
            if not alive or sb.state == SandboxState.CREATING:
                await self._destroy(sb, StopReason.ERROR, error="its VM was lost while the node agent was down"
                                    if not alive else "the node agent stopped while it was being created")
            elif sb.end_at <= now:
                await self._expire(sb)
        live = [Runtime.load(s.runtime) for s in self.store.list_sandboxes(states=LIVE_STATES)]
        await self.network.sweep({r.nic.slot_id for r in live if r.nic})
        snaps = {s.snapshot_id for s in self.store.list_snapshots()} | {
            t.snapshot.snapshot_id for t in self.store.list_templates() if t.snapshot} | self.snapshot_bases()
        await self.storage.gc({r.disk.disk_id for r in live if r.disk}, snaps)

    # -- teams and keys ------------------------------------------------------------------------

    def create_api_key(self, team_name: str) -> tuple[ApiKey, str]:
        return keys.create_key(self.store, team_name)

    def authenticate(self, secret: str | None) -> Team:
        return keys.authenticate(self.store, secret)

    def revoke_api_key(self, key_id_or_prefix: str) -> ApiKey:
        return keys.revoke_key(self.store, key_id_or_prefix)

    def list_api_keys(self) -> list[tuple[ApiKey, Team | None]]:
        return keys.list_keys(self.store)

    # -- templates -----------------------------------------------------------------------------

    def list_templates(self) -> list[Template]:
        return self.store.list_templates()

    def get_template(self, template_id_or_alias: str) -> Template:
        template = self.store.get_template(template_id_or_alias)
        if template is None:
            raise TemplateNotFoundError(template=template_id_or_alias)
        return template

    # -- sandboxes -----------------------------------------------------------------------------

    async def current_state(self, sandbox_id: str) -> SandboxState:
        return self._record(sandbox_id).state

    def _record(self, sandbox_id: str, team_id: str | None = None) -> Sandbox:
        sb = self.store.get_sandbox(sandbox_id)
        if sb is None or (team_id is not None and sb.team_id != team_id) or sb.state == SandboxState.KILLED:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        if sb.state == SandboxState.ERROR:
            raise SandboxFailedError(sandbox_id=sandbox_id, reason=sb.error or "unknown error")
        return sb

    def get(self, team_id: str, sandbox_id: str) -> Sandbox:
        return self._record(sandbox_id, team_id)

    def count_by_state(self) -> dict[str, int]:
        """Live sandboxes of every team by state, and warm-pool members (for metrics)."""
        counts = {s.value: 0 for s in LIVE_STATES}
        for sb in self.store.list_sandboxes(states=LIVE_STATES):
            if sb.team_id != POOL_TEAM:
                counts[sb.state.value] += 1
        return counts

    def pool_sizes(self) -> dict[str, int]:
        return self.pool.sizes()

    def list(self, team_id: str, *, states: tuple[SandboxState, ...] | None = None,
             metadata: dict[str, str] | None = None) -> list[Sandbox]:
        wanted = states or (SandboxState.RUNNING, SandboxState.PAUSED)
        out = [s for s in self.store.list_sandboxes(team_id=team_id, states=wanted)]
        if metadata:
            out = [s for s in out if all(s.metadata.get(k) == v for k, v in metadata.items())]
        return out

    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Create a sandbox from a template (id or alias) or from one of the team's snapshots."""
        started = time.perf_counter()
        snap = self.store.get_snapshot(spec.template_id)
        if snap is not None and snap.team_id == spec.team_id:
            spec = spec.evolve(from_snapshot=snap.snapshot_id, template_id=snap.template_id)
        template = self.get_template(spec.template_id)
        if template.status != TemplateStatus.READY:
            raise TemplateError(f"template {spec.template_id!r} is {template.status.value}, not ready")
        # the VM is a clone of the template's snapshot: its size is the template's, whatever was asked
        spec = spec.evolve(cpu_count=template.cpu_count, memory_mb=template.memory_mb)
        rejection = self.host.hooks.admit_sandbox(spec)
        if rejection is not None:
            raise AdmissionRejectedError(reason=rejection.reason, retryable=rejection.retryable)
        self.quotas.check_create(spec.team_id, spec.network)  # no await from here to put_sandbox: atomic
        if len(self.store.list_sandboxes(states=LIVE_STATES)) >= self.settings.max_sandboxes:
            raise NoCapacityError(cpu=spec.cpu_count, memory_mb=spec.memory_mb)
        self._refresh_node()
        node = self.scheduler.place(spec, self.store.list_nodes())
        now = utcnow()
        sandbox = Sandbox(
            sandbox_id=ids.sandbox_id(), template_id=template.template_id,
            alias=template.aliases[0] if template.aliases else None, team_id=spec.team_id,
            state=SandboxState.CREATING, started_at=now, end_at=now + timedelta(seconds=spec.timeout_s),
            metadata=dict(spec.metadata), env_vars=dict(spec.env_vars), cpu_count=template.cpu_count,
            memory_mb=template.memory_mb, auto_pause=spec.auto_pause, secure=spec.secure,
            envd_access_token=ids.access_token() if spec.secure else None, network=spec.network,
            node_id=node.node_id, isolation=self.vmm.isolation)
        member = self.pool.take(template.template_id) if self.pool.enabled and not spec.from_snapshot else None
        runtime = Runtime.load(member.runtime) if member else Runtime()
        sandbox = sandbox.evolve(runtime=runtime.dump())
        self.store.put_sandbox(sandbox)
        self._live[sandbox.sandbox_id] = runtime
        try:
            # a pool miss waits its turn (FIFO) for one of max_parallel_starts VM starts
            async with self._start_gate if member is None else contextlib.nullcontext():
                vm_started = time.perf_counter()
                if member is not None:
                    await self._adopt(spec, runtime)
                else:
                    await self._start_vm(sandbox, template, spec, runtime)
                personalize_started = time.perf_counter()
                boot = await self._personalize(sandbox, runtime)
                done = time.perf_counter()
            lineage = {"parent_snapshot": spec.from_snapshot} if spec.from_snapshot else {}
            sandbox = sandbox.evolve(state=SandboxState.RUNNING, runtime={**runtime.dump(), **lineage},
                                     boot_id=boot.boot_id, end_at=utcnow() + timedelta(seconds=spec.timeout_s))
            self.store.put_sandbox(sandbox)
        except BaseException as exc:
            log.warning("create failed", sandbox_id=sandbox.sandbox_id, error=repr(exc))
            await self._destroy(sandbox.evolve(runtime=runtime.dump()), StopReason.ERROR, error=_reason(exc))
            raise
        log.info("sandbox ready", sandbox_id=sandbox.sandbox_id, vm_id=runtime.vm.vm_id if runtime.vm else None,
                 served_by="pool" if member is not None else "start",
                 queued_ms=round((vm_started - started) * 1000, 1),
                 vm_ms=round((personalize_started - vm_started) * 1000, 1),
                 personalize_ms=round((done - personalize_started) * 1000, 1), guest_ms=boot.timings_ms,
                 total_ms=round((time.perf_counter() - started) * 1000, 1))
        self._refresh_node()
        await self.host.hooks.sandbox_created(sandbox)
        return sandbox

    async def _start_vm(self, sandbox: Sandbox, template: Template, spec: SandboxSpec,
                        runtime: Runtime) -> None:
        rules = self.host.hooks.egress_rules(spec)
        runtime.nic = await self.network.allocate(sandbox.sandbox_id, spec.network, rules)
        snap = self.store.get_snapshot(spec.from_snapshot) if spec.from_snapshot else template.snapshot
        if spec.from_snapshot and snap is None:
            raise SnapshotNotFoundError(snapshot_id=spec.from_snapshot)
        if snap is not None and CAP_SNAPSHOT in self.vmm.capabilities and (
                spec.from_snapshot or self.settings.boot_mode == "snapshot"):
            base = DiskHandle.model_validate(snap.disk)
            runtime.disk = await self.storage.create_disk(sandbox.sandbox_id, base.path)
            state = VmState.model_validate(snap.vm_state)
            vm_spec = state.clone_spec(sandbox.sandbox_id, runtime.disk, interpreter=template.interpreter)
            runtime.vm = await self.vmm.restore(state, vm_spec, runtime.nic)
        else:
            if template.rootfs is None or template.kernel is None:
                raise TemplateError(f"template {template.template_id!r} has no image")
            runtime.disk = await self.storage.create_disk(sandbox.sandbox_id, Path(template.rootfs))
            vm_spec = VmSpec(vm_id=sandbox.sandbox_id, kernel=Path(template.kernel),
                             initrd=Path(template.initrd) if template.initrd else None,
                             rootfs_disk=runtime.disk, memory_mb=template.memory_mb,
                             interpreter=template.interpreter)
            runtime.vm = await self.vmm.boot(vm_spec, runtime.nic)
            await self.vmm.wait_ready(runtime.vm, timeout=300.0)

    async def _adopt(self, spec: SandboxSpec, runtime: Runtime) -> None:
        """Make a warm-pool member this sandbox's: its egress policy, then let it run."""
        assert runtime.vm is not None and runtime.nic is not None
        try:
            await self.network.update_policy(runtime.nic, spec.network, self.host.hooks.egress_rules(spec))
        except UnsupportedOperation:
            pass  # this network driver applies no policy at all, for pool members or others
        await self.vmm.resume(runtime.vm)

    async def _personalize(self, sandbox: Sandbox, runtime: Runtime) -> PersonalizeReply:
        assert runtime.vm is not None
        return await guest_call(self.vmm, runtime.vm, "personalize", {
            "sandbox_id": sandbox.sandbox_id, "template_id": sandbox.template_id,
            "env_vars": sandbox.env_vars, "access_token": sandbox.envd_access_token,
            "hostname": sandbox.sandbox_id[:16], "clock_ns": time.time_ns(),
            "entropy": base64.b64encode(os.urandom(64)).decode(), "metadata": sandbox.metadata,
        }, PersonalizeReply, timeout=30.0)

    async def kill(self, team_id: str, sandbox_id: str) -> None:
        sb = self._record(sandbox_id, team_id)
        async with self._lock(sandbox_id):
            await self._destroy(sb, StopReason.KILLED)

    async def _destroy(self, sb: Sandbox, reason: StopReason, *, error: str | None = None) -> None:
        """Free everything a sandbox owns, record it as stopped, tell the plugins; idempotent.

        Stopped for a failure (``StopReason.ERROR``, e.g. a failed create or a guest that broke the
        control protocol) it is recorded in state ``error`` with ``error`` saying why, and later
        look-ups answer :class:`SandboxFailedError`; otherwise in state ``killed``."""
        errors = await self._release(sb)
        state = SandboxState.ERROR if reason == StopReason.ERROR else SandboxState.KILLED
        message = "; ".join(m for m in (error, *errors) if m) or sb.error
        final = sb.evolve(state=state, runtime={}, error=message[:2000] if message else None)
        self.store.put_sandbox(final)
        self._refresh_node()
        await self.host.hooks.sandbox_stopped(final, reason)

    def _refresh_node(self) -> Node:
        """Record this node with what its live sandboxes (warm-pool members included) reserve now
        (memory for every live one, vCPUs for those not paused) and
        its ready templates: recomputed from the records at start, when a template serves, before
        each placement and after each create and stop, so the scheduler (and a cluster reading the
        store) never sees stale usage."""
        mine = [s for s in self.store.list_sandboxes(states=LIVE_STATES) if s.node_id == self.settings.node_id]
        node = Node(node_id=self.settings.node_id, cpu_total=os.cpu_count() or 1,
                    memory_mb_total=total_memory_mb(),
                    cpu_used=sum(s.cpu_count for s in mine if s.state != SandboxState.PAUSED),
                    memory_mb_used=sum(s.memory_mb for s in mine), sandboxes=len(mine),
                    templates=tuple(t.template_id for t in self.store.list_templates()
                                    if t.status == TemplateStatus.READY))
        self.store.put_node(node)
        return node

    async def _fail(self, sandbox_id: str, exc: GuestProtocolError) -> None:
        """Stop a sandbox whose guest broke the protocol (caller holds its lock); record why."""
        sb = self.store.get_sandbox(sandbox_id)
        log.warning("stopping sandbox: its guest broke the control protocol", sandbox_id=sandbox_id,
                    error=str(exc))
        if sb is not None and sb.state in LIVE_STATES:
            await self._destroy(sb, StopReason.ERROR, error=_reason(exc))

    async def _free(self, sb: Sandbox) -> None:
        await self._release(sb)

    async def _release(self, sb: Sandbox) -> builtins.list[str]:
        """Shut the VM down, then free its network slot and disk; every step runs."""
        runtime = self._live.pop(sb.sandbox_id, None) or Runtime.load(sb.runtime)
        errors: builtins.list[str] = []
        # The VM goes first (it holds the tap and the disk open), then its slot and disk.
        if runtime.vm is not None:
            await self._step(sb, "vm", functools.partial(self.vmm.shutdown, runtime.vm), errors)
        if runtime.nic is not None:
            await self._step(sb, "nic", functools.partial(self.network.release, runtime.nic), errors)
        if runtime.disk is not None:
            await self._step(sb, "disk", functools.partial(self.storage.delete_disk, runtime.disk), errors)
        return errors

    @staticmethod
    async def _step(sb: Sandbox, step: str, action: Callable[[], Awaitable[None]],
                    errors: builtins.list[str]) -> None:
        try:
            await action()
        except Exception as exc:  # any failure of one step: the others still run (cancellation passes)
            errors.append(f"{step}: {_reason(exc)}")
            log.warning("cleanup step failed", sandbox_id=sb.sandbox_id, step=step, error=repr(exc))

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    def _runtime(self, sandbox_id: str) -> Runtime:
        runtime = self._live.get(sandbox_id)
        if runtime is None or runtime.vm is None:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return runtime

    async def set_timeout(self, team_id: str, sandbox_id: str, timeout_s: int) -> Sandbox:
        sb = self._record(sandbox_id, team_id)
        updated = sb.evolve(end_at=utcnow() + timedelta(seconds=timeout_s))
        self.store.put_sandbox(updated)
        return updated

    async def pause(self, team_id: str, sandbox_id: str) -> Sandbox:
        self._record(sandbox_id, team_id)
        async with self._lock(sandbox_id):
            return await self._pause(sandbox_id)

    @require(SandboxState.RUNNING)
    async def _pause(self, sandbox_id: str) -> Sandbox:
        sb = self._record(sandbox_id)
        if CAP_PAUSE not in self.vmm.capabilities:
            raise InvalidStateError(sandbox_id=sandbox_id, state=sb.state.value, required="pausable")
        await self.vmm.pause(self._runtime(sandbox_id).vm)  # type: ignore[arg-type]
        return self._move(sb, SandboxState.PAUSED)

    async def resume(self, team_id: str, sandbox_id: str, timeout_s: int | None = None) -> Sandbox:
        """Resume a paused sandbox (``POST /sandboxes/{id}/resume``)."""
        self._record(sandbox_id, team_id)
        async with self._lock(sandbox_id):
            return await self._resume(sandbox_id, timeout_s)

    @require(SandboxState.PAUSED)
    async def _resume(self, sandbox_id: str, timeout_s: int | None) -> Sandbox:
        sb = self._record(sandbox_id)
        vm = self._runtime(sandbox_id).vm
        assert vm is not None
        self.quotas.check_resume(sb.team_id)
        await self.vmm.resume(vm)
        await self._sync_clock(sandbox_id, vm)
        sb = self._move(sb, SandboxState.RUNNING)
        if timeout_s is not None:
            sb = sb.evolve(end_at=utcnow() + timedelta(seconds=timeout_s))
            self.store.put_sandbox(sb)
        return sb

    async def _sync_clock(self, sandbox_id: str, vm: VmHandle) -> None:
        """A stopped VM's clock stands still: after a resume, give the guest the time again. Best
        effort (the sandbox runs either way; its clock is only behind by the pause), except that a
        guest that breaks the protocol gets its sandbox stopped (:meth:`_fail`)."""
        try:
            reply = await guest_call(self.vmm, vm, "sync_clock", {"clock_ns": time.time_ns()}, SyncClockReply,
                                     timeout=5.0)
        except GuestProtocolError as exc:
            await self._fail(sandbox_id, exc)
            raise
        except CubeError as exc:
            log.warning("clock sync after resume failed", sandbox_id=sandbox_id, error=str(exc))
            return
        log.debug("clock synced after resume", sandbox_id=sandbox_id, behind_ms=reply.behind_ms)

    async def connect(self, team_id: str, sandbox_id: str, timeout_s: int | None = None) -> Sandbox:
        """Return a running sandbox, resuming it if paused; the deadline only moves later."""
        sb = self._record(sandbox_id, team_id)
        async with self._lock(sandbox_id):
            sb = self._record(sandbox_id, team_id)
            if sb.state == SandboxState.PAUSED:
                sb = await self._resume(sandbox_id, None)
            if timeout_s is not None:
                end = utcnow() + timedelta(seconds=timeout_s)
                if end > sb.end_at:
                    sb = sb.evolve(end_at=end)
                    self.store.put_sandbox(sb)
            return sb

    def _move(self, sb: Sandbox, target: SandboxState) -> Sandbox:
        check_transition(sb.sandbox_id, sb.state, target)
        moved = sb.evolve(state=target)
        self.store.put_sandbox(moved)
        return moved

    async def update_network(self, team_id: str, sandbox_id: str, policy: NetworkPolicy) -> Sandbox:
        sb = self._record(sandbox_id, team_id)
        runtime = self._runtime(sandbox_id)
        assert runtime.nic is not None
        self.quotas.check_policy(team_id, policy)
        rules = self.host.hooks.egress_rules(SandboxSpec(template_id=sb.template_id, team_id=team_id,
                                                         network=policy))
        await self.network.update_policy(runtime.nic, policy, rules)
        updated = sb.evolve(network=policy)
        self.store.put_sandbox(updated)
        return updated

    async def network_audit(self, team_id: str, sandbox_id: str, limit: int = 1000) -> builtins.list[dict[str, Any]]:
        self._record(sandbox_id, team_id)
        nic = self._runtime(sandbox_id).nic
        assert nic is not None
        return await self.network.audit(nic, limit=limit)

    def endpoint(self, sandbox_id: str, port: int) -> tuple[Sandbox, str, int]:
        """Where the edge proxy reaches ``port`` of a sandbox: (record, host, port)."""
        sb = self._record(sandbox_id)
        runtime = self._live.get(sandbox_id)
        if runtime is None or runtime.nic is None:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return sb, runtime.nic.guest_address, port

    async def exec(self, sandbox_id: str, cmd: builtins.list[str], timeout: float = 60.0) -> dict[str, Any]:
        """Run a command in the guest over the control channel (``cube sandbox exec``)."""
        self._record(sandbox_id)
        try:
            reply = await guest_call(self.vmm, self._runtime(sandbox_id).vm,  # type: ignore[arg-type]
                                     "exec", {"cmd": cmd}, ExecReply, timeout=timeout)
        except GuestProtocolError as exc:
            async with self._lock(sandbox_id):
                await self._fail(sandbox_id, exc)
            raise
        return reply.model_dump()

    # -- snapshots, fork, rollback ---------------------------------------------------------------

    async def snapshot(self, team_id: str, sandbox_id: str, *, name: str | None = None,
                       kind: str = "snapshot") -> SnapshotRef:
        """Save a running or paused sandbox (memory, devices, disk layer); it keeps its state."""
        self._record(sandbox_id, team_id)
        async with self._lock(sandbox_id):
            sb = self._record(sandbox_id, team_id)
            if sb.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
                raise InvalidStateError(sandbox_id=sandbox_id, state=sb.state.value, required="running or paused")
            if CAP_SNAPSHOT not in self.vmm.capabilities:
                raise UnsupportedOperation(driver=type(self.vmm).__name__, operation="snapshot")
            self.quotas.check_snapshot(team_id)
            runtime = self._runtime(sandbox_id)
            assert runtime.vm is not None and runtime.disk is not None
            snapshot_id = "snap" + ids.sandbox_id()[:16]
            was_running = sb.state == SandboxState.RUNNING
            if was_running:
                await self.vmm.pause(runtime.vm)
            try:
                state = await self.vmm.snapshot(runtime.vm, self.storage.snapshot_dir(snapshot_id))
                frozen = await self.storage.freeze_disk(runtime.disk, snapshot_id)
            except BaseException:
                await self.storage.delete_snapshot(snapshot_id)
                raise
            finally:
                if was_running:
                    await self.vmm.resume(runtime.vm)
            ref = SnapshotRef(snapshot_id=snapshot_id, template_id=sb.template_id, sandbox_id=sandbox_id,
                              parent_id=sb.runtime.get("parent_snapshot") or self._template_snapshot_id(sb),
                              team_id=team_id, vm_state=state.model_dump(mode="json"),
                              disk=frozen.model_dump(mode="json"), names=(name,) if name else (),
                              metadata={"kind": kind})
            self.store.put_snapshot(ref)
        await self.host.hooks.snapshot_taken(sb, ref)
        return ref

    def _template_snapshot_id(self, sb: Sandbox) -> str | None:
        template = self.store.get_template(sb.template_id)
        return template.snapshot.snapshot_id if template and template.snapshot else None

    def list_snapshots(self, team_id: str, sandbox_id: str | None = None) -> builtins.list[SnapshotRef]:
        return self.store.list_snapshots(team_id=team_id, sandbox_id=sandbox_id)

    def get_snapshot(self, team_id: str, snapshot_id: str) -> SnapshotRef:
        ref = self.store.get_snapshot(snapshot_id)
        if ref is None or ref.team_id != team_id:
            raise SnapshotNotFoundError(snapshot_id=snapshot_id)
        return ref

    def snapshot_bases(self) -> set[str]:
        """Snapshots whose files other snapshots need: a VMM may save a clone as the difference
        from the template snapshot it was restored from (``VmState.base_state_id``)."""
        return {str(s.vm_state["base_state_id"]) for s in self.store.list_snapshots()
                if s.vm_state.get("base_state_id")}

    async def delete_snapshot(self, team_id: str, snapshot_id: str) -> None:
        self.get_snapshot(team_id, snapshot_id)
        children = [s.snapshot_id for s in self.store.list_snapshots() if s.parent_id == snapshot_id]
        if children:
            raise SnapshotInUseError(snapshot_id=snapshot_id, detail=f"snapshots {', '.join(children)} build on it")
        self.store.delete_snapshot(snapshot_id)
        await self.storage.delete_snapshot(snapshot_id)  # keeps a disk layer live sandboxes still use

    async def fork(self, team_id: str, sandbox_id: str, count: int = 1,
                   timeout_s: int | None = None) -> builtins.list[Sandbox]:
        """``count`` independent copies of a sandbox as it is now, each with a fresh identity."""
        sb = self._record(sandbox_id, team_id)
        self.quotas.check_fork(team_id, count)
        ref = await self.snapshot(team_id, sandbox_id, kind="fork")
        spec = SandboxSpec(template_id=ref.snapshot_id, team_id=team_id, metadata=sb.metadata,
                           env_vars=sb.env_vars, auto_pause=sb.auto_pause, secure=sb.secure, network=sb.network,
                           timeout_s=timeout_s or max(1, int((sb.end_at - utcnow()).total_seconds())))
        return [await self.create(spec) for _ in range(count)]

    async def rollback(self, team_id: str, sandbox_id: str, snapshot_id: str) -> Sandbox:
        """Put a sandbox back to one of its snapshots: same id, token and deadline."""
        ref = self.get_snapshot(team_id, snapshot_id)
        if ref.sandbox_id != sandbox_id:
            raise SnapshotNotFoundError(snapshot_id=snapshot_id)
        async with self._lock(sandbox_id):
            sb = self._record(sandbox_id, team_id)
            old = self._runtime(sandbox_id)
            template = self.get_template(sb.template_id)
            fresh = Runtime(nic=old.nic)
            base = DiskHandle.model_validate(ref.disk)
            fresh.disk = await self.storage.create_disk(f"{sandbox_id}-r{ids.short_id('')[:6]}", base.path)
            state = VmState.model_validate(ref.vm_state)
            assert old.vm is not None
            await self.vmm.shutdown(old.vm)
            try:
                fresh.vm = await self.vmm.restore(state, state.clone_spec(
                    f"{sandbox_id}-r{ids.short_id('')[:6]}", fresh.disk, interpreter=template.interpreter), fresh.nic)
            except BaseException:
                await self.storage.delete_disk(fresh.disk)
                raise
            if old.disk is not None:
                await self.storage.delete_disk(old.disk)
            self._live[sandbox_id] = fresh
            sb = sb.evolve(runtime=fresh.dump())
            self.store.put_sandbox(sb)
            try:
                boot = await self._personalize(sb, fresh)
            except GuestProtocolError as exc:
                await self._fail(sandbox_id, exc)
                raise
            if sb.state == SandboxState.PAUSED:
                await self.vmm.pause(fresh.vm)
            sb = sb.evolve(runtime={**fresh.dump(), "parent_snapshot": snapshot_id}, boot_id=boot.boot_id)
            self.store.put_sandbox(sb)
        await self.host.hooks.sandbox_restored(sb, ref)
        return sb

    # -- timeouts -----------------------------------------------------------------------------

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                await self.reap_expired()
            except Exception:
                log.exception("timeout reaper failed")

    async def reap_expired(self) -> int:
        now = utcnow()
        expired = [s for s in self.store.list_sandboxes(states=(SandboxState.RUNNING,)) if s.end_at <= now]
        for sb in expired:
            await self._expire(sb)
        return len(expired)

    async def _expire(self, sb: Sandbox) -> None:
        async with self._lock(sb.sandbox_id):
            current = self.store.get_sandbox(sb.sandbox_id)
            if current is None or current.state != SandboxState.RUNNING:
                return
            if current.auto_pause and CAP_PAUSE in self.vmm.capabilities:
                await self._pause(sb.sandbox_id)
            else:
                await self._destroy(current, StopReason.TIMEOUT)


def _reason(exc: BaseException) -> str:
    """A short, log-safe description of why something failed."""
    text = exc.message if isinstance(exc, CubeError) else f"{type(exc).__name__}: {exc}"
    return text[:500]
