"""Team volumes: the records and rules (control plane) and the calls a node runs for them.

A volume is a filesystem image kept by the storage plugin of one node (:class:`VolumeStore`, the
capability ``volumes``); the control plane records it (team, name, size, node, content token) in
the state store. Rules, all here:

- team-scoped: another team's volume is not found (404), by id or by name;
- a volume is mounted read-write by at most one live sandbox: a second mount, its deletion and
  the content API answer :class:`VolumeInUseError` (409) until that sandbox is gone. Read-only
  mounts may be shared with other read-only mounts (never with a read-write one) and leave
  content reads possible;
- its sandboxes run on its node (placement), from a template snapshot with volume slots.

The node side is one call, :class:`VolumeCall` -> :class:`VolumeAnswer`
(``NodeClient.volume``), dispatched to the node's :class:`VolumeStore` by :func:`run_call`.
"""

from __future__ import annotations

import base64
import builtins
import hmac
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_serializer, field_validator

from cube_core import ids
from cube_core.errors import (
    AuthError,
    NodeUnavailableError,
    VolumeInUseError,
    VolumeNameTakenError,
    VolumeNotFoundError,
    VolumePathError,
)
from cube_core.models import Frozen, Sandbox, Volume, VolumeMount
from cube_core.state import SandboxState
from cube_core.storage import VOLUME_MAX_MB, VolumeEntry, VolumeStore

if TYPE_CHECKING:
    from cube_core.config import CoreSettings
    from cube_core.nodes import NodeDirectory
    from cube_core.store import StateStore

LIVE = (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.PAUSED)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
MAX_PATH = 4096


def normalize(path: str) -> str:
    """A content API path as the volume store takes it: absolute, no ``.``/``..``/``//``."""
    if not path or len(path) > MAX_PATH or "\0" in path:
        raise VolumePathError(path=path[:100], reason="must be a non-empty path")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise VolumePathError(path=path, reason="'..' is not allowed")
    if any(len(p.encode()) > 255 for p in parts):
        raise VolumePathError(path=path, reason="a name is longer than 255 bytes")
    return "/" + "/".join(parts)


def mount_path(path: str) -> str:
    """Where a volume is mounted in a sandbox: absolute, normalized, not the root."""
    if not path.startswith("/"):
        raise VolumePathError(path=path, reason="a mount path must be absolute")
    clean = normalize(path)
    if clean == "/":
        raise VolumePathError(path=path, reason="a volume cannot be mounted at /")
    return clean


# -- the node side ----------------------------------------------------------------------------


class _CarriesBytes(Frozen):
    """``data`` is bytes in the process and base64 text on the wire (node API)."""

    data: bytes = b""

    @field_validator("data", mode="before")
    @classmethod
    def _from_wire(cls, value: Any) -> Any:
        return base64.b64decode(value, validate=True) if isinstance(value, str) else value

    @field_serializer("data", when_used="json")
    def _to_wire(self, value: bytes) -> str:
        return base64.b64encode(value).decode()


class VolumeCall(_CarriesBytes):
    """One operation on a node's volume (``NodeClient.volume``)."""

    op: Literal["create", "delete", "stat", "list", "read", "write", "mkdir", "remove", "update"]
    volume_id: str
    size_mb: int = 0
    path: str = "/"
    depth: int = Field(default=1, ge=1, le=32)
    uid: int | None = Field(default=None, ge=0, le=(1 << 32) - 2)
    gid: int | None = Field(default=None, ge=0, le=(1 << 32) - 2)
    mode: int | None = Field(default=None, ge=0, le=0o7777)
    parents: bool = False


class VolumeAnswer(_CarriesBytes):
    entries: tuple[VolumeEntry, ...] = ()


async def run_call(store: VolumeStore, call: VolumeCall) -> VolumeAnswer:
    """Run ``call`` on this node's volume store."""
    vid, path = call.volume_id, call.path
    opts = {"uid": call.uid, "gid": call.gid, "mode": call.mode}
    match call.op:
        case "create":
            await store.create(vid, call.size_mb)
        case "delete":
            await store.delete(vid)
        case "stat":
            return VolumeAnswer(entries=(await store.stat(vid, path),))
        case "list":
            return VolumeAnswer(entries=tuple(await store.list(vid, path, call.depth)))
        case "read":
            return VolumeAnswer(data=await store.read(vid, path))
        case "write":
            return VolumeAnswer(entries=(await store.write(vid, path, call.data, parents=call.parents, **opts),))
        case "mkdir":
            return VolumeAnswer(entries=(await store.make_dir(vid, path, parents=call.parents, **opts),))
        case "remove":
            await store.remove(vid, path)
        case "update":
            return VolumeAnswer(entries=(await store.update(vid, path, **opts),))
    return VolumeAnswer()


# -- the control plane ------------------------------------------------------------------------


