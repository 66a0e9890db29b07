"""Team volumes (``/volumes``, API key) and the volume content API (``/volumecontent``, the volume's
own Bearer token, as the SDK's ``Volume`` sends it).

The SDK reaches the content API at ``E2B_VOLUME_API_URL`` (or ``https://api.<E2B_DOMAIN>``): point
it at Cube's API address. Content operations run in userspace on the node that holds the volume
and are refused (409) while a sandbox mounts the volume read-write; see docs/volumes.md.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from cube_core import NodeError, Team, Volume, VolumeEntry
from cube_core.volumes import VolumeCall
from fastapi import APIRouter, Body, Query, Request, Response, Security
from pydantic import Field

from cube_api_e2b.context import E2bContext
from cube_api_e2b.errors import InvalidRequestError
from cube_api_e2b.routing import API_KEY_SCHEME, Context, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import Request as In
from cube_api_e2b.schemas import Response as Out

MAX_UPLOAD_BYTES = 256 << 20
"""One content API write at most (the node holds it in memory while it writes it)."""

router = APIRouter(route_class=E2bRoute, tags=["volumes"], dependencies=[Security(API_KEY_SCHEME)])


class VolumeTokenRoute(E2bRoute):
    """No API key: each route checks the volume's Bearer token (``Volumes.authorize``)."""

    def authenticate(self, ctx: E2bContext, request: Request) -> Team | None:
        return None


content = APIRouter(route_class=VolumeTokenRoute, tags=["volumes"])


# -- /volumes ------------------------------------------------------------------------------------


class NewVolume(In):
    name: str
    size_mb: int | None = Field(default=None, alias="sizeMB", ge=1)
    """Cube's extension: the volume's quota in MiB (default ``[core] volume_size_mb``)."""


class VolumeOut(Out):
    volume_id: str = Field(alias="volumeID")
    name: str
    size_mb: int = Field(alias="sizeMB")
    created_at: datetime


class VolumeAndTokenOut(VolumeOut):
    token: str


def volume_out(volume: Volume) -> VolumeOut:
    return VolumeOut(volumeID=volume.volume_id, name=volume.name, sizeMB=volume.size_mb,
                     created_at=volume.created_at)


def with_token(volume: Volume) -> VolumeAndTokenOut:
    return VolumeAndTokenOut(volumeID=volume.volume_id, name=volume.name, sizeMB=volume.size_mb,
                             created_at=volume.created_at, token=volume.token)


@router.get("/volumes", response_model=list[VolumeOut], responses=errors(500), summary="List the team's volumes")
async def list_volumes(team: CurrentTeam, service: Service) -> list[VolumeOut]:
    return [volume_out(v) for v in service.volumes.list(team.team_id)]


@router.post("/volumes", status_code=201, response_model=VolumeAndTokenOut, responses=errors(409, 500, 503),
             summary="Create a team volume (its content token in the answer)")
async def create_volume(body: NewVolume, team: CurrentTeam, service: Service) -> VolumeAndTokenOut:
    return with_token(await service.volumes.create(team.team_id, body.name, body.size_mb))


@router.get("/volumes/{volume_id}", response_model=VolumeAndTokenOut, responses=errors(404, 500),
            summary="A team volume and its content token")
async def get_volume(volume_id: str, team: CurrentTeam, service: Service) -> VolumeAndTokenOut:
    return with_token(service.volumes.get(team.team_id, volume_id))


@router.delete("/volumes/{volume_id}", status_code=204, response_class=Response, responses=errors(404, 409, 500),
               summary="Delete a team volume and its content (409 while a sandbox mounts it)")
async def delete_volume(volume_id: str, team: CurrentTeam, service: Service) -> None:
    await service.volumes.delete(team.team_id, volume_id)


# -- /volumecontent ----------------------------------------------------------------------------


class EntryOut(Out):
    name: str
    type: str
    path: str
    size: int
    mode: int
    uid: int
    gid: int
    atime: datetime
    mtime: datetime
    ctime: datetime
    target: str | None = None


class MetadataPatch(In):
    uid: int | None = Field(default=None, ge=0, le=(1 << 32) - 2)
    gid: int | None = Field(default=None, ge=0, le=(1 << 32) - 2)
    mode: int | None = Field(default=None, ge=0, le=0o7777)


def entry_out(entry: VolumeEntry) -> EntryOut:
    return EntryOut(**entry.model_dump())


