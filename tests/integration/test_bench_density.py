"""``cube bench density``'s bookkeeping, without VMs: the fill loop against a simulated host
(each sandbox takes a fixed amount of ``MemAvailable``), the stop conditions, the probes at
25/50/75/100 %, and the smaps breakdown on a real process (this one)."""

from __future__ import annotations

import os
from pathlib import Path

from cube_bench.density import (
    MIB,
    Options,
    Probe,
    at_quarters,
    budget,
    classify,
    fill,
    meminfo_delta,
    reclaim_options,
    settle,
    smaps_breakdown,
    zram_mib,
)

TOTAL = 1000 * MIB


class Host:
    """A host whose ``MemAvailable`` drops by ``per`` KiB per live sandbox; creates fail after
    ``fail_after`` (the server's limit)."""

    def __init__(self, per: int, fail_after: int | None = None) -> None:
        self.per, self.fail_after, self.alive = per, fail_after, 0
        self.probed: list[int] = []

    def available(self) -> int:
        return 900 * MIB - self.alive * self.per

    async def create(self) -> str:
        if self.fail_after is not None and self.alive >= self.fail_after:
            raise RuntimeError("max_sandboxes reached")
        self.alive += 1
        return f"sbx{self.alive}"

    async def probe(self, sbx: str) -> float:
        self.probed.append(self.alive)
        return 100.0 + self.alive


async def _fill(host: Host, **kw: object) -> tuple[object, list[str]]:
    alive: list[str] = []
    done = await fill(create=host.create, probe=host.probe, available_kib=host.available, total_kib=TOTAL,
                      alive=alive, opts=Options(**kw), note=lambda _: None)  # type: ignore[arg-type]
    return done, alive


async def test_stops_at_max() -> None:
    host = Host(per=10 * MIB)
    done, alive = await _fill(host, max_sandboxes=20, concurrency=3)
    assert done.count == len(alive) == host.alive == 20  # type: ignore[attr-defined]
    assert done.bound.startswith("max")  # type: ignore[attr-defined]
    assert round(done.per_sandbox_kib / MIB) == 10  # type: ignore[attr-defined]
    assert done.probes[-1].count == 20  # type: ignore[attr-defined]
    assert host.probed == sorted(host.probed) and host.probed[0] == 1  # every max//20 = 1


async def test_stops_before_memory_floor() -> None:
    # 900 MiB available, floor 15 % of 1000 = 150 MiB: 750 MiB / 50 MiB = 15 sandboxes, never more
    host = Host(per=50 * MIB)
    done, _ = await _fill(host, max_sandboxes=100, concurrency=4, min_available_pct=15.0)
    assert host.alive == 15, host.alive
    assert host.available() >= 150 * MIB
    assert done.bound.startswith("memory")  # type: ignore[attr-defined]
    assert done.count == 15  # type: ignore[attr-defined]


async def test_a_failed_create_is_the_bound() -> None:
    host = Host(per=MIB, fail_after=7)
    done, alive = await _fill(host, max_sandboxes=50, concurrency=4)
    assert len(alive) == 7 and done.count == 7  # type: ignore[attr-defined]
    assert "max_sandboxes reached" in done.bound and done.failures  # type: ignore[attr-defined]


class ReclaimingHost:
    """A host with idle reclaim, on a fake clock: a sandbox takes ``fresh`` KiB of ``MemAvailable``
    for ``after_s`` seconds after its create, then ``steady`` (it was paged out); a create takes
    ``create_s`` of the clock. ``reclaim = False``: sandboxes never get cheaper."""

    def __init__(self, fresh: int, steady: int, after_s: float = 30.0, create_s: float = 0.5,
                 reclaim: bool = True) -> None:
        self.fresh, self.steady, self.after_s, self.create_s, self.reclaim = fresh, steady, after_s, create_s, reclaim
        self.t = 0.0
        self.born: list[float] = []
        self.lowest = 900 * MIB

    def clock(self) -> float:
        return self.t

    async def sleep(self, s: float) -> None:
        self.t += s

    def available(self) -> int:
        cost = sum(self.steady if self.reclaim and self.t - b >= self.after_s else self.fresh for b in self.born)
        self.lowest = min(self.lowest, 900 * MIB - cost)
        return 900 * MIB - cost

    async def create(self) -> str:
        self.t += self.create_s
        self.born.append(self.t)
        self.available()
        return f"sbx{len(self.born)}"

    async def probe(self, sbx: str) -> float:
        return 100.0


async def _fill_reclaiming(host: ReclaimingHost, **kw: object) -> tuple[object, list[str]]:
    alive: list[str] = []
    done = await fill(create=host.create, probe=host.probe, available_kib=host.available, total_kib=TOTAL,
                      alive=alive, opts=Options(**kw), note=lambda _: None,  # type: ignore[arg-type]
                      sleep=host.sleep, clock=host.clock)
    return done, alive