class Volumes:
    """``/volumes``, the volume content API and ``volumeMounts``, for ``SandboxService``."""

    def __init__(self, store: StateStore, settings: CoreSettings, nodes: NodeDirectory) -> None:
        self.store = store
        self.settings = settings
        self.nodes = nodes

    # -- records ---------------------------------------------------------------------------------

    def list(self, team_id: str) -> builtins.list[Volume]:
        return self.store.list_volumes(team_id=team_id)

    def get(self, team_id: str, volume_id: str) -> Volume:
        volume = self.store.get_volume(volume_id)
        if volume is None or volume.team_id != team_id:
            raise VolumeNotFoundError(volume=volume_id)
        return volume

    async def create(self, team_id: str, name: str, size_mb: int | None = None) -> Volume:
        if not NAME.match(name):
            raise VolumePathError(path=name, reason="a volume name is 1-63 letters, digits, '.', '_' or '-'")
        size = size_mb or self.settings.volume_size_mb
        if not 1 <= size <= VOLUME_MAX_MB:
            raise VolumePathError(path=name, reason=f"size must be 1..{VOLUME_MAX_MB} MiB")
        nodes = self.nodes.placeable()
        if not nodes:
            raise NodeUnavailableError(node_id="(any)", detail="no node takes volumes right now")
        node = min(nodes, key=lambda n: len(self.store.list_volumes(node_id=n.node_id)))
        volume = Volume(volume_id=ids.volume_id(), team_id=team_id, name=name, size_mb=size,
                        token=ids.access_token(), node_id=node.node_id)
        if not self.store.add_volume(volume):
            raise VolumeNameTakenError(name=name)
        try:
            await self.nodes.client(node.node_id).volume(VolumeCall(op="create", volume_id=volume.volume_id,
                                                                    size_mb=size))
        except BaseException:
            self.store.delete_volume(volume.volume_id)
            raise
        return volume

    async def delete(self, team_id: str, volume_id: str) -> None:
        volume = self.get(team_id, volume_id)
        users = self.users(volume.volume_id)
        if users:
            raise VolumeInUseError(volume=volume.name, detail=f"mounted by sandbox {users[0].sandbox_id}")
        await self.nodes.client(volume.node_id).volume(VolumeCall(op="delete", volume_id=volume.volume_id))
        self.store.delete_volume(volume.volume_id)

    # -- mounts ----------------------------------------------------------------------------------

    def users(self, volume_id: str, live: Sequence[Sandbox] | None = None) -> builtins.list[Sandbox]:
        """The live sandboxes that mount the volume."""
        if live is None:
            live = self.store.list_sandboxes(states=LIVE)
        return [sb for sb in live if any(m.volume_id == volume_id for m in sb.volume_mounts)]

    def resolve(self, team_id: str, mounts: Sequence[VolumeMount]) -> tuple[tuple[VolumeMount, ...], str | None]:
        """The mounts with their volume ids (by name, in the team) and the node that holds them."""
        resolved: builtins.list[VolumeMount] = []
        node_id: str | None = None
        paths: set[str] = set()
        for mount in mounts:
            volume = self.store.find_volume(team_id, mount.name)
            if volume is None:
                raise VolumeNotFoundError(volume=mount.name)
            path = mount_path(mount.path)
            if path in paths or any(m.volume_id == volume.volume_id for m in resolved):
                raise VolumePathError(path=path, reason="each volume and each path may be mounted once")
            paths.add(path)
            if node_id not in (None, volume.node_id):
                raise VolumeInUseError(volume=volume.name, detail="volumes of one sandbox must be on one node")
            node_id = volume.node_id
            resolved.append(mount.evolve(path=path, volume_id=volume.volume_id))
        return tuple(resolved), node_id

    def check_mountable(self, mounts: Sequence[VolumeMount], live: Sequence[Sandbox]) -> None:
        """Refuse a mount that would share a volume with a read-write mount (caller holds the
        placement lock, so two creates cannot both pass)."""
        for mount in mounts:
            assert mount.volume_id is not None
            for sb in self.users(mount.volume_id, live):
                other = next(m for m in sb.volume_mounts if m.volume_id == mount.volume_id)
                if not (mount.read_only and other.read_only):
                    raise VolumeInUseError(
                        volume=mount.name, detail=f"mounted {'read-only' if other.read_only else 'read-write'} "
                        f"by sandbox {sb.sandbox_id}; a read-write mount is exclusive")

    # -- the content API -------------------------------------------------------------------------

    def authorize(self, volume_id: str, token: str | None) -> Volume:
        """The volume whose content token ``token`` is (the content API's Bearer token)."""
        volume = self.store.get_volume(volume_id)
        if volume is None:
            raise VolumeNotFoundError(volume=volume_id)
        if not token or not hmac.compare_digest(volume.token.encode(), token.encode()):
            raise AuthError("invalid volume token")
        return volume

    async def content(self, volume: Volume, call: VolumeCall) -> VolumeAnswer:
        """Run a content operation; refused while a sandbox mounts the volume read-write (and a
        change while any sandbox mounts it)."""
        changes = call.op not in ("stat", "list", "read")
        for sb in self.users(volume.volume_id):
            mount = next(m for m in sb.volume_mounts if m.volume_id == volume.volume_id)
            if changes or not mount.read_only:
                how = "read-only" if mount.read_only else "read-write"
                raise VolumeInUseError(volume=volume.name, detail=f"mounted {how} by sandbox {sb.sandbox_id}")
        call = call.evolve(path=normalize(call.path), volume_id=volume.volume_id)
        return await self.nodes.client(volume.node_id).volume(call)
