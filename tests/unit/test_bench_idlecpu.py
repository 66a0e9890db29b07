"""``cube bench density``'s idle-CPU attribution (cube_bench.idlecpu) on a fake /proc, and its
``--core`` options in the server's config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("cube_bench")

from cube_bench import idlecpu  # noqa: E402
from cube_bench.density import _with_core_options  # noqa: E402
from cube_bench.idlecpu import ProcSample  # noqa: E402


def _proc(root: Path, pid: int, comm: str, ppid: int, utime: int, stime: int,
          threads: dict[int, tuple[str, int, int, int]] | None = None) -> None:
    """One fake process; ``threads``: tid -> (name, ticks, voluntary, involuntary switches)."""
    d = root / str(pid)
    (d / "task").mkdir(parents=True, exist_ok=True)
    rest = " ".join(["0"] * 8)
    (d / "stat").write_text(f"{pid} ({comm}) S {ppid} 0 0 0 0 0 0 0 0 0 {utime} {stime} {rest}\n")
    for tid, (name, ticks, vol, invol) in (threads or {}).items():
        t = d / "task" / str(tid)
        t.mkdir(exist_ok=True)
        (t / "stat").write_text(f"{tid} ({name}) S {ppid} 0 0 0 0 0 0 0 0 0 {ticks} 0 {rest}\n")
        (t / "status").write_text(f"Name:\t{name}\nvoluntary_ctxt_switches:\t{vol}\n"
                                  f"nonvoluntary_ctxt_switches:\t{invol}\n")


def test_snapshot_reads_processes_and_threads_of_the_detailed(tmp_path: Path) -> None:
    _proc(tmp_path, 10, "qemu-system-x86", 1, 30, 20,
          {10: ("qemu-system-x86", 20, 100, 5), 11: ("CPU 0/TCG", 30, 40, 1), 12: ("qemu-system-x86", 1, 0, 0)})
    _proc(tmp_path, 2, "kthreadd", 0, 0, 0)
    _proc(tmp_path, 13, "ksmd", 2, 7, 0)
    (tmp_path / "self").mkdir()  # not a pid: skipped
    snap = idlecpu.snapshot([10], proc=tmp_path)
    assert snap[10] == ProcSample(comm="qemu-system-x86", ppid=1, ticks=50, switches=146,
                                  threads={"main": 20, "CPU N/TCG": 30, "other threads": 1}, children=0)
    assert snap[13] == ProcSample(comm="ksmd", ppid=2, ticks=7)  # not detailed: no threads read


def test_attribute_splits_the_window_by_owner() -> None:
    hz, window = 100, 10.0
    before = {1: ProcSample("cube", 0, 1000, children=4),
              10: ProcSample("qemu-system-x86", 1, 500, 1000, {"CPU N/TCG": 400}),
              11: ProcSample("qemu-system-x86", 1, 600, 2000, {"CPU N/TCG": 500}),
              12: ProcSample("ksmd", 2, 0), 13: ProcSample("kworker/0:1", 2, 10),
              14: ProcSample("pytest", 1, 100, children=5), 15: ProcSample("gone", 1, 50)}
    after = {1: ProcSample("cube", 0, 1100, children=10),
             10: ProcSample("qemu-system-x86", 1, 520, 1300, {"CPU N/TCG": 410}),
             11: ProcSample("qemu-system-x86", 1, 620, 2300, {"CPU N/TCG": 510}),
             12: ProcSample("ksmd", 2, 30), 13: ProcSample("kworker/0:1", 2, 15),
             14: ProcSample("pytest", 1, 300, children=15),
             16: ProcSample("nft", 1, 4),  # started inside the window: all of it counts
             17: ProcSample("pytest", 1, 1)}  # a reused pid: a new process, all of it counts
    before[17] = ProcSample("sleep", 1, 900)
    # 2 CPUs for 10 s at 100 Hz = 2000 ticks; 500 busy, 20 of them interrupts
    result = idlecpu.attribute(before, after, (0, 0, 0), (500, 2000, 20), serve_pid=1, qemu_pids=[10, 11, 99],
                               window_s=window, clock_hz=hz)
    assert result["cpus"] == 2 and result["sandboxes"] == 2
    assert result["host_busy_pct"] == 25.0 and result["host_busy_pct_of_one_core"] == 50.0
    assert result["cube_serve_pct"] == 10.0 and result["cube_serve_children_pct"] == 0.6
    assert result["qemu_total_pct"] == 4.0 and result["qemu_pct_per_sandbox"] == 2.0
    assert result["qemu_by_thread_pct"] == {"CPU N/TCG": 2.0}
    assert result["qemu_wakeups_per_s_per_sandbox"] == 30.0  # 600 switches / 10 s / 2
    assert result["ksmd_pct"] == 3.0 and result["kernel_threads_pct"] == 0.5
    # pytest 200 + its ended children 10 + nft 4 + the new pid 17's 1
    assert result["other_processes_pct"] == 21.5
    assert result["busiest_others_pct"]["pytest"] == 20.1
    assert result["busiest_others_pct"]["pytest (ended children)"] == 1.0
    assert result["interrupts_pct"] == 2.0
    # 500 busy - (100 + 6 + 40 + 30 + 5 + 215) attributed
    assert result["unattributed_pct"] == 10.4
    assert result["per_sandbox_pct"] == {"cube_serve": 5.0, "qemu": 2.0}


def test_host_ticks_reads_the_cpu_line(tmp_path: Path) -> None:
    (tmp_path / "stat").write_text("cpu  10 1 5 100 4 2 3 0 7 0\ncpu0 1 2 3 4 5 6 7 8 9 0\n")
    assert idlecpu.host_ticks(tmp_path) == (21, 125, 5)


def test_the_real_proc_is_readable() -> None:
    snap = idlecpu.snapshot([os.getpid()])
    me = snap[os.getpid()]
    assert me.threads and me.switches > 0


def test_core_options_go_into_the_core_table() -> None:
    text = "[core]\nstate_dir = \"/x\"\n\n[vmm]\nplugin = \"kvm\"\n"
    out = _with_core_options(text, {"sample_interval_s": 60, "pool": {"warm_up": False}})
    assert out.startswith("[core]\nsample_interval_s = 60\npool = { warm_up = false }\nstate_dir")
    assert _with_core_options(text, {}) == text
