"""Idle reclaim's decisions (no VM, no swap): which VMs are idle, which swap is usable, which
ranges of a process are paged out, and the doctor check."""

from __future__ import annotations

from pathlib import Path

import pytest
from cube_core import VmActivity

from cube_vmm_kvm import KvmConfig
from cube_vmm_kvm.checks import check_reclaim
from cube_vmm_kvm.reclaim import COMPACT_EVERY_S, IdleTracker, Reclaimer, pageout_ranges, swap_devices, usable_swap

HEADER = "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n"


def _swaps(tmp_path: Path, *lines: str) -> Path:
    path = tmp_path / "swaps"
    path.write_text(HEADER + "".join(line + "\n" for line in lines))
    return path


def observe(t: IdleTracker, vm_id: str, cpu_s: float, now: float, swapped_kib: int | None = None) -> bool:
    """One tick of the reclaimer for one VM: a reading, then whether to page it out."""
    t.record(vm_id, cpu_s, now)
    return t.due(vm_id, now, swapped_kib)


def test_idle_after_a_whole_quiet_window_then_once_until_busy() -> None:
    t = IdleTracker(window_s=20, cpu_pct=2.0)
    assert not observe(t, "a", 1.0, 0)  # first sight: a window starts
    assert not observe(t, "a", 1.1, 10)  # quiet, but only half a window
    assert observe(t, "a", 1.2, 20)  # 0.2 s of CPU in 20 s = 1 % < 2 %: reclaim
    assert not observe(t, "a", 1.2, 40)  # still idle: not again
    assert not observe(t, "a", 1.25, 400)
    assert not observe(t, "a", 2.5, 410)  # 1.25 s in 10 s: busy, the idle window starts again
    assert not observe(t, "a", 2.5, 420)
    assert observe(t, "a", 2.55, 430)  # idle for a window since it was busy: reclaim again


def test_again_while_idle_only_when_enough_came_back() -> None:
    t = IdleTracker(window_s=20, cpu_pct=2.0, refault_kib=4096)
    assert not observe(t, "a", 1.0, 0)
    assert observe(t, "a", 1.0, 20)
    t.swapped("a", 30_000)  # 29 MiB went out
    assert not observe(t, "a", 1.0, 30, 30_000)  # nothing came back
    assert not observe(t, "a", 1.01, 40, 27_000)  # a blip (not busy) brought back 3 MiB: under 4
    assert observe(t, "a", 1.02, 50, 25_000)  # 5 MiB back in all: out again
    t.swapped("a", 29_500)
    assert not observe(t, "a", 1.02, 60, 29_500) and not observe(t, "a", 1.02, 600, None)  # unknown: no
    t.mark_reclaimed("p", 1.0, 0)  # paused, paged out
    t.swapped("p", 10_000)
    assert not observe(t, "p", 1.0, 10, 1_000) and observe(t, "p", 1.0, 20, 1_000)  # after a whole window
    off = IdleTracker(window_s=20, cpu_pct=2.0)  # refault_kib 0: once per idle period
    assert not observe(off, "a", 1.0, 0) and observe(off, "a", 1.0, 20)
    off.swapped("a", 30_000)
    assert not observe(off, "a", 1.0, 30, 0)


def test_busy_vm_is_never_reclaimed_and_resume_restarts_the_window() -> None:
    t = IdleTracker(window_s=20, cpu_pct=2.0)
    cpu = 0.0
    for now in range(0, 200, 10):
        cpu += 0.5  # 5 % of a core
        assert not observe(t, "busy", cpu, now)
    t.mark_reclaimed("p", 3.0, 0)  # paged out at its pause
    assert not observe(t, "p", 3.0, 30)  # paused, idle: already reclaimed
    t.mark_busy("p")  # resumed
    assert not observe(t, "p", 3.0, 40)
    assert observe(t, "p", 3.1, 60)
    assert not observe(t, "p", 0.1, 70)  # CPU went down: a new process under that id, a new window
    assert t.known() == {"busy", "p"}


