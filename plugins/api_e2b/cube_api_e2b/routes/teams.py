"""A team's sandbox counts over time: ``/teams/{teamID}/metrics`` and ``/metrics/max``, computed from
the nodes' samples (how many of its sandboxes were sampled running in each step) and the sandbox
records (how many started per second). Only the caller's own team: another team id is 403."""

from __future__ import annotations

from datetime import UTC, datetime

from cube_core.observations import TeamMetricName
from fastapi import APIRouter, Security

from cube_api_e2b.errors import ForbiddenError, InvalidRequestError
from cube_api_e2b.routes.metrics import Unix, until, when
from cube_api_e2b.routing import API_KEY_SCHEME, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import MaxTeamMetricOut, TeamMetricOut

router = APIRouter(route_class=E2bRoute, tags=["auth"], dependencies=[Security(API_KEY_SCHEME)])


def _check(team_id: str, caller: str, start: int | None, end: int | None) -> None:
    if team_id != caller:
        raise ForbiddenError(reason=f"an API key of team '{caller}' cannot read team '{team_id}'")
    if start is not None and end is not None and start > end:
        raise InvalidRequestError(field="start", reason="must not be after end")


@router.get("/teams/{team_id}/metrics", response_model=list[TeamMetricOut], responses=errors(400, 403, 500),
            summary="The team's running sandboxes and start rate over time (default: the last hour)")
async def team_metrics(team_id: str, team: CurrentTeam, service: Service, start: Unix = None,
                       end: Unix = None) -> list[TeamMetricOut]:
    _check(team_id, team.team_id, start, end)
    return [TeamMetricOut(timestamp=p.at, timestamp_unix=int(p.at.timestamp()),
                          concurrent_sandboxes=p.concurrent_sandboxes, sandbox_start_rate=p.sandbox_start_rate)
            for p in service.team_metrics(team.team_id, start=when(start), end=until(end))]


@router.get("/teams/{team_id}/metrics/max", response_model=MaxTeamMetricOut, responses=errors(400, 403, 500),
            summary="The highest value of a team metric in the interval (default: the last hour)")
async def team_metric_max(team_id: str, team: CurrentTeam, service: Service, metric: TeamMetricName,
                          start: Unix = None, end: Unix = None) -> MaxTeamMetricOut:
    _check(team_id, team.team_id, start, end)
    at, value = service.team_metric_max(team.team_id, metric, start=when(start), end=until(end))
    unix = int(at.timestamp())
    return MaxTeamMetricOut(timestamp=datetime.fromtimestamp(unix, UTC), timestamp_unix=unix, value=value)
