"""Pydantic models shared by the core and every plugin.

Specs and records are frozen and reject unknown fields; change one with ``evolve(...)``, which
validates the result like a new object (``model_copy(update=...)`` does not validate: never use it
for a record). What a guest sends is validated with the ``*Reply`` models before it is used.
Driver handles (``VmHandle``, ``DiskHandle``, ``NicHandle``, ``VmState``) carry a ``data`` dict for
the driver's own persisted fields, so the core can store and hand them back without knowing them.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cube_core.state import SandboxState

Isolation = Literal["kvm", "tcg", "none"]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def evolve(self, **changes: Any) -> Self:
        """A copy with ``changes``, validated like a new object (unlike ``model_copy(update=)``)."""
        return self.model_validate({**self.model_dump(), **changes})


class HttpRule(Frozen):
    """One E2B ``network.rules`` entry: headers set on the sandbox's outbound HTTP requests to
    ``host`` (a domain, ``*.domain``, an address or a CIDR), by the node's egress proxy.

    Header values may hold ``${e2b.secrets.<name>}`` placeholders: they are kept as written
    (never resolved here) and resolved by the proxy per request from the sandbox's team's
    secrets, so a value never enters the guest, the policy records or their events."""

    host: str
    headers: dict[str, str] = Field(default_factory=dict)


class NetworkPolicy(Frozen):
    """Egress policy of one sandbox (E2B ``allow_internet_access`` + ``network`` options)."""

    allow_internet_access: bool = True
    allow_out: tuple[str, ...] = ()
    deny_out: tuple[str, ...] = ()
    allow_public_traffic: bool = True
    rules: tuple[HttpRule, ...] = ()
    """Header transforms, applied in order (a later rule's header replaces an earlier one's)."""


class VolumeMount(Frozen):
    """A volume mounted into a sandbox at ``path`` (E2B ``volumeMounts``: the volume by name)."""

    name: str
    path: str
    read_only: bool = False
    volume_id: str | None = None
    """Set by the control plane when it resolves ``name`` in the sandbox's team."""


class Volume(Frozen):
    """The record of one team volume (``/volumes``): a filesystem of ``size_mb`` (its quota) kept
    by the storage plugin of node ``node_id``, mountable into that node's sandboxes."""

    volume_id: str
    team_id: str
    name: str
    size_mb: int = Field(ge=1)
    token: str = Field(repr=False)
    """Bearer token of the volume content API (``Volume.token`` in the SDK)."""
    node_id: str
    created_at: datetime = Field(default_factory=lambda: utcnow())


class SandboxSpec(Frozen):
    """What a client asked for; inert, no live resources."""

    template_id: str
    team_id: str
    timeout_s: int = Field(default=300, ge=0, le=86_400 * 30)
    metadata: dict[str, str] = Field(default_factory=dict)
    env_vars: dict[str, str] = Field(default_factory=dict)
    auto_pause: bool = False
    auto_pause_memory: bool = True
    """False: the pause at the timeout keeps only the disk (a filesystem-only pause)."""
    auto_resume: bool = False
    """A paused sandbox is resumed by traffic for it (the edge proxy) as well as by ``connect``."""
    secure: bool = False
    network: NetworkPolicy = Field(default_factory=NetworkPolicy)
    cpu_count: int = Field(default=1, ge=1, le=64)
    memory_mb: int = Field(default=512, ge=64, le=1 << 20)
    """Set by the service from the template before admission and placement: a sandbox is a clone
    of its template's snapshot, so its size is the template's (what ``cube_admit_sandbox`` and the
    scheduler see)."""
    from_snapshot: str | None = None
    """Set by the service when ``template_id`` names a snapshot of the caller's team."""
    volume_mounts: tuple[VolumeMount, ...] = ()