def test_swap_must_be_ram_backed_unless_allowed(tmp_path: Path) -> None:
    assert swap_devices(tmp_path / "missing") == []
    assert usable_swap([], allow_disk=False)[0] is False
    zram = swap_devices(_swaps(tmp_path, "/dev/zram1                              partition\t4194300\t1024\t100"))
    assert zram[0].ram_backed and zram[0].size_kib == 4194300 and zram[0].used_kib == 1024
    ok, why = usable_swap(zram, allow_disk=False)
    assert ok and "/dev/zram1" in why and "RAM-backed" in why
    mixed = swap_devices(_swaps(tmp_path, "/dev/zram0 partition 1024 0 100", "/swapfile file 2048 0 -2"))
    ok, why = usable_swap(mixed, allow_disk=False)
    assert not ok and "/swapfile" in why and "idle_reclaim_disk_swap" in why
    assert usable_swap(mixed, allow_disk=True)[0]
    assert not swap_devices(_swaps(tmp_path, "/dev/zram10x partition 1 0 1"))[0].ram_backed


def test_pageout_ranges_private_mappings_only() -> None:
    maps = "\n".join([
        "55d0c0000000-55d0c0100000 r--p 00000000 fe:00 123   /usr/bin/qemu-system-x86_64",
        "55d0c2000000-55d0c4000000 rw-p 00000000 00:00 0     [heap]",
        "7f0000000000-7f0002000000 rwxp 00000000 00:00 0 ",
        "7f1000000000-7f1020000000 rw-p 00000000 fe:00 99    /var/lib/cube/snap/memory.ram",
        "7f2000000000-7f2020000000 rw-s 00000000 00:1a 77    /dev/shm/cube/vm.ram",
        "7f3000000000-7f3000001000 ---p 00000000 00:00 0 ",
        "7f4000000000-7f4000003000 rw-s 00000000 00:0f 5     anon_inode:kvm-vcpu:0",
        "7ffd00000000-7ffd00002000 r--p 00000000 00:00 0     [vvar]",
        "7ffd00002000-7ffd00004000 r-xp 00000000 00:00 0     [vdso]",
        "ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0 [vsyscall]",
    ])
    assert list(pageout_ranges(maps)) == [
        (0x55d0c0000000, 0x55d0c0100000), (0x55d0c2000000, 0x55d0c4000000),
        (0x7f0000000000, 0x7f0002000000), (0x7f1000000000, 0x7f1020000000)]


