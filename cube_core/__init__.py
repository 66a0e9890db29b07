"""Cube's public plugin API: the hook marker, errors, models, driver contracts and the doctor Check.

Plugins import from here (and from ``cube_core.testing``) only; underscore modules are private.
"""

from __future__ import annotations

import pluggy

from cube_core.doctor import Check
from cube_core.errors import (
    AbnormalShutdownError,
    AdmissionRejectedError,
    AuthError,
    CapacityError,
    ConfigError,
    CubeError,
    GuestProtocolError,
    GuestTimeoutError,
    InvalidStateError,
    NetworkError,
    NoCapacityError,
    NodeError,
    NodeUnavailableError,
    PluginConflictError,
    PluginError,
    PluginLoadError,
    PluginMissingError,
    PluginNotFoundError,
    QuotaExceededError,
    SandboxError,
    SandboxFailedError,
    SandboxNotFoundError,
    SchedulingError,
    SnapshotInUseError,
    SnapshotNotFoundError,
    StorageError,
    TemplateBuildError,
    TemplateError,
    TemplateNotFoundError,
    UnsupportedOperation,
    VmmError,
    VolumeError,
    VolumeFullError,
    VolumeInUseError,
    VolumeMountedError,
    VolumeNameTakenError,
    VolumeNotFoundError,
    VolumePathError,
    VolumePathNotFoundError,
)
from cube_core.models import (
    DiskHandle,
    EgressRule,
    HttpRule,
    Isolation,
    NetworkPolicy,
    NicHandle,
    Node,
    NodeStatus,
    Rejection,
    Sandbox,
    SandboxRuntime,
    SandboxSpec,
    SnapshotRef,
    StateFile,
    StopReason,
    Template,
    TemplateStatus,
    VmHandle,
    VmSpec,
    VmState,
    Volume,
    VolumeMount,
)
from cube_core.network import CAP_HTTP_RULES, NetworkDriver, SecretSource
from cube_core.scheduler import Scheduler
from cube_core.snapshotfiles import content_key
from cube_core.state import SandboxState
from cube_core.storage import (
    CAP_VOLUMES,
    VOLUME_DEVICE_BYTES,
    Progress,
    RootfsImage,
    RootfsRecipe,
    StorageDriver,
    VolumeEntry,
    VolumeStore,
)
from cube_core.vmm import CAP_PAUSE, CAP_PRIORITY, CAP_REATTACH, CAP_SNAPSHOT, VmActivity, VmmDriver

hookimpl = pluggy.HookimplMarker("cube")

# Imported last: these modules import the names above.
from cube_core.config import CoreSettings  # noqa: E402
from cube_core.models import Team  # noqa: E402
from cube_core.service import SandboxService  # noqa: E402

__all__ = [
    "CAP_HTTP_RULES", "CAP_PAUSE", "CAP_PRIORITY", "CAP_REATTACH", "CAP_SNAPSHOT", "CAP_VOLUMES", "VOLUME_DEVICE_BYTES",
    "AbnormalShutdownError", "AdmissionRejectedError", "AuthError", "CapacityError", "Check", "ConfigError",
    "CoreSettings", "CubeError", "DiskHandle", "EgressRule", "GuestProtocolError", "HttpRule", "GuestTimeoutError",
    "InvalidStateError", "Isolation",
    "NetworkDriver", "NetworkError", "NetworkPolicy", "NicHandle", "NoCapacityError", "Node",
    "NodeError", "NodeStatus", "NodeUnavailableError",
    "PluginConflictError", "PluginError", "PluginLoadError", "PluginMissingError",
    "PluginNotFoundError", "Progress", "QuotaExceededError", "Rejection", "RootfsImage", "RootfsRecipe", "Sandbox",
    "SandboxError", "SandboxFailedError", "SandboxRuntime", "SandboxNotFoundError", "SandboxService", "SandboxSpec",
    "SandboxState",
    "Scheduler",
    "SchedulingError", "SecretSource", "SnapshotInUseError", "SnapshotNotFoundError", "SnapshotRef", "StopReason",
    "StateFile", "StorageDriver", "StorageError", "Team", "Template", "TemplateBuildError", "TemplateError",
    "TemplateNotFoundError", "TemplateStatus", "UnsupportedOperation", "VmHandle", "VmSpec",
    "VmActivity", "VmState", "VmmDriver", "VmmError", "Volume", "VolumeEntry", "VolumeError", "VolumeFullError",
    "VolumeInUseError", "VolumeMountedError", "VolumeMount", "VolumeNameTakenError", "VolumeNotFoundError",
    "VolumePathError", "VolumePathNotFoundError", "VolumeStore", "content_key", "hookimpl",
]
