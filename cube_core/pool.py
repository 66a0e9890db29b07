"""The warm pool: per template, restored and paused VMs with their disk and network slot ready.

Creating a sandbox takes a member (``take``), and the node resumes it and sends it the clock and
env vars (``identity_at_join``: the member was personalized as its sandbox when it joined; else the
node personalizes it fully then); the pool refills in the background, one restore at a time,
and stops refilling when host memory is short. Members are used once. They are recorded in the
state store under the reserved team ``POOL_TEAM`` so a crash leaves nothing unaccounted for: at
start-up every recorded member is destroyed (the pool is rebuilt, never trusted across restarts).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta

import structlog

from cube_core import ids
from cube_core.config import PoolSettings
from cube_core.errors import CubeError, GuestProtocolError, TemplateError, UnsupportedOperation
from cube_core.guest import guest_call, personalize_params
from cube_core.meminfo import available_memory_mb
from cube_core.models import (
    GuestReply,
    NetworkPolicy,
    NicHandle,
    PersonalizeReply,
    Sandbox,
    SandboxRuntime,
    Template,
    VmHandle,
    WarmUpReply,
    utcnow,
)
from cube_core.network import NetworkDriver
from cube_core.state import SandboxState
from cube_core.storage import StorageDriver
from cube_core.store import StateStore
from cube_core.vmm import CAP_PAUSE, CAP_PRIORITY, CAP_SNAPSHOT, VmmDriver

log = structlog.get_logger(__name__)

DEFAULT_POLICY = NetworkPolicy()
"""The egress policy of a create that asks for nothing special. Every member has it written once
it is paused (it prepared with egress closed), so taking one for such a create writes nothing."""
POOL_TEAM = "__pool__"
"""Reserved team id of pool members' records; no API key can belong to it."""
REFILL_YIELD_MAX_S = 5.0
"""With ``background_refill``: the longest the refill waits for the creates being served before
it prepares the next member anyway (so a steady stream of creates cannot starve the pool)."""


