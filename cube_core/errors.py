"""The Cube error tree.

Every failure that Cube reports on purpose is a :class:`CubeError`. Plugins translate their
backend's exceptions at their boundary (``raise SomeCubeError(...) from exc``). HTTP status codes
are chosen only by the API plugin, from this tree::

    CubeError
    ├── ConfigError
    ├── PluginError ── PluginNotFoundError, PluginLoadError, PluginConflictError, PluginMissingError
    ├── SandboxError ── SandboxNotFoundError (── SandboxFailedError), InvalidStateError, AdmissionRejectedError
    ├── TemplateError ── TemplateNotFoundError, TemplateBuildError
    ├── AuthError
    ├── QuotaExceededError
    ├── VmmError ── AbnormalShutdownError, GuestTimeoutError, GuestProtocolError
    ├── NetworkError
    ├── StorageError ── SnapshotNotFoundError, SnapshotInUseError, CapacityError
    │   └── VolumeError ── VolumeNotFoundError, VolumePathError (── VolumePathNotFoundError),
    │                      VolumeNameTakenError, VolumeFullError, VolumeInUseError (── VolumeMountedError)
    ├── SchedulingError ── NoCapacityError
    ├── NodeError ── NodeUnavailableError
    └── UnsupportedOperation

Each class has a message template filled from keyword fields, which stay available as
attributes (``err.sandbox_id``) [ironic ``_msg_fmt``].
"""

from __future__ import annotations

from typing import Any, ClassVar


class CubeError(Exception):
    """Base class of every error Cube raises on purpose."""

    msg_fmt: ClassVar[str] = "{message}"

    def __init__(self, message: str | None = None, **fields: Any) -> None:
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)
        if message is None:
            try:
                message = self.msg_fmt.format(**fields)
            except (KeyError, IndexError):
                message = f"{type(self).__name__}: {fields!r}"
        self.message = message
        super().__init__(message)


class ConfigError(CubeError):
    """plugins.toml (or another setting) is missing, malformed or invalid."""


class PluginError(CubeError):
    """A plugin could not be found, loaded or wired."""


class PluginNotFoundError(PluginError):
    msg_fmt = "no plugin {name!r} in {namespace} — installed: {installed}"


class PluginLoadError(PluginError):
    msg_fmt = "plugin {name!r} in {namespace} failed to load: {reason}"


class PluginConflictError(PluginError):
    msg_fmt = "slot {slot!r} has more than one provider: {providers}"


class PluginMissingError(PluginError):
    msg_fmt = "slot {slot!r} has no provider (hook {hook} returned nothing)"


class SandboxError(CubeError):
    """A sandbox operation failed."""


class SandboxNotFoundError(SandboxError):
    msg_fmt = "sandbox {sandbox_id} not found"


class SandboxFailedError(SandboxNotFoundError):
    """The sandbox is gone because something went wrong (state ``error``); ``reason`` says what."""

    msg_fmt = "sandbox {sandbox_id} was stopped: {reason}"


class InvalidStateError(SandboxError):
    msg_fmt = "sandbox {sandbox_id} is {state}, this needs it to be {required}"


class AdmissionRejectedError(SandboxError):
    msg_fmt = "sandbox rejected: {reason}"


class TemplateError(CubeError):
    """A template could not be found or built."""


class TemplateNotFoundError(TemplateError):
    msg_fmt = "template {template!r} not found"


class TemplateBuildError(TemplateError):
    msg_fmt = "template {template!r} failed to build: {reason}"


class AuthError(CubeError):
    """An API key is missing, malformed, unknown or revoked."""


class QuotaExceededError(CubeError):
    """A team is at one of its quotas (``[quotas]`` in plugins.toml); freeing something lets it go on."""

    msg_fmt = "team {team!r} is at its quota of {limit} {resource}"


class VmmError(CubeError):
    """The VMM failed to start, snapshot, restore or stop a VM."""


class AbnormalShutdownError(VmmError):
    msg_fmt = "VM {vm_id} did not shut down cleanly: {reason}"


class GuestTimeoutError(VmmError):
    msg_fmt = "guest of {vm_id} did not answer within {timeout}s"


class GuestProtocolError(VmmError):
    """The guest answered something the host does not accept (malformed, oversized, wrong
    types, a flood): the guest is treated as hostile and its sandbox is stopped."""

    msg_fmt = "guest of {vm_id} broke the control protocol: {reason}"


class NetworkError(CubeError):
    """Network slot setup, policy or teardown failed."""


class StorageError(CubeError):
    """Disk layers, images or snapshot files failed."""


class SnapshotNotFoundError(StorageError):
    msg_fmt = "snapshot {snapshot_id} not found"


class SnapshotInUseError(StorageError):
    msg_fmt = "snapshot {snapshot_id} is in use: {detail}"


class CapacityError(StorageError):
    msg_fmt = "not enough {resource}: {detail}"


class VolumeError(StorageError):
    """A volume (``/volumes``, the volume content API, ``volumeMounts``) operation failed."""


class VolumeNotFoundError(VolumeError):
    """No such volume in the caller's team (another team's volumes are not found either)."""

    msg_fmt = "volume {volume!r} not found"


class VolumeNameTakenError(VolumeError):
    msg_fmt = "volume name {name!r} is taken in this team"


class VolumePathError(VolumeError):
    """A path of the volume content API is malformed or names the wrong kind of entry."""

    msg_fmt = "{path!r}: {reason}"


class VolumePathNotFoundError(VolumePathError):
    msg_fmt = "path {path!r} not found in volume {volume_id}"


class VolumeFullError(VolumeError):
    """A write needs more than the volume's quota (its size) leaves free."""

    msg_fmt = "volume {volume_id} is full (its quota is {size_mb} MiB)"


class VolumeInUseError(VolumeError):
    """The volume is mounted read-write by a live sandbox: a second mount, its deletion and the
    content API wait until that sandbox is gone (``detail`` names it)."""

    msg_fmt = "volume {volume!r} is in use: {detail}"


class VolumeMountedError(VolumeInUseError):
    """An operation on a sandbox that cannot include its mounted volumes (a snapshot, a pause to
    disk, a fork): refused while the sandbox has volumes mounted."""

    msg_fmt = "sandbox {sandbox_id} has volumes mounted ({volumes}): {operation} is not supported"


class SchedulingError(CubeError):
    """No node could be chosen."""


class NoCapacityError(SchedulingError):
    msg_fmt = "no node has capacity for {cpu} vCPU and {memory_mb} MiB"


class NodeError(CubeError):
    """A node agent could not be reached or refused a request of the control plane."""


class NodeUnavailableError(NodeError):
    """The node that holds a sandbox is down (missed heartbeats) or unreachable: retry later."""

    msg_fmt = "node {node_id} is unavailable: {detail}"


class UnsupportedOperation(CubeError):
    msg_fmt = "{driver} does not support {operation}"
