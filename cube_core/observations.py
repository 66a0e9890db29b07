"""What the node agent observes in a running sandbox: metric samples and log entries.

The sampler (:mod:`cube_core.sampling`) asks each guest agent (control op ``observe``) for a metrics
sample and the log entries after its cursor, and writes them to the state store; the control plane
reads them back for E2B's ``/sandboxes/{id}/metrics`` and ``/logs``. The guest's answer is hostile
input: :class:`ObserveReply` bounds and types it before anything is stored.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import Field

from cube_core.models import Frozen, GuestReply

LogLevel = Literal["debug", "info", "warn", "error"]
LOG_LEVELS: tuple[LogLevel, ...] = ("debug", "info", "warn", "error")
"""From the lowest to the highest."""
TeamMetricName = Literal["concurrent_sandboxes", "sandbox_start_rate"]
_BIG = 1 << 62  # bytes: more than any guest has
_MS_MAX = 1 << 45  # milliseconds since 1970: year 3084

MAX_MESSAGE = 1024
MAX_FIELDS = 16
MAX_FIELD = 512


class MetricSample(Frozen):
    """One sample of a sandbox's CPU, memory and disk use."""

    sandbox_id: str
    team_id: str
    at: datetime
    cpu_count: int = Field(ge=1, le=4096)
    cpu_used_pct: float = Field(ge=0, le=100 * 4096, allow_inf_nan=False)
    mem_used: int = Field(ge=0, le=_BIG)
    mem_total: int = Field(ge=0, le=_BIG)
    mem_cache: int = Field(ge=0, le=_BIG)
    disk_used: int = Field(ge=0, le=_BIG)
    disk_total: int = Field(ge=0, le=_BIG)


class LogEntry(Frozen):
    """One entry of a sandbox's log (the guest agent's events: process start, exit, errors).

    ``seq`` is the guest's sequence number: a re-read entry (after a node restart) is stored once."""

    sandbox_id: str
    team_id: str
    seq: int = Field(ge=0)
    at: datetime
    level: LogLevel
    message: str = Field(max_length=MAX_MESSAGE)
    fields: dict[str, str] = Field(default_factory=dict)

    @property
    def at_ms(self) -> int:
        return int(self.at.timestamp() * 1000)


# -- the guest's answer to ``observe`` (bounded, typed, extra fields ignored) ---------------------


class GuestMetrics(GuestReply):
    ts: int | None = Field(default=None, ge=0, le=1 << 33)
    cpu_count: int = Field(default=1, ge=1, le=4096)
    cpu_used_pct: float = Field(default=0.0, ge=0, le=100 * 4096, allow_inf_nan=False)
    mem_used: int = Field(default=0, ge=0, le=_BIG)
    mem_total: int = Field(default=0, ge=0, le=_BIG)
    mem_cache: int = Field(default=0, ge=0, le=_BIG)
    disk_used: int = Field(default=0, ge=0, le=_BIG)
    disk_total: int = Field(default=0, ge=0, le=_BIG)


class GuestLogEntry(GuestReply):
    seq: int = Field(ge=1, le=1 << 62)
    ts_ms: int = Field(ge=0, le=_MS_MAX)
    level: LogLevel = "info"
    message: Annotated[str, Field(max_length=MAX_MESSAGE)]
    fields: dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=MAX_FIELD)]] = Field(
        default_factory=dict, max_length=MAX_FIELDS)


class ObserveReply(GuestReply):
    """``observe``: the current metrics and the log entries after the host's cursor."""

    metrics: GuestMetrics
    logs: list[GuestLogEntry] = Field(default_factory=list, max_length=1000)
    last_seq: int = Field(default=0, ge=0, le=1 << 62)

    def sample(self, sandbox_id: str, team_id: str, at: datetime) -> MetricSample:
        """The metrics as a sample taken at ``at`` (the host's clock: a guest's may be off)."""
        m = self.metrics
        return MetricSample(sandbox_id=sandbox_id, team_id=team_id, at=at, cpu_count=m.cpu_count,
                            cpu_used_pct=m.cpu_used_pct, mem_used=m.mem_used, mem_total=m.mem_total,
                            mem_cache=m.mem_cache, disk_used=m.disk_used, disk_total=m.disk_total)

    def entries(self, sandbox_id: str, team_id: str) -> list[LogEntry]:
        return [LogEntry(sandbox_id=sandbox_id, team_id=team_id, seq=e.seq,
                         at=datetime.fromtimestamp(e.ts_ms / 1000, UTC), level=e.level, message=e.message,
                         fields=dict(e.fields)) for e in self.logs]


class TeamMetricPoint(Frozen):
    """A team's sandboxes at one moment: how many ran, and how many started per second in the step."""

    at: datetime
    concurrent_sandboxes: int
    sandbox_start_rate: float
