"""A sandbox's current metrics, read from envd's own ``GET /metrics`` inside the guest (as upstream's
orchestrator does): what ``/sandboxes/{id}/metrics`` answers for a running sandbox the node has not
sampled yet (the history comes from the node's samples: ``cube_core.sampling``).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import httpx
import structlog
from cube_core import CubeError, Sandbox, SandboxState
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cube_api_e2b.auth import ACCESS_TOKEN_HEADER
from cube_api_e2b.context import E2bContext
from cube_api_e2b.outbound import tls_context
from cube_api_e2b.proxy import endpoint_headers, endpoint_url
from cube_api_e2b.schemas import SandboxMetricOut

log = structlog.get_logger(__name__)

SAMPLE_TIMEOUT_S = 3.0
MAX_SAMPLE_BYTES = 64 * 1024
_BIG = 1 << 62  # bytes: more than any guest has


class EnvdMetrics(BaseModel):
    """envd's ``GET /metrics`` answer, as far as Cube uses it (hostile input: bounded, typed)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    ts: int | None = Field(default=None, ge=0, le=1 << 33)
    cpu_count: int | None = Field(default=None, ge=1, le=4096)
    cpu_used_pct: float = Field(default=0.0, ge=0, le=100 * 4096, allow_inf_nan=False)
    mem_used: int = Field(ge=0, le=_BIG)
    mem_total: int = Field(ge=0, le=_BIG)
    mem_cache: int = Field(default=0, ge=0, le=_BIG)
    disk_used: int = Field(default=0, ge=0, le=_BIG)
    disk_total: int = Field(default=0, ge=0, le=_BIG)


async def sample(ctx: E2bContext, sb: Sandbox) -> SandboxMetricOut | None:
    """The current metrics of a running sandbox, or None when its envd cannot tell."""
    if sb.state != SandboxState.RUNNING:
        return None
    try:
        _, endpoint = await ctx.service.endpoint(sb.sandbox_id, ctx.config.envd_port)
    except CubeError:
        return None
    headers = endpoint_headers(endpoint)  # via a node: its edge forwards to the guest
    if sb.envd_access_token:
        headers.append((ACCESS_TOKEN_HEADER.lower().encode(), sb.envd_access_token.encode()))
    try:
        async with asyncio.timeout(SAMPLE_TIMEOUT_S), httpx.AsyncClient(  # total, not per read
                timeout=SAMPLE_TIMEOUT_S, trust_env=False, verify=tls_context()) as client, client.stream(
                "GET", endpoint_url(endpoint, b"/metrics"), headers=headers) as response:
            response.raise_for_status()
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_SAMPLE_BYTES:
                    raise ValueError(f"metrics answer larger than {MAX_SAMPLE_BYTES} bytes")
        data = EnvdMetrics.model_validate_json(body)
        ts = data.ts or int(datetime.now(UTC).timestamp())
        return SandboxMetricOut(
            timestamp=datetime.fromtimestamp(ts, UTC), timestamp_unix=ts, cpu_count=data.cpu_count or sb.cpu_count,
            cpu_used_pct=data.cpu_used_pct, mem_used=data.mem_used, mem_total=data.mem_total,
            mem_cache=data.mem_cache, disk_used=data.disk_used, disk_total=data.disk_total)
    except ValidationError as exc:
        log.info("no metrics from envd: invalid answer", sandbox_id=sb.sandbox_id, errors=exc.error_count())
        return None
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError, OverflowError, OSError) as exc:
        # whatever the guest answered (it is hostile input), it is not a sample
        log.info("no metrics from envd", sandbox_id=sb.sandbox_id, error=repr(exc))
        return None


def in_window(metric: SandboxMetricOut, start: int | None, end: int | None) -> bool:
    return (start is None or metric.timestamp_unix >= start) and (end is None or metric.timestamp_unix <= end)
