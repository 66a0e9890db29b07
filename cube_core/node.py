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
import contextlib
import functools
import os
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path

import structlog

from cube_core import telemetry
from cube_core._host import PluginHost
from cube_core.config import CoreSettings
from cube_core.credentials import CredentialNotFoundError, SecretLookupUnavailableError
from cube_core.errors import (
    ConfigError,
    CubeError,
    GuestProtocolError,
    InvalidStateError,
    NodeError,
    SandboxFailedError,
    SandboxNotFoundError,
    SnapshotNotFoundError,
    TemplateError,
    TemplateNotFoundError,
    UnsupportedOperation,
)
from cube_core.events import EventBus
from cube_core.guest import guest_call, personalize_params
from cube_core.log import bind_ids, with_ids
from cube_core.meminfo import available_memory_mb, total_memory_mb
from cube_core.models import (
    DiskHandle,
    EgressRule,
    ExecReply,
    NetworkPolicy,
    Node,
    NodeStatus,
    PersonalizeReply,
    Sandbox,
    SandboxRuntime,
    SandboxSpec,
    SnapshotRef,
    StopReason,
    SyncClockReply,
    Template,
    TemplateStatus,
    VmSpec,
)
from cube_core.network import CAP_HTTP_RULES, NetworkDriver
from cube_core.nodeclient import Launched, LaunchRequest, SavedSnapshot
from cube_core.nodehttp import HttpNodeClient
from cube_core.nodesecrets import SecretLookup
from cube_core.pool import DEFAULT_POLICY, POOL_TEAM, WarmPool
from cube_core.sampling import attach as start_sampling
from cube_core.sampling import detach as stop_sampling
from cube_core.snapshotfiles import NAME_RE, ExportedFile, Received, SnapshotExport, content_key, key_name, stream
from cube_core.state import SandboxState
from cube_core.storage import Progress, StorageDriver
from cube_core.store import StateStore
from cube_core.templates import TemplateBuilder
from cube_core.vmm import CAP_PAUSE, CAP_PRIORITY, CAP_REATTACH, CAP_SNAPSHOT, VmmDriver
from cube_core.volumes import VolumeAnswer, VolumeCall, run_call

log = structlog.get_logger(__name__)

LIVE_STATES = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)
STOPPED_STATES = (SandboxState.KILLED, SandboxState.ERROR)
APPLY_TIMEOUT_S = 30.0
"""How long a sandbox taken from the pool (identity at join) has to apply its create message; a
guest that has not by then is failed, and its first request answers so."""


