"""Sandbox metrics, sampled from envd in the guest (sandbox_metrics.py)."""

from __future__ import annotations

from typing import Annotated

from cube_core import CubeError
from fastapi import APIRouter, Query, Security

from cube_api_e2b.errors import InvalidRequestError
from cube_api_e2b.routing import API_KEY_SCHEME, Context, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.sandbox_metrics import in_window, sample
from cube_api_e2b.schemas import SandboxesWithMetricsOut, SandboxMetricOut

router = APIRouter(route_class=E2bRoute, tags=["sandboxes"], dependencies=[Security(API_KEY_SCHEME)])


@router.get("/sandboxes/metrics", response_model=SandboxesWithMetricsOut, responses=errors(400, 500),
            summary="Current metrics of several sandboxes")
async def metrics_many(team: CurrentTeam, ctx: Context, service: Service, sandbox_ids: str) -> SandboxesWithMetricsOut:
    ids = list(dict.fromkeys(i.strip() for i in sandbox_ids.split(",") if i.strip()))
    if not ids or len(ids) > 100:
        raise InvalidRequestError(field="sandbox_ids", reason="give 1 to 100 sandbox ids, comma-separated")
    out: dict[str, SandboxMetricOut] = {}
    for sandbox_id in ids:
        try:
            sb = service.get(team.team_id, sandbox_id)
        except CubeError:
            continue
        metric = await sample(ctx, sb)
        if metric is not None:
            out[sandbox_id] = metric
    return SandboxesWithMetricsOut(sandboxes=out)


@router.get("/sandboxes/{sandbox_id}/metrics", response_model=list[SandboxMetricOut],
            responses=errors(400, 404, 500), summary="Sandbox metrics (the current sample)")
async def metrics_one(sandbox_id: str, team: CurrentTeam, ctx: Context, service: Service,
                      start: Annotated[int | None, Query(ge=0)] = None,
                      end: Annotated[int | None, Query(ge=0)] = None) -> list[SandboxMetricOut]:
    metric = await sample(ctx, service.get(team.team_id, sandbox_id))
    return [metric] if metric is not None and in_window(metric, start, end) else []
