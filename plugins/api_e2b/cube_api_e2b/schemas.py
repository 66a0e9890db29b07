"""Pydantic models of the E2B wire format (openapi/e2b.yml; NewSandboxV2 and ConnectSandboxV2 from
the e2b 2.63.0 SDK), with the camelCase names as aliases.

Requests are validated strictly (a string is not an integer) and name the bad field; unknown fields
are ignored, as upstream does, so newer SDKs keep working. Responses leave unset optional fields
out (``exclude_none``), because the spec types most of them as non-nullable strings.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer
from pydantic.alias_generators import to_camel

E2bState = Literal["running", "paused"]
BuildStatus = Literal["building", "waiting", "ready", "error"]

#: Wire names that plain camelCase would get wrong.
SPECIAL_NAMES = {
    "template_id": "templateID", "sandbox_id": "sandboxID", "client_id": "clientID", "build_id": "buildID",
    "memory_mb": "memoryMB", "snapshot_id": "snapshotID", "parent_id": "parentID", "disk_size_mb": "diskSizeMB",
    "error_code": "error_code",
}


def response_name(field: str) -> str:
    return SPECIAL_NAMES.get(field) or to_camel(field)


def request_name(field: str) -> str:
    # the create/update requests spell this one in snake_case (E2B_PROTOCOL.md §3.3)
    return field if field == "allow_internet_access" else response_name(field)


class Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True, frozen=True,
                              alias_generator=request_name)


class Response(BaseModel):
    model_config = ConfigDict(populate_by_name=True, frozen=True, alias_generator=response_name)


# -- requests ----------------------------------------------------------------------------------


class SandboxNetworkConfig(Request):
    allow_public_traffic: bool | None = None
    allow_out: list[str] | None = None
    deny_out: list[str] | None = None
    dns_servers: list[str] | None = None
    egress_proxy: dict[str, Any] | None = None
    mask_request_host: str | None = None
    https_ports: list[int] | None = None
    rules: dict[str, Any] | None = None


class SandboxAutoResumeConfig(Request):
    enabled: bool


class SandboxVolumeMount(Request):
    name: str
    path: str
    read_only: bool | None = None
    """Cube's extension (``readOnly``); the SDK sends name and path only (read-write)."""


class NewSandboxV2(Request):
    """``POST /v2/sandboxes`` (SDK >= 2.51). Every sandbox it creates is secured (envd access token)."""

    template_id: str = Field(min_length=1)
    timeout: int | None = Field(default=None, ge=0)
    auto_pause: bool | None = None
    auto_pause_memory: bool | None = None
    auto_resume: SandboxAutoResumeConfig | None = None
    allow_internet_access: bool | None = None
    network: SandboxNetworkConfig | None = None
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = None
    mcp: dict[str, Any] | None = None
    iam: dict[str, Any] | None = None
    volume_mounts: list[SandboxVolumeMount] | None = None


class NewSandbox(NewSandboxV2):
    """``POST /sandboxes`` (SDK <= 2.50): NewSandboxV2 plus ``secure``."""

    secure: bool | None = None


class ConnectSandbox(Request):
    """``POST /sandboxes/{id}/connect`` (SDK 2.10-2.50): ``timeout`` is required."""

    timeout: int = Field(ge=0)


class ConnectSandboxV2(Request):
    """``POST /v2/sandboxes/{id}/connect`` (SDK >= 2.51)."""

    timeout: int | None = Field(default=None, ge=0)
    memory: bool | None = None


class ResumedSandbox(Request):
    """``POST /sandboxes/{id}/resume`` (SDK 2.0-2.9)."""

    timeout: int | None = Field(default=None, ge=0)
    auto_pause: bool | None = None


class SandboxTimeoutRequest(Request):
    timeout: int = Field(ge=0)


class SandboxRefreshRequest(Request):
    duration: int | None = Field(default=None, ge=0, le=3600)


class SandboxPauseRequest(Request):
    memory: bool | None = None
    require_healthy_guest: bool | None = None


class SandboxNetworkUpdateConfig(Request):
    allow_out: list[str] | None = None
    deny_out: list[str] | None = None
    dns_servers: list[str] | None = None
    egress_proxy: dict[str, Any] | None = None
    rules: dict[str, Any] | None = None
    allow_internet_access: bool | None = None


# -- responses ---------------------------------------------------------------------------------


class ErrorBody(Response):
    code: int
    message: str
    error_code: str | None = None


class SandboxOut(Response):
    """``Sandbox``: the answer to create, connect and resume."""

    template_id: str
    sandbox_id: str
    alias: str | None = None
    client_id: str
    envd_version: str
    envd_access_token: str | None = None
    traffic_access_token: str | None = None
    domain: str | None = None


