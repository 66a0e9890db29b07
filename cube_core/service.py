"""SandboxService: the control plane, the only object API plugins call.

It keeps the records (sandboxes, snapshots, templates, teams, keys), checks quotas and
admission, places sandboxes through the scheduler plugin, keeps deadlines, and fires the
lifecycle hooks. It never touches a VM, tap or disk: nodes do that, reached through one typed
:class:`~cube_core.nodeclient.NodeClient` each (:class:`~cube_core.nodes.NodeDirectory`): the
agent in this process for ``cube serve``, HTTP clients for ``cube master``. Team scoping lives
here: a team never sees another team's sandboxes (they are reported as not found).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import math
import socket
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from cube_core import (
    credentials,
    ids,
    keys,
    teamsecrets,
    teamwebhooks,
    telemetry,
    templatebuilds,
    webhookdelivery,
    webhooks,
)
from cube_core._host import PluginHost
from cube_core.buildspec import TemplateBuild
from cube_core.config import CoreSettings
from cube_core.errors import (
    AdmissionRejectedError,
    CubeError,
    GuestProtocolError,
    InvalidStateError,
    NoCapacityError,
    NodeUnavailableError,
    SandboxFailedError,
    SandboxNotFoundError,
    SnapshotInUseError,
    SnapshotNotFoundError,
    TemplateError,
    TemplateNotFoundError,
    VolumeMountedError,
)
from cube_core.events import EventBus
from cube_core.log import bind_ids, with_ids
from cube_core.models import (
    ApiKey,
    NetworkPolicy,
    Node,
    Sandbox,
    SandboxRuntime,
    SandboxSpec,
    SnapshotRef,
    StopReason,
    Team,
    Template,
    TemplateStatus,
    utcnow,
)
from cube_core.node import reason
from cube_core.nodeclient import Endpoint, LaunchRequest, NodeClient
from cube_core.nodes import NodeDirectory
from cube_core.observations import LOG_LEVELS, LogEntry, LogLevel, MetricSample, TeamMetricName, TeamMetricPoint
from cube_core.pool import POOL_TEAM
from cube_core.quotas import Quotas
from cube_core.scheduler import Scheduler
from cube_core.state import SandboxState, check_transition, require
from cube_core.store import SandboxTotals, StateStore
from cube_core.volumes import Volumes

log = structlog.get_logger(__name__)

LIVE_STATES = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)
REAPER_LEASE = "reaper"
TEAM_METRIC_POINTS = 500


class SandboxService:
    """Create, find, change and stop sandboxes; templates, teams and API keys; see the module."""

    def __init__(self, host: PluginHost, store: StateStore, nodes: NodeDirectory, *,
                 events: EventBus | None = None) -> None:
        self.host = host
        self.store = store
        self.nodes = nodes
        self._owns_events = events is None
        self.events = events or EventBus(store.event_channel())
        """What happened, as it happens (:mod:`cube_core.events`): published here, where it happens."""
        nodes.events = self.events
        self.settings: CoreSettings = host.config.data.core
        self.scheduler: Scheduler = host.hooks.scheduler()
        self.quotas = Quotas(host.config.data.quotas, store)
        self._locks: dict[str, asyncio.Lock] = {}
        self._reaper: asyncio.Task[None] | None = None
        self._kept_in_ram: set[str] = set()
        """Paused sandboxes their node could not write out to disk (not tried again)."""
        self._reaping = False
        """Whether this control plane held the reaper lease at its last try."""
        self._sweep_builds = False
        """Every older template build that can be freed is due to be (the reaper lease was gained)."""
        self._freeing: asyncio.Task[None] | None = None
        self.team_secrets = teamsecrets.TeamSecrets(store, self.settings)  # /secrets; needs [core] secrets_key
        # the SDK's Template.build
        self.template_builds = templatebuilds.TemplateBuilds(store, self.settings, nodes, self.events)
        self.volumes = Volumes(store, self.settings, nodes)  # /volumes, the content API, volumeMounts
        self.holder = f"{socket.gethostname()}:{self.settings.node_id}:{self.settings.state_dir}:{self.settings.port}"
        """Who this control plane is when it takes a lease (one reaper among several masters):
        stable across restarts, so a restarted master takes its lease back at once."""
        hooks_settings = host.config.data.webhooks
        self.team_webhooks = teamwebhooks.TeamWebhooks(store, self.settings, hooks_settings)  # /events/webhooks
        self.webhook_delivery = webhookdelivery.WebhookDelivery(
            store, self.team_webhooks, hooks_settings, self.holder, keep_s=self.settings.observations_keep_s)

    # -- lifecycle of the service -------------------------------------------------------------

    async def start(self) -> None:
        """Reap what expired while no control plane ran (before the first request can extend
        it), then keep reaping in the background."""
        if self._owns_events:
            await self.events.start()
        builds = self.events.subscribe(None)  # before anything can happen: no event is missed
        if self._take_lease():
            self.nodes.mark_down()
            await self.reap_expired()
            await self._sweep_builds_if_due()  # before the first request
        self._reaper = asyncio.create_task(self._reap_forever(), name="cube-timeout-reaper")
        self._freeing = asyncio.create_task(self.template_builds.free_on_events(builds, lambda: self._reaping),
                                            name="cube-build-release")
        await self.webhook_delivery.start(self.events.subscribe(None))  # every team's events -> deliveries

    async def stop(self) -> None:
        await self.webhook_delivery.stop()
        for task in (self._reaper, self._freeing):
            if task is None:
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._owns_events:
            await self.events.stop()

    # -- teams and keys ------------------------------------------------------------------------

    def create_api_key(self, team_name: str) -> tuple[ApiKey, str]:
        return keys.create_key(self.store, team_name)

    def authenticate(self, secret: str | None) -> Team:
        return keys.authenticate(self.store, secret)

    def revoke_api_key(self, key_id_or_prefix: str) -> ApiKey:
        return keys.revoke_key(self.store, key_id_or_prefix)

    def list_api_keys(self) -> list[tuple[ApiKey, Team | None]]:
        return keys.list_keys(self.store)

    # -- templates and nodes ---------------------------------------------------------------------

    def list_templates(self, team_id: str | None = None) -> list[Template]:
        """Every template; with ``team_id``, only the public ones and that team's."""
        out = self.store.list_templates()
        return out if team_id is None else [t for t in out if templatebuilds.visible(t, team_id)]

    def get_template(self, template_id_or_alias: str, team_id: str | None = None) -> Template:
        """A template; with ``team_id``, another team's is "not found"."""
        template = self.store.get_template(template_id_or_alias)
        if template is None and ":" in template_id_or_alias:  # name:tag
            found = self.template_builds.tags.resolve(template_id_or_alias)
            template = found[0] if found is not None else None
        if template is None or (team_id is not None and not templatebuilds.visible(template, team_id)):
            raise TemplateNotFoundError(template=template_id_or_alias)
        return template

    def list_nodes(self) -> list[Node]:
        return self.nodes.records()

    def list_builds(self, template_id: str, team_id: str | None = None) -> builtins.list[TemplateBuild]:
        """The builds of the team's own template (``team_id`` None: the operator, any template's),
        newest first; a public template's builds are its owner's only
        (:meth:`~cube_core.templatebuilds.TemplateBuilds.owned`)."""
        return self.store.list_builds(self.template_builds.owned(team_id, template_id).template_id)

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

    def _node(self, sb: Sandbox) -> NodeClient:
        return self.nodes.client(sb.node_id)

    def get(self, team_id: str, sandbox_id: str) -> Sandbox:
        return self._record(sandbox_id, team_id)

    def find(self, sandbox_id: str) -> Sandbox:
        """Any team's live sandbox: for the edge proxy, which checks the sandbox's own tokens."""
        return self._record(sandbox_id)

    def count_by_state(self) -> dict[str, int]:
        """Live sandboxes of every team by state (warm-pool members not counted), for metrics."""
        counts = {s.value: 0 for s in LIVE_STATES}
        for sb in self.store.list_sandboxes(states=LIVE_STATES):
            if sb.team_id != POOL_TEAM:
                counts[sb.state.value] += 1
        return counts

    def pool_sizes(self) -> dict[str, int]:
        """Warm-pool members ready per template, over every node (as they last reported)."""
        sizes: dict[str, int] = {}
        for node in self.nodes.records():
            for template_id, n in node.pool.items():
                sizes[template_id] = sizes.get(template_id, 0) + n
        return sizes

    def owner_of(self, sandbox_id: str) -> str:
        """The team of a live sandbox, for the operator's actions (which then act as that team)."""
        return self._record(sandbox_id).team_id

    def list_all(self, *, states: tuple[SandboxState, ...] | None = None) -> builtins.list[Sandbox]:
        """Every team's sandboxes (warm-pool members not included), for the operator's view."""
        wanted = states or (SandboxState.RUNNING, SandboxState.PAUSED)
        return [s for s in self.store.list_sandboxes(states=wanted) if s.team_id != POOL_TEAM]

    def list(self, team_id: str, *, states: tuple[SandboxState, ...] | None = None,
             metadata: dict[str, str] | None = None) -> list[Sandbox]:
        wanted = states or (SandboxState.RUNNING, SandboxState.PAUSED)
        out = [s for s in self.store.list_sandboxes(team_id=team_id, states=wanted)]
        if metadata:
            out = [s for s in out if all(s.metadata.get(k) == v for k, v in metadata.items())]
        return out

    def _older_build(self, ref: str) -> TemplateBuild | None:
        """The older build ``name:tag`` names (None: a plain name, or the build the template serves)."""
        if ":" not in ref or self.store.get_template(ref) is not None:
            return None
        found = self.template_builds.tags.resolve(ref)
        return found[1] if found is not None else None

    def _place(self, spec: SandboxSpec, snapshot: SnapshotRef | None, live: builtins.list[SandboxTotals],
               volume_node: str | None = None) -> Node:
        """The node for a new sandbox: the scheduler's choice among the nodes that are up and
        have the template ready. From a sandbox snapshot: its own node (the files are there) when
        it takes sandboxes; otherwise one of the others, which copies the snapshot first (its
        origin must be reachable for that: draining is fine, down is not). The same from an older
        template build's snapshot (``name:tag``): the node that built it, or one serving the template."""
        nodes = self.nodes.placeable(live)
        if volume_node is not None:  # its volumes' node (they are not copied)
            nodes = [n for n in nodes if n.node_id == volume_node]
            if not nodes:
                self.nodes.client(volume_node)  # NodeUnavailableError when down
                raise NoCapacityError(cpu=spec.cpu_count, memory_mb=spec.memory_mb)
        if snapshot is not None and snapshot.node_id is not None:
            origin = [n for n in nodes if n.node_id == snapshot.node_id]
            if origin:
                return self.scheduler.place(spec, origin)
            self.nodes.client(snapshot.node_id)  # NodeUnavailableError when down: nothing to copy from
        nodes = [n for n in nodes if spec.template_id in n.templates]
        if not nodes:
            raise TemplateError(f"template {spec.template_id!r} is not ready on any node that takes sandboxes")
        return self.scheduler.place(spec, nodes)

    @with_ids
    async def create(self, spec: SandboxSpec) -> Sandbox:
        """Create a sandbox from a template (id or alias) or from one of the team's snapshots."""
        with telemetry.span("sandbox.create", team_id=spec.team_id, template_id=spec.template_id):
            return await self._create(spec)

    async def _create(self, spec: SandboxSpec) -> Sandbox:
        started = time.perf_counter()
        snap = self.store.get_snapshot(spec.template_id)
        if snap is not None and snap.team_id == spec.team_id:
            spec = spec.evolve(from_snapshot=snap.snapshot_id, template_id=snap.template_id)
        else:
            snap = None
        # the team's own snapshot starts even when its template is another team's, unpublished since
        template = self.get_template(spec.template_id, None if snap is not None else spec.team_id)
        if template.status != TemplateStatus.READY:
            raise TemplateError(f"template {spec.template_id!r} is {template.status.value}, not ready")
        build = self._older_build(spec.template_id) if snap is None else None
        if build is not None:  # name:tag of an older build: its kept snapshot (never a warm-pool member)
            snap = build.snapshot
        # the VM is a clone of the template's (or the older build's) snapshot: its size, whatever was asked
        size = build or template
        spec = spec.evolve(template_id=template.template_id, cpu_count=size.cpu_count, memory_mb=size.memory_mb)
        mounts, volume_node = self.volumes.resolve(spec.team_id, spec.volume_mounts)
        spec = spec.evolve(volume_mounts=mounts)
        rejection = self.host.hooks.admit_sandbox(spec)
        if rejection is not None:
            raise AdmissionRejectedError(reason=rejection.reason, retryable=rejection.retryable)
        with self.store.exclusive("placement"):  # among masters: quota, capacity, node, record at once
            self.quotas.check_create(spec.team_id, spec.network)
            # counted in the store, not parsed record by record: this runs for every create, and
            # under the placement lock
            live = self.store.sandbox_totals(states=LIVE_STATES)  # read once: the cap and the nodes' usage
            live_count = sum(t.count for t in live)
            if live_count >= self.settings.max_sandboxes:
                raise NoCapacityError(cpu=spec.cpu_count, memory_mb=spec.memory_mb)
            if mounts:  # a read-write mount is exclusive
                self.volumes.check_mountable(mounts, self.store.list_sandboxes(states=LIVE_STATES))
            with telemetry.span("scheduler.place", live_sandboxes=live_count) as placing:
                node = self._place(spec, snap, live, volume_node)
                if placing is not None:
                    placing.set_attribute("cube.node_id", node.node_id)
            now = utcnow()
            sandbox = Sandbox(
                sandbox_id=ids.sandbox_id(), template_id=template.template_id,
                alias=template.aliases[0] if template.aliases else None, team_id=spec.team_id,
                state=SandboxState.CREATING, started_at=now, end_at=now + timedelta(seconds=spec.timeout_s),
                metadata=dict(spec.metadata), env_vars=dict(spec.env_vars), cpu_count=spec.cpu_count,
                memory_mb=spec.memory_mb, auto_pause=spec.auto_pause, auto_pause_memory=spec.auto_pause_memory,
                auto_resume=spec.auto_resume,
                timeout_s=spec.timeout_s, secure=spec.secure,
                envd_access_token=ids.access_token() if spec.secure else None, network=spec.network,
                node_id=node.node_id, isolation=node.isolation, volume_mounts=mounts)
            self.store.put_sandbox(sandbox)
        bind_ids(sandbox_id=sandbox.sandbox_id, node_id=node.node_id)
        telemetry.set_attributes(sandbox_id=sandbox.sandbox_id, node_id=node.node_id)
        client = self.nodes.client(node.node_id)
        try:
            if snap is not None and snap.node_id is not None and snap.node_id != node.node_id:
                copied = await client.import_snapshot(snap, self.nodes.get(snap.node_id))
                log.info("snapshot copied for a create", snapshot_id=snap.snapshot_id, origin=snap.node_id,
                         node_id=node.node_id, fetched=copied.fetched, bytes=copied.bytes, seconds=copied.seconds)
            launched = await client.launch(LaunchRequest(sandbox=sandbox, snapshot=snap,
                                                         rules=tuple(self.host.hooks.egress_rules(spec))))
        except BaseException as exc:
            log.warning("create failed", sandbox_id=sandbox.sandbox_id, node_id=node.node_id, error=repr(exc))
            if isinstance(exc, CubeError):  # the node frees what it started; an answer lost on the way
                with contextlib.suppress(CubeError):  # (a timeout) may have left a sandbox there
                    await client.destroy(sandbox)
            final = sandbox.evolve(state=SandboxState.ERROR, error=reason(exc))
            self.store.put_sandbox(final)
            await self.host.hooks.sandbox_stopped(final, StopReason.ERROR)
            await self._free_builds(final.template_id)  # one being created held every older build
            raise
        provisional = sandbox.sandbox_id
        if launched.sandbox_id is not None and launched.sandbox_id != provisional:
            # a warm-pool member personalized at join: it is its sandbox already (id and token)
            sandbox = sandbox.evolve(sandbox_id=launched.sandbox_id, envd_access_token=launched.envd_access_token)
            bind_ids(sandbox_id=sandbox.sandbox_id)
            telemetry.set_attributes(sandbox_id=sandbox.sandbox_id)
        sandbox = sandbox.evolve(state=SandboxState.RUNNING, runtime=launched.runtime, boot_id=launched.boot_id,
                                 end_at=utcnow() + timedelta(seconds=spec.timeout_s))
        self.store.put_sandbox(sandbox)
        if sandbox.sandbox_id != provisional:
            self.store.delete_sandbox(provisional)  # clients never saw it
        log.info("sandbox ready", sandbox_id=sandbox.sandbox_id, node_id=node.node_id,
                 served_by=launched.served_by, node_ms=launched.timings_ms,
                 total_ms=round((time.perf_counter() - started) * 1000, 1))
        await self.host.hooks.sandbox_created(sandbox)
        self._emit("sandbox.created", sandbox)
        return sandbox

    def _emit(self, type_: str, sb: Sandbox, **data: Any) -> None:
        self.events.emit(type_, team_id=sb.team_id, sandbox_id=sb.sandbox_id, node_id=sb.node_id,
                         state=sb.state.value, template_id=sb.template_id, **data)

    @with_ids
    async def kill(self, team_id: str, sandbox_id: str) -> None:
        self._record(sandbox_id, team_id)
        async with self._lock(sandbox_id):
            await self._destroy(self._record(sandbox_id, team_id), StopReason.KILLED)

    async def _destroy(self, sb: Sandbox, reason_: StopReason, *, error: str | None = None) -> None:
        """Have its node free everything the sandbox owns, record it as stopped, tell the
        plugins; idempotent.

        Stopped for a failure (``StopReason.ERROR``, e.g. a guest that broke the control
        protocol) it is recorded in state ``error`` with ``error`` saying why, and later look-ups
        answer :class:`SandboxFailedError`; otherwise in state ``killed``. When its node is down,
        the record keeps its runtime: the node frees it when it returns (it reconciles)."""
        runtime = SandboxRuntime()
        errors: builtins.list[str] = []
        try:
            errors = await self._node(sb).destroy(sb)
        except NodeUnavailableError as exc:
            runtime = sb.runtime
            errors = [f"its node will free it when it returns ({exc.message})"]
        state = SandboxState.ERROR if reason_ == StopReason.ERROR else SandboxState.KILLED
        message = "; ".join(m for m in (error, *errors) if m) or sb.error
        final = sb.evolve(state=state, runtime=runtime, error=message[:2000] if message else None)
        self.store.put_sandbox(final)
        await self.host.hooks.sandbox_stopped(final, reason_)
        self._emit("sandbox.expired" if reason_ == StopReason.TIMEOUT else "sandbox.killed", final,
                   reason=reason_.value)

    async def _fail(self, sandbox_id: str, exc: GuestProtocolError) -> None:
        """Stop a sandbox whose guest broke the protocol (caller holds its lock); record why."""
        sb = self.store.get_sandbox(sandbox_id)
        log.warning("stopping sandbox: its guest broke the control protocol", sandbox_id=sandbox_id,
                    error=str(exc))
        if sb is not None and sb.state in LIVE_STATES:
            await self._destroy(sb, StopReason.ERROR, error=reason(exc))

    def _lock(self, sandbox_id: str) -> asyncio.Lock:
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    @with_ids
    async def set_timeout(self, team_id: str, sandbox_id: str, timeout_s: int) -> Sandbox:
        sb = self._record(sandbox_id, team_id)
        updated = sb.evolve(end_at=utcnow() + timedelta(seconds=timeout_s))
        self.store.put_sandbox(updated)
        self._emit("sandbox.timeout_changed", updated, end_at=updated.end_at.isoformat())
        return updated

    @with_ids
    async def pause(self, team_id: str, sandbox_id: str, *, memory: bool = True) -> Sandbox:
        """Pause a running sandbox; ``memory=False``: a filesystem-only pause (its VM ends, its
        disk and network slot stay; a resume boots it from its disk: files kept, processes not)."""
        self._record(sandbox_id, team_id)
        async with self._lock(sandbox_id):
            return await self._pause(sandbox_id, memory)

    @require(SandboxState.RUNNING)
    async def _pause(self, sandbox_id: str, memory: bool = True) -> Sandbox:
        sb = self._record(sandbox_id)
        if memory:
            await self._node(sb).pause(sandbox_id)
        else:
            sb = sb.evolve(runtime=await self._node(sb).drop_memory(sandbox_id))
        paused = self._move(sb.evolve(paused_at=utcnow()), SandboxState.PAUSED)
        self._emit("sandbox.paused", paused)
        return paused

    @with_ids
    async def resume(self, team_id: str, sandbox_id: str, timeout_s: int | None = None) -> Sandbox:
        """Resume a paused sandbox (``POST /sandboxes/{id}/resume``)."""
        self._record(sandbox_id, team_id)
        async with self._lock(sandbox_id):
            return await self._resume(sandbox_id, timeout_s)

    @require(SandboxState.PAUSED)
    async def _resume(self, sandbox_id: str, timeout_s: int | None) -> Sandbox:
        sb = self._record(sandbox_id)
        self.quotas.check_resume(sb.team_id)
        from_disk = sb.runtime.on_disk
        try:
            runtime = await self._node(sb).resume(sandbox_id)
        except GuestProtocolError as exc:
            await self._fail(sandbox_id, exc)
            raise
        sb = self._move(sb.evolve(runtime=runtime, paused_at=None), SandboxState.RUNNING)
        self._kept_in_ram.discard(sandbox_id)
        if timeout_s is not None:
            sb = sb.evolve(end_at=utcnow() + timedelta(seconds=timeout_s))
            self.store.put_sandbox(sb)
        self._emit("sandbox.resumed", sb, end_at=sb.end_at.isoformat(), from_disk=from_disk)
        return sb

    @with_ids
    async def wake(self, sandbox_id: str) -> Sandbox:
        """The record of a sandbox traffic arrived for (the edge proxy), resumed first when it is
        paused with auto-resume; concurrent requests resume it once (the others wait for that
        resume, then go). A resumed sandbox gets the timeout it was created with, from now."""
        sb = self._record(sandbox_id)
        if sb.state != SandboxState.PAUSED or not sb.auto_resume or sb.runtime.disk_only:
            return sb  # paused without memory: only an explicit connect or resume boots it
        async with self._lock(sandbox_id):
            sb = self._record(sandbox_id)
            if sb.state == SandboxState.PAUSED and sb.auto_resume and not sb.runtime.disk_only:
                started = time.perf_counter()
                on_disk = sb.runtime.on_disk
                sb = await self._resume(sandbox_id, sb.timeout_s or self.settings.default_timeout_s)
                log.info("sandbox resumed by traffic", sandbox_id=sandbox_id, from_disk=on_disk,
                         ms=round((time.perf_counter() - started) * 1000, 1))
        return sb

    async def _into_ram(self, sb: Sandbox) -> Sandbox:
        """A paused sandbox written out to disk, restored and paused again (for a snapshot or a
        rollback, which need its VM); any other, unchanged. Caller holds its lock."""
        if sb.state != SandboxState.PAUSED or not sb.runtime.without_vm:
            return sb
        node = self._node(sb)
        try:
            runtime = await node.resume(sb.sandbox_id)
            await node.pause(sb.sandbox_id)
        except GuestProtocolError as exc:
            await self._fail(sb.sandbox_id, exc)
            raise
        sb = sb.evolve(runtime=runtime, paused_at=utcnow())
        self.store.put_sandbox(sb)
        return sb

    @with_ids
    async def connect(self, team_id: str, sandbox_id: str, timeout_s: int | None = None, *,
                      memory: bool = True) -> Sandbox:
        """Return a running sandbox, resuming it if paused; the deadline only moves later.
        ``memory=False`` (the SDK's ``on_resume="reboot"``): a paused sandbox's memory is dropped
        and it boots from its disk (a running one is left as it is)."""
        sb = self._record(sandbox_id, team_id)
        async with self._lock(sandbox_id):
            sb = self._record(sandbox_id, team_id)
            if sb.state == SandboxState.PAUSED and not memory and not sb.runtime.disk_only:
                sb = sb.evolve(runtime=await self._node(sb).drop_memory(sandbox_id))
                self.store.put_sandbox(sb)
            if sb.state == SandboxState.PAUSED:
                sb = await self._resume(sandbox_id, None)
            if timeout_s is not None:
                end = utcnow() + timedelta(seconds=timeout_s)
                if end > sb.end_at:
                    sb = sb.evolve(end_at=end)
                    self.store.put_sandbox(sb)
                    self._emit("sandbox.timeout_changed", sb, end_at=end.isoformat())
            return sb

    def _move(self, sb: Sandbox, target: SandboxState) -> Sandbox:
        check_transition(sb.sandbox_id, sb.state, target)
        moved = sb.evolve(state=target)
        self.store.put_sandbox(moved)
        return moved

    @with_ids
    async def update_network(self, team_id: str, sandbox_id: str, policy: NetworkPolicy) -> Sandbox:
        sb = self._record(sandbox_id, team_id)
        self.quotas.check_policy(team_id, policy)
        rules = self.host.hooks.egress_rules(SandboxSpec(template_id=sb.template_id, team_id=team_id,
                                                         network=policy))
        await self._node(sb).update_policy(sandbox_id, policy, rules)
        updated = sb.evolve(network=policy)
        self.store.put_sandbox(updated)
        self._emit("sandbox.policy_changed", updated, network=policy.model_dump(mode="json"))
        return updated

    @with_ids
    async def network_audit(self, team_id: str, sandbox_id: str, limit: int = 1000) -> builtins.list[dict[str, Any]]:
        sb = self._record(sandbox_id, team_id)
        return await self._node(sb).audit(sandbox_id, limit)

    async def endpoint(self, sandbox_id: str, port: int) -> tuple[Sandbox, Endpoint]:
        """Where the edge proxy reaches ``port`` of a sandbox, and its record. A sandbox just
        taken from the warm pool answers once its guest applied its create message (the node
        waits, a bounded time), so its first request never overtakes the create."""
        sb = self._record(sandbox_id)
        endpoint = await self._node(sb).endpoint(sandbox_id, port)
        return self._record(sandbox_id), endpoint

    @with_ids
    async def exec(self, sandbox_id: str, cmd: builtins.list[str], timeout: float = 60.0) -> dict[str, Any]:
        """Run a command in the guest over the control channel (``cube sandbox exec``)."""
        sb = self._record(sandbox_id)
        try:
            reply = await self._node(sb).exec(sandbox_id, cmd, timeout)
        except GuestProtocolError as exc:
            async with self._lock(sandbox_id):
                await self._fail(sandbox_id, exc)
            raise
        return reply.model_dump()

    # -- snapshots, fork, rollback ---------------------------------------------------------------

    @with_ids
    async def snapshot(self, team_id: str, sandbox_id: str, *, name: str | None = None,
                       kind: str = "snapshot", memory: bool = True) -> SnapshotRef:
        """Save a running or paused sandbox (memory, devices, disk layer); it keeps its state.
        ``memory=False`` (the SDK's ``mode="filesystem"``): its disk layer only; a sandbox created
        from it boots fresh from that disk (a new identity, no processes)."""
        self._record(sandbox_id, team_id)
        async with self._lock(sandbox_id):
            sb = self._record(sandbox_id, team_id)
            if sb.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
                raise InvalidStateError(sandbox_id=sandbox_id, state=sb.state.value, required="running or paused")
            if sb.volume_mounts:  # a snapshot cannot hold (nor restore) a volume's content
                raise VolumeMountedError(sandbox_id=sandbox_id, volumes=", ".join(m.name for m in sb.volume_mounts),
                                         operation=kind)
            self.quotas.check_snapshot(team_id)
            sb = await self._into_ram(sb)
            snapshot_id = "snap" + ids.sandbox_id()[:16]
            saved = await self._node(sb).snapshot(sandbox_id, snapshot_id, memory=memory)
            ref = SnapshotRef(snapshot_id=snapshot_id, template_id=sb.template_id, sandbox_id=sandbox_id,
                              parent_id=sb.runtime.parent_snapshot,
                              team_id=team_id, vm_state=saved.vm_state, disk=saved.disk, node_id=sb.node_id,
                              names=(name,) if name else (), metadata={"kind": kind})
            self.store.put_snapshot(ref)
        await self.host.hooks.snapshot_taken(sb, ref)
        self._emit("sandbox.snapshot", sb, snapshot_id=ref.snapshot_id, kind=kind)
        return ref

    def list_snapshots(self, team_id: str, sandbox_id: str | None = None) -> builtins.list[SnapshotRef]:
        return self.store.list_snapshots(team_id=team_id, sandbox_id=sandbox_id)

    def get_snapshot(self, team_id: str, snapshot_id: str) -> SnapshotRef:
        ref = self.store.get_snapshot(snapshot_id)
        if ref is None or ref.team_id != team_id:
            raise SnapshotNotFoundError(snapshot_id=snapshot_id)
        return ref

    async def delete_snapshot(self, team_id: str, snapshot_id: str) -> None:
        ref = self.get_snapshot(team_id, snapshot_id)
        children = [s.snapshot_id for s in self.store.list_snapshots() if s.parent_id == snapshot_id]
        if children:
            raise SnapshotInUseError(snapshot_id=snapshot_id, detail=f"snapshots {', '.join(children)} build on it")
        client = self.nodes.client(ref.node_id or self.settings.node_id)
        self.store.delete_snapshot(snapshot_id)
        await client.delete_snapshot(snapshot_id)
        for node in self.nodes.records():  # the copies other nodes made of it
            if snapshot_id in node.snapshots and node.node_id != ref.node_id:
                try:
                    await self.nodes.client(node.node_id).delete_snapshot(snapshot_id)
                except NodeUnavailableError as exc:  # it drops the copy when it starts again
                    log.info("snapshot copy left on a node that is away", snapshot_id=snapshot_id,
                             node_id=node.node_id, error=exc.message)
        if ref.template_id:
            await self._free_builds(ref.template_id)  # it may have been an older build's last user

    @with_ids
    async def fork(self, team_id: str, sandbox_id: str, count: int = 1,
                   timeout_s: int | None = None) -> builtins.list[Sandbox]:
        """``count`` independent copies of a sandbox as it is now, each with a fresh identity."""
        sb = self._record(sandbox_id, team_id)
        self.quotas.check_fork(team_id, count)
        ref = await self.snapshot(team_id, sandbox_id, kind="fork")
        spec = SandboxSpec(template_id=ref.snapshot_id, team_id=team_id, metadata=sb.metadata,
                           env_vars=sb.env_vars, auto_pause=sb.auto_pause, auto_pause_memory=sb.auto_pause_memory,
                           auto_resume=sb.auto_resume,
                           secure=sb.secure, network=sb.network,
                           timeout_s=timeout_s or max(1, int((sb.end_at - utcnow()).total_seconds())))
        return [await self.create(spec) for _ in range(count)]

    @with_ids
    async def rollback(self, team_id: str, sandbox_id: str, snapshot_id: str) -> Sandbox:
        """Put a sandbox back to one of its snapshots: same id, token and deadline."""
        ref = self.get_snapshot(team_id, snapshot_id)
        if ref.sandbox_id != sandbox_id:
            raise SnapshotNotFoundError(snapshot_id=snapshot_id)
        async with self._lock(sandbox_id):
            sb = await self._into_ram(self._record(sandbox_id, team_id))
            try:
                launched = await self._node(sb).rollback(sb, ref, paused=sb.state == SandboxState.PAUSED)
            except GuestProtocolError as exc:
                await self._fail(sandbox_id, exc)
                raise
            sb = sb.evolve(runtime=launched.runtime, boot_id=launched.boot_id)
            self.store.put_sandbox(sb)
        await self.host.hooks.sandbox_restored(sb, ref)
        return sb

    # -- deadlines and nodes that stopped reporting ----------------------------------------------

    async def _reap_forever(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            try:
                if self._take_lease():
                    self.nodes.mark_down()
                    await self.reap_expired()
                    await self.write_out_paused()
                    await self._sweep_builds_if_due()
            except Exception:
                log.exception("timeout reaper failed")

    def _take_lease(self) -> bool:
        """Take or keep the reaper lease. Gaining it (at start, or from a master that went) starts
        with one sweep of the older template builds that could be freed (their trigger may have
        been lost in a crash; :meth:`TemplateBuilds.release`): :meth:`_sweep_builds_if_due`."""
        held = self.store.acquire_lease(REAPER_LEASE, self.holder, ttl_s=10.0)
        self._sweep_builds = self._sweep_builds or (held and not self._reaping)
        self._reaping = held
        return held

    async def _sweep_builds_if_due(self) -> None:
        if self._sweep_builds:
            self._sweep_builds = False
            await self._free_builds(None)

    async def _free_builds(self, template_id: str | None) -> None:
        """:meth:`TemplateBuilds.release` after something that can free a build; never raises."""
        try:
            await self.template_builds.release(template_id)
        except Exception:  # noqa: BLE001 - the next trigger (or the next start's sweep) tries again
            log.exception("freeing older template builds failed", template_id=template_id)

    async def reap_expired(self) -> int:
        now = utcnow()
        expired = self.store.list_sandboxes(states=(SandboxState.RUNNING,), ends_by=now)
        for sb in expired:
            await self._expire(sb)
        return len(expired)

    async def write_out_paused(self) -> int:
        """Write the sandboxes paused for ``[core] pause_to_disk_after_s`` out to disk (their VM
        processes end), and every paused one of a node short of memory (it reports less available
        than ``[core] pause_to_disk_below_mb``); how many were. One the node cannot write out (its
        VMM cannot: a ``CubeError``) stays paused in RAM, and so does one with volumes mounted (never tried)."""
        after, floor = self.settings.pause_to_disk_after_s, self.settings.pause_to_disk_below_mb
        short = {n.node_id for n in self.nodes.records() if 0 < n.memory_mb_available < floor}
        if after <= 0 and not short:
            return 0
        cutoff = utcnow() - timedelta(seconds=after) if after > 0 else None
        due = [s for s in self.store.list_sandboxes(states=(SandboxState.PAUSED,))
               if s.team_id != POOL_TEAM and not s.runtime.without_vm and s.sandbox_id not in self._kept_in_ram
               and not s.volume_mounts
               and (s.node_id in short or (cutoff is not None and s.paused_at is not None
                                           and s.paused_at <= cutoff))]
        written = 0
        for sb in due:
            written += await self._write_out(sb.sandbox_id)
        return written

    @with_ids
    async def _write_out(self, sandbox_id: str) -> int:
        async with self._lock(sandbox_id):
            sb = self.store.get_sandbox(sandbox_id)
            if sb is None or sb.state != SandboxState.PAUSED or sb.runtime.without_vm:
                return 0
            if sb.volume_mounts:  # its volumes' slots are not part of a saved state: it stays in RAM
                log.info("paused sandbox stays in RAM: it has volumes mounted", sandbox_id=sandbox_id)
                self._kept_in_ram.add(sandbox_id)
                return 0
            started = time.perf_counter()
            try:
                runtime = await self._node(sb).pause_to_disk(sandbox_id)
            except NodeUnavailableError as exc:  # tried again once its node is back
                log.info("paused sandbox not written out: its node is away", sandbox_id=sandbox_id, error=exc.message)
                return 0
            except CubeError as exc:
                log.warning("paused sandbox stays in RAM: it cannot be written out", sandbox_id=sandbox_id,
                            error=exc.message)
                self._kept_in_ram.add(sandbox_id)
                return 0
            self.store.put_sandbox(sb.evolve(runtime=runtime))
            log.info("paused sandbox written out to disk", sandbox_id=sandbox_id,
                     ms=round((time.perf_counter() - started) * 1000, 1))
            return 1

    @with_ids
    async def _expire(self, sb: Sandbox) -> None:
        async with self._lock(sb.sandbox_id):
            current = self.store.get_sandbox(sb.sandbox_id)
            if current is None or current.state != SandboxState.RUNNING:
                return
            if current.auto_pause:
                try:
                    await self._pause(sb.sandbox_id, current.auto_pause_memory)
                    return
                except (InvalidStateError, NodeUnavailableError) as exc:
                    log.info("auto-pause impossible, killing", sandbox_id=sb.sandbox_id, error=str(exc))
                except CubeError as exc:
                    log.warning("auto-pause failed, killing", sandbox_id=sb.sandbox_id, error=str(exc))
            await self._destroy(current, StopReason.TIMEOUT)

    # -- a team's secrets, API keys and access tokens (/secrets, /api-keys, /access-tokens) ----------
    # Team-scoped like sandboxes: another team's record is "not found". No method returns a secret's
    # value; a key's or token's secret is returned once, by the call that creates it.

    def list_secrets(self, team_id: str) -> builtins.list[credentials.SecretRecord]:
        return self.team_secrets.list(team_id)

    def get_secret(self, team_id: str, secret: str) -> credentials.SecretRecord:
        return self.team_secrets.get(team_id, secret)

    def create_secret(self, team_id: str, name: str, value: str,
                      metadata: dict[str, str] | None = None) -> credentials.SecretRecord:
        return self.team_secrets.create(team_id, name, value, metadata)

    def update_secret(self, team_id: str, secret: str, value: str,
                      metadata: dict[str, str] | None = None) -> credentials.SecretRecord:
        return self.team_secrets.update(team_id, secret, value, metadata)

    def delete_secret(self, team_id: str, secret: str) -> None:
        self.team_secrets.delete(team_id, secret)

    def team_api_keys(self, team_id: str) -> builtins.list[tuple[ApiKey, credentials.KeyLabel]]:
        return keys.team_keys(self.store, team_id)

    def create_team_api_key(self, team: Team, name: str) -> tuple[ApiKey, credentials.KeyLabel, str]:
        return keys.create_team_key(self.store, team, name)

    def rename_team_api_key(self, team_id: str, key_id: str, name: str) -> None:
        keys.rename_team_key(self.store, team_id, key_id, name)

    def delete_team_api_key(self, team_id: str, key_id: str) -> None:
        keys.delete_team_key(self.store, team_id, key_id)

    def create_access_token(self, team_id: str, name: str) -> tuple[credentials.AccessToken, str]:
        return keys.create_access_token(self.store, team_id, name)

    def delete_access_token(self, team_id: str, token_id: str) -> None:
        keys.delete_access_token(self.store, team_id, token_id)

    # -- a team's webhooks (/events/webhooks): team-scoped; a signing secret is returned only by the
    # create that generated it

    def list_webhooks(self, team_id: str) -> builtins.list[webhooks.Webhook]:
        return self.team_webhooks.list(team_id)

    def get_webhook(self, team_id: str, webhook_id: str) -> webhooks.Webhook:
        return self.team_webhooks.get(team_id, webhook_id)

    def create_webhook(self, team_id: str, url: str, *, events: Sequence[str] | None = None, name: str = "",
                       enabled: bool = True, secret: str | None = None) -> tuple[webhooks.Webhook, str | None]:
        return self.team_webhooks.create(team_id, url, events=events, name=name, enabled=enabled, secret=secret)

    def update_webhook(self, team_id: str, webhook_id: str, *, url: str | None = None,
                       events: Sequence[str] | None = None, name: str | None = None, enabled: bool | None = None,
                       secret: str | None = None) -> webhooks.Webhook:
        return self.team_webhooks.update(team_id, webhook_id, url=url, events=events, name=name, enabled=enabled,
                                         secret=secret)

    def delete_webhook(self, team_id: str, webhook_id: str) -> None:
        self.team_webhooks.delete(team_id, webhook_id)

    def webhook_deliveries(self, team_id: str, webhook_id: str, limit: int = 100) -> builtins.list[webhooks.Delivery]:
        return self.team_webhooks.deliveries(team_id, webhook_id, limit)

    # -- observations: sandboxes' metrics and logs, a team's sandbox counts ----------------------------
    # The nodes sample their running sandboxes (cube_core.sampling) into the store; these read it back,
    # team-scoped. A sandbox that ended keeps its samples and log entries for [core] observations_keep_s.

    def _observed(self, team_id: str, sandbox_id: str) -> Sandbox:
        sb = self.store.get_sandbox(sandbox_id)
        if sb is None or sb.team_id != team_id:
            raise SandboxNotFoundError(sandbox_id=sandbox_id)
        return sb

    def sandbox_metrics(self, team_id: str, sandbox_id: str, *, start: datetime | None = None,
                        end: datetime | None = None) -> builtins.list[MetricSample]:
        """The samples of the team's sandbox taken in [start, end] (either open), oldest first."""
        self._observed(team_id, sandbox_id)
        return self.store.metric_samples(sandbox_id, start=start, end=end)

    def latest_metrics(self, team_id: str, sandbox_ids: Sequence[str]) -> dict[str, MetricSample]:
        """The newest sample of each of the team's running sandboxes among ``sandbox_ids``."""
        out: dict[str, MetricSample] = {}
        for sandbox_id in sandbox_ids:
            sb = self.store.get_sandbox(sandbox_id)
            if sb is None or sb.team_id != team_id or sb.state != SandboxState.RUNNING:
                continue
            newest = self.store.metric_samples(sandbox_id, limit=1)
            if newest:
                out[sandbox_id] = newest[0]
        return out

    def sandbox_logs(self, team_id: str, sandbox_id: str, *, cursor_ms: int | None = None, limit: int = 1000,
                     backward: bool = False, min_level: LogLevel | None = None,
                     search: str | None = None) -> builtins.list[LogEntry]:
        """The team's sandbox's log entries (see :meth:`StateStore.log_entries`), at ``min_level`` or above."""
        self._observed(team_id, sandbox_id)
        levels = LOG_LEVELS[LOG_LEVELS.index(min_level):] if min_level is not None else None
        return self.store.log_entries(sandbox_id, cursor_ms=cursor_ms, limit=limit, backward=backward,
                                      levels=levels, search=search)

    def team_metrics(self, team_id: str, *, start: datetime | None = None,
                     end: datetime | None = None) -> builtins.list[TeamMetricPoint]:
        """The team's sandboxes over [start, end] (default: the last hour), one point per step (at
        least the sampling interval; at most 500 points): how many were sampled running in the step,
        and how many started per second."""
        end = end or utcnow()
        start = start or end - timedelta(hours=1)
        if start > end:
            return []
        span = (end - start).total_seconds()
        step = max(math.ceil(self.settings.sample_interval_s), math.ceil(span / TEAM_METRIC_POINTS), 1)
        first = int(start.timestamp()) // step * step
        running = dict(self.store.team_concurrency(team_id, datetime.fromtimestamp(first, UTC), end, step))
        starts: dict[int, int] = {}
        for sb in self.store.list_sandboxes(team_id=team_id):
            at = sb.started_at.timestamp()
            if first <= at <= end.timestamp():
                slot = int(at) // step * step
                starts[slot] = starts.get(slot, 0) + 1
        return [TeamMetricPoint(at=datetime.fromtimestamp(slot, UTC),
                                concurrent_sandboxes=running.get(datetime.fromtimestamp(slot, UTC), 0),
                                sandbox_start_rate=starts.get(slot, 0) / step)
                for slot in range(first, int(end.timestamp()) + 1, step)]

    def team_metric_max(self, team_id: str, metric: TeamMetricName, *, start: datetime | None = None,
                        end: datetime | None = None) -> tuple[datetime, float]:
        """The highest value of ``metric`` over [start, end] and the first step it was reached in
        (0 at ``end`` when there is no point)."""
        points = self.team_metrics(team_id, start=start, end=end)
        if not points:
            return end or utcnow(), 0.0
        value = (lambda p: float(p.concurrent_sandboxes)) if metric == "concurrent_sandboxes" else (
            lambda p: p.sandbox_start_rate)
        best = max(points, key=value)  # the first of equal maxima
        return best.at, value(best)
