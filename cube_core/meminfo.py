"""This host's memory, from ``/proc/meminfo`` (the warm pool's guard and the node record)."""

from __future__ import annotations


def meminfo_mb(field: str, default: int = 0) -> int:
    """``field`` of /proc/meminfo (``MemTotal``, ``MemAvailable``...) in MiB, or ``default``."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return default


def available_memory_mb() -> int:
    return meminfo_mb("MemAvailable")


def total_memory_mb() -> int:
    return meminfo_mb("MemTotal", default=1024)