class NetworkConfigOut(Response):
    allow_public_traffic: bool
    allow_out: list[str]
    deny_out: list[str]
    rules: dict[str, list[dict[str, Any]]] | None = None


class LifecycleOut(Response):
    auto_resume: bool
    on_timeout: Literal["kill", "pause"]


class VolumeMountOut(Response):
    name: str
    path: str


class ListedSandboxOut(Response):
    template_id: str
    alias: str | None = None
    sandbox_id: str
    client_id: str
    started_at: datetime
    end_at: datetime
    cpu_count: int
    memory_mb: int
    disk_size_mb: int
    metadata: dict[str, str] | None = None
    state: E2bState
    envd_version: str
    volume_mounts: list[VolumeMountOut] | None = None


class SandboxDetailOut(ListedSandboxOut):
    envd_access_token: str | None = None
    allow_internet_access: bool | None = None
    domain: str | None = None
    network: NetworkConfigOut | None = None
    lifecycle: LifecycleOut | None = None


class SandboxMetricOut(Response):
    timestamp: datetime
    timestamp_unix: int
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int


class SandboxesWithMetricsOut(Response):
    sandboxes: dict[str, SandboxMetricOut]


class TeamMetricOut(Response):
    timestamp: datetime
    timestamp_unix: int
    concurrent_sandboxes: int
    sandbox_start_rate: float


class MaxTeamMetricOut(Response):
    timestamp: datetime
    timestamp_unix: int
    value: float


class SandboxLogOut(Response):
    timestamp: datetime
    line: str


class SandboxLogEntryOut(Response):
    timestamp: datetime
    message: str
    level: Literal["debug", "info", "warn", "error"]
    fields: dict[str, str]


class SandboxLogsOut(Response):
    logs: list[SandboxLogOut]
    log_entries: list[SandboxLogEntryOut]


class SandboxLogsV2Out(Response):
    logs: list[SandboxLogEntryOut]


class TemplateOut(Response):
    template_id: str
    build_id: str
    cpu_count: int
    memory_mb: int
    disk_size_mb: int
    public: bool
    aliases: list[str]
    names: list[str]
    created_at: datetime
    updated_at: datetime
    created_by: None = None
    last_spawned_at: datetime | None = None
    spawn_count: int
    build_count: int
    envd_version: str
    build_status: BuildStatus


class TemplateBuildOut(Response):
    build_id: str
    status: BuildStatus
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
    cpu_count: int
    memory_mb: int
    disk_size_mb: int | None = None
    envd_version: str | None = None

    @model_serializer(mode="wrap")
    def _set_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Unset optional fields left out (the spec's are non-nullable), in a template answer
        that keeps its own ``null`` fields (``createdBy``, ``lastSpawnedAt``)."""
        return {k: v for k, v in handler(self).items() if v is not None}


class TemplateWithBuildsOut(TemplateOut):
    """The spec's ``TemplateWithBuilds``; e2b 2.63.0's client also requires every ``Template`` field."""

    builds: list[TemplateBuildOut]


class TemplateUpdateIn(Request):
    public: bool | None = None


class TemplateUpdateOut(Response):
    names: list[str]


class TemplateAliasOut(Response):
    template_id: str
    public: bool


class NetworkAuditOut(Response):
    """Cube extension: ``GET /sandboxes/{id}/network/audit``."""

    sandbox_id: str
    events: list[dict[str, Any]]


class ExecCommand(Request):
    """Cube extension: ``POST /sandboxes/{id}/exec`` (``cube sandbox exec``)."""

    cmd: list[str] = Field(min_length=1, max_length=256)
    timeout: float = Field(default=60.0, gt=0, le=3600)


class ExecOut(Response):
    sandbox_id: str
    exit_code: int | None
    stdout: str
    stderr: str
    truncated: bool


class ForkSandbox(Request):
    timeout: int | None = Field(default=None, ge=0, le=86_400 * 30)
    count: int = Field(default=1, ge=1, le=20)


class NewSnapshot(Request):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    memory: bool | None = None


class RollbackSandbox(Request):
    snapshot_id: str = Field(min_length=1)


class ForkItemOut(Response):
    sandbox: SandboxOut | None = None
    error: dict[str, object] | None = None


class SnapshotInfoOut(Response):
    snapshot_id: str
    names: list[str]
    # Cube extensions (the SDK ignores them): where the snapshot comes from, so snapshots form a tree
    sandbox_id: str | None = None
    parent_id: str | None = None
    """The snapshot this one builds on: the one its sandbox was created from or last rolled back
    to, else the template's own snapshot."""
    created_at: datetime | None = None
