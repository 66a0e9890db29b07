"""The node agent's sampler: every ``[core] sample_interval_s`` it asks each running sandbox's guest
agent (control op ``observe``) for a metrics sample and the log entries after its cursor, and writes
both to the state store; once a minute it drops what is older than ``[core] observations_keep_s``.
A sandbox whose VM has been idle since the last round (the VMM's CPU count, read on the host) is
asked only every ``[core] sample_idle_interval_s``: each ask wakes the guest, which is most of what
an idle sandbox costs the host (and, with idle reclaim, faults back what was paged out). Whether a
VM is idle is the VMM driver's call (``VmmDriver.activity``: the KVM driver's idle tracker, whose
readings its reclaimer uses too); the sampler asks for all its VMs at once. In the rounds
between, its last answer is stored again with the round's time and the CPU use the host counted,
so the history keeps one sample per round (memory and disk use barely change in an idle guest).

It runs beside a :class:`~cube_core.node.NodeAgent` (``attach`` in its ``start``, ``detach`` in its
``stop``) and needs nothing of it but its id, store and VMM driver: the sandboxes are the store's
running records of this node, their VMs the records' handles. A guest that does not answer (busy,
paused a moment for a snapshot, broken) is skipped until the next round; what it answers is hostile
input, validated by :class:`~cube_core.observations.ObserveReply` before it is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from datetime import timedelta
from typing import TYPE_CHECKING

import structlog

from cube_core.errors import CubeError
from cube_core.guest import guest_call
from cube_core.models import Sandbox, utcnow
from cube_core.observations import MetricSample, ObserveReply
from cube_core.pool import POOL_TEAM
from cube_core.state import SandboxState
from cube_core.vmm import VmActivity

if TYPE_CHECKING:
    from cube_core.node import NodeAgent

log = structlog.get_logger(__name__)

OBSERVE_TIMEOUT_S = 3.0
LOG_BATCH = 500
PRUNE_EVERY_S = 60.0
STARTED_SLACK = timedelta(seconds=2)  # the guest's clock against the host's
SETTLE_ROUNDS = 2
"""After the VMM last found a VM busy, its guest is asked until an answer taken this many rounds
later: the end of what it did (a process's exit, its last log lines) can use less CPU than the
VMM's idle threshold, and is then in that answer rather than ``sample_idle_interval_s`` late."""


class Sampler:
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        settings = agent.settings
        self.interval_s = settings.sample_interval_s
        self.keep = timedelta(seconds=settings.observations_keep_s)
        self.cursors: dict[str, int] = {}
        """The last log sequence number stored, by sandbox."""
        self.idle_interval_s = settings.sample_idle_interval_s
        self._observed: dict[str, tuple[float, MetricSample]] = {}
        """By sandbox: when its guest last answered (monotonic), and its sample then."""
        self._task: asyncio.Task[None] | None = None
        self._pruned_at = -PRUNE_EVERY_S  # the first round prunes

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cube-node-sampler")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:  # a store error: try again next round, never stop sampling
                log.exception("sampling round failed")
            await asyncio.sleep(self.interval_s)

    def sandboxes(self) -> list[Sandbox]:
        """The running sandboxes of this node that finished starting (warm-pool members are nobody's)."""
        return [sb for sb in self.agent.store.list_sandboxes(states=(SandboxState.RUNNING,))
                if sb.node_id == self.agent.node_id and sb.team_id != POOL_TEAM and sb.runtime.vm is not None
                and not self.agent.starting(sb.sandbox_id)]  # a sandbox still starting: the next round

    async def tick(self) -> int:
        """One round: observe every running sandbox of this node at once, but an idle one
        (:meth:`idle_pct`), whose last answer is carried forward; how many samples were stored."""
        live = self.sandboxes()
        ids = {sb.sandbox_id for sb in live}
        for table in (self.cursors, self._observed):
            for gone in set(table) - ids:
                del table[gone]
        due, carried, now = [], [], utcnow()
        activity = await self.activity(live)
        for sb in live:
            pct = self.idle_pct(sb, activity)
            if pct is None:
                due.append(sb)
            else:  # what it answered last, its CPU from the host's count (as the guest counts: all its vCPUs)
                last = self._observed[sb.sandbox_id][1]
                carried.append(last.evolve(at=now, cpu_used_pct=round(pct / last.cpu_count, 2)))
        if carried:
            self.agent.store.add_metric_samples(carried)
        answered = sum(await asyncio.gather(*(self.observe(sb) for sb in due)))
        if time.monotonic() - self._pruned_at >= PRUNE_EVERY_S:
            self.prune()
        return answered + len(carried)

    def prune(self) -> int:
        """Drop the samples and log entries older than ``[core] observations_keep_s``."""
        self._pruned_at = time.monotonic()
        dropped = self.agent.store.prune_observations(utcnow() - self.keep)
        if dropped:
            log.debug("old observations dropped", count=dropped)
        return dropped

    async def activity(self, live: list[Sandbox]) -> dict[str, VmActivity]:
        """The VMM's count of how busy the VMs of ``live`` have been (by vm_id), in one call."""
        if self.idle_interval_s <= 0 or not live:
            return {}
        vms = [sb.runtime.vm for sb in live if sb.runtime.vm is not None]
        try:
            return await self.agent.vmm.activity(vms, max_age_s=self.interval_s / 2)
        except CubeError as exc:
            log.debug("no VM activity", error=str(exc))
            return {}

    def idle_pct(self, sb: Sandbox, activity: dict[str, VmActivity]) -> float | None:
        """None: ask ``sb``'s guest this round. Else the VMM counts its VM idle (``VmmDriver.activity``,
        which wakes nobody) since at least :data:`SETTLE_ROUNDS` rounds before its guest's last
        answer, and that answer is less than ``sample_idle_interval_s`` old: the % of one core
        its VM used lately, by the VMM's count."""
        if self.idle_interval_s <= 0:
            return None
        assert sb.runtime.vm is not None
        act = activity.get(sb.runtime.vm.vm_id)
        answered = self._observed.get(sb.sandbox_id)
        if act is None or answered is None or time.monotonic() - answered[0] >= self.idle_interval_s:
            return None
        if answered[0] - act.idle_since < SETTLE_ROUNDS * self.interval_s:
            return None  # busy since, or shortly before, its last answer: what it did last may be unasked
        return act.cpu_pct

    async def observe(self, sb: Sandbox) -> bool:
        vm = sb.runtime.vm
        assert vm is not None
        after = self.cursors.get(sb.sandbox_id, 0)
        try:
            reply = await guest_call(self.agent.vmm, vm, "observe", {"after": after, "limit": LOG_BATCH},
                                     ObserveReply, timeout=OBSERVE_TIMEOUT_S)
        except CubeError as exc:
            log.debug("no observation", sandbox_id=sb.sandbox_id, error=str(exc))
            return False
        sample = reply.sample(sb.sandbox_id, sb.team_id, utcnow())
        self._observed[sb.sandbox_id] = (time.monotonic(), sample)
        self.agent.store.add_metric_samples([sample])
        new = [e for e in reply.entries(sb.sandbox_id, sb.team_id) if e.seq > after]
        if new:
            # what the guest did before it became this sandbox (a warm-pool member's warm-up) is not its log
            since = sb.started_at - STARTED_SLACK
            self.agent.store.add_log_entries([e for e in new if e.at >= since])
            self.cursors[sb.sandbox_id] = max(e.seq for e in new)
        elif reply.last_seq < after:  # a guest that started over (rollback): read it from the start
            self.cursors[sb.sandbox_id] = 0
        return True


_SAMPLERS: weakref.WeakKeyDictionary[NodeAgent, Sampler] = weakref.WeakKeyDictionary()


def attach(agent: NodeAgent) -> Sampler:
    """Start sampling ``agent``'s sandboxes (from ``NodeAgent.start``)."""
    sampler = _SAMPLERS[agent] = Sampler(agent)
    sampler.start()
    return sampler


async def detach(agent: NodeAgent) -> None:
    """Stop sampling (from ``NodeAgent.stop``); a no-op if it never started."""
    sampler = _SAMPLERS.pop(agent, None)
    if sampler is not None:
        await sampler.stop()


def sampler_of(agent: NodeAgent) -> Sampler | None:
    return _SAMPLERS.get(agent)
