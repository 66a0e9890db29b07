"""``cube bench cluster``: what the control plane's hop to a node costs, and what a second node adds.

Three setups on this box, one after another in one run, each measured the same way through the
E2B SDK (``AsyncSandbox.create`` then ``commands.run("true")``, waves of ``c`` creates, every
sandbox killed after its wave, the warm pool refilled before each wave so creates are pool hits):

* ``serve``: ``cube serve`` (control plane and node agent in one process; the baseline);
* ``master_1node``: a throwaway PostgreSQL, ``cube master`` and one ``cube node`` (every call
  crosses the HTTP ``NodeClient``; sandbox traffic goes master edge -> node edge -> guest);
* ``master_2nodes``: the same with two nodes (``spread`` placement, so both take creates).

Per setup and concurrency: create and first-command p50/p95, and creates/s (creates of the waves
divided by the time the waves took, pool refills excluded). The ratios against ``serve`` are what
the control plane's hop adds; ``master_2nodes`` against ``master_1node`` is what a second node
adds on a box whose two cores every node shares (so it shows the control plane's limits, not the
gain of a second machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from cube_core.errors import CubeError
from cube_core.testing.postgres import PostgresServer

from cube_bench.create import (
    HOST_LOCK,
    Client,
    ModePlan,
    Note,
    PoolWatch,
    Sample,
    Target,
    bench_credentials,
    cube_executable,
    free_port,
    host_lock,
    kill_leftover_qemus,
    kill_team_sandboxes,
    local_server,
    stop_server,
    summarize,
)
from cube_bench.servertoml import UNLIMITED_PLACEMENT, plugins_toml

SETUPS: tuple[str, ...] = ("serve", "master_1node", "master_2nodes")


def node_toml(name: str, state: Path, *, subnet: str, template: str, pool_size: int, port: int) -> str:
    """A ``cube node`` of the bench's cluster (state and token from the environment)."""
    return plugins_toml(
        core={"node_id": name, "state_dir": state, "state": {"env": "CUBE_STATE_URL"}, "templates": [template],
              "pool": {"size": pool_size, "max_memory_mb": max(4096, pool_size * 128 + 1024)},
              "max_sandboxes": 1000},
        node={"host": "127.0.0.1", "port": port}, **_plugins(name, state, subnet))


def master_toml(name: str, state: Path, *, port: int, admin_port: int, subnet: str) -> str:
    """The ``cube master`` of the bench's cluster."""
    return plugins_toml(
        core={"node_id": name, "state_dir": state, "state": {"env": "CUBE_STATE_URL"}, "host": "127.0.0.1",
              "port": port, "admin_port": admin_port, "max_sandboxes": 1000},
        **_plugins(name, state, subnet))


def _plugins(name: str, state: Path, subnet: str) -> dict[str, Any]:
    return {"state": state, "vmm": {"mem_dir": f"/dev/shm/cube-bench-{name}"}, "network": {"subnet": subnet},
            "scheduler": "spread", "scheduler_options": UNLIMITED_PLACEMENT,
            "cluster": {"token": {"env": "CUBE_CLUSTER_TOKEN"}}}


@dataclass(frozen=True)
class Options:
    concurrency: tuple[int, ...] = (1, 10)
    n: int = 40
    setups: tuple[str, ...] = SETUPS
    template: str = "base"
    out: Path = Path("bench-results")
    boot_timeout_s: float = 1500.0