async def test_without_reclaim_wait_the_fill_stops_at_the_first_floor() -> None:
    # 750 MiB above the floor, 40 MiB per new sandbox: 18 fit while all are fresh
    host = ReclaimingHost(fresh=40 * MIB, steady=10 * MIB)
    done, alive = await _fill_reclaiming(host, max_sandboxes=200, concurrency=4, reclaim_wait_s=0)
    assert len(alive) == 18 and done.bound.startswith("memory")  # type: ignore[attr-defined]
    assert not done.waits and done.first_floor is None  # type: ignore[attr-defined]


async def test_the_fill_waits_for_reclaim_and_reaches_the_steady_bound() -> None:
    # steady: 10 MiB each, so 750 MiB hold ~75 once all are reclaimed; the new ones cost 40 until
    # then, so the last few are fresh when the bound is reached
    host = ReclaimingHost(fresh=40 * MIB, steady=10 * MIB)
    done, alive = await _fill_reclaiming(host, max_sandboxes=200, concurrency=4, reclaim_wait_s=120,
                                         reclaim_period_s=10)
    assert done.first_floor == (18, 40 * MIB)  # type: ignore[attr-defined]
    assert 70 <= len(alive) <= 75, len(alive)
    assert done.bound.startswith("memory") and "waits for idle reclaim" in done.bound  # type: ignore[attr-defined]
    assert done.waits and done.waited_s > 30  # type: ignore[attr-defined]
    assert done.waits[-1].why == "settled"  # type: ignore[attr-defined]
    # never more than one batch of new sandboxes under the floor
    assert host.lowest >= 150 * MIB - 4 * 40 * MIB
    host.t += 100  # everything reclaimed: at or above the floor, with less than a sandbox left
    assert 150 * MIB <= host.available() < 150 * MIB + 10 * MIB + 4 * 30 * MIB
    # fresh cost is what a new sandbox takes, not the average over reclaimed ones
    assert done.fresh_kib >= 30 * MIB  # type: ignore[attr-defined]


async def test_with_reclaim_the_fill_goes_on_to_max() -> None:
    host = ReclaimingHost(fresh=40 * MIB, steady=5 * MIB)
    done, alive = await _fill_reclaiming(host, max_sandboxes=60, concurrency=4, reclaim_wait_s=120,
                                         reclaim_period_s=10)
    assert len(alive) == 60 and done.bound.startswith("max")  # type: ignore[attr-defined]
    assert all(w.why == "room" for w in done.waits)  # type: ignore[attr-defined]


async def test_when_nothing_is_reclaimed_a_wait_ends_once_the_newest_sandbox_had_its_chance() -> None:
    # the newest sandbox is reclaimed at most 3 periods after its create; no rise for 2 periods
    # after that: settled
    host = ReclaimingHost(fresh=40 * MIB, steady=10 * MIB, reclaim=False)
    done, alive = await _fill_reclaiming(host, max_sandboxes=200, concurrency=4, reclaim_wait_s=120,
                                         reclaim_period_s=10)
    assert len(alive) == 18 and done.bound.startswith("memory")  # type: ignore[attr-defined]
    assert [w.why for w in done.waits] == ["settled"]  # type: ignore[attr-defined]
    assert 30 <= done.waits[0].waited_s <= 32  # type: ignore[attr-defined]


async def test_settle_is_bounded_by_the_max_wait() -> None:
    t = [0.0]

    async def sleep(s: float) -> None:
        t[0] += s

    # rises 20 MiB a second for ever: never settles, never reaches the need
    level, why = await settle(lambda: int(t[0] * 20 * MIB), need_kib=1e12, period_s=10, max_wait_s=45,
                              sleep=sleep, clock=lambda: t[0])
    assert why == "max" and 45 <= t[0] <= 47
    t[0] = 0.0
    level, why = await settle(lambda: int(t[0] * 20 * MIB), need_kib=100 * MIB, period_s=10, max_wait_s=45,
                              sleep=sleep, clock=lambda: t[0])
    assert why == "room" and level >= 100 * MIB and t[0] <= 6


def test_reclaim_options_follow_the_server() -> None:
    assert reclaim_options(Options(), swap_kib=0).reclaim_wait_s == 0
    on = reclaim_options(Options(), swap_kib=4 << 20)
    assert on.reclaim_wait_s == 300 and on.reclaim_period_s == 10
    off = reclaim_options(Options(vmm_options={"idle_reclaim": False}), swap_kib=4 << 20)
    assert off.reclaim_wait_s == 0
    assert reclaim_options(Options(vmm_options={"idle_reclaim_after_s": 6}, reclaim_wait_s=30),
                           swap_kib=1).reclaim_period_s == 3


def test_meminfo_delta_names_the_kernel_share() -> None:
    before = {"MemAvailable": 1000 * MIB, "SUnreclaim": 100 * MIB, "PageTables": 10 * MIB}
    after = {"MemAvailable": 800 * MIB, "SUnreclaim": 120 * MIB, "PageTables": 20 * MIB, "KernelStack": 10 * MIB}
    d = meminfo_delta(before, after, 10)
    assert d["MemAvailable"] == -20 and d["SUnreclaim"] == 2 and d["kernel"] == 4


