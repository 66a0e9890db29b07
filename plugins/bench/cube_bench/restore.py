"""Benchmarks (``cube bench restore``): how fast clones come up and what each one costs in host memory.

Measures, for ``n`` clones of one saved VM started one after another and kept running together:
restore latency (``restore()`` returned) and restore→first guest answer (``ping``), p50/p95;
the drop of ``MemAvailable`` per clone once all run and idle; the median PSS and USS of the clone
processes (``/proc/<pid>/smaps_rollup``); their CPU use while idle (over ``settle_s``). Every clone
is shut down before this returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog
from cube_core.models import NicHandle, VmHandle, VmSpec, VmState
from cube_core.vmm import VmmDriver

log = structlog.get_logger(__name__)

SpecFactory = Callable[[str], VmSpec | Awaitable[VmSpec]]
NicFactory = Callable[[str], Awaitable[NicHandle | None]]
Cleanup = Callable[[str], Awaitable[None]]


def meminfo_all(path: Path = Path("/proc/meminfo")) -> dict[str, int]:
    """Every ``/proc/meminfo`` field, KiB (``SwapUsed`` = total - free added)."""
    out = {}
    for line in path.read_text().splitlines():
        name, _, rest = line.partition(":")
        with contextlib.suppress(ValueError, IndexError):
            out[name] = int(rest.split()[0])
    out["SwapUsed"] = out.get("SwapTotal", 0) - out.get("SwapFree", 0)
    return out


def meminfo_kib(field: str = "MemAvailable", path: Path = Path("/proc/meminfo")) -> int:
    return meminfo_all(path)[field]


def smaps_rollup_kib(pid: int) -> dict[str, int]:
    """``Rss``/``Pss``/``Private_*``... of ``pid`` in KiB, plus ``Uss`` (private clean + dirty)."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[-1] == "kB":
            values[parts[0].rstrip(":")] = int(parts[1])
    values["Uss"] = values.get("Private_Clean", 0) + values.get("Private_Dirty", 0)
    return values


def cpu_ticks(pid: int) -> int:
    """User + system clock ticks used so far by ``pid`` (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


async def _prepare(vm_id: str, spec_factory: SpecFactory,
                   nic_factory: NicFactory | None) -> tuple[VmSpec, NicHandle | None]:
    spec = spec_factory(vm_id)
    if inspect.isawaitable(spec):
        spec = await spec
    assert isinstance(spec, VmSpec)
    return spec, (await nic_factory(vm_id) if nic_factory is not None else None)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


async def restore_bench(driver: VmmDriver, state: VmState, n: int, *, spec_factory: SpecFactory,
                        nic_factory: NicFactory | None = None, cleanup: Cleanup | None = None,
                        settle_s: float = 2.0, answer_timeout: float = 30.0,
                        prefix: str = "bench") -> dict[str, Any]:
    """Restore ``n`` clones of ``state`` one by one and report latency and memory (see module doc).

    ``spec_factory(vm_id)`` gives each clone's spec (its own disk); ``nic_factory(vm_id)`` its NIC
    (None: no NIC, which must match how ``state`` was saved); ``cleanup(vm_id)`` frees what the
    factories made, after the clone is shut down.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    available_before = meminfo_kib()
    restore_ms: list[float] = []
    answer_ms: list[float] = []
    vms: list[VmHandle] = []
    try:
        for i in range(n):
            spec, nic = await _prepare(f"{prefix}-{i}", spec_factory, nic_factory)
            started = time.monotonic()
            vm = await driver.restore(state, spec, nic)
            restored = time.monotonic()
            vms.append(vm)
            await driver.guest_call(vm, "ping", timeout=answer_timeout)
            answered = time.monotonic()
            restore_ms.append((restored - started) * 1000)
            answer_ms.append((answered - started) * 1000)
        pids = [vm.pid for vm in vms if vm.pid is not None]
        ticks_before = sum(cpu_ticks(pid) for pid in pids)
        await asyncio.sleep(settle_s)
        ticks_after = sum(cpu_ticks(pid) for pid in pids)
        available_after = meminfo_kib()
        rollups = [smaps_rollup_kib(pid) for pid in pids]
    finally:
        for vm in vms:
            try:
                await driver.shutdown(vm)
            finally:
                if cleanup is not None:
                    await cleanup(vm.vm_id)
    result: dict[str, Any] = {
        "n": n,
        "isolation": driver.isolation,
        "restore_ms_p50": round(percentile(restore_ms, 50), 1),
        "restore_ms_p95": round(percentile(restore_ms, 95), 1),
        "answer_ms_p50": round(percentile(answer_ms, 50), 1),
        "answer_ms_p95": round(percentile(answer_ms, 95), 1),
        "answer_ms_max": round(max(answer_ms), 1),
        "memavailable_drop_mib_per_clone": round((available_before - available_after) / 1024 / n, 1),
        "idle_mib_per_sandbox": round((available_before - available_after) / 1024 / n, 1),
        "pss_mib_median": round(statistics.median(r["Pss"] for r in rollups) / 1024, 1) if rollups else None,
        "uss_mib_median": round(statistics.median(r["Uss"] for r in rollups) / 1024, 1) if rollups else None,
        "idle_cpu_pct_per_clone": round((ticks_after - ticks_before) / os.sysconf("SC_CLK_TCK")
                                        / settle_s * 100 / max(1, len(pids)), 2),
    }
    log.info("restore bench", **result)
    return result


async def cold_boot_bench(driver: VmmDriver, n: int, *, spec_factory: SpecFactory,
                          nic_factory: NicFactory | None = None, cleanup: Cleanup | None = None,
                          ready_timeout: float = 600.0, prefix: str = "coldboot") -> dict[str, Any]:
    """The baseline for ``restore_bench``: ``n`` cold boots, process start to guest agent ready."""
    boot_ms: list[float] = []
    for i in range(n):
        vm_id = f"{prefix}-{i}"
        spec, nic = await _prepare(vm_id, spec_factory, nic_factory)
        started = time.monotonic()
        vm = await driver.boot(spec, nic)
        try:
            await driver.wait_ready(vm, timeout=ready_timeout)
            await driver.guest_call(vm, "ping", timeout=ready_timeout)
            boot_ms.append((time.monotonic() - started) * 1000)
        finally:
            try:
                await driver.shutdown(vm)
            finally:
                if cleanup is not None:
                    await cleanup(vm_id)
    return {"n": n, "cold_boot_ms_p50": round(percentile(boot_ms, 50), 1),
            "cold_boot_ms_p95": round(percentile(boot_ms, 95), 1)}
