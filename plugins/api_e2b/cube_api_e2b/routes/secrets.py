"""A team's secrets: create, list, get, update, delete. No answer ever carries a value.

Values are write-only and sealed at rest with ``[core] secrets_key``; without it every route here
answers 403 saying how to configure it. ``{secretID}`` is a ``sec_...`` id or the canonical
(lower-case) name. The SDK's ``Secret.fill(name)`` placeholders (``${e2b.secrets.<name>}``) are
resolved by upstream E2B's egress proxy (``network.rules`` transforms), which Cube does not have yet.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from cube_core.credentials import SecretRecord
from fastapi import APIRouter, Body, Query, Response, Security
from pydantic import Field

from cube_api_e2b.errors import InvalidRequestError
from cube_api_e2b.routing import API_KEY_SCHEME, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import Request
from cube_api_e2b.schemas import Response as Out

router = APIRouter(route_class=E2bRoute, tags=["secrets"], dependencies=[Security(API_KEY_SCHEME)])


class NewSecret(Request):
    name: str
    value: str = Field(repr=False)
    metadata: dict[str, str] | None = None


class SecretUpdate(Request):
    value: str = Field(repr=False)
    metadata: dict[str, str] | None = None


class SecretOut(Out):
    secret_id: str = Field(alias="secretID")
    name: str
    current_version: int
    metadata: dict[str, str]
    created_at: datetime
    updated_at: datetime


def secret_out(secret: SecretRecord) -> SecretOut:
    return SecretOut(secretID=secret.secret_id, name=secret.name, current_version=secret.version,
                     metadata=secret.metadata, created_at=secret.created_at, updated_at=secret.updated_at)


@router.get("/secrets", response_model=list[SecretOut], responses=errors(403, 500), summary="List the team's secrets")
async def list_secrets(team: CurrentTeam, service: Service, response: Response,
                       limit: Annotated[int, Query(ge=1, le=100)] = 100,
                       next_token: Annotated[str | None, Query(alias="nextToken")] = None) -> list[SecretOut]:
    if next_token and not (next_token.isascii() and next_token.isdigit() and len(next_token) <= 9):
        raise InvalidRequestError(field="nextToken", reason="invalid pagination token")
    secrets = service.list_secrets(team.team_id)
    start = int(next_token) if next_token else 0
    if start + limit < len(secrets):
        response.headers["X-Next-Token"] = str(start + limit)
    return [secret_out(s) for s in secrets[start:start + limit]]


@router.post("/secrets", status_code=201, response_model=SecretOut, responses=errors(403, 409, 500),
             summary="Create a secret (its value is never returned)")
async def create_secret(body: NewSecret, team: CurrentTeam, service: Service) -> SecretOut:
    return secret_out(service.create_secret(team.team_id, body.name, body.value, body.metadata))


@router.get("/secrets/{secret_id}", response_model=SecretOut, responses=errors(403, 404, 500),
            summary="A secret's metadata, by id or name")
async def get_secret(secret_id: str, team: CurrentTeam, service: Service) -> SecretOut:
    return secret_out(service.get_secret(team.team_id, secret_id))


@router.post("/secrets/{secret_id}", response_model=SecretOut, responses=errors(403, 404, 500),
             summary="Store a new version of a secret's value (and replace its metadata if given)")
async def update_secret(secret_id: str, body: Annotated[SecretUpdate, Body()], team: CurrentTeam,
                        service: Service) -> SecretOut:
    return secret_out(service.update_secret(team.team_id, secret_id, body.value, body.metadata))


@router.delete("/secrets/{secret_id}", status_code=204, response_class=Response, responses=errors(403, 404, 500),
               summary="Delete a secret and every version of its value")
async def delete_secret(secret_id: str, team: CurrentTeam, service: Service) -> None:
    service.delete_secret(team.team_id, secret_id)
