"""Template builds, as the E2B SDK's ``Template.build`` / ``build_in_background`` call them.

``POST /v3/templates`` -> ``GET /templates/{id}/files/{hash}`` per COPY (+ a PUT of the tar
archive to the signed URL it answers, unless ``present``) -> ``POST /v2/templates/{id}/builds/{buildID}``
-> ``GET /templates/{id}/builds/{buildID}/status?logsOffset=`` until ``ready``/``error``. The control
plane side is :mod:`cube_core.templatebuilds`, the node side :mod:`cube_core.builds`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from cube_core import CubeError
from cube_core.buildspec import STEP_TYPES, BuildLogLine, BuildPlan, BuildStep, RegistryAuth, TemplateBuild
from fastapi import APIRouter, Body, Query, Request, Response, Security
from pydantic import Field

from cube_api_e2b.errors import InvalidRequestError
from cube_api_e2b.routing import API_KEY_SCHEME, Context, CurrentTeam, E2bRoute, Service, error_response, errors
from cube_api_e2b.schemas import Request as In
from cube_api_e2b.schemas import Response as Out

router = APIRouter(route_class=E2bRoute, tags=["templates"], dependencies=[Security(API_KEY_SCHEME)])
tags_router = APIRouter(route_class=E2bRoute, tags=["tags"], dependencies=[Security(API_KEY_SCHEME)])
"""Mounted before the snapshot routes: ``DELETE /templates/tags`` is not ``DELETE /templates/{snapshotID}``."""
uploads = APIRouter(tags=["templates"])
"""The upload URL: no API key (the SDK PUTs to it as to a presigned URL), a signature instead."""

STATUS_PAGE = 100
"""Log entries per status answer (the SDK polls until a page is empty)."""


class BuildRequestV3(In):
    name: str | None = Field(default=None, max_length=200)
    alias: str | None = Field(default=None, max_length=200)
    tags: list[str] | None = None
    cpu_count: int | None = Field(default=None, ge=1, le=64)
    memory_mb: int | None = Field(default=None, ge=128, le=65536)
    min_free_disk_mb: int | None = Field(default=None, alias="minFreeDiskMB")


class RequestOut(Out):
    template_id: str
    build_id: str
    public: bool
    names: list[str]
    tags: list[str]
    aliases: list[str]


class FileUploadOut(Out):
    present: bool
    url: str | None = None


class StepIn(In):
    type: str = Field(max_length=100)
    args: list[str] = Field(default_factory=list, max_length=10_000)
    files_hash: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    force: bool = False


class BuildStartV2(In):
    from_image: str | None = None
    from_template: str | None = None
    from_image_registry: dict[str, object] | None = None
    force: bool = False
    steps: list[StepIn] = Field(default_factory=list)
    start_cmd: str | None = None
    ready_cmd: str | None = None


class LogEntryOut(Out):
    timestamp: datetime
    message: str
    level: str
    step: str | None = None


class ReasonOut(Out):
    message: str
    step: str | None = None
    log_entries: list[LogEntryOut] = Field(default_factory=list)


class BuildInfoOut(Out):
    template_id: str
    build_id: str
    status: str
    logs: list[str]
    log_entries: list[LogEntryOut]
    reason: ReasonOut | None = None


class BuildLogsOut(Out):
    logs: list[LogEntryOut]


def entry(line: BuildLogLine) -> LogEntryOut:
    return LogEntryOut(timestamp=line.timestamp, message=line.message, level=line.level, step=line.step)


def info(build: TemplateBuild, entries: list[BuildLogLine]) -> BuildInfoOut:
    reason = None
    if build.reason:
        failed = [entry(e) for e in build.logs if e.step == build.reason_step][-20:]
        reason = ReasonOut(message=build.reason, step=build.reason_step, log_entries=failed)
    return BuildInfoOut(template_id=build.template_id, build_id=build.build_id, status=build.status.value,
                        logs=[f"[{e.timestamp.isoformat()}] {e.message}" for e in entries],
                        log_entries=[entry(e) for e in entries], reason=reason)


@router.post("/v3/templates", status_code=202, response_model=RequestOut, responses=errors(403, 409, 500),
             summary="Request a template build")
async def request_build(body: Annotated[BuildRequestV3, Body()], team: CurrentTeam, service: Service) -> RequestOut:
    name = body.name or body.alias
    if not name:
        raise InvalidRequestError("name: required")
    template, build = service.template_builds.request(
        team.team_id, name, tags=tuple(body.tags or ()), cpu_count=body.cpu_count, memory_mb=body.memory_mb)
    return RequestOut(template_id=template.template_id, build_id=build.build_id, public=False, names=[build.name],
                      tags=list(build.tags), aliases=[build.name])


@router.get("/templates/{template_id}/files/{files_hash}", status_code=201, response_model=FileUploadOut,
            response_model_exclude_none=True, responses=errors(404, 500),
            summary="Is this COPY's content uploaded? If not, where to upload it")
async def file_link(template_id: str, files_hash: str, request: Request, team: CurrentTeam,
                    service: Service) -> FileUploadOut:
    present, signature = service.template_builds.file_link(team.team_id, template_id, files_hash)
    if present:
        return FileUploadOut(present=True)
    url = request.url_for("upload_files", template_id=template_id, files_hash=files_hash)
    return FileUploadOut(present=False, url=str(url.include_query_params(signature=signature)))


@uploads.put("/templates/{template_id}/files/{files_hash}/upload", status_code=201, name="upload_files",
             response_class=Response, responses=errors(403, 500),
             summary="Cube: the upload URL of GET /templates/{id}/files/{hash} (signed, no API key)")
async def upload_files(template_id: str, files_hash: str, request: Request, ctx: Context,
                       signature: str = Query(default="")) -> Response:
    try:
        await ctx.service.template_builds.upload(template_id, files_hash, signature, request.stream())
    except CubeError as exc:
        return error_response(ctx, exc)
    return Response(status_code=201)


@router.post("/v2/templates/{template_id}/builds/{build_id}", status_code=202, response_class=Response,
             responses=errors(404, 409, 500), summary="Start a requested build")
async def start_build(template_id: str, build_id: str, body: Annotated[BuildStartV2, Body()], team: CurrentTeam,
                      service: Service) -> Response:
    for i, step in enumerate(body.steps):
        if step.type not in STEP_TYPES:
            raise InvalidRequestError(field=f"steps[{i}].type", reason=f"instruction {step.type[:100]!r} is not "
                                      f"supported (Cube runs {', '.join(STEP_TYPES)})")
    plan = BuildPlan(from_image=body.from_image, from_template=body.from_template, force=body.force,
                     start_cmd=body.start_cmd, ready_cmd=body.ready_cmd,
                     steps=tuple(BuildStep.model_validate(s.model_dump()) for s in body.steps))
    registry = registry_auth(body.from_image_registry, body.from_image) if body.from_image_registry else None
    await service.template_builds.start(team.team_id, template_id, build_id, plan, registry=registry)
    return Response(status_code=202)


def registry_auth(config: dict[str, object], image: str | None) -> RegistryAuth:
    """The SDK's ``fromImageRegistry`` as credentials for the node's pull: ``registry``
    (``from_image(..., username=, password=)``) as given; ``gcp`` as Google's basic-auth form
    (user ``_json_key``, the service account JSON as password); ``aws`` is refused (ECR wants a
    token from AWS's API, which a node here cannot reach: pass ``aws ecr get-login-password``'s
    token as ``password`` with ``username="AWS"`` instead)."""
    kind = config.get("type")
    if not image:
        raise InvalidRequestError(field="fromImageRegistry", reason="registry credentials need fromImage")
    if kind == "registry":
        username, password = config.get("username"), config.get("password")
    elif kind == "gcp":
        username, password = "_json_key", config.get("serviceAccountJson")
    elif kind == "aws":
        raise InvalidRequestError(field="fromImageRegistry", reason=(
            "type 'aws' is not supported: ECR needs a token from AWS's API; use from_image(image, "
            "username='AWS', password=<aws ecr get-login-password>) instead"))
    else:
        raise InvalidRequestError(field="fromImageRegistry.type", reason=f"unknown registry type {str(kind)[:40]!r}")
    if not isinstance(username, str) or not username or not isinstance(password, str) or not password:
        raise InvalidRequestError(field="fromImageRegistry", reason=f"type {kind!r} needs a username and a password")
    try:
        return RegistryAuth(username=username, password=password)
    except ValueError:
        raise InvalidRequestError(field="fromImageRegistry", reason="username or password too long") from None


@router.get("/templates/{template_id}/builds/{build_id}/status", response_model=BuildInfoOut,
            response_model_exclude_none=True, responses=errors(404, 500), summary="A build's status and logs")
async def build_status(template_id: str, build_id: str, team: CurrentTeam, service: Service,
                       logs_offset: int = Query(default=0, ge=0, alias="logsOffset"),
                       limit: int = Query(default=STATUS_PAGE, ge=0, le=STATUS_PAGE),
                       level: str | None = Query(default=None)) -> BuildInfoOut:
    build = service.template_builds.get(team.team_id, template_id, build_id)
    entries = list(build.logs[logs_offset:logs_offset + limit])
    if level:
        entries = [e for e in entries if LEVELS.index(e.level) >= LEVELS.index(level)] if level in LEVELS else []
    return info(build, entries)


LEVELS = ("debug", "info", "warn", "error")


@router.get("/templates/{template_id}/builds/{build_id}/logs", response_model=BuildLogsOut,
            response_model_exclude_none=True, responses=errors(404, 500), summary="A build's logs")
async def build_logs(template_id: str, build_id: str, team: CurrentTeam, service: Service,
                     cursor: int | None = Query(default=None, ge=0),
                     limit: int = Query(default=100, ge=0, le=100),
                     direction: Literal["forward", "backward"] = Query(default="forward"),
                     level: str | None = Query(default=None)) -> BuildLogsOut:
    build = service.template_builds.get(team.team_id, template_id, build_id)
    lines = [e for e in build.logs if cursor is None or int(e.timestamp.timestamp() * 1000) >= cursor]
    if direction == "backward":
        lines = [e for e in build.logs if cursor is None or int(e.timestamp.timestamp() * 1000) <= cursor][::-1]
    if level in LEVELS:
        lines = [e for e in lines if LEVELS.index(e.level) >= LEVELS.index(level or "debug")]
    return BuildLogsOut(logs=[entry(e) for e in lines[:limit]])


class AssignTagsIn(In):
    target: str = Field(max_length=300)
    tags: list[str] = Field(max_length=100)


class DeleteTagsIn(In):
    name: str = Field(max_length=300)
    tags: list[str] = Field(max_length=100)


class AssignedTagsOut(Out):
    tags: list[str]
    build_id: str


class TagOut(Out):
    tag: str
    build_id: str
    created_at: datetime


@tags_router.post("/templates/tags", status_code=201, response_model=AssignedTagsOut,
                  responses=errors(404, 500), summary="Give tags to the build a name:tag names")
async def assign_tags(body: Annotated[AssignTagsIn, Body()], team: CurrentTeam, service: Service) -> AssignedTagsOut:
    build = service.template_builds.tags.assign(team.team_id, body.target, tuple(body.tags))
    await service.template_builds.release(build.template_id)  # a build the tags moved off may be free now
    return AssignedTagsOut(tags=list(body.tags), build_id=build.build_id)


@tags_router.delete("/templates/tags", status_code=204, response_class=Response, responses=errors(404, 500),
                    summary="Take tags off a template's builds")
async def delete_tags(body: Annotated[DeleteTagsIn, Body()], team: CurrentTeam, service: Service) -> Response:
    template = service.template_builds.tags.remove(team.team_id, body.name, tuple(body.tags))
    await service.template_builds.release(template.template_id)  # a build no tag names: its files go
    return Response(status_code=204)


@tags_router.get("/templates/{template_id}/tags", response_model=list[TagOut], responses=errors(404, 500),
                 summary="A template's tags and the builds they name")
async def list_tags(template_id: str, team: CurrentTeam, service: Service) -> list[TagOut]:
    return [TagOut(tag=tag, build_id=b.build_id, created_at=b.finished_at or b.created_at)
            for tag, b in service.template_builds.tags.list(team.team_id, template_id)]