def test_reclaimer_tick_off_without_swap_and_on_with_zram(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node task against a fake /proc: idle VMs are paged out once, gone VMs forgotten."""
    proc = tmp_path / "proc"
    cpu = {101: 0, 102: 0}
    swap = {101: 0, 102: 0}

    def write_stat() -> None:
        for pid, ticks in cpu.items():
            (proc / str(pid)).mkdir(parents=True, exist_ok=True)
            (proc / str(pid) / "stat").write_text(f"{pid} (qemu-system-x86) S 1 {' '.join(['0'] * 9)} {ticks} 0 0")
            (proc / str(pid) / "status").write_text(f"Name:\tqemu\nVmSwap:\t{swap[pid]} kB\n")

    paged: list[int] = []

    def pageout(pid: int, _proc: Path) -> int:
        paged.append(pid)
        swap[pid] = 20_000  # what the page-out moved
        write_stat()
        return 0

    monkeypatch.setattr("cube_vmm_kvm.reclaim.pageout", pageout)
    vms = {"idle": 101, "busy": 102}
    swaps = _swaps(tmp_path)
    r = Reclaimer(lambda: dict(vms), window_s=20, cpu_pct=2.0, allow_disk=False, refault_kib=4096, swaps=swaps,
                  proc=proc)
    write_stat()
    assert r.tick(0) == [] and paged == []  # no swap: off (the CPU is read all the same)
    swaps.write_text(HEADER + "/dev/zram1 partition 4194300 0 100\n")
    assert r.tick(10) == []  # not idle for a window yet
    cpu[102] += 500  # 5 s (at 100 ticks/s) in 10 s: busy
    write_stat()
    assert r.tick(20) == ["idle"] and paged == [101]
    assert r.tick(30) == []  # busy until 20: not idle for a window yet; idle: done already
    assert r.tick(40) == ["busy"]  # quiet since 20
    swap[101] = 15_000  # 5 MiB of the idle VM came back (a metrics ask): out again
    write_stat()
    assert r.tick(45) == ["idle"] and r.tick(46) == []
    del vms["idle"]
    r.tick(50)
    assert "idle" not in r.tracker.known()


def test_reclaimer_compacts_its_zram_pools_once_a_minute(tmp_path: Path) -> None:
    """The zram swap devices' pools are compacted from the ticks, at most every COMPACT_EVERY_S;
    a disk swap is not touched, and nothing is compacted while the reclaimer is off."""
    sys_block = tmp_path / "block"
    for name in ("zram1", "sda2"):
        (sys_block / name).mkdir(parents=True)
        (sys_block / name / "compact").write_text("")
    swaps = _swaps(tmp_path, "/dev/zram1 partition 4194300 0 100", "/dev/sda2 partition 4194300 0 -2")
    off = Reclaimer(dict, window_s=20, cpu_pct=2.0, allow_disk=True, pageouts=False, swaps=swaps,
                    proc=tmp_path, sys_block=sys_block)
    off.tick(0)
    assert off.compactions == 0 and (sys_block / "zram1" / "compact").read_text() == ""
    r = Reclaimer(dict, window_s=20, cpu_pct=2.0, allow_disk=True, swaps=swaps, proc=tmp_path, sys_block=sys_block)
    r.tick(0)
    assert r.compactions == 1 and (sys_block / "zram1" / "compact").read_text() == "1"
    assert (sys_block / "sda2" / "compact").read_text() == ""
    r.tick(10)
    r.tick(COMPACT_EVERY_S - 1)
    assert r.compactions == 1
    r.tick(COMPACT_EVERY_S)
    assert r.compactions == 2


def test_one_reading_serves_the_sampler_and_the_reclaimer(tmp_path: Path) -> None:
    """``activity`` (what the node's sampler asks through the driver) and the ticks share one
    tracker: a reading younger than the asker's ``max_age_s`` is not taken again, so each QEMU's
    ``/proc/<pid>/stat`` is read once per period; idle or busy is the tracker's call for both;
    without page-outs (``idle_reclaim = false``) the readings go on."""
    proc = tmp_path / "proc"
    cpu = {101: 0, 102: 0}

    def write_stat() -> None:
        for pid, ticks in cpu.items():
            (proc / str(pid)).mkdir(parents=True, exist_ok=True)
            (proc / str(pid) / "stat").write_text(f"{pid} (qemu-system-x86) S 1 {' '.join(['0'] * 9)} {ticks} 0 0")

    write_stat()
    r = Reclaimer(lambda: {"idle": 101, "busy": 102}, window_s=20, cpu_pct=2.0, allow_disk=False, pageouts=False,
                  swaps=_swaps(tmp_path), proc=proc)
    assert r.activity(["idle", "busy", "gone"], max_age_s=2.5, now=0) == {}  # one reading: nothing to tell yet
    assert r.reads == 2
    cpu[102] += 300  # 3 s in 5 s
    write_stat()
    found = r.activity(["idle", "busy"], max_age_s=2.5, now=5)
    assert found["idle"] == VmActivity(cpu_pct=0.0, idle_since=0)
    assert found["busy"] == VmActivity(cpu_pct=60.0, idle_since=5)  # a burst: busy at once
    assert r.reads == 4
    assert r.tick(6) == [] and r.reads == 4  # read 1 s ago: the tick takes no reading of its own
    assert r.activity(["idle"], max_age_s=2.5, now=7) == {"idle": found["idle"]} and r.reads == 4
    assert r.tick(15) == [] and r.reads == 6  # 10 s old: read again; no page-outs without them
    assert r.activity(["busy"], max_age_s=2.5, now=15)["busy"] == VmActivity(cpu_pct=0.0, idle_since=5)


def test_doctor_check_reclaim(tmp_path: Path) -> None:
    assert check_reclaim(KvmConfig(), _swaps(tmp_path)).status == "warn"
    assert "zram-swap.sh" in check_reclaim(KvmConfig(), _swaps(tmp_path)).hint
    assert check_reclaim(KvmConfig(idle_reclaim=False), _swaps(tmp_path)).status == "ok"
    disk = _swaps(tmp_path, "/dev/vda2 partition 1024 0 -2")
    assert check_reclaim(KvmConfig(), disk).status == "warn"
    assert check_reclaim(KvmConfig(idle_reclaim_disk_swap=True), disk).status == "ok"
    zram = _swaps(tmp_path, "/dev/zram3 partition 1024 0 100")
    assert check_reclaim(KvmConfig(), zram).status == "ok"
