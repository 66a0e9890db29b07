"""Templates: list them (the public ones and the team's own), look one up by alias."""

from __future__ import annotations

from fastapi import APIRouter, Security

from cube_api_e2b.errors import ForbiddenError
from cube_api_e2b.routing import API_KEY_SCHEME, Context, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import TemplateAliasOut, TemplateOut
from cube_api_e2b.views import template_out

router = APIRouter(route_class=E2bRoute, tags=["templates"], dependencies=[Security(API_KEY_SCHEME)])


@router.get("/templates", response_model=list[TemplateOut], responses=errors(500), summary="List templates")
async def list_templates(team: CurrentTeam, ctx: Context, service: Service) -> list[TemplateOut]:
    return [template_out(ctx, t) for t in service.list_templates(team.team_id)]


@router.get("/templates/aliases/{alias}", response_model=TemplateAliasOut, responses=errors(400, 403, 404, 500),
            summary="Does a template with this alias exist?")
async def template_alias(alias: str, team: CurrentTeam, service: Service) -> TemplateAliasOut:
    template = service.get_template(alias)
    if template.team_id is not None and template.team_id != team.team_id:
        # E2B's answer for a name another team owns (the SDK's Template.exists reads 403 as "taken")
        raise ForbiddenError(reason=f"template {alias!r} belongs to another team")
    return TemplateAliasOut(template_id=template.template_id, public=template.team_id is None)
