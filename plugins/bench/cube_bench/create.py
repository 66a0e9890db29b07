"""``cube bench create``: sandbox create latency and idle cost, through the real E2B SDK.

Three modes, measured one after another in the same run so their ratios mean something:

* ``pool_hit``: the default configuration; the warm pool holds ``max(concurrency)`` members and is
  refilled before every wave, so each create of a wave can take one (resume + personalize);
* ``pool_miss``: ``[core] pool = { size = 0 }``: every create restores the template snapshot;
* ``cold``: ``[core] boot_mode = "cold"`` and no pool: every create boots the template image
  from scratch (seconds under TCG, so only ``cold_n`` creates at concurrency 1).

Each mode gets its own ``cube serve`` (free ports, a temporary state directory, template
``base`` only), started and stopped under the host lock; never two at once. With ``url`` the
server there is measured as it is configured (one mode, ``url``).

Per concurrency ``c``: ``n`` creates in waves of ``c`` simultaneous ``AsyncSandbox.create``
calls; for each, create→201 (the SDK call returned) and create→first ``commands.run("true")``
answered, as p50/p95/p99 (nearest rank) and a failure count. The serve log tells, per sandbox,
whether a pool member, a snapshot restore or a cold boot served it (``served_by``).

Idle cost: ``idle_n`` sandboxes created and left alone: the drop of ``MemAvailable`` per sandbox
(the pool is full both before and after, so its members cancel out), the median PSS/USS/RSS of
their QEMU processes (``/proc/<pid>/smaps_rollup``; pids from the sandboxes' records, or a /proc
scan for QEMU processes started after the baseline when the server is not ours), their CPU use
while idle; then the same after each ran ``true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import structlog
from cube_core import keys
from cube_core.errors import CubeError
from cube_core.pool import POOL_TEAM
from cube_core.state import SandboxState
from cube_core.store import SqliteStore

from cube_bench.profile import Windows, summary
from cube_bench.restore import cpu_ticks, meminfo_kib, percentile, smaps_rollup_kib
from cube_bench.servertoml import UNLIMITED_PLACEMENT, plugins_toml

log = structlog.get_logger(__name__)

HOST_LOCK = Path("/tmp/cube-host.lock")
"""Only one Cube node may run on a host (the network plugin sweeps what it does not know)."""
MODES: tuple[str, ...] = ("pool_hit", "pool_miss", "cold")
"""The default modes."""
NOJAIL_MODES: tuple[str, ...] = ("pool_hit_nojail", "pool_miss_nojail")
"""The same as ``pool_hit``/``pool_miss`` with ``[vmm.options] jail = false``: the cost of the
QEMU jail (uid, namespaces, pivot_root) is ``pool_miss`` against ``pool_miss_nojail``."""
LATE_IDENTITY_MODES: tuple[str, ...] = ("pool_hit_personalize_at_create",)
"""``pool_hit`` with ``[core] pool = { identity_at_join = false }``: the old create path, which
personalizes the member fully (id, token, hostname, machine-id, RNG, clock, env) and waits for it."""
FOREGROUND_REFILL_MODES: tuple[str, ...] = ("pool_hit_foreground_refill",)
"""``pool_hit`` with ``[core] pool = { background_refill = false }``: the old refill, members
prepared at the same CPU priority as the users' sandboxes and without waiting for the creates."""
ASLR_MODES: tuple[str, ...] = ("pool_hit_aslr",)
"""``pool_hit`` with ``[vmm.options] guest_aslr = "on"``: guests randomize process layouts
(under TCG the default turns it off, so a command's code is not translated again each time)."""
ALL_MODES: tuple[str, ...] = MODES + NOJAIL_MODES + LATE_IDENTITY_MODES + FOREGROUND_REFILL_MODES + ASLR_MODES
TARGETS: dict[str, float] = {"create_ms_p50": 25.0, "create_ms_p95_at_max_c": 150.0,
                             "first_cmd_ms_p50": 80.0, "idle_mib_per_sandbox": 12.0}
"""Issue 5's goals for a pool hit on a 2-core box under TCG."""

Note = Callable[[str], None]


@dataclass(frozen=True)
class ModePlan:
    """What to measure in one mode, and how its server is configured."""

    name: str
    concurrency: tuple[int, ...]
    n: int
    idle_n: int
    pool_size: int
    boot_mode: str = "snapshot"
    note: str = ""
    jail: bool = True
    identity_at_join: bool = True
    warm_up: bool = True
    background_refill: bool = True
    vmm_options: tuple[tuple[str, Any], ...] = ()
    """More ``[vmm.options]`` (key, value) pairs."""
    max_sandboxes: int | None = None
    """``[core] max_sandboxes``; default: room for the idle run, the pool and one wave."""


def server_toml(plan: ModePlan, state: Path, *, port: int, admin_port: int, template: str, mem_dir: Path) -> str:
    """The ``plugins.toml`` of the ``cube serve`` that measures ``plan``."""
    pool_memory_mb = max(4096, plan.pool_size * 128 + 1024)  # the pool counts 1/8 of guest RAM per member
    return plugins_toml(
        core={"state_dir": state, "host": "127.0.0.1", "port": port, "admin_port": admin_port,
              "templates": [template],
              "pool": {"size": plan.pool_size, "max_memory_mb": pool_memory_mb,
                       "identity_at_join": plan.identity_at_join, "warm_up": plan.warm_up,
                       "background_refill": plan.background_refill},
              "boot_mode": plan.boot_mode,
              "max_sandboxes": plan.max_sandboxes or max(200, plan.idle_n + plan.pool_size
                                                         + max(plan.concurrency) + 10)},
        state=state, vmm={"mem_dir": mem_dir, "jail": plan.jail, **dict(plan.vmm_options)},
        scheduler_options=UNLIMITED_PLACEMENT)


@dataclass(frozen=True)
class Target:
    """A running server to measure; the optional fields exist only for a server we started."""

    url: str
    api_key: str
    admin_url: str | None = None
    state_dir: Path | None = None
    log: Path | None = None
    team_id: str | None = None
    pid: int | None = None


@dataclass
class Sample:
    create_ms: float | None = None
    first_cmd_ms: float | None = None
    sandbox_id: str | None = None
    error: str | None = None
    started_at: float | None = None
    """Wall clock (``time.time()``) when the create was called, and when it returned: the server's
    log lines of the same create (same host, same clock) split its latency (:func:`phases`)."""
    created_at: float | None = None