class Sandbox(Frozen):
    """The record of one sandbox, as the state store keeps it."""

    sandbox_id: str
    template_id: str
    alias: str | None = None
    team_id: str
    state: SandboxState
    started_at: datetime
    end_at: datetime
    metadata: dict[str, str] = Field(default_factory=dict)
    env_vars: dict[str, str] = Field(default_factory=dict)
    cpu_count: int = 1
    memory_mb: int = 512
    auto_pause: bool = False
    auto_pause_memory: bool = True
    """False: the pause at the timeout keeps only the disk (a filesystem-only pause)."""
    auto_resume: bool = False
    timeout_s: int | None = None
    """The timeout it was created with: what a resume by traffic (``auto_resume``) gives it again."""
    paused_at: datetime | None = None
    """When it was paused (None unless ``paused``): after ``[core] pause_to_disk_after_s`` it is
    written out to disk (``runtime.saved``) and its VM process ends."""
    secure: bool = False
    envd_access_token: str | None = None
    network: NetworkPolicy = Field(default_factory=NetworkPolicy)
    node_id: str = "local"
    isolation: Isolation = "none"
    boot_id: str | None = None
    error: str | None = None
    volume_mounts: tuple[VolumeMount, ...] = ()
    """Volumes mounted in the sandbox (resolved: each has its ``volume_id``)."""
    runtime: SandboxRuntime = Field(default_factory=lambda: SandboxRuntime())
    """Where the live sandbox is on its node (driver handles), kept so a restarted node agent can
    re-attach; empty once it has stopped."""

    @field_validator("runtime", mode="before")
    @classmethod
    def _runtime_of_old_records(cls, value: Any) -> Any:
        return value or {}


class TemplateStatus(enum.StrEnum):
    BUILDING = "building"
    READY = "ready"
    FAILED = "failed"


