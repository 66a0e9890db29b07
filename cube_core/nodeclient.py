"""The control plane's only way to a node: the typed :class:`NodeClient` contract.

A node agent (``cube_core.node.NodeAgent``) owns everything that touches a VM, a tap or a disk on
its machine. The control plane (``cube_core.service.SandboxService``) keeps the records and decides;
it reaches a node through a ``NodeClient``: :class:`LocalNodeClient` when the agent runs in the same
process (``cube serve``), ``cube_core.nodehttp.HttpNodeClient`` when it is a ``cube node`` elsewhere.
Both pass one contract suite (``cube_core.testing.node_contract``), so no path exists in one mode only.

Every method names the sandbox by id; the agent finds its live handles itself (after a restart,
from the record's :class:`~cube_core.models.SandboxRuntime`). Errors are :class:`CubeError` s, the
same classes in both modes (the HTTP client rebuilds them from the agent's answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import Field

from cube_core.buildspec import BuildJob
from cube_core.models import (
    DiskHandle,
    EgressRule,
    ExecReply,
    Frozen,
    NetworkPolicy,
    Node,
    Sandbox,
    SandboxRuntime,
    SnapshotRef,
    Template,
    VmState,
)
from cube_core.snapshotfiles import Received
from cube_core.volumes import VolumeAnswer, VolumeCall

if TYPE_CHECKING:
    from cube_core.node import NodeAgent


class LaunchRequest(Frozen):
    """Start ``sandbox`` (its record as the control plane wrote it, state ``creating``) on the node:
    from a warm-pool member of its template when one is ready and ``snapshot`` is None, else by
    restoring ``snapshot`` (a sandbox snapshot) or the template's own snapshot. Then personalize it:
    id, env vars, access token, hostname, clock, fresh entropy."""

    sandbox: Sandbox
    snapshot: SnapshotRef | None = None
    rules: tuple[EgressRule, ...] = ()
    """Egress rules the plugins add to the sandbox's policy (``cube_egress_rules``)."""


class Launched(Frozen):
    """A started, personalized sandbox."""

    runtime: SandboxRuntime
    boot_id: str
    served_by: Literal["pool", "start"]
    sandbox_id: str | None = None
    """The id the sandbox got: a warm-pool member personalized at join is its sandbox already
    (id and access token); the control plane records the sandbox under it. None: the request's."""
    envd_access_token: str | None = None
    """Its envd access token (None for a non-secure sandbox)."""
    timings_ms: dict[str, float] = Field(default_factory=dict)
    """Where the time went on the node (``queued``, ``vm``, ``personalize`` and the guest's own)."""


class SavedSnapshot(Frozen):
    """What a node wrote for a snapshot: the VM's state and its frozen disk layer (no VM state:
    a filesystem snapshot, ``memory=False``)."""

    vm_state: VmState | None = None
    disk: DiskHandle


class Endpoint(Frozen):
    """Where the edge proxy sends a sandbox's traffic for one port.

    ``via`` is None: straight to ``host:port`` (the guest, reachable from this process). Otherwise
    ``via`` is the base URL of the node agent's edge, which forwards to the guest; the request then
    carries the cluster token and the sandbox id and port in ``headers``."""

    host: str
    port: int
    via: str | None = None
    headers: tuple[tuple[str, str], ...] = ()


