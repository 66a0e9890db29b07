"""Templates: list them (the public ones and the team's own), look one up by alias, read one with
its builds, publish or unpublish the team's own (``e2b template publish``/``unpublish``).

Public: built in (plugins.toml), or published by the team that built it. Every team lists a public
template and starts sandboxes from it; only its own team reads its builds, changes or deletes it
(another team gets 403 for a public one, 404 for one it cannot see).
"""

from __future__ import annotations

from typing import Annotated

from cube_core.templatebuilds import visible
from fastapi import APIRouter, Body, Query, Response, Security

from cube_api_e2b.errors import ForbiddenError, InvalidRequestError
from cube_api_e2b.routing import API_KEY_SCHEME, Context, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import (
    TemplateAliasOut,
    TemplateOut,
    TemplateUpdateIn,
    TemplateUpdateOut,
    TemplateWithBuildsOut,
)
from cube_api_e2b.views import template_builds_out, template_out

router = APIRouter(route_class=E2bRoute, tags=["templates"], dependencies=[Security(API_KEY_SCHEME)])

PAGE = 100
TeamQuery = Annotated[str | None, Query(alias="teamID", max_length=200)]
Limit = Annotated[int, Query(ge=1, le=PAGE)]
NextToken = Annotated[str | None, Query(alias="nextToken", max_length=200)]


def _own_team(team_id: str | None, caller: str) -> None:
    """``teamID`` (the CLI's ``--project``) may only name the key's own team."""
    if team_id is not None and team_id != caller:
        raise ForbiddenError(reason=f"an API key of team '{caller}' cannot list the templates of team '{team_id}'")


def _after(ids: list[str], token: str | None) -> int:
    """Where the page after the item ``token`` names starts (the token: that item's id)."""
    if not token:
        return 0
    try:
        return ids.index(token) + 1
    except ValueError:
        raise InvalidRequestError(field="nextToken", reason="invalid pagination token") from None


@router.get("/templates", response_model=list[TemplateOut], responses=errors(403, 500), summary="List templates")
async def list_templates(team: CurrentTeam, ctx: Context, service: Service,
                         team_id: TeamQuery = None) -> list[TemplateOut]:
    _own_team(team_id, team.team_id)
    return [template_out(ctx, t) for t in service.list_templates(team.team_id)]


@router.get("/v2/templates", response_model=list[TemplateOut], responses=errors(403, 500),
            summary="List templates, a page at a time (by template id)")
async def list_templates_v2(team: CurrentTeam, ctx: Context, service: Service, response: Response,
                            team_id: TeamQuery = None, limit: Limit = PAGE,
                            next_token: NextToken = None) -> list[TemplateOut]:
    _own_team(team_id, team.team_id)
    templates = sorted(service.list_templates(team.team_id), key=lambda t: t.template_id)
    if next_token:  # the last id served: the page goes on after it, whatever came or went since
        templates = [t for t in templates if t.template_id > next_token]
    if len(templates) > limit:
        response.headers["X-Next-Token"] = templates[limit - 1].template_id
    return [template_out(ctx, t) for t in templates[:limit]]


@router.get("/templates/aliases/{alias}", response_model=TemplateAliasOut, responses=errors(403, 404, 500),
            summary="Does a template with this alias exist?")
async def template_alias(alias: str, team: CurrentTeam, service: Service) -> TemplateAliasOut:
    template = service.get_template(alias)
    if not visible(template, team.team_id):
        # E2B's answer for a name another team owns (the SDK's Template.exists reads 403 as "taken")
        raise ForbiddenError(reason=f"template {alias!r} belongs to another team")
    return TemplateAliasOut(template_id=template.template_id, public=template.public)


@router.get("/templates/{template_id}", response_model=TemplateWithBuildsOut, responses=errors(403, 404, 500),
            summary="The team's template and its builds, newest first")
async def template_builds(template_id: str, team: CurrentTeam, ctx: Context, service: Service, response: Response,
                          limit: Limit = PAGE, next_token: NextToken = None) -> TemplateWithBuildsOut:
    template = service.template_builds.owned(team.team_id, template_id)
    builds = service.list_builds(template.template_id, team.team_id)
    start = _after([b.build_id for b in builds], next_token)
    page = builds[start:start + limit]
    if start + limit < len(builds):
        response.headers["X-Next-Token"] = page[-1].build_id
    return template_builds_out(ctx, template, page, build_count=len(builds))


@router.patch("/templates/{template_id}", response_class=Response, responses=errors(403, 404, 500),
              summary="Publish or unpublish the team's template (deprecated: the v2 route answers its names)")
async def update_template(template_id: str, body: Annotated[TemplateUpdateIn, Body()], team: CurrentTeam,
                          service: Service) -> Response:
    service.template_builds.update(team.team_id, template_id, public=body.public)
    return Response(status_code=200)


@router.patch("/v2/templates/{template_id}", response_model=TemplateUpdateOut, responses=errors(403, 404, 500),
              summary="Publish or unpublish the team's template")
async def update_template_v2(template_id: str, body: Annotated[TemplateUpdateIn, Body()], team: CurrentTeam,
                             service: Service) -> TemplateUpdateOut:
    template = service.template_builds.update(team.team_id, template_id, public=body.public)
    return TemplateUpdateOut(names=list(template.aliases) or [template.template_id])