class SnapshotRef(Frozen):
    """A memory + device state + disk layer set that a sandbox can be restored from."""

    snapshot_id: str
    template_id: str
    sandbox_id: str | None = None
    parent_id: str | None = None
    team_id: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    vm_state: VmState | None = None
    disk: DiskHandle | None = None
    """The saved VM and its frozen disk layer on the node that took it (``node_id``)."""
    node_id: str | None = None
    names: tuple[str, ...] = ()
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("vm_state", "disk", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return value or None

    @property
    def base_state_id(self) -> str | None:
        """The snapshot whose files this one's memory needs (see :attr:`VmState.base_state_id`)."""
        return self.vm_state.base_state_id if self.vm_state else None


class Template(Frozen):
    template_id: str
    aliases: tuple[str, ...] = ()
    status: TemplateStatus = TemplateStatus.BUILDING
    kernel: str | None = None
    initrd: str | None = None
    rootfs: str | None = None
    rootfs_bytes: int = 0
    interpreter: bool = False
    cpu_count: int = 1
    memory_mb: int = 512
    envd_version: str = "0.4.0"
    build_log: str = ""
    created_at: datetime = Field(default_factory=utcnow)
    snapshot: SnapshotRef | None = None
    team_id: str | None = None
    """The team a template built with the SDK belongs to (only it changes, rebuilds and deletes it;
    other teams see and use it only when :attr:`published`); None: built in, public."""
    build_id: str | None = None
    """The build (``cube_core.buildspec.TemplateBuild``) this template's files come from."""
    published: bool = False
    """The owner team made it public (``PATCH /templates/{id}``): every team lists it and starts
    sandboxes from it (or builds on it); unpublishing stops new ones, not the ones started."""
    updated_at: datetime | None = None
    """The last rebuild or publish/unpublish; None: not changed since :attr:`created_at`."""

    @property
    def public(self) -> bool:
        """Every team sees and uses it: built in, or published by its team."""
        return self.team_id is None or self.published


class NodeStatus(enum.StrEnum):
    UP = "up"
    DRAINING = "draining"
    """Keeps its sandboxes, takes no new ones (``cube node drain``)."""
    DOWN = "down"
    """Missed its heartbeats: its sandboxes are unreachable until it returns."""


class Node(Frozen):
    """One node agent as it reports itself (registration, then every heartbeat)."""

    node_id: str
    url: str | None = None
    """Where masters reach the node agent (``http://host:port``); None: in this process."""
    status: NodeStatus = NodeStatus.UP
    heartbeat_at: datetime = Field(default_factory=utcnow)
    cpu_total: int
    memory_mb_total: int
    cpu_used: int = 0
    memory_mb_used: int = 0
    """What its live sandboxes reserve: memory for every live one (warm-pool members too), vCPUs
    for those not paused."""
    sandboxes: int = 0
    sandboxes_paused: int = 0
    pool: dict[str, int] = Field(default_factory=dict)
    """Warm-pool members ready, per template."""
    templates: tuple[str, ...] = ()
    """Templates ready on this node."""
    disk_free_mb: int = 0
    memory_mb_available: int = 0
    """The host's available memory (``MemAvailable``) at the report; 0: unknown. Below ``[core]
    pause_to_disk_below_mb`` its paused sandboxes are written out to disk at once."""
    isolation: Isolation = "none"
    snapshots: tuple[str, ...] = ()
    """Snapshots of other nodes this node holds a copy of (imported to launch from them); the
    control plane deletes these copies with the snapshot."""

    @property
    def healthy(self) -> bool:
        """Takes new sandboxes."""
        return self.status == NodeStatus.UP


class Team(Frozen):
    team_id: str
    name: str
    created_at: datetime = Field(default_factory=utcnow)


class ApiKey(Frozen):
    key_id: str
    team_id: str
    key_hash: str
    prefix: str
    created_at: datetime = Field(default_factory=utcnow)
    revoked: bool = False


class StopReason(enum.StrEnum):
    KILLED = "killed"
    TIMEOUT = "timeout"
    ERROR = "error"
    SHUTDOWN = "shutdown"


class Rejection(Frozen):
    """A decision hook's reason to refuse a sandbox."""

    reason: str
    retryable: bool = False


class EgressRule(Frozen):
    """One egress rule contributed by a plugin (``cube_egress_rules``)."""

    action: Literal["allow", "deny"]
    target: str
    """A CIDR (``198.18.0.0/15``), an address, or a domain name (``example.com``, ``*.example.com``)."""
    protocol: Literal["tcp", "udp", "any"] = "any"
    port: int | None = None


# -- what a guest answers (hostile input: typed, bounded, extra fields ignored) ----------------


class GuestReply(BaseModel):
    """Base of the models a guest agent's replies are validated with before the host uses them."""

    model_config = ConfigDict(frozen=True, extra="ignore")


GuestId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
GuestNumber = Annotated[float, Field(ge=-1e12, le=1e12, allow_inf_nan=False)]


class PersonalizeReply(GuestReply):
    """``personalize``: the guest's boot id (recorded on the sandbox) and how long each step took."""

    boot_id: GuestId
    timings_ms: dict[Annotated[str, Field(max_length=64)], GuestNumber] = Field(default_factory=dict,
                                                                               max_length=32)


class SyncClockReply(GuestReply):
    behind_ms: GuestNumber | None = None


class WarmUpReply(GuestReply):
    ms: GuestNumber | None = None


class ExecReply(GuestReply):
    exit_code: int | None = Field(default=None, ge=-255, le=255)
    stdout: str = Field(default="", max_length=1 << 20)
    stderr: str = Field(default="", max_length=1 << 20)
    truncated: bool = False


# -- driver handles ----------------------------------------------------------------------------


class VmSpec(Frozen):
    """How to start one VM; the VMM driver turns it into a process."""

    vm_id: str
    kernel: Path
    initrd: Path | None = None
    """Only for kernels that need one (the stock-kernel fallback); the Cube kernel boots without."""
    rootfs_disk: DiskHandle
    memory_mb: int = 512
    cpu_count: int = 1
    interpreter: bool = False
    cmdline_extra: tuple[str, ...] = ()
    """Extra kernel parameters. Never ``--``: QEMU appends its device list after them."""
    volumes: tuple[DiskHandle, ...] = ()
    """Volume images for the VM's volume slots, in slot order (raw, ``readonly`` for a read-only
    mount); the slots left over get an empty placeholder. More than the VMM's slots is an error."""


class DiskHandle(Frozen):
    """A sandbox's writable disk (owned by the storage driver)."""

    disk_id: str
    path: Path
    format: Literal["raw", "qcow2"] = "qcow2"
    readonly: bool = False
    data: dict[str, Any] = Field(default_factory=dict)


class NicHandle(Frozen):
    """A sandbox's network slot (owned by the network driver)."""

    slot_id: str
    netns: str | None = None
    tap: str | None = None
    guest_address: str
    """Where the host reaches the guest (an address routable from the host's namespace)."""
    guest_mac: str = "52:54:00:00:00:21"
    data: dict[str, Any] = Field(default_factory=dict)


class VmHandle(Frozen):
    """A live VM (owned by the VMM driver)."""

    vm_id: str
    pid: int | None = None
    isolation: Isolation
    workdir: Path
    boot_id: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)


