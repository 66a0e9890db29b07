"""Access tokens (deprecated upstream in favour of API keys): create (shown once), delete.

Team-scoped and authenticated with ``X-API-Key``. Cube records them (only a SHA-256) but accepts
no access token in place of an API key: e2b 2.63.0 never sends one (E2B_PROTOCOL.md, E2B_ACCESS_TOKEN).
"""

from __future__ import annotations

from datetime import datetime

from cube_core.keys import ACCESS_TOKEN_PREFIX
from fastapi import APIRouter, Response, Security

from cube_api_e2b.routes.apikeys import MaskOut, NamedRequest
from cube_api_e2b.routing import API_KEY_SCHEME, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import Response as Out

router = APIRouter(route_class=E2bRoute, tags=["access-tokens"], dependencies=[Security(API_KEY_SCHEME)])


class CreatedAccessTokenOut(Out):
    id: str
    name: str
    token: str
    mask: MaskOut
    created_at: datetime


@router.post("/access-tokens", status_code=201, response_model=CreatedAccessTokenOut, responses=errors(500),
             summary="Create an access token for the team (its value is shown once)")
async def create_token(body: NamedRequest, team: CurrentTeam, service: Service) -> CreatedAccessTokenOut:
    record, token = service.create_access_token(team.team_id, body.name)
    mask = MaskOut(prefix=ACCESS_TOKEN_PREFIX, value_length=record.length,
                   masked_value_prefix=record.masked_prefix, masked_value_suffix=record.masked_suffix)
    return CreatedAccessTokenOut(id=record.token_id, name=record.name, token=token, mask=mask,
                                 created_at=record.created_at)


@router.delete("/access-tokens/{access_token_id}", status_code=204, response_class=Response,
               responses=errors(404, 500), summary="Delete one of the team's access tokens")
async def delete_token(access_token_id: str, team: CurrentTeam, service: Service) -> None:
    service.delete_access_token(team.team_id, access_token_id)