@dataclass(frozen=True)
class Options:
    concurrency: tuple[int, ...] = (1, 10, 50)
    n: int = 200
    idle: int = 100
    cold_n: int = 4
    modes: tuple[str, ...] = MODES
    url: str | None = None
    api_key: str | None = None
    admin_url: str | None = None
    out: Path = Path("bench-results")
    template: str = "base"
    settle_s: float = 2.0
    boot_timeout_s: float = 1500.0
    lock: Path = HOST_LOCK
    profile: bool = False
    """Sample the server's Python stacks with py-spy during the waves' creates (our own servers)."""
    clients: int = 1
    """Client processes that make each wave's creates between them (each its own event loop and
    SDK); 1: the bench's own event loop makes them all (the reference numbers)."""


def plans(opts: Options) -> list[ModePlan]:
    """The modes to run, in order (pool hit first: it is the reference of the ratios)."""
    if opts.n < 1 or not opts.concurrency or min(opts.concurrency) < 1:
        raise CubeError("--n and every --concurrency value must be at least 1")
    idle_n = max(0, min(opts.idle, opts.n))
    if opts.url:
        return [ModePlan("url", opts.concurrency, opts.n, idle_n, pool_size=0, note="the server at --url, as is")]
    unknown = set(opts.modes) - set(ALL_MODES)
    if unknown:
        raise CubeError(f"unknown mode(s) {', '.join(sorted(unknown))}; known: {', '.join(ALL_MODES)}")
    cold_n = max(1, min(opts.n, opts.cold_n))
    every = {
        "pool_hit": ModePlan("pool_hit", opts.concurrency, opts.n, idle_n, pool_size=max(opts.concurrency),
                             note=f"warm pool of {max(opts.concurrency)}, refilled before every wave"),
        "pool_miss": ModePlan("pool_miss", opts.concurrency, opts.n, idle_n, pool_size=0,
                              note="pool size 0: every create restores the template snapshot"),
        "cold": ModePlan("cold", (1,), cold_n, min(idle_n, cold_n), pool_size=0, boot_mode="cold",
                         note=f"cold boot, no snapshot; n={cold_n} at concurrency 1 only (slow under TCG)"),
        "pool_hit_nojail": ModePlan("pool_hit_nojail", opts.concurrency, opts.n, idle_n,
                                    pool_size=max(opts.concurrency), jail=False,
                                    note="pool_hit with [vmm.options] jail = false"),
        "pool_miss_nojail": ModePlan("pool_miss_nojail", opts.concurrency, opts.n, idle_n, pool_size=0,
                                     jail=False, note="pool_miss with [vmm.options] jail = false"),
        "pool_hit_personalize_at_create": ModePlan(
            "pool_hit_personalize_at_create", opts.concurrency, opts.n, idle_n, pool_size=max(opts.concurrency),
            identity_at_join=False, note="pool_hit with pool.identity_at_join = false (the old path)"),
        "pool_hit_foreground_refill": ModePlan(
            "pool_hit_foreground_refill", opts.concurrency, opts.n, idle_n, pool_size=max(opts.concurrency),
            background_refill=False, note="pool_hit with pool.background_refill = false (the old refill)"),
        "pool_hit_aslr": ModePlan(
            "pool_hit_aslr", opts.concurrency, opts.n, idle_n, pool_size=max(opts.concurrency),
            vmm_options=(("guest_aslr", "on"),), note='pool_hit with [vmm.options] guest_aslr = "on"'),
    }
    return [every[m] for m in ALL_MODES if m in opts.modes]


# -- the host lock -------------------------------------------------------------------------------


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def held_by_ancestor(path: Path) -> bool:
    """Whether an ancestor of this process (``flock <path> cube bench ...``) holds ``path``."""
    try:
        inode = os.stat(path).st_ino
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return False
    mine = _ancestors()
    for line in lines:
        parts = line.split()
        if "->" in parts or len(parts) < 6 or parts[1] != "FLOCK":
            continue  # "->" marks a waiter, not a holder
        if parts[5].rsplit(":", 1)[-1] == str(inode) and int(parts[4]) in mine:
            return True
    return False


@contextlib.contextmanager
def host_lock(path: Path = HOST_LOCK, note: Note | None = None) -> Iterator[None]:
    """Hold the host lock (``flock``) for a while, unless an ancestor process holds it already."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if held_by_ancestor(path):
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if note:
                note(f"waiting for the host lock {path} (another Cube node runs)")
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# -- our own server ------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cube_executable() -> str:
    beside = Path(sys.executable).with_name("cube")
    return str(beside) if beside.exists() else (shutil.which("cube") or "cube")


@dataclass(frozen=True)
class Credentials:
    secret: str
    team_id: str


def bench_credentials(state: Path) -> Credentials:
    """An API key of team ``bench`` in the state store under ``state`` (before any server runs)."""
    store = SqliteStore(state / "cube.db")
    try:
        key, secret = keys.create_key(store, "bench")
    finally:
        store.close()
    return Credentials(secret=secret, team_id=key.team_id)


@contextlib.contextmanager
def local_server(plan: ModePlan, state: Path, credentials: Credentials, *, template: str,
                 boot_timeout_s: float, log_path: Path) -> Iterator[Target]:
    """``cube serve`` configured for ``plan`` on free ports, with its state in ``state``; stopped
    (SIGTERM, then SIGKILL) on exit. Servers run one after another on the same state, so only
    the first one builds the template (boots it and saves its snapshot)."""
    port, admin_port = free_port(), free_port()
    mem_dir = Path(f"/dev/shm/cube-bench-{port}")
    config = state / f"plugins-{plan.name}.toml"
    config.write_text(server_toml(plan, state, port=port, admin_port=admin_port, template=template, mem_dir=mem_dir))
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log_file:
        proc = subprocess.Popen([cube_executable(), "serve", "--config", str(config)], stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, log_path, boot_timeout_s)
        yield Target(url=url, api_key=credentials.secret, admin_url=f"http://127.0.0.1:{admin_port}",
                     state_dir=state, log=log_path, team_id=credentials.team_id, pid=proc.pid)
    finally:
        stop_server(proc, state, url=url, api_key=credentials.secret)
        shutil.rmtree(mem_dir, ignore_errors=True)


def stop_server(proc: subprocess.Popen[bytes], state: Path, *, url: str | None = None, api_key: str | None = None,
                note: Note | None = None) -> None:
    """Stop a server the bench started, leaving no VM behind. A node keeps its sandboxes' VMs
    running across its own restart (they run in sessions of their own), so stopping the server
    alone would leave every sandbox still alive (a wave in flight when the bench failed, a
    create the SDK gave up on but the server finished, a kill that failed): first every sandbox
    of the bench's team is killed through the API, then the server gets SIGTERM (SIGKILL after
    120 s), then any QEMU still running a VM of ``state`` is stopped."""
    if url is not None and api_key is not None and proc.poll() is None:
        killed = kill_team_sandboxes(url, api_key)
        if killed and note:
            note(f"killed {killed} sandboxes still alive at the end")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    leftover = kill_leftover_qemus(state)
    if leftover:
        log.warning("bench: stopped QEMU processes the server left behind", count=leftover, state=str(state))
        if note:
            note(f"stopped {leftover} QEMU processes the server left behind")


def kill_team_sandboxes(url: str, api_key: str, *, rounds: int = 20) -> int:
    """Kill every running or paused sandbox of the API key's team; how many were killed."""
    killed = 0
    try:
        with httpx.Client(base_url=url, headers={"X-API-Key": api_key}, timeout=60) as http:
            for _ in range(rounds):  # a page at a time; killed ones leave the list
                listed = http.get("/v2/sandboxes", params={"state": "running,paused", "limit": 100})
                listed.raise_for_status()
                ids = [item["sandboxID"] for item in listed.json()]
                if not ids:
                    break
                for sandbox_id in ids:
                    if http.delete(f"/sandboxes/{sandbox_id}").status_code in (204, 404):
                        killed += 1
    except httpx.HTTPError as exc:
        log.warning("bench: could not kill the sandboxes left", error=f"{type(exc).__name__}: {exc}")
    return killed