class SandboxRuntime(Frozen):
    """Where a live sandbox is on its node: its driver handles (each owned by its driver), and
    the snapshot it was last restored from (the parent of its next snapshot)."""

    vm: VmHandle | None = None
    disk: DiskHandle | None = None
    nic: NicHandle | None = None
    parent_snapshot: str | None = None
    saved: VmState | None = None
    """A paused sandbox written out to disk: its memory and devices (an incremental snapshot of
    the node's storage, ``saved.state_id``); ``vm`` is None then (no VM process runs), and a
    resume restores it onto the same disk and network slot."""

    @property
    def on_disk(self) -> bool:
        return self.saved is not None and self.vm is None

    @property
    def disk_only(self) -> bool:
        """Paused without its memory (a filesystem-only pause): no VM, no saved state; its disk
        and network slot stay, and a resume boots it from its disk."""
        return self.vm is None and self.saved is None and self.disk is not None

    @property
    def without_vm(self) -> bool:
        """Paused with no VM process: written out to disk, or filesystem only."""
        return self.on_disk or self.disk_only


class StateFile(Frozen):
    """One file a restore of a snapshot reads, as the driver that wrote it describes it (what a
    node copies to another one: ``VmmDriver.state_files``, ``StorageDriver.layer_files``)."""

    path: Path
    """Where it is on this node."""
    key: str | None = None
    """A name that means the same bytes on every node (``sha256:...`` of the content, or
    ``layer:<snapshot id>`` for a frozen disk layer, which never changes): a node that holds a
    file of that key needs no copy. None: a file of this snapshot alone (always copied)."""
    parent: str | None = None
    """Disk layers: the key of the file this one is backed by (None: no backing file)."""


class VmState(Frozen):
    """A saved VM: memory file + device state, enough to restore clones from. ``memory_file``
    equals ``device_state`` when the RAM is inside the state stream. A state may also need the
    files of another one (``base_state_id``): an incremental snapshot of a clone holds only what
    changed since its template."""

    state_id: str
    memory_file: Path
    device_state: Path
    memory_mb: int
    cpu_count: int = 1
    kernel: Path
    initrd: Path | None = None
    isolation: Isolation
    data: dict[str, Any] = Field(default_factory=dict)
    base_state_id: str | None = None
    """The state (snapshot id) whose files this one needs to be restored, e.g. the template of an
    incremental snapshot; keep that snapshot as long as this one exists. None: self-contained."""
    volume_slots: int = 0
    """How many volume slots (spare block devices) the saved VM has: a clone restored from it
    can mount that many volumes (VMs cannot gain devices after a snapshot)."""

    def clone_spec(self, vm_id: str, disk: DiskHandle, *, interpreter: bool,
                   volumes: tuple[DiskHandle, ...] = ()) -> VmSpec:
        """The spec of a VM restored from this state onto ``disk``."""
        return VmSpec(vm_id=vm_id, kernel=self.kernel, initrd=self.initrd, rootfs_disk=disk,
                      memory_mb=self.memory_mb, cpu_count=self.cpu_count, interpreter=interpreter,
                      volumes=volumes)


VmSpec.model_rebuild()
SnapshotRef.model_rebuild()
SandboxRuntime.model_rebuild()
Sandbox.model_rebuild()
Template.model_rebuild()
