"""Per-sandbox limits of Cube's resolver: a token bucket of queries, a cap on queries in flight
and on open TCP connections, and a bound on the queue all sandboxes share."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Literal

Verdict = Literal["ok", "rate_limited", "too_many_in_flight", "queue_full"]


@dataclass(frozen=True)
class DnsLimits:
    rate: float = 50.0
    """Queries per second a sandbox may send (long-run average)."""
    burst: int = 100
    """Queries a sandbox may send at once after being quiet."""
    in_flight: int = 4
    """Queries of one sandbox being answered at the same time (each may wait on upstream)."""
    queue: int = 256
    """Queries of all sandboxes admitted and not yet answered; beyond it queries are dropped."""
    workers: int = 16
    """Threads answering UDP and TCP queries (upstream round trips)."""
    tcp_per_sandbox: int = 4
    """Open TCP connections per sandbox (each one is read by a thread of its own)."""
    tcp_connections: int = 64
    """Open TCP connections in all."""


@dataclass
class _Bucket:
    tokens: float
    stamp: float
    in_flight: int = 0
    tcp: int = 0
    reported: float = field(default=0.0)


class Admission:
    """Thread-safe bookkeeping of :class:`DnsLimits` per sandbox (keyed by slot id)."""

    def __init__(self, limits: DnsLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._queued = 0
        self._tcp = 0

    def _bucket(self, slot_id: str, now: float) -> _Bucket:
        bucket = self._buckets.get(slot_id)
        if bucket is None:
            bucket = self._buckets[slot_id] = _Bucket(tokens=float(self.limits.burst), stamp=now)
        return bucket

    def admit(self, slot_id: str) -> Verdict:
        """Take a query of ``slot_id`` in (then call :meth:`done`), or say why not."""
        now = time.monotonic()
        with self._lock:
            bucket = self._bucket(slot_id, now)
            bucket.tokens = min(float(self.limits.burst),
                                bucket.tokens + (now - bucket.stamp) * self.limits.rate)
            bucket.stamp = now
            if bucket.tokens < 1:
                return "rate_limited"
            if bucket.in_flight >= self.limits.in_flight:
                return "too_many_in_flight"
            if self._queued >= self.limits.queue:
                return "queue_full"
            bucket.tokens -= 1
            bucket.in_flight += 1
            self._queued += 1
            return "ok"

    def done(self, slot_id: str) -> None:
        with self._lock:
            self._queued -= 1
            bucket = self._buckets.get(slot_id)
            if bucket is not None:
                bucket.in_flight -= 1
            self._forget_idle(slot_id)

    def open_tcp(self, slot_id: str) -> bool:
        with self._lock:
            bucket = self._bucket(slot_id, time.monotonic())
            if bucket.tcp >= self.limits.tcp_per_sandbox or self._tcp >= self.limits.tcp_connections:
                return False
            bucket.tcp += 1
            self._tcp += 1
            return True

    def close_tcp(self, slot_id: str) -> None:
        with self._lock:
            self._tcp -= 1
            bucket = self._buckets.get(slot_id)
            if bucket is not None:
                bucket.tcp -= 1
            self._forget_idle(slot_id)

    def should_report(self, slot_id: str) -> bool:
        """True at most once a second per sandbox (audit of refused queries)."""
        now = time.monotonic()
        with self._lock:
            bucket = self._bucket(slot_id, now)
            if now - bucket.reported < 1.0:
                return False
            bucket.reported = now
            return True

    def _forget_idle(self, slot_id: str) -> None:
        """Drop a bucket that is full again and has nothing open (keeps the table small)."""
        bucket = self._buckets.get(slot_id)
        if bucket is None or bucket.in_flight or bucket.tcp:
            return
        refilled = bucket.tokens + (time.monotonic() - bucket.stamp) * self.limits.rate
        if refilled >= self.limits.burst and time.monotonic() - bucket.reported >= 1.0:
            del self._buckets[slot_id]