def kill_leftover_qemus(state: Path) -> int:
    """Stop the QEMU processes of VMs under ``state`` that are still running (a server that died
    leaves its VMs: they run in their own sessions); the network slots go with the next node's
    start-up sweep, the jail uid leases once their work directories are gone."""
    marker = f"{state}/"
    pids = [pid for pid in qemu_processes() if any(marker in arg for arg in _cmdline(pid))]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.2)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _cmdline(pid: int) -> list[str]:
    try:
        return [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return []


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, log_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise CubeError(f"cube serve exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            health = httpx.get(f"{url}/health", timeout=2)
            # 200 once one template serves; wait until every configured template is ready
            if health.status_code == 200 and all(v == "ready" for v in health.json().get("templates", {}).values()):
                return
        except httpx.HTTPError:
            pass
        failed = next((e for e in serve_log_events(log_path) if e.get("event", "").startswith("template build failed")),
                      None)
        if failed is not None:  # /health would stay 503 for ever
            raise CubeError(f"cube serve could not build its template:\n{str(failed.get('exception'))[-3000:]}")
        if time.monotonic() > deadline:
            raise CubeError(f"cube serve not healthy after {timeout_s:.0f}s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)


def serve_log_events(path: Path | None) -> list[dict[str, Any]]:
    """The JSON events of a serve log (other lines are skipped)."""
    if path is None or not path.exists():
        return []
    events = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def served_by(events: list[dict[str, Any]], sandbox_ids: list[str]) -> dict[str, int]:
    """How each sandbox's VM came up: ``cold`` (booted for it), ``restore`` (restored for it) or
    ``pool`` (it took a warm-pool member: its ``sandbox ready`` line says so; a member personalized
    at join was restored under its sandbox's id, one that was not carries the member's own id)."""
    pooled = {e.get("sandbox_id") for e in events if e.get("event") == "sandbox ready" and e.get("served_by") == "pool"}
    booted = {e.get("vm_id") for e in events if e.get("event") == "vm booting"}
    restored = {e.get("vm_id") for e in events if e.get("event") == "vm restored"}
    counts = Counter("pool" if s in pooled else "cold" if s in booted else "restore" if s in restored else "pool"
                     for s in sandbox_ids)
    return {k: counts.get(k, 0) for k in ("pool", "restore", "cold")}


# -- measuring -----------------------------------------------------------------------------------


class Client:
    """The E2B SDK (``e2b.AsyncSandbox``) pointed at one server."""

    def __init__(self, target: Target, template: str, request_timeout_s: float = 300.0) -> None:
        try:
            from e2b import AsyncSandbox
        except ImportError as exc:
            raise CubeError("cube bench create needs the E2B SDK: pip install cube-bench") from exc
        self.sandbox_cls = AsyncSandbox
        self.template = template
        # retries=0: a refused create counts as a failure, it is not hidden in the latency.
        self.params: dict[str, Any] = {"api_key": target.api_key, "api_url": target.url,
                                       "sandbox_url": target.url, "request_timeout": request_timeout_s,
                                       "retries": 0}

    async def create(self, created: Callable[[], None] = lambda: None) -> tuple[Sample, Any]:
        """One create and its first command; ``created`` is called when the create returned (or failed)."""
        sample = Sample(started_at=time.time())
        started = time.perf_counter()
        try:
            sbx = await self.sandbox_cls.create(template=self.template, timeout=1800, **self.params)
        except Exception as exc:
            sample.error = f"create: {type(exc).__name__}: {exc}"[:300]
            created()
            return sample, None
        sample.create_ms = (time.perf_counter() - started) * 1000
        sample.created_at = time.time()
        created()
        sample.sandbox_id = sbx.sandbox_id
        try:
            await sbx.commands.run("true")
            sample.first_cmd_ms = (time.perf_counter() - started) * 1000
        except Exception as exc:
            sample.error = f"first command: {type(exc).__name__}: {exc}"[:300]
        return sample, sbx

    async def create_only(self) -> Any:
        """A sandbox, or None if the create failed (logged)."""
        try:
            return await self.sandbox_cls.create(template=self.template, timeout=1800, **self.params)
        except Exception as exc:
            log.warning("bench: create failed", error=f"{type(exc).__name__}: {exc}")
            return None

    async def kill(self, sandboxes: list[Any], concurrency: int = 10) -> None:
        async def one(sbx: Any) -> None:
            try:
                await sbx.kill()
            except Exception as exc:
                log.warning("bench: kill failed", sandbox_id=sbx.sandbox_id, error=str(exc))

        await _bounded([functools.partial(one, s) for s in sandboxes], concurrency)


async def _bounded(jobs: list[Callable[[], Awaitable[Any]]], concurrency: int) -> list[Any]:
    gate = asyncio.Semaphore(max(1, concurrency))

    async def run(job: Callable[[], Awaitable[Any]]) -> Any:
        async with gate:
            return await job()

    return list(await asyncio.gather(*(run(j) for j in jobs)))


class PoolWatch:
    """How many warm-pool members are ready (paused): from the state store of a server we run,
    else from the ``cube_warm_pool_members`` metric (which also counts members being restored)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.store = SqliteStore(target.state_dir / "cube.db") if target.state_dir else None

    def close(self) -> None:
        if self.store is not None:
            self.store.close()

    async def ready(self) -> int | None:
        if self.store is not None:
            return len(self.store.list_sandboxes(team_id=POOL_TEAM, states=(SandboxState.PAUSED,)))
        if self.target.admin_url:
            try:
                async with httpx.AsyncClient(timeout=5) as http:
                    text = (await http.get(f"{self.target.admin_url}/metrics")).text
            except httpx.HTTPError:
                return None
            for line in text.splitlines():
                if line.startswith("cube_warm_pool_members "):
                    return int(float(line.split()[1]))
        return None

    async def wait_full(self, size: int, timeout_s: float = 300.0) -> bool:
        """Wait until ``size`` members are ready; False on timeout or when it cannot be known."""
        if size <= 0:
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            count = await self.ready()
            if count is None:
                await asyncio.sleep(min(5.0, timeout_s))  # unknown: give the pool time to refill
                return False
            if count >= size:
                if self.store is None:
                    await asyncio.sleep(1.0)  # the metric counts a member still being restored
                return True
            await asyncio.sleep(0.1)
        log.warning("bench: warm pool not refilled in time", wanted=size)
        return False


@dataclass
class CpuWindow:
    """CPU seconds the bench client (this process, all threads) and the server used while the
    creates of the waves were in flight (a wave's start until its last create returned)."""

    client_s: float = 0.0
    server_s: float = 0.0
    server_known: bool = False


class ClientProcesses:
    """``count`` client processes (``spawn``: each a fresh interpreter with its own event loop and
    SDK) that make a wave's creates between them, as that many agents on the host would: each
    gets its share of the wave, all start at the same wall-clock moment, each kills its own
    sandboxes after the wave's first commands. The client CPU of a wave is the sum of theirs,
    each up to its own last create answered; the server's window closes when the last create of
    any of them returned (a shared counter, read every 2 ms)."""

    def __init__(self, count: int, target: Target, template: str) -> None:
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        self.left = context.Value("i", 0)
        self.pipes: list[Any] = []
        self.procs: list[Any] = []
        for _ in range(count):
            parent, child = context.Pipe()
            proc = context.Process(target=_client_process, args=(child, target.url, target.api_key, template,
                                                                  self.left), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)
        for pipe in self.pipes:  # each has imported the SDK
            if pipe.recv() != "ready":
                raise CubeError("a bench client process failed to start")

    async def wave(self, size: int, wave: WaveCpu) -> list[Sample]:
        shares = [size // len(self.pipes) + (1 if i < size % len(self.pipes) else 0) for i in range(len(self.pipes))]
        with self.left.get_lock():
            self.left.value = size
        go_at = time.time() + 0.2  # every process sleeping until the same moment
        busy = [pipe for pipe, k in zip(self.pipes, shares, strict=True) if k]
        for pipe, k in zip(self.pipes, shares, strict=True):
            if k:
                pipe.send(("wave", k, go_at))
        wave.own_client = False  # the client's CPU is the processes' own (reported below)
        while wave.left > 0:
            await asyncio.sleep(0.002)
            done = size - self.left.value
            while wave.left > size - done:
                wave.created()
        results = await asyncio.gather(*(asyncio.to_thread(pipe.recv) for pipe in busy))
        samples: list[Sample] = []
        for made, cpu_s in results:
            samples.extend(Sample(*fields) for fields in made)
            wave.total.client_s += cpu_s
        return samples

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(("stop",))
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def _client_process(pipe: Any, url: str, api_key: str, template: str, left: Any) -> None:
    """One client process of :class:`ClientProcesses`: waves on request, until ``stop``."""
    client = Client(Target(url=url, api_key=api_key), template)
    pipe.send("ready")

    async def one_wave(k: int, go_at: float) -> tuple[list[tuple[Any, ...]], float]:
        await asyncio.sleep(max(0.0, go_at - time.time()))
        cpu0, cpu_last = time.process_time(), [0.0]

        def created() -> None:
            cpu_last[0] = time.process_time()
            with left.get_lock():
                left.value -= 1

        made = await asyncio.gather(*(client.create(created) for _ in range(k)))
        await client.kill([sbx for _, sbx in made if sbx is not None])
        return ([(s.create_ms, s.first_cmd_ms, s.sandbox_id, s.error, s.started_at, s.created_at) for s, _ in made],
                cpu_last[0] - cpu0)

    async def serve() -> None:
        while True:
            command = await asyncio.to_thread(pipe.recv)
            if command[0] != "wave":
                return
            pipe.send(await one_wave(command[1], command[2]))

    asyncio.run(serve())


class WaveCpu:
    """Adds one wave's CPU to ``total``: from now until :meth:`created` was called ``size`` times
    (and ends the profile's window then, if any)."""

    def __init__(self, total: CpuWindow, size: int, server_pid: int | None, profile: Windows | None = None) -> None:
        self.total, self.left, self.server_pid, self.profile = total, size, server_pid, profile
        self.own_client = True
        """Whether the creates are this process's (else :class:`ClientProcesses` adds theirs)."""
        self.client0, self.server0 = _cpu_now(server_pid)

    def created(self) -> None:
        self.left -= 1
        if self.left == 0:  # the wave's last create returned: close its window
            if self.profile is not None:
                self.profile.stop()
            client1, server1 = _cpu_now(self.server_pid)
            if self.own_client:
                self.total.client_s += client1 - self.client0
            if self.server0 is not None and server1 is not None:
                self.total.server_s += server1 - self.server0
                self.total.server_known = True


def _cpu_now(server_pid: int | None) -> tuple[float, float | None]:
    """(this process's CPU seconds, the server's CPU seconds or None)."""
    server: float | None = None
    if server_pid is not None:
        with contextlib.suppress(OSError, IndexError, ValueError):
            server = cpu_ticks(server_pid) / os.sysconf("SC_CLK_TCK")
    return time.process_time(), server


async def latency_run(client: Client, pool: PoolWatch, *, concurrency: int, n: int, pool_size: int,
                      note: Note, server_pid: int | None = None, profile: Windows | None = None,
                      procs: ClientProcesses | None = None) -> tuple[list[Sample], float, CpuWindow]:
    """``n`` creates in waves of ``concurrency``; every sandbox is killed after its wave. Also the
    seconds the waves' creates took (from a wave's start until its last create returned; the
    pool refills between waves and the first commands after the last 201 are not counted), and
    the CPU the client and the server used in that time; ``profile`` samples the server in those
    same windows."""
    samples: list[Sample] = []
    busy = 0.0
    cpu = CpuWindow()
    for start in range(0, n, concurrency):
        await pool.wait_full(pool_size)
        size = min(concurrency, n - start)
        if profile is not None:
            await asyncio.sleep(profile.start())
        wave = WaveCpu(cpu, size, server_pid, profile)
        if procs is not None:
            made_by_procs = await procs.wave(size, wave)
            busy += max((s.create_ms or 0.0) for s in made_by_procs) / 1000
            samples.extend(made_by_procs)
        else:
            made = await asyncio.gather(*(client.create(wave.created) for _ in range(size)))
            busy += max((s.create_ms or 0.0) for s, _ in made) / 1000  # the creates start together
            samples.extend(s for s, _ in made)
            await client.kill([sbx for _, sbx in made if sbx is not None])
        if concurrency > 1 or (start + 1) % 25 == 0 or start + 1 >= n:
            note(f"  c={concurrency}: {len(samples)}/{n} created")
    return samples, busy, cpu


def cpu_per_create(samples: list[Sample], cpu: CpuWindow) -> dict[str, float | None]:
    """CPU milliseconds per create answered, of the client and of the server (see :class:`CpuWindow`)."""
    created = sum(1 for s in samples if s.create_ms is not None)
    if not created:
        return {"client_cpu_ms_per_create": None, "server_cpu_ms_per_create": None}
    return {"client_cpu_ms_per_create": round(1000 * cpu.client_s / created, 1),
            "server_cpu_ms_per_create": round(1000 * cpu.server_s / created, 1) if cpu.server_known else None}


def creates_per_s(samples: list[Sample], busy_s: float) -> float | None:
    """Creates answered per second of the waves' create time (see :func:`latency_run`)."""
    created = sum(1 for s in samples if s.create_ms is not None)
    return round(created / busy_s, 2) if busy_s > 0 else None


def summarize(samples: list[Sample], events: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    create = [s.create_ms for s in samples if s.create_ms is not None]
    first = [s.first_cmd_ms for s in samples if s.first_cmd_ms is not None]

    def pct(values: list[float], q: float) -> float | None:
        return round(percentile(values, q), 1) if values else None

    out: dict[str, Any] = {
        "n": len(samples),
        "create_ms_p50": pct(create, 50), "create_ms_p95": pct(create, 95), "create_ms_p99": pct(create, 99),
        "first_cmd_ms_p50": pct(first, 50), "first_cmd_ms_p95": pct(first, 95), "first_cmd_ms_p99": pct(first, 99),
        "failures": sum(1 for s in samples if s.error is not None),
    }
    errors = sorted({s.error for s in samples if s.error})
    if errors:
        out["errors"] = errors[:5]
    if events:
        ids = [s.sandbox_id for s in samples if s.sandbox_id]
        out["served_by"] = served_by(events, ids)
        wanted = set(ids)
        restore = [float(e["restore_ms"]) for e in events
                   if e.get("event") == "vm restored" and e.get("vm_id") in wanted and "restore_ms" in e]
        # The driver's own restore time (spawn -> QMP RESUME) of the sandboxes restored for a create.
        out["restore_ms_p50"], out["restore_ms_p95"] = pct(restore, 50), pct(restore, 95)
        out["phases_ms"] = phases(samples, events)
    return out


PHASES = ("to_server", "before_service", "service", "answer", "to_client")
"""A create's latency split by the server's log lines (:func:`phases`)."""


def _log_time(event: dict[str, Any]) -> float | None:
    with contextlib.suppress(KeyError, TypeError, ValueError):
        return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()
    return None


def phases(samples: list[Sample], events: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Where each create's time went, from the client's clock and the server's log lines (one
    host, one clock), ms: ``to_server`` (the call until the request entered the server's app: the
    client building and sending it, the server's loop reading it), ``before_service`` (in the app
    until the route called the service: body, auth, routing), ``service`` (``service.create``),
    ``answer`` (the service's return until the answer's status line was sent), ``to_client`` (the
    answer sent until the SDK call returned: the client's loop reading it, the SDK's work). p50,
    p95, and the mean over the slowest 10 % of creates (what the tail waited on)."""
    created = {e.get("sandbox_id"): e for e in events if e.get("event") == "sandbox created" and "request_ms" in e}
    answered = {e.get("request_id"): e for e in events
                if e.get("logger") == "uvicorn.access" and "POST /v2/sandboxes" in str(e.get("event"))}
    rows: list[tuple[float, dict[str, float]]] = []
    for s in samples:
        made = created.get(s.sandbox_id)
        if made is None or s.started_at is None or s.created_at is None or s.create_ms is None:
            continue
        access = answered.get(made.get("request_id"))
        route_end, sent = _log_time(made), _log_time(access) if access else None
        if route_end is None or sent is None:
            continue
        request_ms, create_ms = float(made["request_ms"]), float(made["create_ms"])
        arrived = route_end - request_ms / 1000
        rows.append((s.create_ms, {
            "to_server": (arrived - s.started_at) * 1000, "before_service": request_ms - create_ms,
            "service": create_ms, "answer": (sent - route_end) * 1000, "to_client": (s.created_at - sent) * 1000}))
    if not rows:
        return None
    rows.sort(key=lambda r: r[0])
    tail = [r for _, r in rows[-max(1, len(rows) // 10):]]
    out: dict[str, Any] = {"n": len(rows)}
    for name in PHASES:
        values = [r[name] for _, r in rows]
        out[name] = {"p50": round(percentile(values, 50), 1), "p95": round(percentile(values, 95), 1),
                     "slowest_10pct_mean": round(statistics.fmean(r[name] for r in tail), 1)}
    return out


def qemu_processes() -> dict[int, int]:
    """pid → start time (clock ticks after boot) of every ``qemu-system-*`` process."""
    found: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if not (entry / "comm").read_text().startswith("qemu-system"):
                continue
            found[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[19])
        except (OSError, ValueError, IndexError):
            continue
    return found


def _sandbox_pids(target: Target, sandbox_ids: set[str], before: dict[int, int]) -> tuple[list[int], str]:
    if target.state_dir is not None:
        store = SqliteStore(target.state_dir / "cube.db")
        try:
            pids = [sb.runtime.vm.pid for sb in store.list_sandboxes(states=(SandboxState.RUNNING,))
                    if sb.sandbox_id in sandbox_ids and sb.runtime.vm is not None and sb.runtime.vm.pid]
        finally:
            store.close()
        return pids, "records"
    return [pid for pid in qemu_processes() if pid not in before], "proc-scan (may include refilled pool members)"


def _host_busy_ticks() -> tuple[int, int]:
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


async def _footprint(pids: list[int], n: int, available_before_kib: int, settle_s: float) -> dict[str, Any]:
    """Memory per sandbox against the baseline, and CPU use over ``settle_s``."""
    alive = [p for p in pids if Path(f"/proc/{p}").exists()]
    ticks_before = sum(cpu_ticks(p) for p in alive)
    busy_before, total_before = _host_busy_ticks()
    await asyncio.sleep(settle_s)
    alive = [p for p in alive if Path(f"/proc/{p}").exists()]
    ticks_after = sum(cpu_ticks(p) for p in alive)
    busy_after, total_after = _host_busy_ticks()
    rollups = [smaps_rollup_kib(p) for p in alive]

    def median_mib(key: str) -> float | None:
        return round(statistics.median(r.get(key, 0) for r in rollups) / 1024, 1) if rollups else None

    return {
        "mib_per_sandbox": round((available_before_kib - meminfo_kib()) / 1024 / max(1, n), 1),
        "pss_mib_median": median_mib("Pss"), "uss_mib_median": median_mib("Uss"),
        "rss_mib_median": median_mib("Rss"),
        "cpu_pct_per_sandbox": round((ticks_after - ticks_before) / os.sysconf("SC_CLK_TCK") / settle_s * 100
                                     / max(1, len(alive)), 2),
        "host_cpu_busy_pct": round(100 * (busy_after - busy_before) / max(1, total_after - total_before), 1),
        "processes": len(alive),
    }


async def idle_run(client: Client, pool: PoolWatch, target: Target, *, n: int, pool_size: int,
                   concurrency: int, settle_s: float, note: Note) -> dict[str, Any]:
    """Create ``n`` sandboxes, leave them idle, measure; run ``true`` in each, measure again."""
    await pool.wait_full(pool_size)
    await asyncio.sleep(settle_s / 2)
    before = qemu_processes()
    available_before = meminfo_kib()
    made = await _bounded([client.create_only for _ in range(n)], concurrency)
    sandboxes = [sbx for sbx in made if sbx is not None]
    try:
        note(f"  idle: {len(sandboxes)}/{n} sandboxes up; measuring")
        await pool.wait_full(pool_size)
        await asyncio.sleep(settle_s)
        pids, source = _sandbox_pids(target, {s.sandbox_id for s in sandboxes}, before)
        idle = await _footprint(pids, len(sandboxes), available_before, settle_s)
        ran = await _bounded([functools.partial(_run_true, s) for s in sandboxes], concurrency)
        await asyncio.sleep(settle_s)
        after = await _footprint(pids, len(sandboxes), available_before, settle_s)
        paused = await pause_run(sandboxes, pids, available_before, concurrency=concurrency, settle_s=settle_s)
    finally:
        await client.kill(sandboxes)
    return {
        "n": n, "failures": n - len(sandboxes) + ran.count(False) + paused.pop("failures"), "pids_from": source,
        "idle_mib_per_sandbox": idle["mib_per_sandbox"], **{k: v for k, v in idle.items() if k != "mib_per_sandbox"},
        "after_first_cmd": after, "pause": paused,
    }


async def pause_run(sandboxes: list[Any], pids: list[int], available_before_kib: int, *, concurrency: int,
                    settle_s: float) -> dict[str, Any]:
    """Pause every sandbox through the SDK (``pause()``: POST /sandboxes/{id}/pause), measure what
    the paused ones cost, then resume them (``connect()``) and check each still answers."""

    async def timed(call: Callable[[], Awaitable[Any]]) -> float | None:
        started = time.perf_counter()
        try:
            await call()
        except Exception as exc:
            log.warning("bench: pause/resume failed", error=f"{type(exc).__name__}: {exc}")
            return None
        return (time.perf_counter() - started) * 1000

    pause_ms = await _bounded([functools.partial(timed, s.pause) for s in sandboxes], concurrency)
    await asyncio.sleep(settle_s / 2)
    cost = await _footprint(pids, len(sandboxes), available_before_kib, settle_s)
    resume_ms = await _bounded([functools.partial(timed, s.connect) for s in sandboxes], concurrency)
    answered = await _bounded([functools.partial(_run_true, s) for s in sandboxes], concurrency)
    ok_pause = [v for v in pause_ms if v is not None]
    ok_resume = [v for v in resume_ms if v is not None]

    def pct(values: list[float], q: float) -> float | None:
        return round(percentile(values, q), 1) if values else None

    return {"pause_ms_p50": pct(ok_pause, 50), "pause_ms_p95": pct(ok_pause, 95),
            "resume_ms_p50": pct(ok_resume, 50), "resume_ms_p95": pct(ok_resume, 95),
            "paused_cpu_pct_per_sandbox": cost["cpu_pct_per_sandbox"],
            "paused_mib_per_sandbox": cost["mib_per_sandbox"], "paused_pss_mib_median": cost["pss_mib_median"],
            "failures": (len(pause_ms) - len(ok_pause)) + (len(resume_ms) - len(ok_resume)) + answered.count(False)}


async def _run_true(sbx: Any) -> bool:
    try:
        await sbx.commands.run("true")
    except Exception as exc:
        log.warning("bench: command failed", sandbox_id=sbx.sandbox_id, error=str(exc))
        return False
    return True


async def measure(plan: ModePlan, target: Target, *, template: str, settle_s: float, note: Note,
                  profile_to: Path | None = None, clients: int = 1) -> dict[str, Any]:
    """Every measurement of one mode against ``target``; with ``profile_to`` (and a server of
    ours), py-spy samples the server during the waves' creates into that file; ``clients`` > 1:
    that many client processes make each wave's creates (:class:`ClientProcesses`)."""
    client = Client(target, template)
    pool = PoolWatch(target)
    pool_size = plan.pool_size
    if target.state_dir is None:  # not our server: keep its pool at the size it has now
        await asyncio.sleep(settle_s)
        pool_size = await pool.ready() or 0
    try:
        raw: dict[int, list[Sample]] = {}
        busy: dict[int, float] = {}
        cpu: dict[int, CpuWindow] = {}
        profile = Windows(target.pid, profile_to) if profile_to is not None and target.pid is not None else None
        procs = ClientProcesses(clients, target, template) if clients > 1 else None
        try:
            for c in plan.concurrency:
                note(f"{plan.name}: {plan.n} creates at concurrency {c}")
                raw[c], busy[c], cpu[c] = await latency_run(client, pool, concurrency=c, n=plan.n,
                                                            pool_size=pool_size, note=note, server_pid=target.pid,
                                                            profile=profile, procs=procs)
        finally:
            profiled = profile.merge() if profile is not None else None
            if procs is not None:
                procs.close()
        idle: dict[str, Any] | None = None
        if plan.idle_n > 0:
            note(f"{plan.name}: {plan.idle_n} idle sandboxes")
            idle = await idle_run(client, pool, target, n=plan.idle_n, pool_size=pool_size,
                                  concurrency=min(plan.idle_n, 10), settle_s=settle_s, note=note)
    finally:
        pool.close()
    events = serve_log_events(target.log)
    started = next((e for e in events if e.get("event") == "vmm started"), {})
    return {
        "note": plan.note, "pool_size": pool_size, "boot_mode": plan.boot_mode, "clients": clients,
        "isolation": started.get("isolation"),
        "by_concurrency": {str(c): {**summarize(s, events), "creates_per_s": creates_per_s(s, busy[c]),
                                  **cpu_per_create(s, cpu[c])}
                           for c, s in raw.items()},
        "profile": summary(profiled) if profiled is not None else None,
        "idle_mib_per_sandbox": idle["idle_mib_per_sandbox"] if idle else None,
        "idle": idle,
        # [create ms, first command ms, called at, returned at (wall clock), sandbox id]
        "samples": {str(c): [[s.create_ms, s.first_cmd_ms, s.started_at, s.created_at, s.sandbox_id] for s in samples]
                    for c, samples in raw.items()},
    }


# -- the whole run -------------------------------------------------------------------------------


def run(opts: Options, note: Note) -> dict[str, Any]:
    """Measure every planned mode (one server at a time) and write JSON + PNG into ``opts.out``."""
    began = time.monotonic()
    modes: dict[str, dict[str, Any]] = {}
    opts.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    partial = opts.out / f"bench-create-{stamp}.partial.json"
    if opts.url:
        key = opts.api_key or os.environ.get("E2B_API_KEY")
        if not key:
            raise CubeError("--url needs an API key: --api-key or E2B_API_KEY")
        target = Target(url=opts.url.rstrip("/"), api_key=key, admin_url=opts.admin_url)
        for plan in plans(opts):
            modes[plan.name] = asyncio.run(measure(plan, target, template=opts.template, settle_s=opts.settle_s,
                                                   note=note, clients=opts.clients))
    else:
        with tempfile.TemporaryDirectory(prefix="cube-bench-") as tmp:
            state = Path(tmp)
            credentials = bench_credentials(state)
            for plan in plans(opts):
                with host_lock(opts.lock, note):
                    note(f"{plan.name}: starting cube serve ({plan.note})")
                    with local_server(plan, state, credentials, template=opts.template,
                                      boot_timeout_s=opts.boot_timeout_s,
                                      log_path=opts.out / f"serve-{plan.name}.log") as target:
                        profile_to = opts.out / f"profile-{plan.name}-{stamp}.txt" if opts.profile else None
                        modes[plan.name] = asyncio.run(measure(plan, target, template=opts.template,
                                                               settle_s=opts.settle_s, note=note,
                                                               profile_to=profile_to, clients=opts.clients))
                partial.write_text(json.dumps(modes))  # what is measured survives a later failure
    reference = modes.get("pool_hit") or next(iter(modes.values()))
    result: dict[str, Any] = {
        "by_concurrency": reference["by_concurrency"],
        "idle_mib_per_sandbox": reference["idle_mib_per_sandbox"],
        "host": {"cpus": os.cpu_count(), "mem_total_mib": meminfo_kib("MemTotal") // 1024},
        "n": opts.n, "concurrency": list(opts.concurrency), "clients": opts.clients,
        "modes": {name: {k: v for k, v in m.items() if k != "samples"} for name, m in modes.items()},
        "ratios": ratios(modes),
        "targets": targets(modes),
        "duration_s": round(time.monotonic() - began, 1),
    }
    json_path = opts.out / f"bench-create-{stamp}.json"
    result["files"] = {"json": str(json_path), "plot": plot(modes, opts.out / f"bench-create-{stamp}.png")}
    json_path.write_text(json.dumps({**result, "samples": {k: m["samples"] for k, m in modes.items()}}, indent=1))
    partial.unlink(missing_ok=True)
    return result


def _get(modes: dict[str, dict[str, Any]], mode: str, c: str, key: str) -> float | None:
    value = modes.get(mode, {}).get("by_concurrency", {}).get(c, {}).get(key)
    return float(value) if value is not None else None


def ratios(modes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Slower mode over faster mode, per metric at concurrency 1 (cold runs only there), and
    pool miss over pool hit at every concurrency both ran."""
    pairs = (("pool_miss", "pool_hit"), ("cold", "pool_hit"), ("cold", "pool_miss"),
             ("pool_miss", "pool_miss_nojail"), ("pool_hit", "pool_hit_nojail"),
             ("pool_hit_personalize_at_create", "pool_hit"), ("pool_hit_foreground_refill", "pool_hit"),
             ("pool_hit_aslr", "pool_hit"))
    out: dict[str, Any] = {}
    for metric in ("create_ms_p50", "create_ms_p95", "first_cmd_ms_p50", "first_cmd_ms_p95", "restore_ms_p50"):
        for slow, fast in pairs:
            a, b = _get(modes, slow, "1", metric), _get(modes, fast, "1", metric)
            if a is not None and b:
                out.setdefault(f"c1_{metric}", {})[f"{slow}/{fast}"] = round(a / b, 1)
    for c in modes.get("pool_hit", {}).get("by_concurrency", {}):
        for metric in ("create_ms_p50", "create_ms_p95"):
            a, b = _get(modes, "pool_miss", c, metric), _get(modes, "pool_hit", c, metric)
            if a is not None and b:
                out.setdefault(f"pool_miss/pool_hit_{metric}", {})[c] = round(a / b, 1)
        for metric in ("create_ms_p50", "create_ms_p95", "first_cmd_ms_p50", "first_cmd_ms_p95", "creates_per_s"):
            a, b = _get(modes, "pool_hit_foreground_refill", c, metric), _get(modes, "pool_hit", c, metric)
            if a is not None and b:
                out.setdefault(f"pool_hit_foreground_refill/pool_hit_{metric}", {})[c] = round(a / b, 2)
    return out


def targets(modes: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The pool-hit numbers next to issue 5's goals (met or not, as measured)."""
    hit = modes.get("pool_hit")
    if hit is None:
        return []
    levels = sorted(hit["by_concurrency"], key=int)
    checks = [("create_ms_p50", levels[0], "create_ms_p50", TARGETS["create_ms_p50"]),
              ("create_ms_p50", levels[-1], "create_ms_p50", TARGETS["create_ms_p50"]),
              ("create_ms_p95", levels[-1], "create_ms_p95_at_max_c", TARGETS["create_ms_p95_at_max_c"]),
              ("first_cmd_ms_p50", levels[0], "first_cmd_ms_p50", TARGETS["first_cmd_ms_p50"])]
    out = []
    for metric, c, name, goal in dict.fromkeys(checks):
        measured = _get(modes, "pool_hit", c, metric)
        out.append({"metric": metric, "concurrency": int(c), "target": goal, "measured": measured,
                    "met": measured is not None and measured <= goal, "name": name})
    idle = hit.get("idle_mib_per_sandbox")
    out.append({"metric": "idle_mib_per_sandbox", "n": (hit.get("idle") or {}).get("n"),
                "target": TARGETS["idle_mib_per_sandbox"], "measured": idle,
                "met": idle is not None and idle <= TARGETS["idle_mib_per_sandbox"], "name": "idle_mib_per_sandbox"})
    return out


def plot(modes: dict[str, dict[str, Any]], path: Path) -> str | None:
    """ECDFs of create→201 and create→first command per mode and concurrency (log x); None when
    matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("bench: matplotlib is not installed; no plot")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    panels = ((axes[0], 0, "create → 201", TARGETS["create_ms_p50"]),
              (axes[1], 1, "create → first commands.run('true')", TARGETS["first_cmd_ms_p50"]))
    for ax, column, title, goal in panels:
        for name, mode in modes.items():
            for c, samples in mode["samples"].items():
                values = sorted(v[column] for v in samples if v[column] is not None)
                if not values:
                    continue
                ys = [0.0] + [(i + 1) / len(values) for i in range(len(values))]
                ax.step([values[0], *values], ys, where="post", label=f"{name} c={c} (n={len(values)})")
        ax.axvline(goal, color="grey", linestyle="--", linewidth=1)
        ax.text(goal, 1.01, f" p50 goal {goal:g} ms", color="grey", fontsize="small")
        ax.set_ylim(0, 1.06)
        ax.set_xscale("log")
        ax.set_xlabel("ms (log scale)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("fraction of creates")
    axes[1].legend(fontsize="small", loc="lower right")
    fig.suptitle(f"cube bench create ({os.cpu_count()} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def tables(result: dict[str, Any]) -> list[Any]:
    """Rich tables of a result: latencies, idle cost, ratios, targets."""
    from rich.table import Table

    def fmt(value: Any) -> str:
        return "-" if value is None else str(value)

    latency = Table("mode", "c", "n", "fail", "create p50", "p95", "p99", "first cmd p50", "p95", "p99",
                    "restore p50", "creates/s", "CPU ms/create client", "server", "served by",
                    title="latency (ms)")
    for name, mode in result["modes"].items():
        for c, s in mode["by_concurrency"].items():
            served = s.get("served_by")
            latency.add_row(name, c, str(s["n"]), str(s["failures"]), fmt(s["create_ms_p50"]),
                            fmt(s["create_ms_p95"]), fmt(s["create_ms_p99"]), fmt(s["first_cmd_ms_p50"]),
                            fmt(s["first_cmd_ms_p95"]), fmt(s["first_cmd_ms_p99"]), fmt(s.get("restore_ms_p50")),
                            fmt(s.get("creates_per_s")), fmt(s.get("client_cpu_ms_per_create")),
                            fmt(s.get("server_cpu_ms_per_create")),
                            " ".join(f"{k}={v}" for k, v in served.items() if v) if served else "-")
    idle = Table("mode", "N", "MemAvail drop MiB/sbx", "PSS med", "USS med", "CPU %/sbx",
                 "after cmd: MiB/sbx", "PSS med", "paused: CPU %/sbx", "pause p50/p95", "resume p50/p95",
                 title="idle sandboxes")
    for name, mode in result["modes"].items():
        i = mode.get("idle")
        if i:
            p = i.get("pause") or {}
            idle.add_row(name, str(i["n"]), fmt(i["idle_mib_per_sandbox"]), fmt(i["pss_mib_median"]),
                         fmt(i["uss_mib_median"]), fmt(i["cpu_pct_per_sandbox"]),
                         fmt(i["after_first_cmd"]["mib_per_sandbox"]), fmt(i["after_first_cmd"]["pss_mib_median"]),
                         fmt(p.get("paused_cpu_pct_per_sandbox")),
                         f"{fmt(p.get('pause_ms_p50'))} / {fmt(p.get('pause_ms_p95'))}",
                         f"{fmt(p.get('resume_ms_p50'))} / {fmt(p.get('resume_ms_p95'))}")
    split = Table("mode", "c", *PHASES, title="where a create's time went (ms: p50 / p95 / slowest 10 % mean)")
    for name, mode in result["modes"].items():
        for c, s in mode["by_concurrency"].items():
            ph = s.get("phases_ms")
            if ph:
                split.add_row(name, c, *(f"{ph[k]['p50']} / {ph[k]['p95']} / {ph[k]['slowest_10pct_mean']}"
                                         for k in PHASES))
    ratio = Table("metric", "ratio", "value", title="ratios")
    for metric, values in result["ratios"].items():
        for pair, value in values.items():
            ratio.add_row(metric, pair, f"{value}x")
    goals = Table("pool hit", "c / N", "target", "measured", "met", title="targets")
    for t in result["targets"]:
        goals.add_row(t["metric"], fmt(t.get("concurrency", t.get("n"))), f"≤ {t['target']}", fmt(t["measured"]),
                      "[green]yes[/]" if t["met"] else "[red]no[/]")
    notes = Table("mode", "note", title="modes")
    for name, mode in result["modes"].items():
        clients = mode.get("clients", 1)
        notes.add_row(name, mode["note"] + (f"; {clients} client processes" if clients > 1 else "; one client loop"))
    profiles = Table("mode", "function (module)", "% inclusive", "function (module)", "% self",
                     title="server profile (py-spy, latency runs)")
    for name, mode in result["modes"].items():
        prof = mode.get("profile") or {}
        for (inc, inc_pct), (own, own_pct) in zip(prof.get("inclusive_pct", [])[:15], prof.get("self_pct", [])[:15],
                                                  strict=False):
            profiles.add_row(name, inc, str(inc_pct), own, str(own_pct))
    return [notes, latency, *([split] if split.row_count else []), idle, ratio, goals,
            *([profiles] if profiles.row_count else [])]
