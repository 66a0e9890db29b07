"""Sandbox logs: the guest agent's events (sandbox start, each process's start and exit with its
code, failed starts), read by the nodes with the metrics and kept for ``[core] observations_keep_s``,
also after the sandbox ended. Timestamps and cursors are milliseconds since 1970."""

from __future__ import annotations

from typing import Annotated, Literal

from cube_core.observations import LogEntry, LogLevel
from fastapi import APIRouter, Query, Security

from cube_api_e2b.routing import API_KEY_SCHEME, CurrentTeam, E2bRoute, Service, errors
from cube_api_e2b.schemas import SandboxLogEntryOut, SandboxLogOut, SandboxLogsOut, SandboxLogsV2Out

router = APIRouter(route_class=E2bRoute, tags=["sandboxes"], dependencies=[Security(API_KEY_SCHEME)])

Millis = Annotated[int | None, Query(ge=0, le=253402300799999)]


def entry_out(e: LogEntry) -> SandboxLogEntryOut:
    return SandboxLogEntryOut(timestamp=e.at, message=e.message, level=e.level, fields=e.fields)


def line(e: LogEntry) -> str:
    fields = " ".join(f"{k}={v}" for k, v in e.fields.items())
    return f"{e.message} {fields}" if fields else e.message


@router.get("/sandboxes/{sandbox_id}/logs", response_model=SandboxLogsOut, responses=errors(404, 500),
            summary="Sandbox logs from a timestamp on, oldest first (use v2)")
async def logs_v1(sandbox_id: str, team: CurrentTeam, service: Service, start: Millis = None,
                  limit: Annotated[int, Query(ge=0, le=10000)] = 1000) -> SandboxLogsOut:
    entries = service.sandbox_logs(team.team_id, sandbox_id, cursor_ms=start, limit=limit)
    return SandboxLogsOut(logs=[SandboxLogOut(timestamp=e.at, line=line(e)) for e in entries],
                          log_entries=[entry_out(e) for e in entries])


@router.get("/v2/sandboxes/{sandbox_id}/logs", response_model=SandboxLogsV2Out, responses=errors(400, 404, 500),
            summary="Sandbox logs: forward from the cursor (oldest first) or backward (newest first)")
async def logs_v2(sandbox_id: str, team: CurrentTeam, service: Service, cursor: Millis = None,
                  limit: Annotated[int, Query(ge=0, le=1000)] = 1000,
                  direction: Literal["forward", "backward"] = "forward",
                  level: LogLevel | None = None,
                  search: Annotated[str | None, Query(max_length=256)] = None) -> SandboxLogsV2Out:
    entries = service.sandbox_logs(team.team_id, sandbox_id, cursor_ms=cursor, limit=limit,
                                   backward=direction == "backward", min_level=level, search=search)
    return SandboxLogsV2Out(logs=[entry_out(e) for e in entries])
