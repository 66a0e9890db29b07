"""``GET /metrics``: CPU, memory and disk figures read from /proc and statvfs."""

from __future__ import annotations

import os
import time
from typing import Any


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies from the first line of /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    total = sum(fields[:8])
    return total - idle, total


def _meminfo() -> dict[str, int]:
    out: dict[str, int] = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts:
                out[key] = int(parts[0]) * 1024
    return out


class MetricsSampler:
    def __init__(self, disk_path: str = "/") -> None:
        self.disk_path = disk_path
        self._last: tuple[int, int] | None = None

    def sample(self) -> dict[str, Any]:
        busy, total = _cpu_times()
        if self._last is None:
            prev_busy, prev_total = 0, 0
        else:
            prev_busy, prev_total = self._last
        self._last = (busy, total)
        d_total = total - prev_total
        cpu_pct = round(100.0 * (busy - prev_busy) / d_total, 2) if d_total > 0 else 0.0
        mem = _meminfo()
        mem_total = mem.get("MemTotal", 0)
        mem_available = mem.get("MemAvailable", mem.get("MemFree", 0))
        mem_cache = mem.get("Cached", 0) + mem.get("Buffers", 0)
        vfs = os.statvfs(self.disk_path)
        disk_total = vfs.f_blocks * vfs.f_frsize
        disk_used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        mem_used = max(mem_total - mem_available, 0)
        return {
            "ts": int(time.time()),
            "cpu_count": os.cpu_count() or 1,
            "cpu_used_pct": cpu_pct,
            "mem_total": mem_total,
            "mem_used": mem_used,
            "mem_cache": mem_cache,
            "mem_total_mib": mem_total >> 20,
            "mem_used_mib": mem_used >> 20,
            "disk_used": disk_used,
            "disk_total": disk_total,
        }
