"""Sandbox metrics, read from envd's own ``GET /metrics`` inside the guest (as upstream's orchestrator does).

Only the current sample exists: Cube keeps no metrics history yet, so a time window that does not
include "now" is empty.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import httpx
import structlog
from cube_core import CubeError, Sandbox, SandboxState

from cube_api_e2b.auth import ACCESS_TOKEN_HEADER
from cube_api_e2b.context import E2bContext
from cube_api_e2b.schemas import SandboxMetricOut

log = structlog.get_logger(__name__)

SAMPLE_TIMEOUT_S = 3.0
MAX_SAMPLE_BYTES = 64 * 1024


async def sample(ctx: E2bContext, sb: Sandbox) -> SandboxMetricOut | None:
    """The current metrics of a running sandbox, or None when its envd cannot tell."""
    if sb.state != SandboxState.RUNNING:
        return None
    try:
        _, host, port = ctx.service.endpoint(sb.sandbox_id, ctx.config.envd_port)
    except CubeError:
        return None
    headers = {ACCESS_TOKEN_HEADER: sb.envd_access_token} if sb.envd_access_token else {}
    try:
        async with asyncio.timeout(SAMPLE_TIMEOUT_S), httpx.AsyncClient(  # total, not per read
                timeout=SAMPLE_TIMEOUT_S, trust_env=False) as client, client.stream(
                "GET", f"http://{host}:{port}/metrics", headers=headers) as response:
            response.raise_for_status()
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_SAMPLE_BYTES:
                    raise ValueError(f"metrics answer larger than {MAX_SAMPLE_BYTES} bytes")
        data = json.loads(body)
        if not isinstance(data, dict):
            raise TypeError("metrics answer is not a JSON object")
        ts = int(data.get("ts") or datetime.now(UTC).timestamp())
        return SandboxMetricOut(
            timestamp=datetime.fromtimestamp(ts, UTC), timestamp_unix=ts,
            cpu_count=int(data.get("cpu_count", sb.cpu_count)), cpu_used_pct=float(data.get("cpu_used_pct", 0.0)),
            mem_used=int(data["mem_used"]), mem_total=int(data["mem_total"]), mem_cache=int(data.get("mem_cache", 0)),
            disk_used=int(data.get("disk_used", 0)), disk_total=int(data.get("disk_total", 0)))
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError, OverflowError, OSError) as exc:
        # whatever the guest answered (it is hostile input), it is not a sample
        log.info("no metrics from envd", sandbox_id=sb.sandbox_id, error=repr(exc))
        return None


def in_window(metric: SandboxMetricOut, start: int | None, end: int | None) -> bool:
    return (start is None or metric.timestamp_unix >= start) and (end is None or metric.timestamp_unix <= end)
