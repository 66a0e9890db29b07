"""``cube bench create`` end to end: it starts real ``cube serve`` processes (pool hit, pool miss,
cold boot, one after another), creates real microVM sandboxes through the real E2B SDK and
reports numbers that must be consistent with what the servers did.

Run it under the host lock (``flock /tmp/cube-host.lock pytest ...``): the bench sees the lock
held by its ancestor and does not take it again; without it, the bench takes the lock itself.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cube_bench.create import Options, Sample, held_by_ancestor, host_lock, phases, plans, served_by, summarize

vm_slow = [pytest.mark.vm, pytest.mark.slow]

CUBE = str(Path(sys.executable).with_name("cube"))

LATENCY_KEYS = ("create_ms_p50", "create_ms_p95", "create_ms_p99", "first_cmd_ms_p50", "first_cmd_ms_p95",
                "first_cmd_ms_p99", "failures")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench-create")
    proc = subprocess.run([CUBE, "bench", "create", "--concurrency", "1,2", "--n", "4", "--json", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_latencies(stats: dict, n: int) -> None:
    assert set(LATENCY_KEYS) <= set(stats)
    assert stats["n"] == n
    assert stats["failures"] == 0, stats.get("errors")
    for prefix in ("create_ms", "first_cmd_ms"):
        p50, p95, p99 = (stats[f"{prefix}_p{q}"] for q in (50, 95, 99))
        assert all(isinstance(v, float) and v > 0 for v in (p50, p95, p99)), stats
        assert p50 <= p95 <= p99, stats
    assert stats["first_cmd_ms_p50"] > stats["create_ms_p50"] * 0.999  # the command comes after the 201


@pytest.mark.vm
@pytest.mark.slow
def test_json_shape_and_percentiles(bench: dict) -> None:
    assert set(bench["by_concurrency"]) == {"1", "2"}
    for stats in bench["by_concurrency"].values():
        check_latencies(stats, 4)
    assert isinstance(bench["idle_mib_per_sandbox"], float) and bench["idle_mib_per_sandbox"] > 0
    assert bench["by_concurrency"] == bench["modes"]["pool_hit"]["by_concurrency"]


@pytest.mark.vm
@pytest.mark.slow
def test_every_mode_did_what_it_says(bench: dict) -> None:
    modes = bench["modes"]
    assert set(modes) == {"pool_hit", "pool_miss", "cold"}
    for c in ("1", "2"):
        assert modes["pool_hit"]["by_concurrency"][c]["served_by"] == {"pool": 4, "restore": 0, "cold": 0}
        assert modes["pool_miss"]["by_concurrency"][c]["served_by"] == {"pool": 0, "restore": 4, "cold": 0}
        check_latencies(modes["pool_miss"]["by_concurrency"][c], 4)
    assert set(modes["cold"]["by_concurrency"]) == {"1"}, "cold boots run at concurrency 1 only"
    cold = modes["cold"]["by_concurrency"]["1"]
    check_latencies(cold, 4)
    assert cold["served_by"] == {"pool": 0, "restore": 0, "cold": 4}
    assert cold["create_ms_p50"] > modes["pool_hit"]["by_concurrency"]["1"]["create_ms_p50"]
    assert modes["pool_hit"]["isolation"] in ("kvm", "tcg")


@pytest.mark.vm
@pytest.mark.slow
def test_idle_cost_and_ratios(bench: dict) -> None:
    for name, mode in bench["modes"].items():
        idle = mode["idle"]
        assert idle["n"] == 4 and idle["failures"] == 0, name
        assert idle["pids_from"] == "records" and idle["processes"] == 4, name
        assert idle["pss_mib_median"] > 0 and idle["uss_mib_median"] > 0, name
        assert idle["rss_mib_median"] >= idle["pss_mib_median"], name
        assert idle["cpu_pct_per_sandbox"] >= 0, name
        assert idle["after_first_cmd"]["processes"] == 4, name
        paused = idle["pause"]
        assert 0 < paused["pause_ms_p50"] <= paused["pause_ms_p95"], name
        assert 0 < paused["resume_ms_p50"] <= paused["resume_ms_p95"], name
        assert paused["paused_cpu_pct_per_sandbox"] < 1.0, (name, paused)  # a stopped VM costs no CPU
    ratios = bench["ratios"]
    assert ratios["c1_create_ms_p50"]["cold/pool_hit"] > 1
    assert set(ratios["pool_miss/pool_hit_create_ms_p50"]) == {"1", "2"}
    names = {t["name"] for t in bench["targets"]}
    assert {"create_ms_p50", "create_ms_p95_at_max_c", "first_cmd_ms_p50", "idle_mib_per_sandbox"} <= names


@pytest.mark.vm
@pytest.mark.slow
def test_files_written(bench: dict) -> None:
    saved = json.loads(Path(bench["files"]["json"]).read_text())
    assert len(saved["samples"]["pool_hit"]["1"]) == 4
    assert saved["by_concurrency"] == bench["by_concurrency"]
    png = Path(bench["files"]["plot"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for mode in ("pool_hit", "pool_miss", "cold"):
        assert (png.parent / f"serve-{mode}.log").stat().st_size > 0


# -- the pieces, without VMs ----------------------------------------------------------------------


def test_summarize_uses_nearest_rank_and_counts_failures() -> None:
    samples = [Sample(create_ms=float(i), first_cmd_ms=float(i) + 100, sandbox_id=f"s{i}") for i in range(1, 101)]
    samples.append(Sample(error="create: boom"))
    samples.append(Sample(create_ms=5.0, sandbox_id="sx", error="first command: boom"))
    stats = summarize(samples, [{"event": "vm restored", "vm_id": "s1"}, {"event": "vm booting", "vm_id": "s2"}])
    assert (stats["create_ms_p50"], stats["create_ms_p95"], stats["create_ms_p99"]) == (50.0, 95.0, 99.0)
    assert (stats["first_cmd_ms_p50"], stats["first_cmd_ms_p99"]) == (150.0, 199.0)
    assert stats["failures"] == 2 and stats["n"] == 102
    assert stats["served_by"] == {"pool": 99, "restore": 1, "cold": 1}
    assert summarize([Sample(error="x")])["create_ms_p50"] is None


def test_phases_split_a_create_by_the_servers_log_lines() -> None:
    """Client clock + the route's ``sandbox created`` (request_ms, create_ms) + uvicorn's access line
    (same request id): to_server, before_service, service, answer, to_client; the slowest 10 %."""
    samples, events = [], []
    for i in range(20):
        t0 = 1000.0 + i  # each create: called at t0, entered the app 10 ms (+i) later, ...
        slow = 100.0 if i == 19 else 0.0
        arrived = t0 + (10 + i + slow) / 1000
        route_end = arrived + 3 / 1000
        sent = route_end + 0.5 / 1000
        samples.append(Sample(create_ms=(sent + 0.002 - t0) * 1000, sandbox_id=f"s{i}", started_at=t0,
                              created_at=sent + 0.002))
        stamp = lambda t: datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")  # noqa: E731
        events.append({"event": "sandbox created", "sandbox_id": f"s{i}", "request_id": f"r{i}", "request_ms": 3.0,
                       "create_ms": 2.0, "timestamp": stamp(route_end)})
        events.append({"event": '127.0.0.1:1 - "POST /v2/sandboxes HTTP/1.1" 201', "logger": "uvicorn.access",
                       "request_id": f"r{i}", "timestamp": stamp(sent)})
    samples.append(Sample(error="create: boom"))  # no times: left out
    split = phases(samples, events)
    assert split is not None and split["n"] == 20
    assert split["to_server"]["p50"] == pytest.approx(19, abs=0.2)  # 10 + i, nearest rank of 20
    assert split["to_server"]["slowest_10pct_mean"] == pytest.approx((28 + 129) / 2, abs=0.2)
    assert split["before_service"]["p95"] == pytest.approx(1.0, abs=0.01)
    assert split["service"]["p50"] == 2.0
    assert split["answer"]["p50"] == pytest.approx(0.5, abs=0.05)
    assert split["to_client"]["p95"] == pytest.approx(2.0, abs=0.05)
    assert phases(samples, []) is None


def test_served_by_ignores_pool_refills() -> None:
    events = [{"event": "vm restored", "vm_id": "pool123"}, {"event": "vm restored", "vm_id": "sbx1"}]
    assert served_by(events, ["sbx1", "sbx2"]) == {"pool": 1, "restore": 1, "cold": 0}
    # a member personalized at join was restored under its sandbox's id: "sandbox ready" tells
    joined = [{"event": "vm restored", "vm_id": "sbx3"}, {"event": "sandbox ready", "sandbox_id": "sbx3",
                                                          "served_by": "pool"}]
    assert served_by(joined, ["sbx3"]) == {"pool": 1, "restore": 0, "cold": 0}


def test_plans_cold_is_small_and_sequential() -> None:
    by_name = {p.name: p for p in plans(Options(concurrency=(1, 10, 50), n=200, idle=100))}
    assert by_name["pool_hit"].pool_size == 50 and by_name["pool_miss"].pool_size == 0
    assert by_name["pool_hit"].idle_n == by_name["pool_miss"].idle_n == 100
    cold = by_name["cold"]
    assert (cold.concurrency, cold.n, cold.boot_mode, cold.pool_size) == ((1,), 4, "cold", 0)
    assert [p.name for p in plans(Options(n=3, url="http://x"))] == ["url"]
    assert plans(Options(n=3, idle=100))[0].idle_n == 3


def test_host_lock_is_taken_or_inherited(tmp_path: Path) -> None:
    lock = tmp_path / "host.lock"
    lock.touch()
    assert not held_by_ancestor(lock)
    with host_lock(lock):  # nobody holds it: we take it, and another process cannot
        busy = subprocess.run(["flock", "-n", str(lock), "true"])
        assert busy.returncode != 0
    assert subprocess.run(["flock", "-n", str(lock), "true"]).returncode == 0
    # Held by our parent (flock <lock> python ...): seen as inherited, not waited for.
    code = (f"from pathlib import Path; from cube_bench.create import held_by_ancestor, host_lock\n"
            f"assert held_by_ancestor(Path({str(lock)!r}))\n"
            f"with host_lock(Path({str(lock)!r})): print('in')")
    inherited = subprocess.run(["flock", str(lock), sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=30)
    assert inherited.returncode == 0 and inherited.stdout.strip() == "in", inherited.stderr


@pytest.mark.parametrize("boot_mode", ["snapshot", "cold"])
async def test_boot_mode_decides_how_a_pool_miss_starts(plugin_host, cube_config_factory, tmp_path: Path,
                                                        boot_mode: str) -> None:
    """The ``cold`` baseline of the bench: ``[core] boot_mode`` (fake drivers, no VM)."""
    from cube_core.embedded import Embedded
    from cube_core.models import SandboxSpec
    from cube_core.store import SqliteStore
    from cube_core.testing.fakes import FAKE_CONFIG

    text = FAKE_CONFIG.format(state_dir=tmp_path / "state").replace(
        "pool = { size = 0 }", f'pool = {{ size = 0 }}\nboot_mode = "{boot_mode}"')
    cube = Embedded(plugin_host(cube_config_factory(text)), SqliteStore(tmp_path / "cube.db"))
    service, vmm = cube.service, cube.agent.vmm
    await cube.start()
    try:
        await cube.agent.ensure_templates(("base",))
        sb = await service.create(SandboxSpec(template_id="base", team_id="t1"))
        started = [op for op, vm_id in vmm.calls if vm_id == sb.sandbox_id and op in ("boot", "restore")]
        assert started == (["boot"] if boot_mode == "cold" else ["restore"])
        # A sandbox snapshot is always restored, whatever the mode.
        ref = await service.snapshot("t1", sb.sandbox_id)
        child = await service.create(SandboxSpec(template_id=ref.snapshot_id, team_id="t1"))
        assert [op for op, vm_id in vmm.calls if vm_id == child.sandbox_id and op in ("boot", "restore")] \
            == ["restore"]
    finally:
        await cube.stop()


def test_server_configs_come_from_one_builder_and_parse(tmp_path: Path) -> None:
    """``cube bench create``/``density``/``cluster`` and the cluster e2e write their plugins.toml
    with :func:`cube_bench.servertoml.plugins_toml`: Cube's own parser accepts every one, with the
    real plugins and what each server needs."""
    from cube_bench.cluster import master_toml, node_toml
    from cube_bench.create import server_toml
    from cube_bench.density import Options as DensityOptions
    from cube_bench.density import _server_config

    from cube_core.config import parse_config

    state = tmp_path / "s"
    plan = plans(Options(concurrency=(1, 10), n=4, idle=2, modes=("pool_hit_personalize_at_create",)))[0]
    serve = parse_config(server_toml(plan, state, port=3100, admin_port=3101, template="base",
                                     mem_dir=Path("/dev/shm/m"))).data
    assert [(s, getattr(serve, s).plugin) for s in ("vmm", "network", "storage", "scheduler")] == [
        ("vmm", "kvm"), ("network", "ebpf"), ("storage", "cow"), ("scheduler", "binpack")]
    assert [a.plugin for a in serve.api] == ["e2b"]
    assert serve.vmm.options == {"run_dir": f"{state}/vms", "mem_dir": "/dev/shm/m", "jail": True}
    assert serve.storage.options == {"root": f"{state}/storage"}
    assert serve.core.pool.size == 10 and serve.core.pool.identity_at_join is False
    assert (serve.core.port, serve.core.admin_port, serve.core.templates) == (3100, 3101, ("base",))
    density = parse_config(_server_config(DensityOptions(max_sandboxes=30, vmm_options={"tb_size_mb": 8}), state,
                                          1, 2, Path("/dev/shm/d"))).data
    assert density.vmm.options["tb_size_mb"] == 8 and density.core.max_sandboxes == 40
    node = parse_config(node_toml("n1", state, subnet="100.90.0.0/16", template="base", pool_size=3, port=7071)).data
    assert (node.node.port, node.core.node_id, node.core.pool.size) == (7071, "n1", 3)
    assert node.network.options == {"subnet": "100.90.0.0/16"} and node.scheduler.plugin == "spread"
    master_text = master_toml("m", state, port=3200, admin_port=3201, subnet="100.99.0.0/16")
    assert parse_config(master_text).data.cluster.token == {"env": "CUBE_CLUSTER_TOKEN"}  # resolved at start
    assert '[scheduler]\nplugin = "spread"' in master_text  # cluster_e2e's set_scheduler edits this line


def test_a_stopped_bench_server_leaves_no_sandbox_alive(tmp_path: Path) -> None:
    """A node keeps its sandboxes running across its own stop, so a bench that stopped its server
    with sandboxes still alive (a wave in flight when it failed, a create the SDK gave up on)
    left their QEMU processes behind. ``stop_server`` kills the team's sandboxes through the API
    first: a real ``cube serve`` (fake drivers, the E2B API) with three live sandboxes, one of
    them paused, stops with every one recorded killed."""
    import time

    import httpx
    from cube_bench.create import bench_credentials, cube_executable, free_port, stop_server

    from cube_core.state import SandboxState
    from cube_core.store import SqliteStore
    from cube_core.testing.fakes import FAKE_CONFIG

    state = tmp_path / "state"
    state.mkdir()
    credentials = bench_credentials(state)
    port = free_port()
    config = tmp_path / "plugins.toml"
    config.write_text(FAKE_CONFIG.format(state_dir=state)
                      .replace("templates = []", f'templates = ["base"]\nport = {port}\nadmin_port = {free_port()}')
                      .replace('[[api]]\nplugin = "fake"', '[[api]]\nplugin = "e2b"'))
    with (tmp_path / "serve.log").open("w") as log_file:
        proc = subprocess.Popen([cube_executable(), "serve", "--config", str(config)], stdout=log_file,
                                stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, headers={"X-API-Key": credentials.secret}, timeout=30) as http:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if http.get("/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, (tmp_path / "serve.log").read_text()
                time.sleep(0.2)
            made = [http.post("/v2/sandboxes", json={"templateID": "base", "timeout": 600}) for _ in range(3)]
            assert [r.status_code for r in made] == [201] * 3, made[0].text
            ids = {r.json()["sandboxID"] for r in made}
            assert http.post(f"/sandboxes/{sorted(ids)[0]}/pause").status_code == 204
    finally:
        stop_server(proc, state, url=url, api_key=credentials.secret)
    assert proc.returncode is not None
    store = SqliteStore(state / "cube.db")
    try:
        states = {s.sandbox_id: s.state for s in store.list_sandboxes(team_id=credentials.team_id)}
    finally:
        store.close()
    assert set(states) == ids and set(states.values()) == {SandboxState.KILLED}, states