def bearer(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


async def run(ctx: E2bContext, request: Request, volume_id: str, call: VolumeCall) -> tuple[VolumeEntry, ...]:
    volumes = ctx.service.volumes
    answer = await volumes.content(volumes.authorize(volume_id, bearer(request)), call)
    return answer.entries


def _one(entries: tuple[VolumeEntry, ...]) -> EntryOut:
    if len(entries) != 1:
        raise NodeError(f"the node answered {len(entries)} entries for one path")
    return entry_out(entries[0])


Path = Annotated[str, Query(min_length=1, max_length=4096)]
Id = Annotated[int | None, Query(ge=0, le=(1 << 32) - 2)]
Mode = Annotated[int | None, Query(ge=0, le=0o7777)]


@content.get("/volumecontent/{volume_id}/path", response_model=EntryOut, response_model_exclude_none=True,
             responses=errors(404, 409, 500), summary="Stat a volume entry")
async def stat(volume_id: str, path: Path, request: Request, ctx: Context) -> EntryOut:
    return _one(await run(ctx, request, volume_id, VolumeCall(op="stat", volume_id=volume_id, path=path)))


@content.patch("/volumecontent/{volume_id}/path", response_model=EntryOut, response_model_exclude_none=True,
               responses=errors(404, 409, 500), summary="Change an entry's owner and mode")
async def update(volume_id: str, path: Path, request: Request, ctx: Context,
                 body: Annotated[MetadataPatch | None, Body()] = None) -> EntryOut:
    patch = body or MetadataPatch()
    call = VolumeCall(op="update", volume_id=volume_id, path=path, uid=patch.uid, gid=patch.gid, mode=patch.mode)
    return _one(await run(ctx, request, volume_id, call))


@content.delete("/volumecontent/{volume_id}/path", status_code=204, response_class=Response,
                responses=errors(404, 409, 500), summary="Remove a file or a directory (with its content)")
async def remove(volume_id: str, path: Path, request: Request, ctx: Context) -> None:
    await run(ctx, request, volume_id, VolumeCall(op="remove", volume_id=volume_id, path=path))


@content.get("/volumecontent/{volume_id}/dir", response_model=list[EntryOut], response_model_exclude_none=True,
             responses=errors(404, 409, 500), summary="List a directory")
async def list_dir(volume_id: str, path: Path, request: Request, ctx: Context,
                   depth: Annotated[int, Query(ge=1, le=32)] = 1) -> list[EntryOut]:
    call = VolumeCall(op="list", volume_id=volume_id, path=path, depth=depth)
    return [entry_out(e) for e in await run(ctx, request, volume_id, call)]


@content.post("/volumecontent/{volume_id}/dir", status_code=201, response_model=EntryOut,
              response_model_exclude_none=True, responses=errors(404, 409, 500), summary="Make a directory")
async def make_dir(volume_id: str, path: Path, request: Request, ctx: Context, uid: Id = None, gid: Id = None,
                   mode: Mode = None, force: bool = False) -> EntryOut:
    call = VolumeCall(op="mkdir", volume_id=volume_id, path=path, uid=uid, gid=gid, mode=mode, parents=force)
    return _one(await run(ctx, request, volume_id, call))


@content.get("/volumecontent/{volume_id}/file", response_class=Response, responses=errors(404, 409, 500),
             summary="Read a file")
async def read_file(volume_id: str, path: Path, request: Request, ctx: Context) -> Response:
    volumes = ctx.service.volumes
    answer = await volumes.content(volumes.authorize(volume_id, bearer(request)),
                                   VolumeCall(op="read", volume_id=volume_id, path=path))
    return Response(answer.data, media_type="application/octet-stream")


@content.put("/volumecontent/{volume_id}/file", status_code=201, response_model=EntryOut,
             response_model_exclude_none=True, responses=errors(404, 409, 413, 500, 507),
             summary="Write a file (created or replaced; force: create missing directories)")
async def write_file(volume_id: str, path: Path, request: Request, ctx: Context, uid: Id = None, gid: Id = None,
                     mode: Mode = None, force: bool = False) -> EntryOut:
    volume = ctx.service.volumes.authorize(volume_id, bearer(request))  # before reading the body
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_UPLOAD_BYTES or size > volume.size_mb << 20:
            raise InvalidRequestError(field="body", reason=f"larger than {min(MAX_UPLOAD_BYTES, volume.size_mb << 20)}"
                                      " bytes (one write, or the volume's size)")
        chunks.append(chunk)
    call = VolumeCall(op="write", volume_id=volume_id, path=path, data=b"".join(chunks), uid=uid, gid=gid,
                      mode=mode, parents=force)
    answer = await ctx.service.volumes.content(volume, call)
    return _one(answer.entries)
