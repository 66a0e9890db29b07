"""The node agent's sampler: every ``[core] sample_interval_s`` it asks each running sandbox's guest
agent (control op ``observe``) for a metrics sample and the log entries after its cursor, and writes
both to the state store; once a minute it drops what is older than ``[core] observations_keep_s``.
A sandbox whose VM has been idle since the last round (the VMM's CPU count, read on the host) is
asked only every ``[core] sample_idle_interval_s``: each ask wakes the guest, which is most of what
an idle sandbox costs the host. In the rounds between, its last answer is stored again with the
round's time and the CPU use the host counted, so the history keeps one sample per round (memory
and disk use barely change in a guest that runs under 1 % of a core).

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

if TYPE_CHECKING:
    from cube_core.node import NodeAgent

log = structlog.get_logger(__name__)

OBSERVE_TIMEOUT_S = 3.0
LOG_BATCH = 500
PRUNE_EVERY_S = 60.0
STARTED_SLACK = timedelta(seconds=2)  # the guest's clock against the host's
IDLE_CPU_PCT = 1.0
"""A sandbox whose VM used less than this much of one core (host CPU) since the last round is idle:
its guest is asked only every ``[core] sample_idle_interval_s``. An idle guest's VM uses ~0.2 % under
TCG with the asks included (docs/bench.md, "Idle CPU per sandbox"); a command or a file write is more."""


class Sampler:
    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent
        settings = agent.settings
        self.interval_s = settings.sample_interval_s
        self.keep = timedelta(seconds=settings.observations_keep_s)
        self.cursors: dict[str, int] = {}
        """The last log sequence number stored, by sandbox."""
        self.idle_interval_s = settings.sample_idle_interval_s
        self._cpu: dict[str, tuple[float, float]] = {}
        """By sandbox: its VM's CPU seconds and the monotonic time they were read, at the last round."""
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
        for table in (self.cursors, self._cpu, self._observed):
            for gone in set(table) - ids:
                del table[gone]
        due, carried, now = [], [], utcnow()
        for sb in live:
            pct = await self.idle_pct(sb)
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

    async def idle_pct(self, sb: Sandbox) -> float | None:
        """None: ask ``sb``'s guest this round. Else its VM has been idle (less than
        :data:`IDLE_CPU_PCT` of one core since the last round, by the VMM's count, which wakes
        nobody) and its guest answered less than ``sample_idle_interval_s`` ago: the % of one core
        its VM used since the last round."""
        if self.idle_interval_s <= 0:
            return None
        assert sb.runtime.vm is not None
        now = time.monotonic()
        cpu = await self.agent.vmm.cpu_seconds(sb.runtime.vm)
        before = self._cpu.pop(sb.sandbox_id, None)
        if cpu is None:
            return None
        self._cpu[sb.sandbox_id] = (cpu, now)
        answered = self._observed.get(sb.sandbox_id)
        if before is None or answered is None or now - answered[0] >= self.idle_interval_s:
            return None
        pct = 100 * max(0.0, cpu - before[0]) / max(now - before[1], 1e-3)
        return pct if pct < IDLE_CPU_PCT else None

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