class WarmPool:
    def __init__(self, *, settings: PoolSettings, store: StateStore, vmm: VmmDriver, network: NetworkDriver,
                 storage: StorageDriver, destroy: Callable[[Sandbox], Awaitable[None]],
                 memory_probe: Callable[[], int] = available_memory_mb, node_id: str = "local",
                 warm_up: Callable[[Sandbox, str], Awaitable[None]] | None = None) -> None:
        self.settings = settings
        self._plugins_warm_up = warm_up
        self.node_id = node_id
        self.store = store
        self.vmm = vmm
        self.network = network
        self.storage = storage
        self._destroy = destroy
        self._memory_probe = memory_probe
        self._members: dict[str, deque[Sandbox]] = {}
        self._templates: dict[str, Template] = {}
        self._wake = asyncio.Event()
        self._serving = 0
        self._no_creates = asyncio.Event()
        self._no_creates.set()
        self._task: asyncio.Task[None] | None = None
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return (self.settings.size > 0 and CAP_SNAPSHOT in self.vmm.capabilities
                and CAP_PAUSE in self.vmm.capabilities)

    def sizes(self) -> dict[str, int]:
        return {t: len(q) for t, q in self._members.items()}

    async def start(self) -> None:
        """Destroy members recorded by an earlier process, then start refilling."""
        for stale in self.store.list_sandboxes(team_id=POOL_TEAM):
            if stale.node_id != self.node_id:
                continue  # another node's
            if stale.state != SandboxState.KILLED:
                await self._destroy(stale)
            self.store.delete_sandbox(stale.sandbox_id)
        if self.enabled:
            self._task = asyncio.create_task(self._refill_forever(), name="cube-warm-pool")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for queue in self._members.values():
            while queue:
                member = queue.popleft()
                await self._destroy(member)
                self.store.delete_sandbox(member.sandbox_id)

    def watch(self, template: Template) -> None:
        """Keep a pool for ``template`` (called when it becomes READY)."""
        if template.snapshot is None:
            return
        self._templates[template.template_id] = template
        self._members.setdefault(template.template_id, deque())
        self._wake.set()

    async def drain(self, template_id: str, *, forget: bool = False) -> int:
        """Destroy the members of ``template_id`` (it was rebuilt: new members come from its new
        snapshot; ``forget``: it was deleted, keep no pool for it). How many went."""
        if forget:
            self._templates.pop(template_id, None)
        queue = self._members.pop(template_id, deque()) if forget else self._members.get(template_id, deque())
        count = 0
        while queue:
            await self._drop(queue.popleft())
            count += 1
        self._wake.set()
        return count

    async def _drop(self, member: Sandbox) -> None:
        try:
            await self._destroy(member)
        finally:
            self.store.delete_sandbox(member.sandbox_id)

    def take(self, template_id: str) -> Sandbox | None:
        """A ready, paused member for ``template_id`` (its record says where its VM, disk and NIC
        are), or None on a pool miss."""
        queue = self._members.get(template_id)
        if not queue:
            self.misses += 1
            self._wake.set()
            return None
        member = queue.popleft()
        self.store.delete_sandbox(member.sandbox_id)
        self.hits += 1
        self._wake.set()
        return member

    @contextlib.contextmanager
    def serving(self) -> Iterator[None]:
        """Around a create served on this node (hit or miss): a background refill yields to it."""
        self._serving += 1
        self._no_creates.clear()
        try:
            yield
        finally:
            self._serving -= 1
            if self._serving == 0:
                self._no_creates.set()

    async def _yield_to_creates(self) -> None:
        if self._serving:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._no_creates.wait(), REFILL_YIELD_MAX_S)

    async def _refill_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while True:
                template = self._most_needed()
                if template is None:
                    break
                if self._memory_probe() < self.settings.max_memory_mb // 4 + template.memory_mb:
                    log.info("warm pool paused: memory is short", available_mb=self._memory_probe())
                    await asyncio.sleep(5)
                    break
                if self.settings.background_refill:
                    await self._yield_to_creates()
                try:
                    member = await self._restore(template)
                except Exception as exc:  # the pool keeps refilling whatever one restore did
                    log.warning("warm pool restore failed", template=template.template_id, error=repr(exc))
                    await asyncio.sleep(2)
                    break
                current = self._templates.get(template.template_id)
                if current is None or current.snapshot != template.snapshot:  # removed or rebuilt meanwhile
                    await self._drop(member)
                    continue
                self._members[template.template_id].append(member)

    async def _join(self, vm: VmHandle, record: Sandbox) -> Sandbox:
        """Personalize the member as the sandbox it will become (``identity_at_join``): its id,
        envd access token, hostname, ``E2B_SANDBOX_ID``, machine-id, and fresh entropy for the
        kernel and Python RNGs (a member is used once: no two sandboxes share RNG state). The
        record keeps the token and the guest's boot id; a create then only sends the clock and
        the env vars. A guest that fails this is not a member."""
        owner = record.sandbox_id
        reply = await guest_call(self.vmm, vm, "personalize", personalize_params(
            self.vmm, self.network, sandbox_id=owner, template_id=record.template_id,
            access_token=record.envd_access_token), PersonalizeReply, timeout=60.0)
        return record.evolve(boot_id=reply.boot_id)

    async def _warm_up(self, vm: VmHandle, nic: NicHandle, record: Sandbox) -> None:
        """Personalize the member as itself (unless it joined as its sandbox already), let the
        guest agent run a command through envd, and let the plugins reach the guest over the
        sandbox's network path (``cube_pool_member_warm_up``): what a create and a first request
        will do, done once ahead (the sandbox's own personalization replaces every field later).
        Best effort: a member that cannot warm up still serves, but one whose guest breaks the
        protocol is destroyed (:class:`GuestProtocolError` propagates)."""
        owner, template_id = record.sandbox_id, record.template_id
        try:
            if record.boot_id is None:
                await guest_call(self.vmm, vm, "personalize", personalize_params(
                    self.vmm, self.network, sandbox_id=owner, template_id=template_id, access_token=None),
                    GuestReply, timeout=60.0)
            reply = await guest_call(self.vmm, vm, "warm_up", {}, WarmUpReply, timeout=60.0)
        except GuestProtocolError:
            raise
        except CubeError as exc:
            log.warning("warm pool: warm-up failed", vm_id=vm.vm_id, error=str(exc))
            return
        if self._plugins_warm_up is not None:
            await self._plugins_warm_up(record, nic.guest_address)
        log.debug("warm pool: member warmed up", vm_id=vm.vm_id, ms=reply.ms)

    async def _default_policy(self, nic: NicHandle) -> None:
        """Open the paused member's egress to the default policy (it prepared with none), so a
        create that asks for the default writes nothing (see ``DEFAULT_POLICY``)."""
        try:
            await self.network.update_policy(nic, DEFAULT_POLICY, [])
        except UnsupportedOperation:
            pass  # this network driver applies no policy at all

    def _most_needed(self) -> Template | None:
        budget = self.settings.max_memory_mb
        used = sum(len(q) * self._templates[t].memory_mb // 8 for t, q in self._members.items())
        wanting = [(len(q), t) for t, q in self._members.items() if len(q) < self.settings.size]
        if not wanting or used >= budget:
            return None
        return self._templates[min(wanting)[1]]

    async def _restore(self, template: Template) -> Sandbox:
        assert template.snapshot is not None
        identity = self.settings.identity_at_join
        owner = ids.sandbox_id() if identity else "pool" + ids.sandbox_id()[:16]
        now = utcnow()
        record = Sandbox(sandbox_id=owner, template_id=template.template_id, team_id=POOL_TEAM,
                         state=SandboxState.CREATING, started_at=now, end_at=now + timedelta(days=3650),
                         memory_mb=template.memory_mb, cpu_count=template.cpu_count, node_id=self.node_id,
                         isolation=self.vmm.isolation, envd_access_token=ids.access_token() if identity else None,
                         secure=identity)
        self.store.put_sandbox(record)
        runtime = SandboxRuntime()
        snap = template.snapshot
        try:
            if snap.vm_state is None or snap.disk is None:
                raise TemplateError(f"template {template.template_id!r} has a snapshot without files")
            nic = await self.network.allocate(owner, NetworkPolicy(allow_internet_access=False))
            runtime = runtime.evolve(nic=nic)
            disk = await self.storage.create_disk(owner, snap.disk.path)
            runtime = runtime.evolve(disk=disk)
            spec = snap.vm_state.clone_spec(owner, disk, interpreter=template.interpreter)
            vm = await self.vmm.restore(snap.vm_state, spec, nic)
            runtime = runtime.evolve(vm=vm, parent_snapshot=snap.snapshot_id)  # the build it came from
            if self.settings.background_refill and CAP_PRIORITY in self.vmm.capabilities:
                await self.vmm.set_priority(vm, background=True)  # a create's node raises it again
            if identity:
                record = await self._join(vm, record)
            if self.settings.warm_up:
                await self._warm_up(vm, nic, record)
            await self.vmm.pause(vm)
            await self._default_policy(nic)
        except BaseException:
            await self._destroy(record.evolve(runtime=runtime))
            self.store.delete_sandbox(owner)
            raise
        record = record.evolve(state=SandboxState.PAUSED, runtime=runtime)
        self.store.put_sandbox(record)
        return record
