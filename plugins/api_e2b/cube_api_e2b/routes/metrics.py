"""Sandbox metrics: the samples the nodes take every ``[core] sample_interval_s`` (kept for
``[core] observations_keep_s``), read back through the control plane. A running sandbox not sampled
yet (created a moment ago) answers its current sample, read from its envd (sandbox_metrics.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

from cube_core import CubeError
from cube_core.observations import MetricSample
from fastapi import APIRouter, Query, Security

from cube_api_e2b.errors import InvalidRequestError
from cube_api_e2b.routing import API_KEY_SCHEME, Context, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.sandbox_metrics import in_window, sample
from cube_api_e2b.schemas import SandboxesWithMetricsOut, SandboxMetricOut

router = APIRouter(route_class=E2bRoute, tags=["sandboxes"], dependencies=[Security(API_KEY_SCHEME)])

# seconds since 1970, as the SDK sends them; up to the year 9999 (datetime's limit)
Unix = Annotated[int | None, Query(ge=0, le=253402300799)]


def metric_out(m: MetricSample) -> SandboxMetricOut:
    at = int(m.at.timestamp())
    return SandboxMetricOut(timestamp=datetime.fromtimestamp(at, UTC), timestamp_unix=at, cpu_count=m.cpu_count,
                            cpu_used_pct=m.cpu_used_pct, mem_used=m.mem_used, mem_total=m.mem_total,
                            mem_cache=m.mem_cache, disk_used=m.disk_used, disk_total=m.disk_total)


def when(unix: int | None) -> datetime | None:
    return datetime.fromtimestamp(unix, UTC) if unix is not None else None


def until(unix: int | None) -> datetime | None:
    """The end of second ``unix``: a sample taken at 12:00:05.7 is reported as 12:00:05, so ``end``
    12:00:05 includes it."""
    return datetime.fromtimestamp(unix, UTC) + timedelta(microseconds=999_999) if unix is not None else None


@router.get("/sandboxes/metrics", response_model=SandboxesWithMetricsOut, responses=errors(400, 500),
            summary="The latest metrics of several sandboxes")
async def metrics_many(team: CurrentTeam, ctx: Context, service: Service, sandbox_ids: str) -> SandboxesWithMetricsOut:
    ids = list(dict.fromkeys(i.strip() for i in sandbox_ids.split(",") if i.strip()))
    if not ids or len(ids) > 100:
        raise InvalidRequestError(field="sandbox_ids", reason="give 1 to 100 sandbox ids, comma-separated")
    stored = service.latest_metrics(team.team_id, ids)
    out: dict[str, SandboxMetricOut] = {}
    for sandbox_id in ids:
        if sandbox_id in stored:
            out[sandbox_id] = metric_out(stored[sandbox_id])
            continue
        try:
            sb = service.get(team.team_id, sandbox_id)
        except CubeError:
            continue
        metric = await sample(ctx, sb)
        if metric is not None:
            out[sandbox_id] = metric
    return SandboxesWithMetricsOut(sandboxes=out)


@router.get("/sandboxes/{sandbox_id}/metrics", response_model=list[SandboxMetricOut],
            responses=errors(400, 404, 500), summary="Sandbox metrics over time, oldest first")
async def metrics_one(sandbox_id: str, team: CurrentTeam, ctx: Context, service: Service,
                      start: Unix = None, end: Unix = None) -> list[SandboxMetricOut]:
    if start is not None and end is not None and start > end:
        raise InvalidRequestError(field="start", reason="must not be after end")
    samples = service.sandbox_metrics(team.team_id, sandbox_id, start=when(start), end=until(end))
    if samples:
        return [metric_out(m) for m in samples]
    if service.latest_metrics(team.team_id, [sandbox_id]):
        return []  # sampled, only not in this window
    try:
        sb = service.get(team.team_id, sandbox_id)
    except CubeError:
        return []  # ended (or failed) before its first sample
    metric = await sample(ctx, sb)
    return [metric] if metric is not None and in_window(metric, start, end) else []
