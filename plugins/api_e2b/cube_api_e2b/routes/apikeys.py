"""The caller's team's API keys: list, create (the key is shown once), rename, delete.

Authenticated with ``X-API-Key`` like every Cube route (upstream E2B takes a dashboard user's
bearer token and ``X-Team-ID`` here). A deleted key is revoked at once, even the caller's own.
Another team's key is 404.
"""

from __future__ import annotations

from datetime import datetime

from cube_core.credentials import KeyLabel
from cube_core.keys import API_KEY_PREFIX
from cube_core.models import ApiKey
from fastapi import APIRouter, Response, Security
from pydantic import Field

from cube_api_e2b.routing import API_KEY_SCHEME, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import Request
from cube_api_e2b.schemas import Response as Out

router = APIRouter(route_class=E2bRoute, tags=["api-keys"], dependencies=[Security(API_KEY_SCHEME)])

KEY_LENGTH = 40  # hex digits after e2b_


class NamedRequest(Request):
    name: str = Field(min_length=1, max_length=256)


class MaskOut(Out):
    prefix: str
    value_length: int
    masked_value_prefix: str
    masked_value_suffix: str


class TeamApiKeyOut(Out):
    id: str
    name: str
    mask: MaskOut
    created_at: datetime


class CreatedTeamApiKeyOut(TeamApiKeyOut):
    key: str


def key_mask(key: ApiKey, label: KeyLabel) -> MaskOut:
    return MaskOut(prefix=API_KEY_PREFIX, value_length=KEY_LENGTH,
                   masked_value_prefix=key.prefix[len(API_KEY_PREFIX):len(API_KEY_PREFIX) + 2],
                   masked_value_suffix=label.suffix)


@router.get("/api-keys", response_model=list[TeamApiKeyOut], responses=errors(500), summary="List the team's API keys")
async def list_keys(team: CurrentTeam, service: Service) -> list[TeamApiKeyOut]:
    return [TeamApiKeyOut(id=k.key_id, name=label.name, mask=key_mask(k, label), created_at=k.created_at)
            for k, label in service.team_api_keys(team.team_id)]


@router.post("/api-keys", status_code=201, response_model=CreatedTeamApiKeyOut, responses=errors(500),
             summary="Create an API key for the team (its value is shown once)")
async def create_key(body: NamedRequest, team: CurrentTeam, service: Service) -> CreatedTeamApiKeyOut:
    key, label, secret = service.create_team_api_key(team, body.name)
    return CreatedTeamApiKeyOut(id=key.key_id, name=label.name, mask=key_mask(key, label),
                                created_at=key.created_at, key=secret)


@router.patch("/api-keys/{api_key_id}", status_code=200, response_class=Response, responses=errors(404, 500),
              summary="Rename one of the team's API keys")
async def rename_key(api_key_id: str, body: NamedRequest, team: CurrentTeam, service: Service) -> Response:
    service.rename_team_api_key(team.team_id, api_key_id, body.name)
    return Response(status_code=200)


@router.delete("/api-keys/{api_key_id}", status_code=204, response_class=Response, responses=errors(404, 500),
               summary="Delete (revoke) one of the team's API keys")
async def delete_key(api_key_id: str, team: CurrentTeam, service: Service) -> None:
    service.delete_team_api_key(team.team_id, api_key_id)
