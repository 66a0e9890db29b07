"""``cube bench density``: how many idle sandboxes this host holds, and what each one costs.

Starts its own ``cube serve`` (like ``cube bench create``: free ports, a temporary state
directory, template ``base``, under the host lock) and creates sandboxes through the E2B SDK,
``concurrency`` at a time, until one of:

* ``max`` sandboxes are alive;
* the next batch would take ``MemAvailable`` under ``min_available_pct`` % of ``MemTotal``
  (estimated from what a new sandbox has cost so far) and, when the server reclaims idle
  memory into swap, ``MemAvailable`` has stopped rising while the fill waited for that
  (``reclaim_wait_s``, :func:`settle`): a new sandbox costs more in its first idle window than
  once it has been reclaimed, so the first time the floor is near is not the steady bound;
* a create fails (the error is the bound: the server's ``max_sandboxes``, pids, slots...).

Every ``probe_every`` sandboxes the p50 of ``probe_runs`` ``commands.run("true")`` in one random
live sandbox is taken; the report gives the probe nearest to 25/50/75/100 % of the final count.
Memory per sandbox is the drop of ``MemAvailable`` from the baseline (server up, pool full)
divided by the count, at the end of the fill and at steady state (after reclaim settled), with
the ``/proc/meminfo`` parts it came from (the kernel's own share per sandbox); for a sample of
the sandboxes' QEMU processes the report adds where their memory is (``/proc/<pid>/smaps`` by
mapping: guest RAM, TCG code buffer, heap and other anonymous memory, QEMU's binary and
libraries; page tables from ``/proc/<pid>/status``).
Then, over a fixed idle window (``idle_window_s``), where the host's CPU goes: ``cube serve``,
the QEMU processes (per sandbox, by thread, wake-ups per second), ksmd, kernel threads, the rest
(:mod:`cube_bench.idlecpu`). Every sandbox is killed at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
from cube_core.errors import CubeError
from cube_core.state import SandboxState
from cube_core.store import SqliteStore

from cube_bench import create as bench_create
from cube_bench import idlecpu
from cube_bench import profile as bench_profile
from cube_bench.restore import meminfo_all, meminfo_kib, percentile, smaps_rollup_kib
from cube_bench.servertoml import toml_value

log = structlog.get_logger(__name__)

Note = Callable[[str], None]
MIB = 1024
KSM_RUN = Path("/sys/kernel/mm/ksm/run")
KSM_DIR = Path("/sys/kernel/mm/ksm")
QUARTERS = (25, 50, 75, 100)


@dataclass(frozen=True)
class Options:
    max_sandboxes: int = 400
    min_available_pct: float = 15.0
    concurrency: int = 4
    pool_size: int = 0
    """Warm-pool size of the server; with a pool, every create waits for a full pool (a hit)."""
    pool_warm_up: bool = True
    """``[core] pool.warm_up`` of the server."""
    probe_every: int = 0
    """Probe command latency every this many sandboxes (0: ``max_sandboxes // 20``, at least 1)."""
    probe_runs: int = 5
    breakdown_sample: int = 10
    vmm_options: dict[str, Any] = field(default_factory=dict)
    """Extra ``[vmm.options]`` of the server (``tb_size_mb``, ``mem_merge``...)."""
    core_options: dict[str, Any] = field(default_factory=dict)
    """Extra ``[core]`` keys of the server (``sample_interval_s``...)."""
    ksm: bool | None = None
    """Set ``/sys/kernel/mm/ksm/run`` to 1 (True) or 2 (False: unmerge) for the run and put the
    old value back afterwards; None leaves it as it is."""
    ksm_pages_to_scan: int | None = None
    """With ``ksm``: ``/sys/kernel/mm/ksm/pages_to_scan`` for the run (put back afterwards)."""
    ksm_scans: int = 2
    """With KSM running: after the fill, wait for this many more full scans (at most
    ``ksm_wait_s``) before measuring, so merging has caught up."""
    ksm_wait_s: float = 300.0
    zram: str | None = None
    """Set up a zram swap device of this size (``scripts/zram-swap.sh setup``) for the run and
    remove it after (for ``[vmm.options] idle_reclaim``); None leaves the host's swap as it is."""
    zram_algo: str = "lzo-rle"
    """The compressor of that device."""
    idle_wait_s: float = 0.0
    """After the fill, wait this long before measuring (so idle reclaim reached every sandbox)."""
    reclaim_wait_s: float | None = None
    """At the memory floor, wait up to this long (seconds, per wait) for the server's idle reclaim
    to free memory, then go on if the next sandbox fits (:func:`settle`); 0: stop at the first
    time the floor would be crossed. None: 300 when the server reclaims (``idle_reclaim`` not off
    and the host has swap), else 0."""
    reclaim_period_s: float | None = None
    """How often the server's reclaimer looks (``idle_reclaim_after_s / 2``; None: from
    ``vmm_options``, default 10 s). A wait ends once ``MemAvailable`` has not risen for two."""
    out: Path = Path("bench-results")
    template: str = "base"
    settle_s: float = 3.0
    idle_window_s: float = 30.0
    """The window over which the idle sandboxes' CPU is attributed (``idle_cpu`` in the report)."""
    idle_profile: bool = False
    """Sample ``cube serve`` with py-spy over that window (``idle_cpu.serve_profile``)."""
    boot_timeout_s: float = 1500.0
    lock: Path = bench_create.HOST_LOCK


# -- bookkeeping (pure) --------------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    """One latency probe: ``count`` sandboxes alive, p50 of the commands in one of them."""

    count: int
    cmd_ms_p50: float | None


def budget(available_kib: int, total_kib: int, min_available_pct: float, per_sandbox_kib: float) -> int:
    """How many more sandboxes fit before ``MemAvailable`` would drop under the floor."""
    floor = total_kib * min_available_pct / 100
    if per_sandbox_kib <= 0:
        return 0 if available_kib <= floor else 1 << 30
    return max(0, int((available_kib - floor) // per_sandbox_kib))


def reclaim_options(opts: Options, *, swap_kib: int) -> Options:
    """``opts`` with ``reclaim_wait_s`` and ``reclaim_period_s`` decided: the server reclaims
    idle memory when its ``idle_reclaim`` is not off and the host has swap."""
    period = opts.reclaim_period_s or float(opts.vmm_options.get("idle_reclaim_after_s", 20.0)) / 2
    wait = opts.reclaim_wait_s
    if wait is None:
        wait = 300.0 if opts.vmm_options.get("idle_reclaim", True) is not False and swap_kib > 0 else 0.0
    return replace(opts, reclaim_wait_s=wait, reclaim_period_s=period)


MEMINFO_PARTS = ("MemAvailable", "MemFree", "AnonPages", "Cached", "Shmem", "Mapped", "SwapCached",
                 "SUnreclaim", "SReclaimable", "KernelStack", "PageTables", "Percpu", "VmallocUsed")


def meminfo_delta(before: dict[str, int], after: dict[str, int], n: int) -> dict[str, float]:
    """Per sandbox, MiB: how ``MEMINFO_PARTS`` (and swap used) changed over the run, and the
    kernel's own share (unreclaimable slab + kernel stacks + page tables + per-CPU + vmalloc)."""
    keys = (*MEMINFO_PARTS, "SwapUsed")
    out = {k: round((after.get(k, 0) - before.get(k, 0)) / MIB / max(1, n), 2) for k in keys}
    out["kernel"] = round(sum(out[k] for k in ("SUnreclaim", "KernelStack", "PageTables", "Percpu",
                                                "VmallocUsed")), 2)
    return out


def at_quarters(probes: Sequence[Probe], final: int) -> dict[str, Probe | None]:
    """For 25/50/75/100 % of ``final``, the probe taken nearest to that count (None: no probes)."""
    out: dict[str, Probe | None] = {}
    for q in QUARTERS:
        want = final * q / 100
        out[str(q)] = min(probes, key=lambda p: (abs(p.count - want), -p.count)) if probes else None
    return out


def classify(path: str, perms: str, ram_paths: Sequence[str]) -> str:
    """Which part of a QEMU process a mapping of ``/proc/<pid>/smaps`` is."""
    if (path and any(path.startswith(r) for r in ram_paths)) or "memory.ram" in path:
        return "guest_ram"
    if path == "[heap]":
        return "heap"
    if path.startswith("["):
        return "other"  # [stack], [vdso], [vvar]
    if path:
        return "binary_libs"
    if "x" in perms:
        return "tcg_code"
    return "anon"


def smaps_breakdown(pid: int, ram_paths: Sequence[str] = ("/dev/shm/",)) -> dict[str, dict[str, int]]:
    """KiB by part (``classify``) of ``pid``'s mappings: Rss, Pss, Private_Dirty, Private_Clean,
    Shared (clean + dirty) and mapped Size; plus ``page_tables`` (``VmPTE``)."""
    parts: dict[str, dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if "-" in fields[0] and not fields[0].endswith(":"):  # a mapping header
            perms = fields[1]
            path = " ".join(fields[5:]) if len(fields) > 5 else ""
            current = parts.setdefault(classify(path, perms, ram_paths),
                                       {"Size": 0, "Rss": 0, "Pss": 0, "Private_Dirty": 0, "Private_Clean": 0,
                                        "Shared": 0, "SwapPss": 0, "mappings": 0})
            current["mappings"] += 1
            continue
        key = fields[0].rstrip(":")
        if key == "VmFlags" and current is not None and "mg" in fields[1:]:
            current["mergeable"] = current.get("mergeable", 0) + 1
        if current is None or len(fields) < 3:
            continue
        if key in current:
            current[key] += int(fields[1])
        elif key in ("Shared_Clean", "Shared_Dirty"):
            current["Shared"] += int(fields[1])
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmPTE:"):
            parts["page_tables"] = {"Rss": int(line.split()[1])}
    return parts


def median_breakdown(samples: Sequence[dict[str, dict[str, int]]]) -> dict[str, dict[str, float]]:
    """Per part and field, the median over the sampled processes, in MiB (0.1)."""
    names = sorted({name for s in samples for name in s})
    out: dict[str, dict[str, float]] = {}
    for name in names:
        keys = sorted({k for s in samples for k in s.get(name, {})})
        out[name] = {k: round(statistics.median(s.get(name, {}).get(k, 0) for s in samples) / MIB, 1)
                     for k in keys if k != "mappings"}
    return out


@dataclass(frozen=True)
class ReclaimWait:
    """One wait at the memory floor for the server's idle reclaim (:func:`settle`)."""

    count: int
    """Sandboxes alive when it began."""
    waited_s: float
    before_kib: int
    after_kib: int
    """``MemAvailable`` when it began and when it ended."""
    why: str
    """``room`` (the next batch fits), ``settled`` (``MemAvailable`` stopped rising) or ``max``
    (``reclaim_wait_s`` ran out)."""


async def settle(available_kib: Callable[[], int], *, need_kib: float, period_s: float, max_wait_s: float,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 clock: Callable[[], float] = time.monotonic, rise_kib: int = 16 * MIB,
                 not_before: float = 0.0) -> tuple[int, str]:
    """Wait while the server's idle reclaim frees memory: until ``MemAvailable`` reaches
    ``need_kib`` (``room``), or it has not risen by more than ``rise_kib`` over two reclaim
    periods and ``clock()`` has passed ``not_before`` (``settled``: the newest sandbox had its
    chance, an idle window and a look of the reclaimer), or ``max_wait_s`` has passed (``max``).
    Returns the last ``MemAvailable`` and why the wait ended."""
    began = clock()
    now_kib = peak = available_kib()
    peak_at = began
    step = max(0.2, min(2.0, period_s / 5))
    while True:
        if now_kib >= need_kib:
            return now_kib, "room"
        if clock() - peak_at >= 2 * period_s and clock() >= not_before:
            return now_kib, "settled"
        if clock() - began >= max_wait_s:
            return now_kib, "max"
        await sleep(step)
        now_kib = available_kib()
        if now_kib > peak + rise_kib:
            peak, peak_at = now_kib, clock()


@dataclass
class Fill:
    """What :func:`fill` did."""

    count: int = 0
    bound: str = ""
    probes: list[Probe] = field(default_factory=list)
    per_sandbox_kib: float = 0.0
    """``MemAvailable`` drop per sandbox at the end of the fill (after the last wait, if any)."""
    first_floor: tuple[int, float] | None = None
    """Sandboxes alive and the drop per sandbox the first time the floor was reached (what the
    fill stopped at before it waited for reclaim)."""
    fresh_kib: float = 0.0
    """What a new sandbox costs until the server reclaims it (median drop per sandbox of the last
    batches; never less than the average)."""
    waits: list[ReclaimWait] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    @property
    def waited_s(self) -> float:
        return round(sum(w.waited_s for w in self.waits), 1)


async def fill(*, create: Callable[[], Awaitable[Any]], probe: Callable[[Any], Awaitable[float | None]],
               available_kib: Callable[[], int], total_kib: int, alive: list[Any], opts: Options,
               note: Note, before_create: Callable[[], Awaitable[None]] | None = None,
               first_guess_kib: float = 64 * MIB, sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
               clock: Callable[[], float] = time.monotonic) -> Fill:
    """Create sandboxes into ``alive`` until a bound (see the module docstring); ``create``
    returns a sandbox or raises (the error becomes the bound).

    The next batch is sized by what a *new* sandbox costs (``Fill.fresh_kib``: with idle reclaim
    a sandbox costs more in its first idle window than after). When it would cross the floor and
    ``opts.reclaim_wait_s`` is set, the fill waits for reclaim (:func:`settle`) and goes on if a
    sandbox fits then; the bound is the floor once ``MemAvailable`` has stopped rising."""
    done = Fill()
    baseline = available_kib()
    every = opts.probe_every or max(1, opts.max_sandboxes // 20)
    next_probe = every
    marginal: list[float] = []  # drop per sandbox of each recent batch
    floor = total_kib * opts.min_available_pct / 100
    last_create = clock()
    while True:
        room = opts.max_sandboxes - len(alive)
        if room <= 0:
            done.bound = f"max: {opts.max_sandboxes} sandboxes (--max)"
            break
        now = available_kib()
        used = baseline - now
        done.per_sandbox_kib = used / len(alive) if alive and used > 0 else done.per_sandbox_kib
        recent = statistics.median(marginal[-15:]) if marginal else 0.0
        done.fresh_kib = max(recent, done.per_sandbox_kib)
        fits = budget(now, total_kib, opts.min_available_pct, done.fresh_kib or first_guess_kib)
        if fits <= 0 and opts.reclaim_wait_s:
            if done.first_floor is None:
                done.first_floor = (len(alive), done.per_sandbox_kib)
            want = floor + (done.fresh_kib or first_guess_kib) * min(room, max(1, opts.concurrency))
            began, period = clock(), opts.reclaim_period_s or 10.0
            # the newest sandbox is reclaimed an idle window (2 periods) after the reclaimer first saw
            # it (at most a period after its create)
            after, why = await settle(available_kib, need_kib=want, period_s=period, max_wait_s=opts.reclaim_wait_s,
                                      sleep=sleep, clock=clock, not_before=last_create + 3 * period)
            done.waits.append(ReclaimWait(len(alive), round(clock() - began, 1), now, after, why))
            if why != "room":
                note(f"  {len(alive)} alive: waited {done.waits[-1].waited_s:g} s for reclaim ({why}), "
                     f"MemAvailable {now // MIB} -> {after // MIB} MiB")
            now = after
            fits = budget(now, total_kib, opts.min_available_pct, done.fresh_kib or first_guess_kib)
        if fits <= 0:
            used = baseline - now
            done.per_sandbox_kib = used / len(alive) if alive and used > 0 else done.per_sandbox_kib
            done.bound = (f"memory: MemAvailable {now // MIB} MiB, the next sandbox would take it under "
                          f"{opts.min_available_pct:g} % of MemTotal"
                          + (f" (after {done.waited_s:g} s of waits for idle reclaim)" if done.waits else ""))
            break
        batch = min(room, fits, max(1, opts.concurrency), next_probe - len(alive))
        if before_create is not None:
            await before_create()
        before_batch = available_kib()
        results = await asyncio.gather(*(create() for _ in range(batch)), return_exceptions=True)
        last_create = clock()
        errors = [r for r in results if isinstance(r, BaseException)]
        alive.extend(r for r in results if not isinstance(r, BaseException))
        if len(results) > len(errors):
            marginal.append((before_batch - available_kib()) / (len(results) - len(errors)))
        if errors:
            done.failures.extend(f"{type(e).__name__}: {e}"[:300] for e in errors)
            done.bound = f"create failed at {len(alive)} alive: {done.failures[0]}"
            break
        if len(alive) >= next_probe:
            done.probes.append(Probe(len(alive), await probe(random.choice(alive))))
            note(f"  {len(alive)} alive, MemAvailable {available_kib() // MIB} MiB, "
                 f"command p50 {done.probes[-1].cmd_ms_p50} ms")
            next_probe = len(alive) + every
    done.count = len(alive)
    if alive and (not done.probes or done.probes[-1].count != len(alive)):
        done.probes.append(Probe(len(alive), await probe(random.choice(alive))))
    used = baseline - available_kib()
    done.per_sandbox_kib = used / len(alive) if alive else 0.0
    return done


# -- the real run ------------------------------------------------------------------------------


def _server_config(opts: Options, state: Path, port: int, admin_port: int, mem_dir: Path) -> str:
    plan = bench_create.ModePlan("density", (opts.concurrency,), opts.max_sandboxes, 0, pool_size=opts.pool_size,
                                 warm_up=opts.pool_warm_up, vmm_options=tuple(opts.vmm_options.items()),
                                 max_sandboxes=opts.max_sandboxes + opts.pool_size + 10)
    text = bench_create.server_toml(plan, state, port=port, admin_port=admin_port, template=opts.template,
                                    mem_dir=mem_dir)
    return _with_core_options(text, opts.core_options)


def _with_core_options(text: str, options: dict[str, Any]) -> str:
    """``text`` with ``options`` added to its ``[core]`` table (keys the bench does not set itself:
    ``sample_interval_s``...)."""
    lines = "".join(f"{k} = {toml_value(v)}\n" for k, v in options.items())
    return text.replace("[core]\n", "[core]\n" + lines, 1)


def ksm_counters() -> dict[str, int]:
    out: dict[str, int] = {}
    for name in ("run", "pages_shared", "pages_sharing", "full_scans"):
        try:
            out[name] = int((KSM_DIR / name).read_text())
        except (OSError, ValueError):
            continue
    return out


def ksmd_cpu_s() -> float | None:
    """CPU seconds ``ksmd`` has used so far (None if there is no ksmd)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "comm").read_text().strip() == "ksmd":
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                continue
    return None


ZRAM_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "zram-swap.sh"


def zram_mib(sys_block: Path = Path("/sys/block")) -> dict[str, dict[str, float]]:
    """Per zram device (``/sys/block/zramN/mm_stat``): data stored, compressed, RAM used (MiB),
    and the pages it keeps without compressing them: ``same_pages`` (filled with one value: zero
    pages, no RAM) and ``huge_pages`` (incompressible: a whole page of RAM each)."""
    out = {}
    for dev in sorted(sys_block.glob("zram*")):
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = [int(x) for x in (dev / "mm_stat").read_text().split()]
            if f[0]:
                out[dev.name] = {"orig_data": round(f[0] / 2**20, 1), "compressed": round(f[1] / 2**20, 1),
                                 "mem_used_total": round(f[2] / 2**20, 1), "same_pages": f[5],
                                 "huge_pages": f[7]}
    return out


def _pids(state: Path, ids: set[str]) -> list[int]:
    store = SqliteStore(state / "cube.db")
    try:
        return [sb.runtime.vm.pid for sb in store.list_sandboxes(states=(SandboxState.RUNNING,))
                if sb.sandbox_id in ids and sb.runtime.vm is not None and sb.runtime.vm.pid]
    finally:
        store.close()


async def _probe(sbx: Any, runs: int) -> float | None:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        try:
            await sbx.commands.run("true")
        except Exception as exc:
            log.warning("bench: probe failed", sandbox_id=sbx.sandbox_id, error=str(exc))
            continue
        times.append((time.perf_counter() - started) * 1000)
    return round(percentile(times, 50), 1) if times else None


async def _idle_window(target: bench_create.Target, pids: list[int], opts: Options, note: Note) -> dict[str, Any]:
    """Over ``opts.idle_window_s`` with nothing but the sandboxes running: where the host's CPU
    went (:mod:`cube_bench.idlecpu`), and with ``opts.idle_profile`` what ``cube serve``'s Python
    threads ran meanwhile (py-spy)."""
    note(f"idle CPU: {opts.idle_window_s:.0f} s window over {len(pids)} sandboxes")
    profile_path = opts.out / f"idle-profile-{target.pid}.txt"
    with contextlib.ExitStack() as stack:
        profiling = (stack.enter_context(bench_profile.recording(target.pid, profile_path))
                     if opts.idle_profile and target.pid else None)
        before, host_before = idlecpu.snapshot(pids), idlecpu.host_ticks()
        started = time.monotonic()
        await asyncio.sleep(opts.idle_window_s)
        after, host_after = idlecpu.snapshot(pids), idlecpu.host_ticks()
        window = time.monotonic() - started
    result = idlecpu.attribute(before, after, host_before, host_after, serve_pid=target.pid, qemu_pids=pids,
                               window_s=round(window, 2))
    if profiling is not None:
        result["serve_profile"] = bench_profile.summary(profiling, top=15)
    return result


async def measure(opts: Options, target: bench_create.Target, mem_dir: Path, note: Note) -> dict[str, Any]:
    client = bench_create.Client(target, opts.template)
    pool = bench_create.PoolWatch(target)
    alive: list[Any] = []
    try:
        await pool.wait_full(opts.pool_size)
        await asyncio.sleep(opts.settle_s)
        total = meminfo_kib("MemTotal")
        available_before = meminfo_kib()
        meminfo_before = meminfo_all()
        ksm_before, ksmd_before, began = ksm_counters(), ksmd_cpu_s(), time.monotonic()

        async def create() -> Any:
            sbx = await client.sandbox_cls.create(template=opts.template, timeout=3600, **client.params)
            return sbx

        async def wait_pool() -> None:
            await pool.wait_full(opts.pool_size)

        probed: set[str] = set()

        async def probe(sbx: Any) -> float | None:
            probed.add(sbx.sandbox_id)
            return await _probe(sbx, opts.probe_runs)

        run_opts = reclaim_options(opts, swap_kib=meminfo_kib("SwapTotal"))
        if run_opts.reclaim_wait_s:
            note(f"the server reclaims idle memory: at the floor the fill waits up to {run_opts.reclaim_wait_s:g} s "
                 f"for it (reclaim period {run_opts.reclaim_period_s:g} s)")
        # with a pool, a batch is at most the pool, so every create of it is a hit
        run_opts = replace(run_opts, concurrency=min(opts.concurrency, opts.pool_size or opts.concurrency))
        done = await fill(create=create, probe=probe, available_kib=meminfo_kib, total_kib=total, alive=alive,
                          note=note, opts=run_opts, before_create=wait_pool if opts.pool_size else None)
        available_filled, filled_at = meminfo_kib(), time.monotonic()
        await pool.wait_full(opts.pool_size)
        await asyncio.sleep(opts.settle_s)
        if opts.idle_wait_s:
            note(f"waiting {opts.idle_wait_s:g} s (idle reclaim)")
            await asyncio.sleep(opts.idle_wait_s)
        steady_why = None
        if run_opts.reclaim_wait_s:
            note("waiting for idle reclaim to settle (MemAvailable no longer rising)")
            period = run_opts.reclaim_period_s or 10.0
            _, steady_why = await settle(meminfo_kib, need_kib=float("inf"), period_s=period,
                                         max_wait_s=run_opts.reclaim_wait_s, not_before=filled_at + 3 * period)
        steady_wait_s = round(time.monotonic() - filled_at, 1)
        if ksm_counters().get("run") == 1:
            scans = ksm_counters().get("full_scans", 0) + opts.ksm_scans
            deadline = time.monotonic() + opts.ksm_wait_s
            note(f"waiting for {opts.ksm_scans} KSM full scans")
            while ksm_counters().get("full_scans", 0) < scans and time.monotonic() < deadline:
                await asyncio.sleep(1.0)
        meminfo_after = meminfo_all()
        available_after = meminfo_after["MemAvailable"]
        elapsed = time.monotonic() - began
        assert target.state_dir is not None
        all_pids = _pids(target.state_dir, {s.sandbox_id for s in alive})
        cpu = await _idle_window(target, all_pids, opts, note)
        ksm_after, ksmd_after = ksm_counters(), ksmd_cpu_s()
        # where an idle sandbox's memory is: prefer sandboxes no probe ran commands in
        idle_ids = {s.sandbox_id for s in alive} - probed
        pids = _pids(target.state_dir, idle_ids) or _pids(target.state_dir, {s.sandbox_id for s in alive})
        sample = random.sample(pids, min(len(pids), opts.breakdown_sample))
        breakdowns, rollups = [], []
        for pid in sample:
            try:
                breakdowns.append(smaps_breakdown(pid, (str(mem_dir), "/dev/shm/")))
                rollups.append(smaps_rollup_kib(pid))
            except OSError:
                continue

        def med(key: str) -> float | None:
            return round(statistics.median(r.get(key, 0) for r in rollups) / MIB, 1) if rollups else None

        # a sandbox idle since the fill (reclaimed, with idle reclaim on): its first command pays
        # the page faults back; the next ones are steady
        firsts, steady = [], []
        for sbx in random.sample([s for s in alive if s.sandbox_id in idle_ids], min(5, len(idle_ids))):
            first = await _probe(sbx, 1)
            if first is not None:
                firsts.append(first)
            rest = await _probe(sbx, opts.probe_runs)
            if rest is not None:
                steady.append(rest)

        quarters = at_quarters(done.probes, done.count)
        zram = zram_mib()
        n = max(1, done.count)
        zram_used = sum(d["mem_used_total"] for d in zram.values())
        pss = med("Pss")
        return {
            "count": done.count, "bound": done.bound, "failures": done.failures[:5],
            "mib_per_sandbox": round((available_before - available_after) / MIB / n, 1),
            "per_sandbox_mib": {
                "first_floor": ({"count": done.first_floor[0], "mib": round(done.first_floor[1] / MIB, 1)}
                                if done.first_floor else None),
                "end_of_fill": round((available_before - available_filled) / MIB / n, 1),
                "fresh": round(done.fresh_kib / MIB, 1),
                "steady": round((available_before - available_after) / MIB / n, 1),
                "pss_median": pss, "zram": round(zram_used / n, 2),
                "pss_plus_zram": round(pss + zram_used / n, 1) if pss is not None else None,
                "meminfo_delta": meminfo_delta(meminfo_before, meminfo_after, n)},
            "reclaim_waits": {"max_s": run_opts.reclaim_wait_s, "period_s": run_opts.reclaim_period_s,
                              "n": len(done.waits), "waited_s": done.waited_s,
                              "not_room": [[w.count, w.waited_s, w.before_kib // MIB, w.after_kib // MIB, w.why]
                                           for w in done.waits if w.why != "room"],
                              "steady_after_fill_s": steady_wait_s, "steady": steady_why},
            "mem_available_mib": {"before": available_before // MIB, "after": available_after // MIB,
                                  "total": total // MIB},
            "pss_mib_median": med("Pss"), "uss_mib_median": med("Uss"), "rss_mib_median": med("Rss"),
            "swap_pss_mib_median": med("SwapPss"), "zram_mib": zram,
            "idle_sandbox_cmd_ms": {"first_p50": round(statistics.median(firsts), 1) if firsts else None,
                                    "first": firsts,
                                    "then_p50": round(statistics.median(steady), 1) if steady else None},
            "breakdown_mib_median": median_breakdown(breakdowns), "breakdown_n": len(breakdowns),
            "breakdown_of": "never probed" if idle_ids else "probed (every sandbox ran probe commands)",
            "cmd_ms_p50_at": {q: ({"count": p.count, "cmd_ms_p50": p.cmd_ms_p50} if p else None)
                              for q, p in quarters.items()},
            "probes": [[p.count, p.cmd_ms_p50] for p in done.probes],
            "ksm": {"before": ksm_before, "after": ksm_after,
                    "ksmd_cpu_pct": (round(100 * (ksmd_after - ksmd_before) / elapsed, 2)
                                     if ksmd_after is not None and ksmd_before is not None else None)},
            "fill_s": round(elapsed, 1), "idle_cpu": cpu,
        }
    finally:
        note(f"killing {len(alive)} sandboxes")
        await client.kill(alive)
        pool.close()


def run(opts: Options, note: Note) -> dict[str, Any]:
    """Start a server, fill the host, write ``bench-density-<time>.json`` into ``opts.out``."""
    if opts.max_sandboxes < 1 or not 0 <= opts.min_available_pct < 100:
        raise CubeError("--max must be at least 1 and --min-available-pct in [0, 100)")
    opts.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    ksm_old: dict[Path, str] = {}
    with tempfile.TemporaryDirectory(prefix="cube-bench-density-") as tmp, \
            bench_create.host_lock(opts.lock, note):
        state = Path(tmp)
        credentials = bench_create.bench_credentials(state)
        settings: dict[Path, str] = {}
        if opts.ksm is not None:
            settings[KSM_RUN] = "1" if opts.ksm else "2"
            if opts.ksm_pages_to_scan:
                settings[KSM_DIR / "pages_to_scan"] = str(opts.ksm_pages_to_scan)
        zram_state = state / "zram-swap.dev"
        try:
            for path, value in settings.items():
                ksm_old[path] = path.read_text().strip()
                path.write_text(value)
            if opts.zram:
                subprocess.run([str(ZRAM_SCRIPT), "setup", opts.zram, opts.zram_algo], check=True, capture_output=True,
                               env={**os.environ, "CUBE_ZRAM_STATE": str(zram_state)})
                note(f"zram swap of {opts.zram} ({opts.zram_algo}) set up for the run")
            result = _serve_and_measure(opts, state, credentials, stamp, note)
        finally:
            for path, value in ksm_old.items():
                path.write_text(value)
            if zram_state.exists():
                subprocess.run([str(ZRAM_SCRIPT), "teardown"], check=True,
                               env={**os.environ, "CUBE_ZRAM_STATE": str(zram_state)})
    result.update({"options": {"max": opts.max_sandboxes, "min_available_pct": opts.min_available_pct,
                               "concurrency": opts.concurrency, "pool_size": opts.pool_size,
                               "pool_warm_up": opts.pool_warm_up,
                               "vmm_options": opts.vmm_options, "core_options": opts.core_options,
                               "ksm": opts.ksm, "ksm_pages_to_scan": opts.ksm_pages_to_scan, "zram": opts.zram,
                               "zram_algo": opts.zram_algo,
                               "idle_wait_s": opts.idle_wait_s, "reclaim_wait_s": opts.reclaim_wait_s},
                   "host": {"cpus": os.cpu_count(), "mem_total_mib": meminfo_kib("MemTotal") // MIB}})
    path = opts.out / f"bench-density-{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    result["file"] = str(path)
    return result


def _serve_and_measure(opts: Options, state: Path, credentials: bench_create.Credentials, stamp: str,
                       note: Note) -> dict[str, Any]:
    port, admin_port = bench_create.free_port(), bench_create.free_port()
    mem_dir = Path(f"/dev/shm/cube-bench-{port}")
    config = state / "plugins-density.toml"
    config.write_text(_server_config(opts, state, port, admin_port, mem_dir))
    log_path = opts.out / f"serve-density-{stamp}.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([bench_create.cube_executable(), "serve", "--config", str(config)],
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        bench_create._wait_healthy(proc, url, log_path, opts.boot_timeout_s)
        target = bench_create.Target(url=url, api_key=credentials.secret, admin_url=f"http://127.0.0.1:{admin_port}",
                                     state_dir=state, log=log_path, team_id=credentials.team_id, pid=proc.pid)
        note(f"cube serve up ({url}); filling up to {opts.max_sandboxes} sandboxes")
        result = asyncio.run(measure(opts, target, mem_dir, note))
        result["serve_log"] = str(log_path)
        if proc.poll() is not None:  # the server died under the load: that is the bound
            tail = [line for line in log_path.read_text(errors="replace").splitlines() if line.strip()][-3:]
            result["server_exited"] = {"code": proc.returncode, "log_tail": tail}
            result["bound"] = f"cube serve exited ({proc.returncode}) at {result['count']} alive: {tail[-1:]}"
        return result
    finally:
        bench_create.stop_server(proc, state, url=url, api_key=credentials.secret, note=note)
        shutil.rmtree(mem_dir, ignore_errors=True)
