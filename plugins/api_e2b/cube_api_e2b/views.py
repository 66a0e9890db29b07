"""Cube records -> E2B response models (schemas.py)."""

from __future__ import annotations

from typing import Any

from cube_core import CubeError, HttpRule, Sandbox, SandboxState, SnapshotRef, Template, TemplateStatus
from cube_core.buildspec import TemplateBuild

from cube_api_e2b.context import E2bContext
from cube_api_e2b.schemas import (
    BuildStatus,
    E2bState,
    LifecycleOut,
    ListedSandboxOut,
    NetworkConfigOut,
    SandboxDetailOut,
    SandboxOut,
    SnapshotInfoOut,
    TemplateBuildOut,
    TemplateOut,
    TemplateWithBuildsOut,
    VolumeMountOut,
)

BUILD_STATUS: dict[TemplateStatus, BuildStatus] = {
    TemplateStatus.BUILDING: "building", TemplateStatus.READY: "ready", TemplateStatus.FAILED: "error"}
MIB = 1 << 20


def e2b_state(state: SandboxState) -> E2bState:
    """E2B knows only ``running`` and ``paused``; a sandbox still being created is reported running."""
    return "paused" if state == SandboxState.PAUSED else "running"


class TemplateLookup:
    """Templates by id for one request (a sandbox's template may have been removed since)."""

    def __init__(self, ctx: E2bContext) -> None:
        self._ctx = ctx
        self._cache: dict[str, Template | None] = {}

    def get(self, template_id: str) -> Template | None:
        if template_id not in self._cache:
            try:
                self._cache[template_id] = self._ctx.service.get_template(template_id)
            except CubeError:
                self._cache[template_id] = None
        return self._cache[template_id]


def _envd_version(ctx: E2bContext, templates: TemplateLookup, sb: Sandbox) -> str:
    template = templates.get(sb.template_id)
    return ctx.envd_version(template.envd_version if template else None)


def _disk_mb(templates: TemplateLookup, sb: Sandbox) -> int:
    template = templates.get(sb.template_id)
    return (template.rootfs_bytes + MIB - 1) // MIB if template else 0


def sandbox_out(ctx: E2bContext, sb: Sandbox, templates: TemplateLookup | None = None) -> SandboxOut:
    templates = templates or TemplateLookup(ctx)
    traffic = None if sb.network.allow_public_traffic else ctx.tokens.token_for(sb.sandbox_id)
    return SandboxOut(
        template_id=sb.template_id, sandbox_id=sb.sandbox_id, alias=sb.alias, client_id=sb.node_id,
        envd_version=_envd_version(ctx, templates, sb), envd_access_token=sb.envd_access_token,
        traffic_access_token=traffic, domain=ctx.domain)


def listed_out(ctx: E2bContext, sb: Sandbox, templates: TemplateLookup) -> ListedSandboxOut:
    return ListedSandboxOut(
        template_id=sb.template_id, alias=sb.alias, sandbox_id=sb.sandbox_id, client_id=sb.node_id,
        started_at=sb.started_at, end_at=sb.end_at, cpu_count=sb.cpu_count, memory_mb=sb.memory_mb,
        disk_size_mb=_disk_mb(templates, sb), metadata=dict(sb.metadata), state=e2b_state(sb.state),
        envd_version=_envd_version(ctx, templates, sb),
        volume_mounts=[VolumeMountOut(name=m.name, path=m.path) for m in sb.volume_mounts] or None)


def detail_out(ctx: E2bContext, sb: Sandbox) -> SandboxDetailOut:
    templates = TemplateLookup(ctx)
    listed = listed_out(ctx, sb, templates)
    return SandboxDetailOut(
        **listed.model_dump(),
        envd_access_token=sb.envd_access_token,
        allow_internet_access=sb.network.allow_internet_access,
        domain=ctx.domain,
        network=NetworkConfigOut(allow_public_traffic=sb.network.allow_public_traffic,
                                 allow_out=list(sb.network.allow_out), deny_out=list(sb.network.deny_out),
                                 rules=rules_out(sb.network.rules)),
        lifecycle=LifecycleOut(auto_resume=sb.auto_resume, on_timeout="pause" if sb.auto_pause else "kill"))


def rules_out(rules: tuple[HttpRule, ...]) -> dict[str, list[dict[str, Any]]] | None:
    """``network.rules`` as E2B returns it: host -> rules in order (placeholders as written)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for rule in rules:
        out.setdefault(rule.host, []).append({"transform": {"headers": dict(rule.headers)}}
                                             if rule.headers else {})
    return out or None


def template_out(ctx: E2bContext, template: Template) -> TemplateOut:
    names = list(template.aliases) or [template.template_id]
    return TemplateOut(
        template_id=template.template_id,
        build_id=template.build_id or (template.snapshot.snapshot_id if template.snapshot else template.template_id),
        cpu_count=template.cpu_count, memory_mb=template.memory_mb,
        disk_size_mb=(template.rootfs_bytes + MIB - 1) // MIB, public=template.public,
        aliases=list(template.aliases),
        names=names, created_at=template.created_at, updated_at=template.updated_at or template.created_at,
        created_by=None,
        last_spawned_at=None, spawn_count=0, build_count=1,
        envd_version=ctx.envd_version(template.envd_version), build_status=BUILD_STATUS[template.status])


def template_builds_out(ctx: E2bContext, template: Template, page: list[TemplateBuild],
                        build_count: int) -> TemplateWithBuildsOut:
    """``GET /templates/{id}``: the template and a page of its builds (newest first); the build it
    serves carries its disk size and envd version."""
    listed = template_out(ctx, template).model_copy(update={"build_count": build_count})
    return TemplateWithBuildsOut(**dict(listed), builds=[build_out(ctx, template, b) for b in page])


def build_out(ctx: E2bContext, template: Template, build: TemplateBuild) -> TemplateBuildOut:
    serving = build.build_id == template.build_id
    return TemplateBuildOut(
        build_id=build.build_id, status=build.status.value, created_at=build.created_at,
        updated_at=build.finished_at or build.created_at, finished_at=build.finished_at,
        cpu_count=build.cpu_count, memory_mb=build.memory_mb,
        disk_size_mb=(template.rootfs_bytes + MIB - 1) // MIB if serving else None,
        envd_version=ctx.envd_version(template.envd_version) if serving else None)


def snapshot_out(ref: SnapshotRef) -> SnapshotInfoOut:
    return SnapshotInfoOut(snapshot_id=ref.snapshot_id, names=list(ref.names), sandbox_id=ref.sandbox_id,
                           parent_id=ref.parent_id, created_at=ref.created_at)
