"""The node agent: everything that touches a VM, a tap or a disk on this machine.

It owns the slot drivers (vmm, network, storage), the warm pool, the template builder and the
live handles of the sandboxes it runs. It starts sandboxes (:meth:`NodeAgent.launch`: one launch
path for warm-pool members, snapshot restores and cold boots), personalizes them, and pauses,
resumes, snapshots, rolls back and stops them when the control plane asks (through a
:class:`~cube_core.nodeclient.NodeClient`). It decides nothing about teams, quotas or deadlines.

It reports itself (:meth:`report`) to the state store at start and every heartbeat; the control
plane places sandboxes from those records. After a restart it reconciles (:meth:`start`): the
sandboxes recorded on this node whose VMs are still alive are re-attached, the dead ones are
recorded as failed, and whatever is left of stopped ones is freed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import structlog

from cube_core._host import PluginHost
from cube_core.config import CoreSettings
from cube_core.errors import (
    CubeError,
    GuestProtocolError,
    InvalidStateError,
    SandboxNotFoundError,
    TemplateError,
    TemplateNotFoundError,
    UnsupportedOperation,
)
from cube_core.guest import guest_call
from cube_core.meminfo import total_memory_mb
from cube_core.models import (
    EgressRule,
    ExecReply,
    NetworkPolicy,
    Node,
    NodeStatus,
    PersonalizeReply,
    Sandbox,
    SandboxRuntime,
    SnapshotRef,
    StopReason,
    SyncClockReply,
    Template,
    TemplateStatus,
    VmSpec,
)
from cube_core.network import NetworkDriver
from cube_core.nodeclient import Launched, LaunchRequest, SavedSnapshot
from cube_core.pool import POOL_TEAM, WarmPool
from cube_core.state import SandboxState
from cube_core.storage import Progress, StorageDriver
from cube_core.store import StateStore
from cube_core.templates import TemplateBuilder
from cube_core.vmm import CAP_PAUSE, CAP_REATTACH, CAP_SNAPSHOT, VmmDriver

log = structlog.get_logger(__name__)

LIVE_STATES = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)
STOPPED_STATES = (SandboxState.KILLED, SandboxState.ERROR)


class NodeAgent:
    """The sandboxes of one node; see the module docstring."""

    def __init__(self, host: PluginHost, store: StateStore, *, url: str | None = None,
                 heartbeat_s: float = 2.0) -> None:
        self.host = host
        self.store = store
        self.settings: CoreSettings = host.config.data.core
        self.node_id = self.settings.node_id
        self.url = url
        self.heartbeat_s = heartbeat_s
        self.vmm: VmmDriver = host.hooks.vmm_driver()
        self.network: NetworkDriver = host.hooks.network_driver()
        self.storage: StorageDriver = host.hooks.storage_driver()
        self.templates = TemplateBuilder(store=store, storage=self.storage, vmm=self.vmm,
                                         network=self.network, kernel_setting=self.settings.kernel)
        self.pool = WarmPool(settings=self.settings.pool, store=store, vmm=self.vmm, network=self.network,
                             storage=self.storage, destroy=self._free, node_id=self.node_id,
                             warm_up=host.hooks.pool_member_warm_up)
        self._live: dict[str, SandboxRuntime] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._paused: set[str] = set()
        self._ready: dict[str, Template] = {}
        """Templates whose files are on this node, by id."""
        self._start_gate = asyncio.Semaphore(self.settings.max_parallel_starts)
        """FIFO: asyncio wakes a semaphore's waiters in the order they came."""
        self._heartbeat: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        """Set once a template serves on this node."""

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        for driver in (self.storage, self.network, self.vmm):
            await driver.start()
        for template in self.store.list_templates():
            if template.status == TemplateStatus.READY and TemplateBuilder.files_present(template):
                self._ready[template.template_id] = template
        await self._reconcile()
        await self.pool.start()
        for template in self._ready.values():
            self.pool.watch(template)
        self.beat()
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="cube-node-heartbeat")

    async def stop(self) -> None:
        if self._heartbeat:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await self.pool.stop()
        for driver in (self.vmm, self.network, self.storage):
            await driver.close()

    async def ensure_templates(self, names: Sequence[str],
                               lanes: Callable[[str], Progress] | None = None) -> None:
        """Build (or reuse) ``names`` at once: the kernel beside the first root filesystem, root
        filesystems one after the other in this order. :attr:`ready` is set as soon as the first
        template serves; the others keep building."""

        async def one(name: str) -> None:
            template = await self.templates.ensure(name, lanes(name) if lanes else None,
                                                   kernel_progress=kernel_lane)
            self.template_ready(template)
            log.info("template serving", template=name, node_id=self.node_id)

        kernel_lane = lanes("kernel") if lanes else None
        results = await asyncio.gather(*(one(name) for name in names), return_exceptions=True)
        failed = [(n, r) for n, r in zip(names, results, strict=True) if isinstance(r, BaseException)]
        for name, exc in failed:
            log.error("template build failed", template=name, error=str(exc))
        if failed:
            raise failed[0][1]

    def template_ready(self, template: Template) -> None:
        """``template`` serves on this node from now on (its pool fills)."""
        self._ready[template.template_id] = template
        self.pool.watch(template)
        self.ready.set()
        self.beat()

    def template_removed(self, template_id: str) -> None:
        self._ready.pop(template_id, None)
        self.beat()

    # -- the node's report -----------------------------------------------------------------------

    def report(self) -> Node:
        """This node as the scheduler sees it: what its live sandboxes (warm-pool members
        included) reserve (memory for every live one, vCPUs for those not paused), from the
        records, so a sandbox placed a moment ago counts already."""
        mine = [s for s in self.store.list_sandboxes(states=LIVE_STATES) if s.node_id == self.node_id]
        users = [s for s in mine if s.team_id != POOL_TEAM]
        try:
            disk_free = shutil.disk_usage(self.settings.state_dir).free >> 20
        except OSError:
            disk_free = 0
        return Node(node_id=self.node_id, url=self.url, cpu_total=os.cpu_count() or 1,
                    memory_mb_total=total_memory_mb(),
                    cpu_used=sum(s.cpu_count for s in mine if s.state != SandboxState.PAUSED),
                    memory_mb_used=sum(s.memory_mb for s in mine), sandboxes=len(users),
                    sandboxes_paused=sum(1 for s in users if s.state == SandboxState.PAUSED),
                    pool=self.pool.sizes(), templates=tuple(sorted(self._ready)), disk_free_mb=disk_free,
                    isolation=self.vmm.isolation)

    def beat(self) -> Node:
        """Write this node's report to the store (registration and heartbeat). A node marked
        draining stays draining; one marked down is up again (it is alive)."""
        node = self.report()
        current = next((n for n in self.store.list_nodes() if n.node_id == self.node_id), None)
        if current is not None and current.status == NodeStatus.DRAINING:
            node = node.evolve(status=NodeStatus.DRAINING)
        self.store.put_node(node)
        return node

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                self.beat()
            except Exception:
                log.exception("heartbeat failed", node_id=self.node_id)

    # -- reconcile after a restart ---------------------------------------------------------------

    async def _reconcile(self) -> None:
        """Re-attach to the VMs of sandboxes recorded live on this node; record the lost as
        failed; free what is left of sandboxes stopped while this agent was away."""
        for sb in self.store.list_sandboxes():
            if sb.node_id != self.node_id or sb.team_id == POOL_TEAM:
                continue
            if sb.state in STOPPED_STATES:
                if sb.runtime != SandboxRuntime():  # stopped while this node was down
                    await self.destroy(sb)
                    self.store.put_sandbox(sb.evolve(runtime=SandboxRuntime()))
                continue
            runtime = sb.runtime
            alive = False
            if runtime.vm is not None and CAP_REATTACH in self.vmm.capabilities:
                try:
                    runtime = runtime.model_copy(update={"vm": await self.vmm.reattach(runtime.vm)})
                    alive = True
                except CubeError as exc:
                    log.warning("cannot re-attach sandbox", sandbox_id=sb.sandbox_id, error=str(exc))
            elif runtime.vm is not None:
                alive = await self.vmm.is_alive(runtime.vm)
            self._live[sb.sandbox_id] = runtime
            if sb.state == SandboxState.PAUSED:
                self._paused.add(sb.sandbox_id)
            if not alive or sb.state == SandboxState.CREATING:
                errors = await self.destroy(sb)
                why = ("its VM was lost while the node agent was down" if not alive
                       else "the node agent stopped while it was being created")
                self.store.put_sandbox(sb.evolve(state=SandboxState.ERROR, runtime=SandboxRuntime(),
                                                 error="; ".join([why, *errors])[:2000]))
                await self.host.hooks.sandbox_stopped(sb, StopReason.ERROR)
        live = [s.runtime for s in self.store.list_sandboxes(states=LIVE_STATES)
                if s.node_id == self.node_id and s.team_id != POOL_TEAM]
        await self.network.sweep({r.nic.slot_id for r in live if r.nic})
        await self.storage.gc({r.disk.disk_id for r in live if r.disk}, self._kept_snapshots())

    def _kept_snapshots(self) -> set[str]:
        snaps = self.store.list_snapshots()
        return ({s.snapshot_id for s in snaps} | {s.base_state_id for s in snaps if s.base_state_id}
                | {t.snapshot.snapshot_id for t in self.store.list_templates() if t.snapshot})

    # -- launch ----------------------------------------------------------------------------------

    def local_template(self, template_id: str) -> Template:
        template = self._ready.get(template_id)
        if template is None:
            raise TemplateNotFoundError(template=template_id)
        return template

    async def launch(self, request: LaunchRequest) -> Launched:
        sandbox, snapshot = request.sandbox, request.snapshot
        template = self.local_template(sandbox.template_id)
        started = time.perf_counter()
        member = self.pool.take(template.template_id) if self.pool.enabled and snapshot is None else None
        runtime = member.runtime if member is not None else SandboxRuntime()
        self._live[sandbox.sandbox_id] = runtime
        try:
            async with self._start_gate if member is None else contextlib.nullcontext():
                vm_started = time.perf_counter()
                if member is not None:
                    await self._adopt(sandbox, runtime, request.rules)
                else:
                    runtime = await self._start_vm(sandbox, template, snapshot, request.rules)
                personalize_started = time.perf_counter()
                boot = await self._personalize(sandbox, runtime)
                done = time.perf_counter()
        except BaseException:
            await self.destroy(sandbox)
            raise
        if snapshot is not None:
            runtime = runtime.evolve(parent_snapshot=snapshot.snapshot_id)
        self._live[sandbox.sandbox_id] = runtime
        timings = {"queued": (vm_started - started) * 1000, "vm": (personalize_started - vm_started) * 1000,
                   "personalize": (done - personalize_started) * 1000,
                   **{f"guest_{k}": v for k, v in boot.timings_ms.items()}}
        return Launched(runtime=runtime, boot_id=boot.boot_id, served_by="pool" if member else "start",
                        timings_ms={k: round(v, 1) for k, v in timings.items()})

    async def _start_vm(self, sandbox: Sandbox, template: Template, snapshot: SnapshotRef | None,
                        rules: Sequence[EgressRule]) -> SandboxRuntime:
        """A pool miss: a network slot, a disk, then a restore of ``snapshot`` or the template's
        snapshot (or a cold boot of the template image); ``_live`` follows each step so a failure
        frees what exists."""
        sid = sandbox.sandbox_id
        nic = await self.network.allocate(sid, sandbox.network, list(rules))
        self._live[sid] = runtime = SandboxRuntime(nic=nic)
        snap = snapshot or template.snapshot
        if snap is not None and snap.vm_state is not None and snap.disk is not None and CAP_SNAPSHOT in \
                self.vmm.capabilities and (snapshot is not None or self.settings.boot_mode == "snapshot"):
            disk = await self.storage.create_disk(sid, snap.disk.path)
            self._live[sid] = runtime = runtime.evolve(disk=disk)
            spec = snap.vm_state.clone_spec(sid, disk, interpreter=template.interpreter)
            vm = await self.vmm.restore(snap.vm_state, spec, nic)
            self._live[sid] = runtime = runtime.evolve(vm=vm)
            return runtime
        if template.rootfs is None or template.kernel is None:
            raise TemplateError(f"template {template.template_id!r} has no image")
        disk = await self.storage.create_disk(sid, Path(template.rootfs))
        self._live[sid] = runtime = runtime.evolve(disk=disk)
        vm_spec = VmSpec(vm_id=sid, kernel=Path(template.kernel),
                         initrd=Path(template.initrd) if template.initrd else None, rootfs_disk=disk,
                         memory_mb=template.memory_mb, interpreter=template.interpreter)
        vm = await self.vmm.boot(vm_spec, nic)
        self._live[sid] = runtime = runtime.evolve(vm=vm)
        await self.vmm.wait_ready(vm, timeout=300.0)
        return runtime

    async def _adopt(self, sandbox: Sandbox, runtime: SandboxRuntime, rules: Sequence[EgressRule]) -> None:
        """Make a warm-pool member this sandbox's: its egress policy, then let it run."""
        assert runtime.vm is not None and runtime.nic is not None
        try:
            await self.network.update_policy(runtime.nic, sandbox.network, list(rules))
        except UnsupportedOperation:
            pass  # this network driver applies no policy at all, for pool members or others
        await self.vmm.resume(runtime.vm)

    async def _personalize(self, sandbox: Sandbox, runtime: SandboxRuntime) -> PersonalizeReply:
        assert runtime.vm is not None
        return await guest_call(self.vmm, runtime.vm, "personalize", {
            "sandbox_id": sandbox.sandbox_id, "template_id": sandbox.template_id,
            "env_vars": sandbox.env_vars, "access_token": sandbox.envd_access_token,
            "hostname": sandbox.sandbox_id[:16], "clock_ns": time.time_ns(),
            "entropy": base64.b64encode(os.urandom(64)).decode(), "metadata": sandbox.metadata,
        }, PersonalizeReply, timeout=30.0)

    # -- stop ------------------------------------------------------------------------------------

    async def destroy(self, sandbox: Sandbox) -> list[str]:
        """Shut the VM down, then free its network slot and disk; every step runs. Uses the
        live handles, or the record's after a restart."""
        runtime = self._live.pop(sandbox.sandbox_id, None) or sandbox.runtime
        self._locks.pop(sandbox.sandbox_id, None)
        self._paused.discard(sandbox.sandbox_id)
        errors: list[str] = []
        # The VM goes first (it holds the tap and the disk open), then its slot and disk.
        if runtime.vm is not None:
            await _step(sandbox, "vm", functools.partial(self.vmm.shutdown, runtime.vm), errors)
        if runtime.nic is not None:
            await _step(sandbox, "nic", functools.partial(self.network.release, runtime.nic), errors)
        if runtime.disk is not None:
            await _step(sandbox, "disk", functools.partial(self.storage.delete_disk, runtime.disk), errors)
        return errors

    async def _free(self, sandbox: Sandbox) -> None:
        await self.destroy(sandbox)

    # -- changes to a live sandbox ---------------------------------------------------------------

    def _runtime(self, sandbox_id: str) -> SandboxRuntime:
        runtime = self._live.get(sandbox_id)
        if runtime is None or runtime.vm is None:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return runtime

    def guest_address(self, sandbox_id: str) -> str:
        runtime = self._live.get(sandbox_id)
        if runtime is None or runtime.nic is None:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return runtime.nic.guest_address

    async def pause(self, sandbox_id: str) -> None:
        runtime = self._runtime(sandbox_id)
        if CAP_PAUSE not in self.vmm.capabilities:
            raise InvalidStateError(sandbox_id=sandbox_id, state="running", required="pausable")
        assert runtime.vm is not None
        await self.vmm.pause(runtime.vm)
        self._paused.add(sandbox_id)

    async def resume(self, sandbox_id: str) -> None:
        """Resume, then give the guest the time again: best effort (the sandbox runs either way;
        its clock is only behind by the pause), except that a guest that breaks the protocol
        raises :class:`GuestProtocolError` (the control plane stops it)."""
        vm = self._runtime(sandbox_id).vm
        assert vm is not None
        await self.vmm.resume(vm)
        self._paused.discard(sandbox_id)
        try:
            reply = await guest_call(self.vmm, vm, "sync_clock", {"clock_ns": time.time_ns()}, SyncClockReply,
                                     timeout=5.0)
        except GuestProtocolError:
            raise
        except CubeError as exc:
            log.warning("clock sync after resume failed", sandbox_id=sandbox_id, error=str(exc))
            return
        log.debug("clock synced after resume", sandbox_id=sandbox_id, behind_ms=reply.behind_ms)

    async def update_policy(self, sandbox_id: str, policy: NetworkPolicy, rules: Sequence[EgressRule]) -> None:
        nic = self._runtime(sandbox_id).nic
        assert nic is not None
        await self.network.update_policy(nic, policy, list(rules))

    async def audit(self, sandbox_id: str, limit: int) -> list[dict[str, object]]:
        nic = self._runtime(sandbox_id).nic
        assert nic is not None
        return list(await self.network.audit(nic, limit=limit))

    async def exec(self, sandbox_id: str, cmd: Sequence[str], timeout: float) -> ExecReply:
        vm = self._runtime(sandbox_id).vm
        assert vm is not None
        return await guest_call(self.vmm, vm, "exec", {"cmd": list(cmd)}, ExecReply, timeout=timeout)

    # -- snapshots -------------------------------------------------------------------------------

    async def snapshot(self, sandbox_id: str, snapshot_id: str) -> SavedSnapshot:
        """Save a sandbox; a running one is paused for it and resumed after (a paused one stays)."""
        if CAP_SNAPSHOT not in self.vmm.capabilities:
            raise UnsupportedOperation(driver=type(self.vmm).__name__, operation="snapshot")
        async with self._lock(sandbox_id):
            runtime = self._runtime(sandbox_id)
            assert runtime.vm is not None and runtime.disk is not None
            was_running = sandbox_id not in self._paused
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
        return SavedSnapshot(vm_state=state, disk=frozen)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self.storage.delete_snapshot(snapshot_id)  # keeps a disk layer live sandboxes still use

    async def rollback(self, sandbox: Sandbox, snapshot: SnapshotRef, *, paused: bool) -> Launched:
        """The sandbox's VM and disk become a restore of ``snapshot``; its network slot stays."""
        sid = sandbox.sandbox_id
        if snapshot.vm_state is None or snapshot.disk is None:
            raise UnsupportedOperation(driver=type(self.vmm).__name__, operation="rollback to a snapshot without files")
        template = self.local_template(sandbox.template_id)
        async with self._lock(sid):
            old = self._runtime(sid)
            suffix = f"{sid}-r{os.urandom(3).hex()}"
            disk = await self.storage.create_disk(suffix, snapshot.disk.path)
            assert old.vm is not None
            await self.vmm.shutdown(old.vm)
            try:
                vm = await self.vmm.restore(snapshot.vm_state, snapshot.vm_state.clone_spec(
                    suffix, disk, interpreter=template.interpreter), old.nic)
            except BaseException:
                await self.storage.delete_disk(disk)
                self._live[sid] = old.evolve(vm=None)
                raise
            if old.disk is not None:
                await self.storage.delete_disk(old.disk)
            fresh = SandboxRuntime(vm=vm, disk=disk, nic=old.nic, parent_snapshot=snapshot.snapshot_id)
            self._live[sid] = fresh
            boot = await self._personalize(sandbox, fresh)
            if paused:
                await self.vmm.pause(vm)
                self._paused.add(sid)
        return Launched(runtime=fresh, boot_id=boot.boot_id, served_by="start")

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())


async def _step(sb: Sandbox, step: str, action: Callable[[], Awaitable[None]], errors: list[str]) -> None:
    try:
        await action()
    except Exception as exc:  # any failure of one step: the others still run (cancellation passes)
        errors.append(f"{step}: {reason(exc)}")
        log.warning("cleanup step failed", sandbox_id=sb.sandbox_id, step=step, error=repr(exc))


def reason(exc: BaseException) -> str:
    """A short, log-safe description of why something failed."""
    text = exc.message if isinstance(exc, CubeError) else f"{type(exc).__name__}: {exc}"
    return text[:500]