def test_budget() -> None:
    assert budget(900 * MIB, TOTAL, 15.0, 50 * MIB) == 15
    assert budget(100 * MIB, TOTAL, 15.0, 50 * MIB) == 0
    assert budget(100 * MIB, TOTAL, 0.0, 0) > 1000


def test_quarters_pick_the_nearest_probe() -> None:
    probes = [Probe(c, float(c)) for c in (10, 20, 30, 40, 47)]
    got = at_quarters(probes, 47)
    assert {q: p.count for q, p in got.items() if p} == {"25": 10, "50": 20, "75": 40, "100": 47}
    assert at_quarters([], 10) == {"25": None, "50": None, "75": None, "100": None}


def test_classify() -> None:
    assert classify("/dev/shm/cube/tmpl/memory.ram", "rw-p", ("/dev/shm/",)) == "guest_ram"
    assert classify("/var/lib/cube/snap/memory.ram", "rw-p", ()) == "guest_ram"
    assert classify("", "rwxp", ()) == "tcg_code"
    assert classify("", "rw-p", ()) == "anon"
    assert classify("[heap]", "rw-p", ()) == "heap"
    assert classify("/usr/bin/qemu-system-x86_64", "r-xp", ()) == "binary_libs"


def test_smaps_breakdown_of_this_process_adds_up() -> None:
    parts = smaps_breakdown(os.getpid())
    rollup = {line.split()[0].rstrip(":"): int(line.split()[1])
              for line in Path(f"/proc/{os.getpid()}/smaps_rollup").read_text().splitlines()[1:]
              if line.split()[-1] == "kB"}
    rss = sum(p["Rss"] for name, p in parts.items() if name != "page_tables")
    assert abs(rss - rollup["Rss"]) <= rollup["Rss"] * 0.05  # read a moment apart
    assert parts["binary_libs"]["Rss"] > 0 and parts["page_tables"]["Rss"] > 0


def test_cli_refuses_bad_options_before_starting_anything() -> None:
    import subprocess
    import sys

    cube = str(Path(sys.executable).with_name("cube"))
    for args in (["--vmm", "tb_size_mb"], ["--ksm", "maybe"]):
        proc = subprocess.run([cube, "bench", "density", *args], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stderr
        assert args[0] in proc.stderr


def test_server_config_carries_the_vmm_options_and_pool() -> None:
    import tomllib

    from cube_bench.density import _server_config

    opts = Options(max_sandboxes=30, pool_size=2, pool_warm_up=False, vmm_options={"tb_size_mb": 8, "mem_merge": False})
    config = tomllib.loads(_server_config(opts, Path("/s"), 1, 2, Path("/dev/shm/m")))
    assert config["vmm"]["options"] == {"run_dir": "/s/vms", "mem_dir": "/dev/shm/m", "jail": True, "tb_size_mb": 8,
                                        "mem_merge": False}
    assert config["core"]["pool"]["size"] == 2 and config["core"]["pool"]["warm_up"] is False
    assert config["core"]["max_sandboxes"] == 42
    from cube_vmm_kvm import KvmConfig

    assert KvmConfig.model_validate(config["vmm"]["options"]).mem_merge is False


def test_leftover_qemus_of_this_state_are_stopped_and_no_others(tmp_path: Path) -> None:
    """A server that died leaves its VMs running (own sessions): the bench stops those of its
    own state directory, by pid, and no other QEMU (real QEMUs, stopped with -S, no guest)."""
    import shutil
    import subprocess
    import time

    import pytest
    from cube_bench.create import kill_leftover_qemus

    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("needs qemu-system-x86_64")
    ours, other = tmp_path / "state", tmp_path / "other"
    procs = []
    for state in (ours, other):
        (state / "vms").mkdir(parents=True)
        procs.append(subprocess.Popen(["qemu-system-x86_64", "-S", "-display", "none", "-nodefaults",
                                       "-machine", "none", "-pidfile", str(state / "vms" / "qemu.pid")],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    try:
        for state in (ours, other):
            for _ in range(100):
                if (state / "vms" / "qemu.pid").exists():
                    break
                time.sleep(0.05)
        assert kill_leftover_qemus(ours) == 1
        assert procs[0].wait(timeout=30) is not None
        assert procs[1].poll() is None
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_zram_mib_reports_the_pages_kept_uncompressed(tmp_path: Path) -> None:
    """``mm_stat``'s same (zero) and huge (incompressible) page counts are in the report (the CA
    bundle's base64 in every clone showed up as ~200 huge pages per sandbox, docs/bench.md)."""
    (tmp_path / "zram1").mkdir()
    (tmp_path / "zram1" / "mm_stat").write_text(
        f"{100 << 20} {30 << 20} {32 << 20} 0 {40 << 20} 1234 0 567 600\n")
    (tmp_path / "zram0").mkdir()
    (tmp_path / "zram0" / "mm_stat").write_text("0 0 0 0 0 0 0 0 0\n")  # unused: left out
    assert zram_mib(tmp_path) == {"zram1": {"orig_data": 100.0, "compressed": 30.0, "mem_used_total": 32.0,
                                            "same_pages": 1234, "huge_pages": 567}}