class NodeClient(Protocol):
    """One node agent, as the control plane sees it."""

    @property
    def node_id(self) -> str: ...

    async def status(self) -> Node:
        """The node's report: capacity, usage, ready templates and pool members (no side effect)."""
        ...

    async def launch(self, request: LaunchRequest) -> Launched:
        """Start and personalize a sandbox; on failure nothing of it is left on the node."""
        ...

    async def destroy(self, sandbox: Sandbox) -> list[str]:
        """Stop the sandbox's VM and free its slot and disk (every step runs, idempotent); the
        steps that failed, described (empty: all freed)."""
        ...

    async def pause(self, sandbox_id: str) -> None: ...

    async def pause_to_disk(self, sandbox_id: str) -> SandboxRuntime:
        """Write a paused sandbox's memory and devices out to disk and end its VM process (its disk
        and network slot stay); the runtime to record (``vm`` None, ``saved`` set)."""
        ...

    async def drop_memory(self, sandbox_id: str) -> SandboxRuntime:
        """End a sandbox's VM and forget its memory, keeping its disk and network slot (a
        filesystem-only pause): the guest syncs its disks first (a paused one is let run for it,
        best effort). A later ``resume`` boots it from its own disk. The runtime to record (``vm``
        and ``saved`` None)."""
        ...

    async def resume(self, sandbox_id: str) -> SandboxRuntime:
        """Let it run again (restoring it first when it was written out to disk) and give the guest
        the time (a paused VM's clock stood still); the runtime to record."""
        ...

    async def snapshot(self, sandbox_id: str, snapshot_id: str, *, memory: bool = True) -> SavedSnapshot:
        """Save memory, devices and disk layer; a running sandbox is paused meanwhile and resumed.
        ``memory=False``: a filesystem snapshot, the disk layer only (the guest syncs first)."""
        ...

    async def delete_snapshot(self, snapshot_id: str) -> None:
        """Delete a snapshot's files (a disk layer that live sandboxes still use is kept)."""
        ...

    async def import_snapshot(self, snapshot: SnapshotRef, origin: Node) -> Received:
        """Copy another node's snapshot here (from ``origin``, over HTTP with the cluster token;
        its base snapshots first, each file only if this node lacks its content), so that
        ``launch`` and ``rollback`` can use it; idempotent. What was copied is answered."""
        ...

    async def rollback(self, sandbox: Sandbox, snapshot: SnapshotRef, *, paused: bool) -> Launched:
        """Replace the sandbox's VM and disk with a restore of ``snapshot`` (same slot); personalize
        it as the same sandbox; pause it again when ``paused``."""
        ...

    async def update_policy(self, sandbox_id: str, policy: NetworkPolicy, rules: Sequence[EgressRule]) -> None: ...

    async def audit(self, sandbox_id: str, limit: int) -> list[dict[str, object]]: ...

    async def exec(self, sandbox_id: str, cmd: Sequence[str], timeout: float) -> ExecReply: ...

    async def build_template(self, job: BuildJob) -> None:
        """Start building a template from the SDK's ``Template`` builder on this node (its parent
        template is ready here); returns at once, the build's record tells how it goes."""
        ...

    async def volume(self, call: VolumeCall) -> VolumeAnswer:
        """Run one operation on a volume this node holds (``cube_core.volumes``)."""
        ...

    async def remove_template(self, template: Template) -> list[str]:
        """``template`` was deleted (its record is gone): stop serving it here, destroy its warm
        members, free its snapshot and the build layers only it used; the snapshot ids deleted."""
        ...

    async def free_build(self, build_id: str, snapshot: SnapshotRef | None) -> list[str]:
        """The template build ``build_id`` was freed (no tag names it, nothing uses it): delete its
        ``snapshot`` if this node holds it or a copy (with the build layers copied in under the
        copy), and the build layers only that build used (a layer another build uses, or that
        still backs a disk or layer, stays); idempotent. The snapshot ids deleted."""
        ...

    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        """Where ``port`` of the sandbox is reached from the control plane's process. A sandbox
        just taken from the warm pool is reached only once its guest applied its create message
        (here, or at the node's edge: the traffic waits, then goes)."""
        ...


class LocalNodeClient:
    """The node agent in this process (``cube serve``): plain calls, same contract."""

    def __init__(self, agent: NodeAgent) -> None:
        self.agent = agent

    @property
    def node_id(self) -> str:
        return self.agent.node_id

    async def status(self) -> Node:
        return self.agent.report()

    async def launch(self, request: LaunchRequest) -> Launched:
        return await self.agent.launch(request)

    async def destroy(self, sandbox: Sandbox) -> list[str]:
        return await self.agent.destroy(sandbox)

    async def pause(self, sandbox_id: str) -> None:
        await self.agent.pause(sandbox_id)

    async def pause_to_disk(self, sandbox_id: str) -> SandboxRuntime:
        return await self.agent.pause_to_disk(sandbox_id)

    async def drop_memory(self, sandbox_id: str) -> SandboxRuntime:
        return await self.agent.drop_memory(sandbox_id)

    async def resume(self, sandbox_id: str) -> SandboxRuntime:
        return await self.agent.resume(sandbox_id)

    async def snapshot(self, sandbox_id: str, snapshot_id: str, *, memory: bool = True) -> SavedSnapshot:
        return await self.agent.snapshot(sandbox_id, snapshot_id, memory=memory)

    async def delete_snapshot(self, snapshot_id: str) -> None:
        await self.agent.delete_snapshot(snapshot_id)

    async def import_snapshot(self, snapshot: SnapshotRef, origin: Node) -> Received:
        return await self.agent.import_snapshot(snapshot, origin)

    async def rollback(self, sandbox: Sandbox, snapshot: SnapshotRef, *, paused: bool) -> Launched:
        return await self.agent.rollback(sandbox, snapshot, paused=paused)

    async def update_policy(self, sandbox_id: str, policy: NetworkPolicy, rules: Sequence[EgressRule]) -> None:
        await self.agent.update_policy(sandbox_id, policy, rules)

    async def audit(self, sandbox_id: str, limit: int) -> list[dict[str, object]]:
        return await self.agent.audit(sandbox_id, limit)

    async def exec(self, sandbox_id: str, cmd: Sequence[str], timeout: float) -> ExecReply:
        return await self.agent.exec(sandbox_id, cmd, timeout)

    async def build_template(self, job: BuildJob) -> None:
        from cube_core.builds import engine_of

        engine_of(self.agent).start(job)

    async def volume(self, call: VolumeCall) -> VolumeAnswer:
        return await self.agent.volume(call)

    async def remove_template(self, template: Template) -> list[str]:
        return await self.agent.remove_template(template)

    async def free_build(self, build_id: str, snapshot: SnapshotRef | None) -> list[str]:
        return await self.agent.free_build(build_id, snapshot)

    async def endpoint(self, sandbox_id: str, port: int) -> Endpoint:
        return Endpoint(host=await self.agent.guest_address(sandbox_id), port=port)