@contextlib.contextmanager
def _processes(root: Path) -> Iterator[list[tuple[subprocess.Popen[bytes], Path]]]:
    """The cluster's processes with their state directories; stopped (the master first, then the
    nodes) with :func:`~cube_bench.create.stop_server`, so no VM of ``root`` outlives them."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    try:
        yield procs
    finally:
        for proc, state in reversed(procs):
            stop_server(proc, state)
        kill_leftover_qemus(root)


@contextlib.contextmanager
def cluster(nodes: int, root: Path, *, template: str, pool_size: int, boot_timeout_s: float,
            out: Path) -> Iterator[Target]:
    """PostgreSQL + ``cube master`` + ``nodes`` × ``cube node`` on this box; an API key of team
    ``bench``; everything stopped and removed on exit."""
    pg = PostgresServer()
    pg.start()
    try:
        env = {**os.environ, "CUBE_STATE_URL": pg.create_database(), "CUBE_CLUSTER_TOKEN": secrets.token_hex(32)}
        with _processes(root) as procs:
            names = [f"bench-{i}" for i in range(nodes)]
            for i, name in enumerate(names):
                state = root / name
                state.mkdir(parents=True)
                config = state / "plugins.toml"
                config.write_text(node_toml(name, state, subnet=f"100.9{i}.0.0/16", template=template,
                                            pool_size=pool_size, port=free_port()))
                procs.append((_spawn(["node", "--config", str(config)], out / f"cluster{nodes}-{name}.log", env),
                              state))
            mstate = root / "master"
            mstate.mkdir(parents=True)
            port, admin_port = free_port(), free_port()
            mconfig = mstate / "plugins.toml"
            mconfig.write_text(master_toml("bench-master", mstate, port=port, admin_port=admin_port,
                                           subnet="100.99.0.0/16"))
            log_path = out / f"cluster{nodes}-master.log"
            procs.append((_spawn(["master", "--config", str(mconfig)], log_path, env), mstate))
            key = subprocess.run([cube_executable(), "keys", "create", "--team", "bench", "--config", str(mconfig)],
                                 capture_output=True, text=True, timeout=60, env=env, check=True).stdout.strip()
            url = f"http://127.0.0.1:{port}"
            _wait_nodes(url, mconfig, env, names, template, [p for p, _ in procs], boot_timeout_s)
            try:
                yield Target(url=url, api_key=key, admin_url=f"http://127.0.0.1:{admin_port}", log=log_path)
            finally:  # through the master, while every process still runs (see stop_server)
                kill_team_sandboxes(url, key)
    finally:
        pg.stop()
        for i in range(nodes):
            shutil.rmtree(f"/dev/shm/cube-bench-bench-{i}", ignore_errors=True)


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log_file:
        return subprocess.Popen([cube_executable(), *args], stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)


def _wait_nodes(url: str, config: Path, env: dict[str, str], names: list[str], template: str,
                procs: list[subprocess.Popen[bytes]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise CubeError(f"a cluster process exited with {dead[0].returncode} (see its log in --out)")
        with contextlib.suppress(httpx.HTTPError, subprocess.SubprocessError, ValueError):
            ok = httpx.get(f"{url}/health", timeout=2).status_code == 200
            listed = subprocess.run([cube_executable(), "nodes", "--json", "--config", str(config)],
                                    capture_output=True, text=True, timeout=30, env=env).stdout.splitlines()
            ready = {n["node_id"] for n in map(json.loads, listed)
                     if n["status"] == "up" and template in n["templates"]}
            if ok and set(names) <= ready:
                return
        if time.monotonic() > deadline:
            raise CubeError(f"cluster not ready after {timeout_s:.0f}s")
        time.sleep(0.5)


async def waves(target: Target, *, template: str, concurrency: int, n: int, pool_size: int,
                note: Note) -> tuple[list[Sample], float]:
    """``n`` creates in waves of ``concurrency`` (pool refilled before each); the samples and the
    seconds the waves took."""
    client = Client(target, template)
    pool = PoolWatch(target)
    samples: list[Sample] = []
    busy = 0.0
    try:
        for start in range(0, n, concurrency):
            await pool.wait_full(pool_size)
            began = time.perf_counter()
            made = await asyncio.gather(*(client.create() for _ in range(min(concurrency, n - start))))
            busy += time.perf_counter() - began
            samples.extend(s for s, _ in made)
            await client.kill([sbx for _, sbx in made if sbx is not None])
        note(f"  c={concurrency}: {len(samples)} created")
    finally:
        pool.close()
    return samples, busy


def run(opts: Options, note: Note) -> dict[str, Any]:
    unknown = set(opts.setups) - set(SETUPS)
    if unknown or opts.n < 1 or not opts.concurrency or min(opts.concurrency) < 1:
        raise CubeError(f"setups are {', '.join(SETUPS)}; --n and --concurrency values at least 1")
    began = time.monotonic()
    pool_size = max(opts.concurrency)
    opts.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"n": opts.n, "concurrency": list(opts.concurrency), "setups": {}}

    def measure(name: str, target: Target) -> None:
        per_c: dict[str, Any] = {}
        for c in opts.concurrency:
            note(f"{name}: {opts.n} creates at concurrency {c}")
            samples, busy = asyncio.run(waves(target, template=opts.template, concurrency=c, n=opts.n,
                                              pool_size=pool_size, note=note))
            created = sum(1 for s in samples if s.create_ms is not None)
            per_c[str(c)] = {**summarize(samples), "creates_per_s": round(created / busy, 2) if busy else None}
        result["setups"][name] = per_c

    with tempfile.TemporaryDirectory(prefix="cube-bench-cluster-") as tmp:
        root = Path(tmp)
        for name in opts.setups:
            with host_lock(HOST_LOCK, note):
                note(f"{name}: starting")
                if name == "serve":
                    state = root / "serve"
                    state.mkdir()
                    plan = ModePlan("serve", opts.concurrency, opts.n, 0, pool_size=pool_size)
                    with local_server(plan, state, bench_credentials(state), template=opts.template,
                                      boot_timeout_s=opts.boot_timeout_s, log_path=opts.out / "cluster-serve.log") as t:
                        measure(name, t)
                else:
                    nodes = 1 if name == "master_1node" else 2
                    with cluster(nodes, root / name, template=opts.template, pool_size=pool_size,
                                 boot_timeout_s=opts.boot_timeout_s, out=opts.out) as t:
                        measure(name, t)
    result["ratios"] = _ratios(result["setups"])
    result["duration_s"] = round(time.monotonic() - began, 1)
    path = opts.out / f"bench-cluster-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=1))
    result["file"] = str(path)
    return result


def _ratios(setups: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c, base in setups.get("serve", {}).items():
        for name in ("master_1node", "master_2nodes"):
            other = setups.get(name, {}).get(c)
            if not other:
                continue
            for key in ("create_ms_p50", "create_ms_p95"):
                if base.get(key) and other.get(key) is not None:
                    out[f"{name}_minus_serve_{key}_c{c}"] = round(other[key] - base[key], 1)
    for c, one in setups.get("master_1node", {}).items():
        two = setups.get("master_2nodes", {}).get(c)
        if two and one.get("creates_per_s") and two.get("creates_per_s"):
            out[f"two_nodes_over_one_creates_per_s_c{c}"] = round(two["creates_per_s"] / one["creates_per_s"], 2)
    return out
