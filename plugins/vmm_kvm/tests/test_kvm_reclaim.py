"""Idle reclaim on a real guest and a real zram swap device: a paused VM's private memory goes to
zram (a paused warm-pool member's does not), the template's shared pages stay, the VM runs on
after it, and the node task reclaims a running VM that has been idle for a window. The test sets
the zram device up with the project's own script and removes it after (swap off, device gone)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvm_helpers import TemplateSnapshot, VmFactory

from cube_vmm_kvm import KvmVmm
from cube_vmm_kvm.reclaim import swap_devices

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.asyncio(loop_scope="session")]

SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "zram-swap.sh"


@pytest.fixture
def zram(tmp_path: Path) -> Iterator[str]:
    if os.geteuid() != 0 or not Path("/sys/class/zram-control/hot_add").exists() or not shutil.which("mkswap"):
        pytest.skip("needs root, zram (hot_add) and mkswap")
    env = {**os.environ, "CUBE_ZRAM_STATE": str(tmp_path / "zram.dev")}
    device = subprocess.run([str(SCRIPT), "setup", "1G"], check=True, capture_output=True, text=True,
                            env=env).stdout.strip()
    try:
        yield device
    finally:
        subprocess.run([str(SCRIPT), "teardown"], check=True, env=env)
        assert device not in Path("/proc/swaps").read_text()
        assert not Path("/sys/block", Path(device).name).exists()


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def _ram_shared_kib(pid: int, ram_file: Path) -> int:
    """Shared (clean + dirty) KiB of the process's mapping of ``ram_file``."""
    total, inside = 0, False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        first = line.split()[0] if line.split() else ""
        if "-" in first and not first.endswith(":"):
            inside = line.rstrip().endswith(str(ram_file))
        elif inside and first in ("Shared_Clean:", "Shared_Dirty:"):
            total += int(line.split()[1])
    return total


async def _swapped_after(pid: int, before_kib: int, timeout: float = 20.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _status_kib(pid, "VmSwap")
        if now > before_kib + 4096:
            return now
        await asyncio.sleep(0.2)
    return _status_kib(pid, "VmSwap")


async def test_idle_reclaim_pages_a_vm_out_to_zram(kvm: KvmVmm, template: TemplateSnapshot,
                                                   vm_factory: VmFactory, zram: str) -> None:
    reclaimer = kvm._reclaimer
    assert reclaimer is not None and reclaimer.usable()
    assert any(d.name == zram and d.ram_backed for d in swap_devices())
    clone = await vm_factory.restore(template.state, "reclaim", template.disk)
    pid = clone.pid
    assert pid is not None
    out = await kvm.guest_call(clone, "exec", {"cmd": ["sh", "-c", "echo before > /tmp/mark; cat /tmp/mark"]})
    assert out["stdout"].strip() == "before"
    anon_before = _status_kib(pid, "RssAnon")
    shared_before = _ram_shared_kib(pid, template.state.memory_file)
    zram_before = int(Path(f"/sys/block/{Path(zram).name}/mm_stat").read_text().split()[0])

    # a warm-pool member (prepared in the background, then paused) stays warm
    await kvm.set_priority(clone, background=True)
    await kvm.pause(clone)
    await asyncio.sleep(2)
    assert _status_kib(pid, "VmSwap") < 1024 and not reclaimer._reclaimable(clone.vm_id)
    await kvm.set_priority(clone, background=False)  # taken by a create
    await kvm.resume(clone)

    # a pause pages the VM out right away (in the background)
    await kvm.pause(clone)
    swapped = await _swapped_after(pid, 0)
    anon_after = _status_kib(pid, "RssAnon")
    assert swapped >= 8 << 10, f"only {swapped} KiB swapped (anon {anon_before} -> {anon_after} KiB)"
    assert anon_after < anon_before - (8 << 10)
    stored = int(Path(f"/sys/block/{Path(zram).name}/mm_stat").read_text().split()[0])
    assert stored - zram_before >= 8 << 20  # it went to our zram device
    # the template's pages that other mappings share stay resident (MADV_PAGEOUT skips them)
    assert _ram_shared_kib(pid, template.state.memory_file) >= shared_before * 0.9

    # it runs on: its memory comes back as it is touched
    await kvm.resume(clone)
    out = await kvm.guest_call(clone, "exec", {"cmd": ["cat", "/tmp/mark"]})
    assert out["stdout"].strip() == "before"

    # the node task: a running VM quiet for a whole window is paged out once
    window = reclaimer.tracker.window_s
    t0 = time.monotonic()
    before = _status_kib(pid, "VmSwap")
    await asyncio.to_thread(reclaimer.tick, t0)
    assert clone.vm_id not in await asyncio.to_thread(reclaimer.tick, t0 + window / 2)
    done = await asyncio.to_thread(reclaimer.tick, t0 + window)
    assert clone.vm_id in done
    assert clone.vm_id not in await asyncio.to_thread(reclaimer.tick, t0 + 2 * window)
    assert _status_kib(pid, "VmSwap") >= before - (4 << 10)
    # the sampler's count comes from the same readings: idle, by the driver's call
    assert (await kvm.activity([clone], max_age_s=0))[clone.vm_id].idle_since <= t0
    await kvm.shutdown(clone)