class NodeAgent:
    """The sandboxes of one node; see the module docstring."""

    def __init__(self, host: PluginHost, store: StateStore, *, url: str | None = None,
                 heartbeat_s: float = 2.0, token: str | None = None, events: EventBus | None = None,
                 secrets: SecretLookup | None = None) -> None:
        self.host = host
        self._owns_events = events is None
        self.events = events or EventBus(store.event_channel())
        """Where this node publishes (sandboxes it stopped itself, its status, template builds):
        the control plane's bus in ``cube serve``; its own, on the store's channel, in ``cube node``."""
        self.token = token
        """The cluster token, to fetch snapshot files from other nodes (``node_app`` sets it)."""
        self.store = store
        self.settings: CoreSettings = host.config.data.core
        self.node_id = self.settings.node_id
        self.url = url
        self.heartbeat_s = heartbeat_s
        self.vmm: VmmDriver = host.hooks.vmm_driver()
        self.network: NetworkDriver = host.hooks.network_driver()
        self.storage: StorageDriver = host.hooks.storage_driver()
        self.secrets: SecretLookup | None = secrets
        """Where the ``${e2b.secrets.<name>}`` placeholders of network rules are read, per request
        (:mod:`cube_core.nodesecrets`): the control plane, in process or over HTTP. ``None``:
        they do not resolve here."""
        self.network.use_secrets(self._slot_secret)
        self.templates = TemplateBuilder(store=store, storage=self.storage, vmm=self.vmm,
                                         network=self.network, kernel_setting=self.settings.kernel)
        self.pool = WarmPool(settings=self.settings.pool, store=store, vmm=self.vmm, network=self.network,
                             storage=self.storage, destroy=self._free, node_id=self.node_id,
                             warm_up=host.hooks.pool_member_warm_up)
        self._live: dict[str, SandboxRuntime] = {}
        self.memory_probe: Callable[[], int] = available_memory_mb
        """The host's available memory in MiB, for the report (tests replace it)."""
        self._locks: dict[str, asyncio.Lock] = {}
        self._paused: set[str] = set()
        self._starting: dict[str, asyncio.Task[None]] = {}
        """Sandboxes taken from the pool whose start runs after the create answered: the resume,
        then the create message (clock, env vars). Every operation on such a sandbox waits for
        it (:meth:`_held`, :meth:`settled`); the edge holds its traffic until the guest applied
        the message (:meth:`until_applied`); a kill ends it first."""
        self._ready: dict[str, Template] = {}
        """Templates whose files are on this node, by id."""
        self._start_gate = asyncio.Semaphore(self.settings.max_parallel_starts)
        """FIFO: asyncio wakes a semaphore's waiters in the order they came."""
        self._heartbeat: asyncio.Task[None] | None = None
        self.ready = asyncio.Event()
        """Set once a template serves on this node."""
        self._replicas: dict[str, SnapshotRef] = {}
        """Snapshots of other nodes copied here, by id, with this node's paths."""
        self._imports: dict[str, asyncio.Lock] = {}
        self.copied = Received(snapshot_id="")
        """Totals of every import since start (``files``, ``bytes``, ``seconds``)."""

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._owns_events:
            await self.events.start()
        for driver in (self.storage, self.network, self.vmm):
            await driver.start()
        for template in self.store.list_templates():
            if template.status == TemplateStatus.READY and TemplateBuilder.files_present(template):
                self._ready[template.template_id] = template
        self._load_replicas()
        await self._reconcile()
        await self.pool.start()
        for template in self._ready.values():
            self.pool.watch(template)
        self.beat()
        self._heartbeat = asyncio.create_task(self._beat_forever(), name="cube-node-heartbeat")
        start_sampling(self)  # metrics samples and log entries of the running sandboxes

    async def stop(self) -> None:
        starting = [task for task in self._starting.values() if not task.done()]
        if starting:  # the VMs outlive this agent: none is left paused half-way through its start
            await asyncio.wait(starting, timeout=APPLY_TIMEOUT_S + 5.0)
        if self._heartbeat:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        await stop_sampling(self)
        await self.pool.stop()
        for driver in (self.vmm, self.network, self.storage):
            await driver.close()
        if self._owns_events:
            await self.events.stop()

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

    async def remove_template(self, template: Template) -> list[str]:
        """``template`` was deleted: it stops serving here, its warm members go, and its snapshot
        and the build layers only it used are freed. The snapshot ids deleted."""
        from cube_core.builds import engine_of

        self.template_removed(template.template_id)
        drained = await self.pool.drain(template.template_id, forget=True)
        deleted = []
        if template.snapshot is not None and template.snapshot.snapshot_id not in self._kept_snapshots():
            await self.storage.delete_snapshot(template.snapshot.snapshot_id)
            deleted.append(template.snapshot.snapshot_id)
        deleted += await engine_of(self).forget(template.template_id)
        log.info("template removed", template_id=template.template_id, node_id=self.node_id,
                 pool_members=drained, deleted=deleted)
        return deleted

    async def free_build(self, build_id: str, snapshot: SnapshotRef | None) -> list[str]:
        """The template build ``build_id`` was freed (``TemplateBuilds.release``): its snapshot
        goes if it is here (this node made it, or holds a copy: then with the build layers copied
        in under the copy), and so do the build layers only that build used. The snapshot ids
        deleted."""
        from cube_core.builds import engine_of

        deleted = []
        if snapshot is not None and (snapshot.node_id == self.node_id or snapshot.snapshot_id in self._replicas):
            copied = self._copied_build_layers(snapshot.snapshot_id)
            await self.delete_snapshot(snapshot.snapshot_id)
            deleted.append(snapshot.snapshot_id)
            for layer in copied:  # the storage keeps one another copy is still layered on
                await self.storage.delete_snapshot(layer)
                deleted.append(layer)
        deleted += await engine_of(self).free_build(build_id)
        if deleted:
            log.info("template build freed", build_id=build_id, node_id=self.node_id, deleted=deleted)
        return deleted

    def _copied_build_layers(self, snapshot_id: str) -> list[str]:
        """The build layers (``blayer-*``) right under this node's copy of ``snapshot_id``, top
        first: copied in with it (a build that started from a cached layer is layered on it)."""
        replica = self._replicas.get(snapshot_id)
        if replica is None or replica.disk is None:
            return []
        try:
            chain = self.storage.layer_files(replica.disk)
        except CubeError as exc:
            log.warning("cannot read the layers of a snapshot copy", snapshot_id=snapshot_id, error=exc.message)
            return []
        layers = []
        for item in chain[1:]:
            sid = (item.key or "").removeprefix("layer:")
            if not (item.key or "").startswith("layer:blayer-"):
                break
            layers.append(sid)
        return layers

    # -- the node's report -----------------------------------------------------------------------

    def report(self) -> Node:
        """This node as the scheduler sees it: what its live sandboxes (warm-pool members
        included) reserve (memory for every live one but those paused to disk, vCPUs for those
        not paused), from the
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
                    memory_mb_used=sum(s.memory_mb for s in mine if not s.runtime.without_vm), sandboxes=len(users),
                    sandboxes_paused=sum(1 for s in users if s.state == SandboxState.PAUSED),
                    pool=self.pool.sizes(), templates=tuple(sorted(set(self._ready) - set(self._stale_templates()))),
                    disk_free_mb=disk_free,
                    memory_mb_available=self.memory_probe(),
                    isolation=self.vmm.isolation, snapshots=tuple(sorted(self._replicas)))

    def beat(self) -> Node:
        """Write this node's report to the store (registration and heartbeat). A node marked
        draining stays draining; one marked down is up again (it is alive)."""
        node = self.report()
        current = next((n for n in self.store.list_nodes() if n.node_id == self.node_id), None)
        if current is not None and current.status == NodeStatus.DRAINING:
            node = node.evolve(status=NodeStatus.DRAINING)
        self.store.put_node(node)
        if current is None or current.status == NodeStatus.DOWN:
            self.events.emit("node.up", node_id=self.node_id, isolation=node.isolation,
                             previous=current.status.value if current else None)
        return node

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                await self._drop_stale()
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
            if runtime.without_vm:  # paused with no VM (written out, or filesystem only): its files must be here
                assert runtime.disk is not None
                files = [runtime.disk.path]
                if runtime.saved is not None:
                    files += [runtime.saved.memory_file, runtime.saved.device_state]
                alive = sb.state == SandboxState.PAUSED and all(p.exists() for p in files)
                if alive:
                    try:
                        runtime = await self._recreate_slot(sb, runtime)
                    except CubeError as exc:
                        log.warning("cannot re-create the network slot of a sandbox on disk",
                                    sandbox_id=sb.sandbox_id, error=str(exc))
                        alive = False
                    if alive and runtime != sb.runtime:
                        self.store.put_sandbox(sb.evolve(runtime=runtime))
            elif runtime.vm is not None and CAP_REATTACH in self.vmm.capabilities:
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
                failed = sb.evolve(state=SandboxState.ERROR, runtime=SandboxRuntime(),
                                   error="; ".join([why, *errors])[:2000])
                self.store.put_sandbox(failed)
                await self.host.hooks.sandbox_stopped(sb, StopReason.ERROR)
                self._stopped(failed)
        live = [s.runtime for s in self.store.list_sandboxes(states=LIVE_STATES)
                if s.node_id == self.node_id and s.team_id != POOL_TEAM]
        await self.network.sweep({r.nic.slot_id for r in live if r.nic})
        kept = self._kept_snapshots()
        for gone in [r for r in self._replicas if r not in kept]:  # deleted while this node was away
            self._forget_replica(gone)
        await self.storage.gc({r.disk.disk_id for r in live if r.disk}, kept)

    async def _recreate_slot(self, sb: Sandbox, runtime: SandboxRuntime) -> SandboxRuntime:
        """The network slot of a sandbox without a VM, built again if a host reboot removed it
        (same address, the sandbox's egress policy), so that it can be restored into it."""
        if runtime.nic is None:
            return runtime
        rules = self.host.hooks.egress_rules(SandboxSpec(template_id=sb.template_id, team_id=sb.team_id,
                                                         network=sb.network))
        try:
            nic = await self.network.recreate(runtime.nic, sb.network, rules)
        except UnsupportedOperation:
            return runtime  # a driver whose slots outlive a reboot, or none at all
        return runtime.evolve(nic=nic)

    def _kept_snapshots(self) -> set[str]:
        snaps = self.store.list_snapshots()
        saved = {s.runtime.saved.state_id for s in self.store.list_sandboxes(states=LIVE_STATES)
                 if s.runtime.saved is not None and s.node_id == self.node_id}
        return (saved | {s.snapshot_id for s in snaps} | {s.base_state_id for s in snaps if s.base_state_id}
                | {t.snapshot.snapshot_id for t in self.store.list_templates() if t.snapshot}
                | {t.snapshot.snapshot_id for t in self._ready.values() if t.snapshot}
                | set(self._build_snapshots()))

    def _build_snapshots(self) -> dict[str, SnapshotRef]:
        """The snapshots of team template builds not freed yet (a tag names them, or something
        still uses them; ``TemplateBuilds.release``), by id."""
        return {b.snapshot.snapshot_id: b.snapshot for t in self.store.list_templates() if t.team_id is not None
                for b in self.store.list_builds(t.template_id) if b.snapshot is not None}

    # -- launch ----------------------------------------------------------------------------------

    def local_template(self, template_id: str, *, any_build: bool = False) -> Template:
        """The template as it serves here; ``any_build``: a restore of a given snapshot (a sandbox
        snapshot's, an older build's) needs only the template's record, served here or not."""
        template = self._ready.get(template_id)
        if template is None and any_build:
            template = self.store.get_template(template_id)
        if template is None:
            raise TemplateNotFoundError(template=template_id)
        return template

    def _stale_templates(self) -> list[str]:
        """Team templates served here from a build that is no longer their newest: rebuilt on
        another node (this one still holds the older build's files, for its tags)."""
        stale = []
        for template_id, template in self._ready.items():
            if template.team_id is None:
                continue
            record = self.store.get_template(template_id)
            if record is None or record.build_id != template.build_id:
                stale.append(template_id)
        return stale

    async def _drop_stale(self) -> None:
        for template_id in self._stale_templates():
            self._ready.pop(template_id, None)
            drained = await self.pool.drain(template_id, forget=True)
            log.info("template rebuilt elsewhere: no longer served here", template_id=template_id,
                     node_id=self.node_id, pool_members=drained)

    @with_ids
    async def launch(self, request: LaunchRequest) -> Launched:
        # a background refill waits for the creates being served
        sb = request.sandbox
        with self.pool.serving(), telemetry.span("node.launch", sandbox_id=sb.sandbox_id, node_id=self.node_id,
                                                 template_id=sb.template_id) as launching:
            launched = await self._launch(request)
            if launching is not None:
                launching.set_attributes({"cube.served_by": launched.served_by,
                                          "cube.sandbox_id": launched.sandbox_id or sb.sandbox_id})
            log.debug("launched", sandbox_id=launched.sandbox_id, served_by=launched.served_by,
                      ms=launched.timings_ms)
            return launched

    async def _launch(self, request: LaunchRequest) -> Launched:
        sandbox, snapshot = request.sandbox, self._here(request.snapshot)
        self._check_rules(sandbox.network)
        template = self.local_template(sandbox.template_id, any_build=snapshot is not None)
        started = time.perf_counter()
        # a sandbox that mounts volumes is restored with them in its volume slots: never a member
        member = self.pool.take(template.template_id) if self.pool.enabled and snapshot is None \
            and not sandbox.volume_mounts else None
        joined = member is not None and member.boot_id is not None and member.envd_access_token is not None
        if member is not None and joined:  # personalized at pool join: its id and token are the sandbox's
            sandbox = sandbox.evolve(sandbox_id=member.sandbox_id,
                                     envd_access_token=member.envd_access_token if sandbox.secure else None)
            bind_ids(sandbox_id=sandbox.sandbox_id)
        runtime = member.runtime if member is not None else SandboxRuntime()
        self._live[sandbox.sandbox_id] = runtime
        boot_id, guest_ms = member.boot_id if member is not None else None, {}
        try:
            async with self._start_gate if member is None else contextlib.nullcontext():
                vm_started = time.perf_counter()
                if member is not None:
                    await self._adopt(sandbox, runtime, request.rules)
                    if not joined:  # else its start does (after the answer)
                        await self._let_run(runtime)
                else:
                    runtime = await self._start_vm(sandbox, template, snapshot, request.rules)
                personalize_started = time.perf_counter()
                if joined:
                    self._start_after_answer(sandbox, runtime)
                else:
                    boot = await self._personalize(sandbox, runtime)
                    boot_id, guest_ms = boot.boot_id, boot.timings_ms
                if sandbox.volume_mounts:
                    await self._mount_volumes(sandbox, runtime)
                done = time.perf_counter()
        except BaseException:
            await self.destroy(sandbox)
            raise
        self._live[sandbox.sandbox_id] = runtime
        timings = {"queued": (vm_started - started) * 1000, "vm": (personalize_started - vm_started) * 1000,
                   "apply_sent" if joined else "personalize": (done - personalize_started) * 1000,
                   **{f"guest_{k}": v for k, v in guest_ms.items()}}
        assert boot_id is not None
        return Launched(runtime=runtime, boot_id=boot_id, served_by="pool" if member else "start",
                        sandbox_id=sandbox.sandbox_id, envd_access_token=sandbox.envd_access_token,
                        timings_ms={k: round(v, 1) for k, v in timings.items()})

    def _start_after_answer(self, sandbox: Sandbox, runtime: SandboxRuntime) -> None:
        """Start a member personalized at join as ``sandbox`` after the create answered: let it
        run again (its CPU priority, QMP ``cont``: not on the create's path), then send
        what depends on the request (the clock, the env vars, whether it keeps its access token).
        Every operation on the sandbox orders after this start (:meth:`_held`), its first request
        after the guest applied the message (:meth:`until_applied`). A guest that fails either is
        failed: its VM stopped, its record ``error``."""
        assert runtime.vm is not None
        sid = sandbox.sandbox_id
        params = {"clock_ns": time.time_ns(), "env_vars": sandbox.env_vars,
                  "keep_token": sandbox.envd_access_token is not None}

        async def start() -> None:
            began = time.perf_counter()
            try:
                with self.pool.serving():  # a background refill still yields to this create
                    await starting(began)
            except CubeError as exc:
                log.warning("sandbox failed to start", sandbox_id=sid, error=str(exc))
                await self._fail_unapplied(sandbox, exc)
                raise

        async def starting(began: float) -> None:
            await self._let_run(runtime)
            params["clock_ns"] = time.time_ns()
            sent = time.perf_counter()
            assert runtime.vm is not None
            reply = await guest_call(self.vmm, runtime.vm, "apply", params, PersonalizeReply, timeout=APPLY_TIMEOUT_S)
            log.info("create message applied", sandbox_id=sid, ms=round((time.perf_counter() - sent) * 1000, 1),
                     resume_ms=round((sent - began) * 1000, 1),
                     guest_ms=reply.timings_ms.get("apply"))

        def finished(task: asyncio.Task[None]) -> None:
            if not task.cancelled() and task.exception() is None and self._starting.get(sid) is task:
                del self._starting[sid]  # started: nothing to wait for any more
            # a failed start stays, so that its first request answers why (read there, or here)

        task = asyncio.create_task(start(), name=f"cube-start-{sid}")
        task.add_done_callback(finished)
        self._starting[sid] = task

    async def _fail_unapplied(self, sandbox: Sandbox, exc: CubeError) -> None:
        """Stop a sandbox whose guest did not apply its create message, and record why (the
        control plane writes its record as the launch returns: it is waited for, briefly)."""
        if self._live.get(sandbox.sandbox_id) is None:
            return  # destroyed meanwhile
        await self.destroy(sandbox)
        for _ in range(50):
            record = self.store.get_sandbox(sandbox.sandbox_id)
            if record is not None and record.state in LIVE_STATES:
                failed = record.evolve(state=SandboxState.ERROR, runtime=SandboxRuntime(), error=reason(exc))
                self.store.put_sandbox(failed)
                await self.host.hooks.sandbox_stopped(failed, StopReason.ERROR)
                self._stopped(failed)
                return
            if record is not None:
                return
            await asyncio.sleep(0.2)

    def _stopped(self, failed: Sandbox) -> None:
        self.events.emit("sandbox.killed", team_id=failed.team_id, sandbox_id=failed.sandbox_id,
                         node_id=self.node_id, state=failed.state.value, template_id=failed.template_id,
                         reason=StopReason.ERROR.value, error=failed.error)

    def starting(self, sandbox_id: str) -> bool:
        """Whether the sandbox's start (:meth:`_start_after_answer`) still runs."""
        task = self._starting.get(sandbox_id)
        return task is not None and not task.done()

    async def settled(self, sandbox_id: str) -> None:
        """Return once the sandbox's start is over, however it ended (at once for any other
        sandbox, and inside the start itself). Bounded: the start is (QMP and guest timeouts)."""
        task = self._starting.get(sandbox_id)
        if task is not None and not task.done() and task is not asyncio.current_task():
            await asyncio.wait({task})

    @contextlib.asynccontextmanager
    async def _held(self, sandbox_id: str) -> AsyncIterator[None]:
        """The one way into a live sandbox for an operation: after its start (:meth:`settled`),
        under its lock."""
        await self.settled(sandbox_id)
        async with self._lock(sandbox_id):
            yield

    async def until_applied(self, sandbox_id: str) -> None:
        """Return once the sandbox's guest applied its create message (at once for any other
        sandbox); :class:`SandboxFailedError` when it did not (in :data:`APPLY_TIMEOUT_S`)."""
        await self.settled(sandbox_id)
        task = self._starting.get(sandbox_id)
        if task is None or task is asyncio.current_task():
            return
        if task.cancelled():
            raise SandboxFailedError(sandbox_id=sandbox_id, reason="its guest did not apply the create message")
        exc = task.exception()
        if exc is not None:
            raise SandboxFailedError(sandbox_id=sandbox_id, reason=reason(exc))

    async def _start_vm(self, sandbox: Sandbox, template: Template, snapshot: SnapshotRef | None,
                        rules: Sequence[EgressRule]) -> SandboxRuntime:
        """A pool miss: a network slot, a disk, then a restore of ``snapshot`` or the template's
        snapshot (or a cold boot of the template image); ``_live`` follows each step so a failure
        frees what exists."""
        sid = sandbox.sandbox_id
        volumes = await self._volume_disks(sandbox)
        with telemetry.span("network.allocate"):
            nic = await self.network.allocate(sid, sandbox.network, list(rules))
        self._live[sid] = runtime = SandboxRuntime(nic=nic)
        snap = snapshot or template.snapshot
        if snap is not None and snap.vm_state is not None and snap.disk is not None and CAP_SNAPSHOT in \
                self.vmm.capabilities and (snapshot is not None or self.settings.boot_mode == "snapshot"):
            with telemetry.span("storage.create_disk"):
                disk = await self.storage.create_disk(sid, snap.disk.path)
            self._live[sid] = runtime = runtime.evolve(disk=disk)
            if volumes and not self.vmm.volume_slots:
                raise UnsupportedOperation(driver=type(self.vmm).__name__,
                                           operation="volume mounts (its VMs have no volume slots)")
            if len(volumes) > snap.vm_state.volume_slots:
                raise TemplateError(f"template {template.template_id!r}: its snapshot has "
                                    f"{snap.vm_state.volume_slots} volume slots, {len(volumes)} volumes asked for "
                                    "(rebuild the template: cube templates build --rebuild)")
            spec = snap.vm_state.clone_spec(sid, disk, interpreter=template.interpreter, volumes=volumes)
            with telemetry.span("vmm.restore", snapshot_id=snap.snapshot_id):
                vm = await self.vmm.restore(snap.vm_state, spec, nic)
            # the snapshot it came from (a rebuild of the template later does not change it)
            self._live[sid] = runtime = runtime.evolve(vm=vm, parent_snapshot=snap.snapshot_id)
            return runtime
        if template.rootfs is None or template.kernel is None:
            raise TemplateError(f"template {template.template_id!r} has no image")
        # a filesystem snapshot (no memory): a cold boot of its disk layer with the template's kernel
        fs_snapshot = snapshot if snapshot is not None and snapshot.vm_state is None else None
        if fs_snapshot is not None and fs_snapshot.disk is None:
            raise SnapshotNotFoundError(snapshot_id=fs_snapshot.snapshot_id, detail="it has no disk layer")
        base = fs_snapshot.disk.path if fs_snapshot is not None and fs_snapshot.disk is not None \
            else Path(template.rootfs)
        with telemetry.span("storage.create_disk"):
            disk = await self.storage.create_disk(sid, base)
        self._live[sid] = runtime = runtime.evolve(
            disk=disk, parent_snapshot=fs_snapshot.snapshot_id if fs_snapshot is not None else None)
        vm_spec = VmSpec(vm_id=sid, kernel=Path(template.kernel),
                         initrd=Path(template.initrd) if template.initrd else None, rootfs_disk=disk,
                         memory_mb=template.memory_mb, interpreter=template.interpreter, volumes=volumes)
        with telemetry.span("vmm.boot"):
            vm = await self.vmm.boot(vm_spec, nic)
            self._live[sid] = runtime = runtime.evolve(vm=vm)
            await self.vmm.wait_ready(vm, timeout=300.0)
        return runtime

    async def _adopt(self, sandbox: Sandbox, runtime: SandboxRuntime, rules: Sequence[EgressRule]) -> None:
        """Make a warm-pool member this sandbox's: its egress policy (unless the default, which the
        pool wrote), before it runs again (:meth:`_let_run`)."""
        assert runtime.vm is not None and runtime.nic is not None
        if sandbox.network != DEFAULT_POLICY or rules:  # the pool wrote the default one already
            try:
                with telemetry.span("network.update_policy"):
                    await self.network.update_policy(runtime.nic, sandbox.network, list(rules))
            except UnsupportedOperation:
                pass  # this network driver applies no policy at all, for pool members or others

    async def _let_run(self, runtime: SandboxRuntime) -> None:
        """A paused warm-pool member runs again, at a user's sandbox's CPU priority."""
        assert runtime.vm is not None
        if CAP_PRIORITY in self.vmm.capabilities:  # it was prepared in the background
            await self.vmm.set_priority(runtime.vm, background=False)
        with telemetry.span("vmm.resume"):
            await self.vmm.resume(runtime.vm)

    async def _volume_disks(self, sandbox: Sandbox) -> tuple[DiskHandle, ...]:
        """The images of the sandbox's volumes, in slot order (slot i holds mount i)."""
        if not sandbox.volume_mounts:
            return ()
        store = self.storage.volume_store()
        return tuple([await store.disk(m.volume_id or "", read_only=m.read_only) for m in sandbox.volume_mounts])

    async def _mount_volumes(self, sandbox: Sandbox, runtime: SandboxRuntime) -> None:
        """Have the guest mount volume slot i at mount i's path (it drops what it cached of the
        slot's placeholder first)."""
        assert runtime.vm is not None
        mounts = [{"slot": i, "path": m.path, "read_only": m.read_only} for i, m in enumerate(sandbox.volume_mounts)]
        reply = await self.vmm.guest_call(runtime.vm, "mount_volumes", {"volumes": mounts}, timeout=60.0)
        mounted = reply.get("mounted")
        if not isinstance(mounted, list) or sorted(map(str, mounted)) != sorted(m.path for m in sandbox.volume_mounts):
            raise GuestProtocolError(vm_id=runtime.vm.vm_id, reason=f"mount_volumes answered {reply!r:.200}")

    async def volume(self, call: VolumeCall) -> VolumeAnswer:
        """One operation on a volume of this node's storage driver."""
        return await run_call(self.storage.volume_store(), call)

    async def _personalize(self, sandbox: Sandbox, runtime: SandboxRuntime) -> PersonalizeReply:
        assert runtime.vm is not None
        return await guest_call(self.vmm, runtime.vm, "personalize", personalize_params(
            self.vmm, self.network, sandbox_id=sandbox.sandbox_id, template_id=sandbox.template_id,
            access_token=sandbox.envd_access_token, env_vars=sandbox.env_vars, metadata=sandbox.metadata),
            PersonalizeReply, timeout=30.0)

    # -- stop ------------------------------------------------------------------------------------

    @with_ids
    async def destroy(self, sandbox: Sandbox) -> list[str]:
        """Shut the VM down, then free its network slot and disk; every step runs. Uses the
        live handles, or the record's after a restart. A start still running is ended first."""
        starting = self._starting.get(sandbox.sandbox_id)
        if starting is not None and starting is not asyncio.current_task():  # (a failed start destroys too)
            del self._starting[sandbox.sandbox_id]
            starting.cancel()
            await asyncio.wait({starting})
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
        if runtime.saved is not None:  # written out to disk while paused
            await _step(sandbox, "saved state", functools.partial(self.storage.delete_snapshot,
                                                                   runtime.saved.state_id), errors)
        return errors

    async def _free(self, sandbox: Sandbox) -> None:
        await self.destroy(sandbox)

    # -- changes to a live sandbox ---------------------------------------------------------------

    def _runtime(self, sandbox_id: str) -> SandboxRuntime:
        runtime = self._live.get(sandbox_id)
        if runtime is None or runtime.vm is None:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return runtime

    def _runtime_or_saved(self, sandbox_id: str) -> SandboxRuntime:
        """The runtime of a sandbox with a VM, or paused without one (written out, filesystem only)."""
        runtime = self._live.get(sandbox_id)
        if runtime is None or (runtime.vm is None and not runtime.without_vm):
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return runtime

    async def guest_address(self, sandbox_id: str) -> str:
        """The guest's address, once it applied its create message (:meth:`until_applied`): the
        edge sends a sandbox's first request only then."""
        await self.until_applied(sandbox_id)
        runtime = self._live.get(sandbox_id)
        if runtime is None or runtime.nic is None:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return runtime.nic.guest_address

    @with_ids
    async def pause(self, sandbox_id: str) -> None:
        async with self._held(sandbox_id):
            runtime = self._runtime(sandbox_id)
            if CAP_PAUSE not in self.vmm.capabilities:
                raise InvalidStateError(sandbox_id=sandbox_id, state="running", required="pausable")
            assert runtime.vm is not None
            await self.vmm.pause(runtime.vm)
            self._paused.add(sandbox_id)

    @with_ids
    async def pause_to_disk(self, sandbox_id: str) -> SandboxRuntime:
        """Write a paused sandbox out to disk and end its VM process: its memory and devices are
        saved as an incremental snapshot (the pages it changed since its template) into the
        storage's snapshot directory ``<sandbox id>-mem-<hex>``; its disk and network slot stay.
        It then costs disk, not RAM; :meth:`resume` restores it. Answers the new runtime (``vm``
        None, ``saved`` set), which the control plane records (a restarted node keeps it)."""
        if CAP_SNAPSHOT not in self.vmm.capabilities:
            raise UnsupportedOperation(driver=type(self.vmm).__name__, operation="pause to disk")
        async with self._held(sandbox_id):
            runtime = self._runtime_or_saved(sandbox_id)
            if runtime.without_vm:
                return runtime
            if sandbox_id not in self._paused:
                raise InvalidStateError(sandbox_id=sandbox_id, state="running", required="paused")
            vm = runtime.vm
            assert vm is not None and runtime.disk is not None
            state_id = f"{sandbox_id}-mem-{os.urandom(3).hex()}"
            started = time.perf_counter()
            try:
                saved = await self.vmm.snapshot(vm, self.storage.snapshot_dir(state_id))
            except BaseException:
                await self.storage.delete_snapshot(state_id)
                raise
            try:
                await self.vmm.shutdown(vm)
            except CubeError as exc:
                if await self.vmm.is_alive(vm):  # still running: it stays paused in RAM
                    await self.storage.delete_snapshot(state_id)
                    raise
                log.warning("paused sandbox written out; its VM ended abnormally", sandbox_id=sandbox_id,
                            error=str(exc))
            runtime = runtime.evolve(vm=None, saved=saved)
            self._live[sandbox_id] = runtime
        log.info("paused sandbox written to disk", sandbox_id=sandbox_id, state_id=state_id,
                 ms=round((time.perf_counter() - started) * 1000, 1))
        return runtime

    @with_ids
    async def drop_memory(self, sandbox_id: str) -> SandboxRuntime:
        """A filesystem-only pause: end the sandbox's VM and forget its memory (a saved state
        too), keeping its disk and network slot; :meth:`resume` then boots it from its disk. The
        guest is asked to sync its disks first: a running one must answer (else the error is
        raised and it keeps running); a paused one is resumed for it (one written out to disk is
        restored for it) and, if it does not answer, loses the writes it had not synced, as after
        a power cut. Answers the runtime to record (no VM, no saved state)."""
        async with self._held(sandbox_id):
            runtime = self._runtime_or_saved(sandbox_id)
            if runtime.disk is None:
                raise UnsupportedOperation(driver=type(self.storage).__name__, operation="filesystem-only pause")
            saved, strict = runtime.saved, runtime.vm is not None and sandbox_id not in self._paused
            try:  # a paused guest's memory may hold writes its disk lacks: let it run to sync them
                if runtime.on_disk:
                    runtime = await self._restore_saved(sandbox_id, runtime)
                    saved = None  # deleted once restored
                elif runtime.vm is not None and not strict:
                    await self.vmm.resume(runtime.vm)
            except CubeError as exc:
                log.warning("paused sandbox not resumed to sync its disks before dropping its memory",
                            sandbox_id=sandbox_id, error=str(exc))
            vm = runtime.vm
            if vm is not None:
                try:
                    await guest_call(self.vmm, vm, "exec", {"cmd": ["sync"]}, ExecReply,
                                     timeout=60.0 if strict else 15.0)
                except CubeError as exc:
                    if strict:
                        raise
                    log.warning("guest did not sync its disks before its memory was dropped", sandbox_id=sandbox_id,
                                error=str(exc))
                if CAP_PAUSE in self.vmm.capabilities:
                    with contextlib.suppress(CubeError):
                        await self.vmm.pause(vm)
                self._paused.add(sandbox_id)
                await self.vmm.shutdown(vm)
            runtime = runtime.evolve(vm=None, saved=None)
            self._live[sandbox_id] = runtime
            self._paused.add(sandbox_id)
        if saved is not None:
            try:
                await self.storage.delete_snapshot(saved.state_id)
            except CubeError as exc:  # the storage's gc frees it later
                log.warning("saved state of a sandbox paused without memory not deleted", sandbox_id=sandbox_id,
                            error=str(exc))
        log.info("sandbox paused without its memory", sandbox_id=sandbox_id, had_vm=vm is not None)
        return runtime

    async def _boot_from_disk(self, sandbox_id: str, runtime: SandboxRuntime) -> SandboxRuntime:
        """Boot the VM of a sandbox paused without memory from its own disk (its template's kernel)
        in its own network slot, then personalize it as the same sandbox (caller holds its lock)."""
        assert runtime.disk is not None
        record = self.store.get_sandbox(sandbox_id)
        if record is None:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        template = self._ready.get(record.template_id) or self.store.get_template(record.template_id)
        if template is None or template.kernel is None:
            raise TemplateError(f"template {record.template_id!r}: no kernel to boot sandbox {sandbox_id} with")
        started = time.perf_counter()
        spec = VmSpec(vm_id=f"{sandbox_id}-b{os.urandom(3).hex()}", kernel=Path(template.kernel),
                      initrd=Path(template.initrd) if template.initrd else None, rootfs_disk=runtime.disk,
                      memory_mb=record.memory_mb, cpu_count=record.cpu_count, interpreter=template.interpreter,
                      volumes=await self._volume_disks(record))
        async with self._start_gate:
            vm = await self.vmm.boot(spec, runtime.nic)
            runtime = runtime.evolve(vm=vm)
            self._live[sandbox_id] = runtime
            try:
                await self.vmm.wait_ready(vm, timeout=300.0)
                await self._personalize(record, runtime)
                if record.volume_mounts:
                    await self._mount_volumes(record, runtime)
            except BaseException:
                await self.vmm.shutdown(vm)
                self._live[sandbox_id] = runtime = runtime.evolve(vm=None)
                raise
        log.info("sandbox booted from its disk", sandbox_id=sandbox_id,
                 ms=round((time.perf_counter() - started) * 1000, 1))
        return runtime

    async def _restore_saved(self, sandbox_id: str, runtime: SandboxRuntime) -> SandboxRuntime:
        """Start the VM of a sandbox written out to disk again from its saved state, on its own
        disk and network slot (caller holds its lock); the saved state is deleted once it runs."""
        saved = runtime.saved
        assert saved is not None and runtime.disk is not None
        record = self.store.get_sandbox(sandbox_id)
        template = self.store.get_template(record.template_id) if record is not None else None
        started = time.perf_counter()
        vm = await self.vmm.restore(saved, saved.clone_spec(
            f"{sandbox_id}-r{os.urandom(3).hex()}", runtime.disk,
            interpreter=template.interpreter if template is not None else False), runtime.nic)
        runtime = runtime.evolve(vm=vm, saved=None)
        self._live[sandbox_id] = runtime
        try:
            await self.storage.delete_snapshot(saved.state_id)
        except CubeError as exc:  # the storage's gc frees it later
            log.warning("saved state of a resumed sandbox not deleted", sandbox_id=sandbox_id, error=str(exc))
        log.info("sandbox restored from disk", sandbox_id=sandbox_id, state_id=saved.state_id,
                 ms=round((time.perf_counter() - started) * 1000, 1))
        return runtime

    @with_ids
    async def resume(self, sandbox_id: str) -> SandboxRuntime:
        """Resume (a sandbox written out to disk is restored first, onto its own disk and network
        slot), then give the guest the time again: best effort (the sandbox runs either way; its
        clock is only behind by the pause), except that a guest that breaks the protocol raises
        :class:`GuestProtocolError` (the control plane stops it). Answers the sandbox's runtime
        (new VM handles after a restore from disk)."""
        async with self._held(sandbox_id):
            runtime = self._live.get(sandbox_id)
            if runtime is not None and runtime.on_disk:
                runtime = await self._restore_saved(sandbox_id, runtime)
            elif runtime is not None and runtime.disk_only:
                runtime = await self._boot_from_disk(sandbox_id, runtime)
                self._paused.discard(sandbox_id)
                return runtime  # personalized just now: its clock is right
            else:
                runtime = self._runtime(sandbox_id)
                assert runtime.vm is not None
                await self.vmm.resume(runtime.vm)
            self._paused.discard(sandbox_id)
        await self._sync_clock(sandbox_id, runtime)
        return runtime

    async def _sync_clock(self, sandbox_id: str, runtime: SandboxRuntime) -> None:
        vm = runtime.vm
        assert vm is not None
        try:
            reply = await guest_call(self.vmm, vm, "sync_clock", {"clock_ns": time.time_ns()}, SyncClockReply,
                                     timeout=5.0)
        except GuestProtocolError:
            raise
        except CubeError as exc:
            log.warning("clock sync after resume failed", sandbox_id=sandbox_id, error=str(exc))
            return
        log.debug("clock synced after resume", sandbox_id=sandbox_id, behind_ms=reply.behind_ms)

    @with_ids
    async def update_policy(self, sandbox_id: str, policy: NetworkPolicy, rules: Sequence[EgressRule]) -> None:
        self._check_rules(policy)
        async with self._held(sandbox_id):
            nic = self._runtime_or_saved(sandbox_id).nic
            assert nic is not None
            await self.network.update_policy(nic, policy, list(rules))

    def _check_rules(self, policy: NetworkPolicy) -> None:
        if policy.rules and CAP_HTTP_RULES not in self.network.capabilities:
            raise UnsupportedOperation(driver=type(self.network).__name__, operation="network rules")

    async def _slot_secret(self, slot_id: str, name: str) -> str:
        """:data:`~cube_core.network.SecretSource`: secret ``name`` of the team of the sandbox
        that holds ``slot_id`` on this node, as the control plane answers it (it checks that the
        sandbox is placed here and decides the team: never one the guest names)."""
        sandbox_id = next((sid for sid, rt in list(self._live.items())
                           if rt.nic is not None and rt.nic.slot_id == slot_id), None)
        if sandbox_id is None:
            raise CredentialNotFoundError(kind="secret", ident=name)
        if self.secrets is None:
            raise SecretLookupUnavailableError(reason="no control plane to ask is configured")
        return await self.secrets(self.node_id, sandbox_id, name)

    @with_ids
    async def audit(self, sandbox_id: str, limit: int) -> list[dict[str, object]]:
        await self.settled(sandbox_id)  # a read: no lock
        nic = self._runtime_or_saved(sandbox_id).nic
        assert nic is not None
        return list(await self.network.audit(nic, limit=limit))

    @with_ids
    async def exec(self, sandbox_id: str, cmd: Sequence[str], timeout: float) -> ExecReply:
        await self.settled(sandbox_id)  # no lock: commands may run side by side
        vm = self._runtime(sandbox_id).vm
        assert vm is not None
        return await guest_call(self.vmm, vm, "exec", {"cmd": list(cmd)}, ExecReply, timeout=timeout)

    # -- snapshots -------------------------------------------------------------------------------

    @with_ids
    async def snapshot(self, sandbox_id: str, snapshot_id: str, *, memory: bool = True) -> SavedSnapshot:
        """Save a sandbox; a running one is paused for it and resumed after (a paused one stays).
        ``memory=False``: :meth:`_freeze_filesystem`."""
        if not memory:
            async with self._lock(sandbox_id):
                return SavedSnapshot(disk=await self._freeze_filesystem(sandbox_id, snapshot_id))
        if CAP_SNAPSHOT not in self.vmm.capabilities:
            raise UnsupportedOperation(driver=type(self.vmm).__name__, operation="snapshot")
        async with self._held(sandbox_id):
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

    async def _freeze_filesystem(self, sandbox_id: str, snapshot_id: str) -> DiskHandle:
        """A filesystem snapshot: the guest syncs its disks (a paused one is let run for it),
        its VM is paused (QEMU flushes its disk) and the disk frozen as a layer, as for a memory
        snapshot but without memory or devices; the sandbox is left as it was (caller holds its
        lock). A sandbox without a VM (paused without memory) has its disk frozen as it is."""
        runtime = self._runtime_or_saved(sandbox_id)
        if runtime.disk is None:
            raise UnsupportedOperation(driver=type(self.storage).__name__, operation="filesystem snapshot")
        vm, was_paused = runtime.vm, sandbox_id in self._paused
        if vm is not None and CAP_PAUSE not in self.vmm.capabilities:
            raise UnsupportedOperation(driver=type(self.vmm).__name__, operation="filesystem snapshot (pause)")
        if vm is not None and was_paused:
            await self.vmm.resume(vm)  # its memory may hold writes its disk lacks
        try:
            if vm is not None:
                await guest_call(self.vmm, vm, "exec", {"cmd": ["sync"]}, ExecReply, timeout=60.0)
                await self.vmm.pause(vm)
            try:
                return await self.storage.freeze_disk(runtime.disk, snapshot_id)
            except BaseException:
                await self.storage.delete_snapshot(snapshot_id)
                raise
        finally:
            if vm is not None and not was_paused:
                await self.vmm.resume(vm)
            elif vm is not None:
                with contextlib.suppress(CubeError):  # paused again, as it was
                    await self.vmm.pause(vm)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self.storage.delete_snapshot(snapshot_id)  # keeps a disk layer live sandboxes still use
        self._forget_replica(snapshot_id)

    # -- copies of other nodes' snapshots --------------------------------------------------------

    def _replica_dir(self) -> Path:
        return self.settings.state_dir / "replicas" / self.node_id

    def _load_replicas(self) -> None:
        directory = self._replica_dir()
        for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
            try:
                ref = SnapshotRef.model_validate_json(path.read_text())
            except (OSError, ValueError) as exc:
                log.warning("unreadable snapshot copy record", path=str(path), error=str(exc))
                continue
            self._replicas[ref.snapshot_id] = ref

    def _save_replica(self, ref: SnapshotRef) -> None:
        directory = self._replica_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{ref.snapshot_id}.json"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(ref.model_dump_json(indent=1))
        os.replace(tmp, path)
        self._replicas[ref.snapshot_id] = ref

    def _forget_replica(self, snapshot_id: str) -> None:
        if self._replicas.pop(snapshot_id, None) is not None:
            (self._replica_dir() / f"{snapshot_id}.json").unlink(missing_ok=True)
            log.info("snapshot copy deleted", snapshot_id=snapshot_id, node_id=self.node_id)

    def local_snapshot(self, snapshot_id: str) -> SnapshotRef | None:
        """The snapshot as this node holds it (its own, a template's, or a copy), with paths here."""
        if snapshot_id in self._replicas:
            return self._replicas[snapshot_id]
        for template in self._ready.values():
            if template.snapshot is not None and template.snapshot.snapshot_id == snapshot_id:
                return template.snapshot
        ref = self.store.get_snapshot(snapshot_id) or self._build_snapshots().get(snapshot_id)
        if ref is not None and ref.node_id in (None, self.node_id):
            return ref
        return None

    def _here(self, snapshot: SnapshotRef | None) -> SnapshotRef | None:
        """``snapshot`` with this node's paths: the copy of another node's snapshot."""
        if snapshot is None or snapshot.node_id in (None, self.node_id):
            return snapshot
        replica = self._replicas.get(snapshot.snapshot_id)
        if replica is None:
            raise SnapshotNotFoundError(snapshot_id=snapshot.snapshot_id, detail=(
                f"its files are on node {snapshot.node_id}, not copied to {self.node_id}"))
        return replica

    def _export(self, snapshot_id: str) -> SnapshotExport:
        ref = self.local_snapshot(snapshot_id)
        if ref is None or ref.disk is None:
            raise SnapshotNotFoundError(snapshot_id=snapshot_id, detail=f"no files of it on node {self.node_id}")
        files: list[ExportedFile] = []
        for i, item in enumerate(self.vmm.state_files(ref.vm_state) if ref.vm_state else ()):  # none: a filesystem one
            files.append(ExportedFile(name=f"vm-{i}-{item.path.name}", role="vm", file=item,
                                      size=item.path.stat().st_size))
        for i, item in enumerate(self.storage.layer_files(ref.disk)):
            files.append(ExportedFile(name=f"disk-{i}-{item.path.name}", role="disk", file=item,
                                      size=item.path.stat().st_size))
        return SnapshotExport(snapshot=ref, files=tuple(files))

    async def export_snapshot(self, snapshot_id: str) -> SnapshotExport:
        """What another node needs to restore ``snapshot_id``: its record and every file, with
        content keys (a node holding a key needs no copy of that file)."""
        return await asyncio.to_thread(self._export, snapshot_id)

    def export_files(self, snapshot_id: str, have: Sequence[str]) -> Iterator[bytes]:
        """The stream of the snapshot's files (:mod:`cube_core.snapshotfiles`), without those
        whose content key is in ``have``. Blocking (a sync iterator: the server runs it in a thread)."""
        export = self._export(snapshot_id)
        skip = set(have)
        sent = [(f.name, f.file.path) for f in export.files if f.file.key is None or f.file.key not in skip]
        log.info("sending snapshot files", snapshot_id=snapshot_id, node_id=self.node_id,
                 files=[n for n, _ in sent], skipped=sorted(skip))
        return stream(sent)

    def _content_dir(self) -> Path:
        return self.settings.state_dir / "content"

    def _local_file(self, item: ExportedFile) -> Path | None:
        """This node's file of ``item``'s content key, if it has one."""
        key = item.file.key
        if key is None:
            return None
        if item.role == "disk":
            return self.storage.local_layer(key)
        kept = self._content_dir() / key_name(key)
        if kept.is_file():
            return kept
        with contextlib.suppress(OSError):  # the same file at the same path (a shared cache)
            if item.file.path.is_file() and content_key(item.file.path) == key:
                return item.file.path
        return None

    async def import_snapshot(self, ref: SnapshotRef, origin: Node) -> Received:
        """Copy ``ref``'s files from ``origin`` (its bases first, each only if not here yet), so
        sandboxes of this node can start from it; idempotent. Files whose content this node
        already holds are not sent. The copy is recorded (``replicas/<node>/<id>.json``) and
        reported (``Node.snapshots``) until the snapshot is deleted."""
        if ref.node_id in (None, self.node_id) or self.local_snapshot(ref.snapshot_id) is not None:
            return Received(snapshot_id=ref.snapshot_id)
        if not self.token:
            raise ConfigError("[cluster] token is not set: this node cannot fetch snapshots from others")
        if not origin.url:
            raise NodeError(f"node {origin.node_id} has no URL to fetch snapshot {ref.snapshot_id} from",
                            node_id=origin.node_id)
        started = time.perf_counter()
        async with HttpNodeClient(origin.node_id, origin.url, self.token) as peer:
            got = await self._import(ref.snapshot_id, peer, origin.node_id)
        got = got.evolve(seconds=round(time.perf_counter() - started, 3))
        self.copied = self.copied.evolve(files=self.copied.files + got.files, bytes=self.copied.bytes + got.bytes,
                                         seconds=round(self.copied.seconds + got.seconds, 3),
                                         fetched=(*self.copied.fetched, *got.fetched))
        log.info("snapshot copied", snapshot_id=ref.snapshot_id, origin=origin.node_id, node_id=self.node_id,
                 fetched=got.fetched, files=got.files, bytes=got.bytes, skipped=got.skipped, seconds=got.seconds)
        self.beat()
        return got

    async def _import(self, snapshot_id: str, peer: HttpNodeClient, origin_id: str) -> Received:
        async with self._imports.setdefault(snapshot_id, asyncio.Lock()):
            if self.local_snapshot(snapshot_id) is not None:
                return Received(snapshot_id=snapshot_id)
            export = await peer.snapshot_manifest(snapshot_id)
            snap = export.snapshot
            assert snap.disk is not None
            base: SnapshotRef | None = None
            before = Received(snapshot_id=snapshot_id)
            if snap.base_state_id is not None:
                base = self.local_snapshot(snap.base_state_id)
                if base is None:
                    before = await self._import(snap.base_state_id, peer, origin_id)
                    base = self.local_snapshot(snap.base_state_id)
                    assert base is not None
            present = {f.name: p for f in export.files if (p := self._local_file(f)) is not None}
            wanted = [f for f in export.files if f.name not in present]
            have = sorted({f.file.key for f in export.files if f.name in present and f.file.key})
            directory = self.storage.snapshot_dir(snapshot_id)
            incoming = directory / f".incoming-{os.urandom(4).hex()}"
            try:
                sizes = await peer.snapshot_files(snapshot_id, have, incoming, [f.name for f in wanted])
                local = await asyncio.to_thread(self._place_copy, export, snap, base, present, incoming)
            except BaseException:
                shutil.rmtree(incoming, ignore_errors=True)
                await self.storage.delete_snapshot(snapshot_id)
                raise
            shutil.rmtree(incoming, ignore_errors=True)
            self._save_replica(local)
            return Received(snapshot_id=snapshot_id, fetched=(*before.fetched, snapshot_id),
                            files=before.files + len(sizes), bytes=before.bytes + sum(sizes.values()),
                            skipped=tuple(sorted({*before.skipped, *have})))

    def _place_copy(self, export: SnapshotExport, snap: SnapshotRef, base: SnapshotRef | None,
                    present: dict[str, Path], incoming: Path) -> SnapshotRef:
        """Blocking: move what came into place, hand the state and the layers to the drivers."""
        directory = incoming.parent
        paths: dict[Path, Path] = {}
        received: dict[str, Path] = {}
        chain = [f.file for f in export.files if f.role == "disk"]
        for item in export.files:
            if item.name in present:
                if item.role == "vm":
                    paths[item.file.path] = present[item.name]
                continue
            came = incoming / item.name
            if item.role == "disk":
                assert item.file.key is not None
                received[item.file.key] = came
            elif item.file.key is not None:  # a kernel: kept by content
                dest = self._content_dir() / key_name(item.file.key)
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.chmod(came, 0o644)
                os.replace(came, dest)
                paths[item.file.path] = dest
            else:
                if not NAME_RE.fullmatch(item.file.path.name):
                    raise NodeError(f"snapshot {snap.snapshot_id}: a state file named {item.file.path.name!r}")
                dest = directory / item.file.path.name
                os.replace(came, dest)
                paths[item.file.path] = dest
        vm_state = self.vmm.relocate(snap.vm_state, paths, base.vm_state if base else None) \
            if snap.vm_state is not None else None  # a filesystem snapshot: its disk only
        disk = self.storage.adopt_layer(snap.snapshot_id, chain, received)
        return snap.evolve(vm_state=vm_state, disk=disk)

    @with_ids
    async def rollback(self, sandbox: Sandbox, snapshot: SnapshotRef, *, paused: bool) -> Launched:
        """The sandbox's VM and disk become a restore of ``snapshot``; its network slot stays."""
        sid = sandbox.sandbox_id
        here = self._here(snapshot)
        assert here is not None
        snapshot = here
        if snapshot.vm_state is None or snapshot.disk is None:
            raise UnsupportedOperation(driver=type(self.vmm).__name__, operation="rollback to a snapshot without files")
        template = self.local_template(sandbox.template_id, any_build=True)
        async with self._held(sid):
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
