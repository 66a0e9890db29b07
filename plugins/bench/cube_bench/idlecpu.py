"""Where the host's CPU goes while its sandboxes idle (``cube bench density``'s idle window).

Two readings of ``/proc`` a fixed window apart: the host's busy ticks (``/proc/stat``) and every
process's user + system ticks with the context switches of all its threads. The difference is
attributed to ``cube serve`` (the node agent and the API), the sandboxes' QEMU processes (by
thread name too: vCPU, main loop, workers), ``ksmd``, the other kernel threads, the other
processes (named, the busiest first) and the rest nobody holds at the second reading (processes
that started and ended inside the window and were not waited for by a process alive at both
readings, interrupts; a process's children that ended inside the window count for it). In % of
one core; per sandbox where it scales with them. A QEMU's context switches per second are its
wake-ups (an idle one sleeps in ``ppoll`` until a timer or a file descriptor wakes it).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

PROC = Path("/proc")
KERNEL_THREADS_PPID = 2
"""``kthreadd``: the parent of every kernel thread."""


@dataclass(frozen=True)
class ProcSample:
    comm: str
    ppid: int
    ticks: int
    """User + system clock ticks of all its threads so far."""
    switches: int = 0
    """Voluntary + involuntary context switches of all its threads so far (read only when asked)."""
    threads: Mapping[str, int] | None = None
    """Ticks by thread, when asked: ``main`` (the process's first thread: QEMU's main loop),
    others by name (digits folded: ``CPU 0/TCG`` -> ``CPU N/TCG``; QEMU names its threads only
    with ``debug-threads=on``, else ``other threads``)."""
    children: int = 0
    """User + system ticks of its children that ended and were waited for."""


def _fold_digits(name: str) -> str:
    """``CPU 0/TCG`` -> ``CPU N/TCG``, ``kworker/1:2`` -> ``kworker/N:N`` (``x86`` stays)."""
    return re.sub(r"\b\d+\b", "N", name)


def _stat_fields(text: str) -> tuple[str, list[str]]:
    head, _, tail = text.rpartition(")")
    return head.partition("(")[2], tail.split()


def _switches(status: str) -> int:
    return sum(int(line.split()[1]) for line in status.splitlines()
               if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))


def read_process(pid: int, *, detail: bool = False, proc: Path = PROC) -> ProcSample | None:
    """One process's sample; ``detail``: also its threads' context switches and ticks by name."""
    try:
        comm, fields = _stat_fields((proc / str(pid) / "stat").read_text())
        sample = ProcSample(comm=comm, ppid=int(fields[1]), ticks=int(fields[11]) + int(fields[12]),
                            children=int(fields[13]) + int(fields[14]))
        if not detail:
            return sample
        switches, threads = 0, Counter[str]()
        for task in (proc / str(pid) / "task").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):
                name, tf = _stat_fields((task / "stat").read_text())
                key = "main" if task.name == str(pid) else "other threads" if name == comm else _fold_digits(name)
                threads[key] += int(tf[11]) + int(tf[12])
                switches += _switches((task / "status").read_text())
        return replace(sample, switches=switches, threads=dict(threads))
    except (OSError, ValueError, IndexError):
        return None


def snapshot(detailed: Collection[int] = (), *, proc: Path = PROC) -> dict[int, ProcSample]:
    """Every process now; those in ``detailed`` with their threads."""
    out = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            pid = int(entry.name)
            sample = read_process(pid, detail=pid in detailed, proc=proc)
            if sample is not None:
                out[pid] = sample
    return out


def host_ticks(proc: Path = PROC) -> tuple[int, int, int]:
    """(busy, all, interrupts) ticks of all CPUs so far (``/proc/stat``'s ``cpu`` line; busy = all
    but idle and iowait; guest time is inside user)."""
    values = [int(v) for v in (proc / "stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (values + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal, sum(values[:8]), irq + softirq)


def attribute(before: Mapping[int, ProcSample], after: Mapping[int, ProcSample],
              host_before: tuple[int, int, int], host_after: tuple[int, int, int], *,
              serve_pid: int | None, qemu_pids: Collection[int], window_s: float,
              clock_hz: int | None = None, top: int = 5) -> dict[str, Any]:
    """The window's CPU by owner, in % of one core (pure: two snapshots and two host readings).
    A process counts what it used between the readings (all of it if it started inside the window)."""
    hz = clock_hz or os.sysconf("SC_CLK_TCK")

    def pct(ticks: float) -> float:
        return round(100 * ticks / hz / window_s, 2)

    def used(pid: int) -> int:
        end = after.get(pid)
        if end is None:
            return 0
        start = before.get(pid)
        return max(0, end.ticks - (start.ticks if start is not None and start.comm == end.comm else 0))

    def reaped(pid: int) -> int:
        """What children that ended inside the window used (all their life: an upper bound)."""
        end, start = after.get(pid), before.get(pid)
        return max(0, end.children - start.children) if end and start and start.comm == end.comm else 0

    qemu = {p for p in qemu_pids if p in after}
    groups: Counter[str] = Counter()
    others: Counter[str] = Counter()
    for pid, sample in after.items():
        ticks, children = used(pid), reaped(pid)
        if pid == serve_pid:
            groups["cube_serve_children"] += children
        elif children:
            groups["other_processes"] += children
            others[f"{sample.comm} (ended children)"] += children
        if not ticks:
            continue
        if pid == serve_pid:
            groups["cube_serve"] += ticks
        elif pid in qemu:
            groups["qemu"] += ticks
        elif sample.comm == "ksmd":
            groups["ksmd"] += ticks
        elif sample.ppid == KERNEL_THREADS_PPID or pid == KERNEL_THREADS_PPID:
            groups["kernel_threads"] += ticks
            others["[" + _fold_digits(sample.comm) + "]"] += ticks
        else:
            groups["other_processes"] += ticks
            others[sample.comm] += ticks
    busy = host_after[0] - host_before[0]
    n_cpus = max(1, round((host_after[1] - host_before[1]) / hz / window_s))
    attributed = sum(groups.values())
    threads: Counter[str] = Counter()
    switches = 0
    for pid in qemu:
        end, start = after[pid], before.get(pid)
        switches += end.switches - (start.switches if start is not None else 0)
        for name, t in (end.threads or {}).items():
            threads[name] += t - ((start.threads or {}).get(name, 0) if start is not None else 0)
    n = max(1, len(qemu))
    return {
        "window_s": window_s, "sandboxes": len(qemu), "cpus": n_cpus,
        "host_busy_pct_of_one_core": pct(busy),
        "host_busy_pct": round(100 * busy / max(1, host_after[1] - host_before[1]), 1),
        "cube_serve_pct": pct(groups["cube_serve"]),
        "cube_serve_children_pct": pct(groups["cube_serve_children"]),
        "qemu_total_pct": pct(groups["qemu"]),
        "qemu_pct_per_sandbox": round(pct(groups["qemu"]) / n, 4),
        "qemu_by_thread_pct": {name: pct(t) for name, t in threads.most_common() if t > 0},
        "qemu_wakeups_per_s_per_sandbox": round(switches / window_s / n, 2),
        "ksmd_pct": pct(groups["ksmd"]),
        "kernel_threads_pct": pct(groups["kernel_threads"]),
        "interrupts_pct": pct(host_after[2] - host_before[2]),
        "other_processes_pct": pct(groups["other_processes"]),
        "busiest_others_pct": {name: pct(t) for name, t in others.most_common(top)},
        "unattributed_pct": pct(max(0, busy - attributed)),
        "per_sandbox_pct": {"cube_serve": round(pct(groups["cube_serve"]) / n, 4),
                            "qemu": round(pct(groups["qemu"]) / n, 4)},
    }
