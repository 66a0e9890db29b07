"""Lifecycle with the real SDK on real microVMs: auto-pause on timeout, then a request through the
edge proxy resumes the sandbox (auto-resume); a paused sandbox written out to disk (its QEMU ends)
resumes with its processes and their memory intact, also after a restart of ``cube serve`` and
after a (simulated) host reboot.

The module restarts the shared server with ``[core] pause_to_disk_after_s`` short, and its end puts
the config back. Restarts inside the module (the pause-to-disk test's, the simulated reboot's) keep
the setting, so every test sees it whatever order the tests run in."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cube_e2e import CubeServer
from e2b import Sandbox, SandboxState
from e2b.exceptions import InvalidArgumentException
from test_e2e_legacy_sdk import legacy_python  # noqa: F401 - fixture

from cube_core.models import Sandbox as SandboxRecord
from cube_core.state import SandboxState as RecordState
from cube_core.store import SqliteStore

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

TO_DISK_AFTER_S = 4
COUNTER = ("n=0; id=$(cat /proc/sys/kernel/random/uuid); "
           "while :; do n=$((n+1)); echo \"$$ $id $n\" > /tmp/counter.tmp; mv /tmp/counter.tmp /tmp/counter; "
           "sleep 0.2; done")
"""A shell that keeps a random id and a counter in its memory and writes both out five times a
second: after a resume the same process (pid) goes on with the same id, counting on from where it
was (a restarted process would start at 1 with another id)."""


@pytest.fixture(scope="module")
def server(cube_server: CubeServer, monkeypatch_module: pytest.MonkeyPatch) -> Iterator[CubeServer]:
    original = cube_server.config.read_text()
    cube_server.stop()
    setting = f"[core]\npause_to_disk_after_s = {TO_DISK_AFTER_S}\n"
    cube_server.config.write_text(original.replace("[core]\n", setting, 1))
    cube_server.start()
    for name, value in cube_server.env().items():
        monkeypatch_module.setenv(name, value)
    monkeypatch_module.delenv("E2B_DOMAIN", raising=False)
    try:
        yield cube_server
    finally:
        if cube_server.config.read_text() != original:
            cube_server.stop()
            cube_server.config.write_text(original)
            cube_server.start()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def record(server: CubeServer, sandbox_id: str) -> SandboxRecord:
    store = SqliteStore(server.state_dir / "cube.db")
    try:
        found = store.get_sandbox(sandbox_id)
    finally:
        store.close()
    assert found is not None
    return found


def records(server: CubeServer) -> list[SandboxRecord]:
    store = SqliteStore(server.state_dir / "cube.db")
    try:
        return store.list_sandboxes()
    finally:
        store.close()


def qemu_pids(server: CubeServer) -> list[int]:
    """The server's QEMU processes (their command line names their work dir under its state dir)."""
    marker = f"{server.state_dir}/vms/".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def remove_cgroup(path: Path) -> bool:
    """rmdir a VM's cgroup, killing what is left in it (a reboot ends every process); False while
    it is busy (a killed process not reaped yet)."""
    try:
        for pid in (path / "cgroup.procs").read_text().split():
            os.kill(int(pid), signal.SIGKILL)
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError:
        return False
    return True


def simulate_host_reboot(server: CubeServer) -> None:
    """With ``cube serve`` stopped, remove what a reboot of the host removes: every QEMU process
    (killed), the network namespaces with their taps and veths, the egress filter's pinned maps and
    the host's nftables table, the VMs' cgroups and jail uid leases, and the tmpfs-backed
    directories (/run: the VMs' work dirs and the network slots' state files; /dev/shm: RAM
    files). The state store, the disks and the saved memory are on disk and stay."""
    pids = qemu_pids(server)
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not any(alive(p) for p in pids), "the QEMU processes ended", timeout=30)
    vms = server.state_dir / "vms"
    for record_file in vms.glob("*/vm.json"):
        vm = json.loads(record_file.read_text())
        for path in (vm.get("cgroup_paths") or {}).values():
            wait_for(lambda p=Path(path): remove_cgroup(p), f"cgroup {path} removed", timeout=30)
        if vm.get("jail_uid"):
            Path(f"/run/cube/uids/{vm['jail_uid']}").unlink(missing_ok=True)
    shutil.rmtree(vms)
    slots = {r.runtime.nic.slot_id for r in records(server) if r.runtime.nic is not None}
    for name in os.listdir("/run/netns"):
        if name.startswith("cube-") and (name[5:] in slots or name.startswith("cube-.pool-")):
            subprocess.run(["ip", "netns", "delete", name], check=True)
    for slot_id in slots:
        Path(f"/run/cube/net/{slot_id}.json").unlink(missing_ok=True)
    shutil.rmtree("/sys/fs/bpf/cube", ignore_errors=True)
    subprocess.run(["nft", "delete", "table", "inet", "cube"], check=False, capture_output=True)
    port = server.url.rsplit(":", 1)[1]
    shutil.rmtree(f"/dev/shm/cube-e2e-{port}", ignore_errors=True)


def wait_for(check: object, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout}s")
        time.sleep(0.25)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of a process in KiB."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    rss = int(re.search(r"^Rss:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    pss = int(re.search(r"^Pss:\s+(\d+)", text, re.M).group(1))  # type: ignore[union-attr]
    return rss, pss


def start_counter(sbx: Sandbox) -> tuple[str, str, int]:
    sbx.commands.run(COUNTER, background=True)
    wait_for(lambda: sbx.files.exists("/tmp/counter"), "the counter writes")
    time.sleep(0.5)
    pid, ident, n = sbx.files.read("/tmp/counter").split()
    return pid, ident, int(n)


def check_counter(sbx: Sandbox, before: tuple[str, str, int]) -> None:
    pid, ident, n = sbx.files.read("/tmp/counter").split()
    assert (pid, ident) == before[:2], "another process: the counter's was lost"
    assert int(n) >= before[2], f"the counter went back: {n} < {before[2]}"
    time.sleep(0.6)
    assert int(sbx.files.read("/tmp/counter").split()[2]) > int(n), "the counter does not go on"


def test_filesystem_only_pause_then_connect_boots_from_the_disk(server: CubeServer) -> None:
    """``pause(mode="filesystem")``, the auto-pause ``{"action": "pause", "mode": "filesystem"}``
    and ``connect(on_resume="reboot")`` of a memory-paused sandbox: its QEMU ends, no memory is
    kept; ``connect`` boots it from its own disk as the same sandbox (id, token, env vars): files
    are there, processes are not, commands work."""
    with pytest.raises(InvalidArgumentException):  # refused by the SDK; the API's 400 is in the route tests
        Sandbox.create(template="base", lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"},
                                                   "auto_resume": True})
    explicit = Sandbox.create(template="base", timeout=600, envs={"KEPT": "env"})
    auto = Sandbox.create(template="base", timeout=30,
                          lifecycle={"on_timeout": {"action": "pause", "mode": "filesystem"}})
    rebooted = Sandbox.create(template="base", timeout=600)
    boxes = (explicit, auto, rebooted)
    try:
        pids = {}
        for sbx in boxes:
            sbx.files.write("/home/user/kept.txt", sbx.sandbox_id)
            start_counter(sbx)
            pids[sbx.sandbox_id] = record(server, sbx.sandbox_id).runtime.vm.pid  # type: ignore[union-attr]
        explicit.pause(mode="filesystem")
        rebooted.pause()
        wait_for(lambda: Sandbox.get_info(auto.sandbox_id).state == SandboxState.PAUSED, "auto-paused", timeout=90)
        for sbx in (explicit, auto):
            wait_for(lambda s=sbx: not alive(pids[s.sandbox_id]), "its QEMU ended", timeout=30)  # type: ignore[arg-type]
            runtime = record(server, sbx.sandbox_id).runtime
            assert runtime.disk_only and runtime.saved is None and runtime.disk is not None
            assert runtime.disk.path.exists()
        assert record(server, rebooted.sandbox_id).runtime.saved is not None or \
            record(server, rebooted.sandbox_id).runtime.vm is not None  # paused with its memory

        for sbx, how in ((explicit, "restore"), (auto, "restore"), (rebooted, "reboot")):
            started = time.monotonic()
            again = Sandbox.connect(sbx.sandbox_id, on_resume=how)  # type: ignore[arg-type]
            print(f"{sbx.sandbox_id}: connect ({how}) booted it from its disk in {time.monotonic() - started:.2f}s")
            assert again.sandbox_id == sbx.sandbox_id
            assert again.files.read("/home/user/kept.txt") == sbx.sandbox_id  # the files persist
            ps = again.commands.run("ps -eo args").stdout
            assert "counter" not in ps and "sleep 0.2" not in ps, "a process survived the reboot"
            assert again.commands.run("echo ok").stdout.strip() == "ok"
            assert not alive(pids[sbx.sandbox_id])
            assert record(server, sbx.sandbox_id).runtime.vm is not None
        assert Sandbox.connect(explicit.sandbox_id).commands.run("echo $KEPT").stdout.strip() == "env"
    finally:
        for sbx in boxes:
            sbx.kill()


def test_auto_pause_on_timeout_then_traffic_resumes(server: CubeServer) -> None:
    sbx = Sandbox.create(template="base", timeout=20, lifecycle={"on_timeout": "pause", "auto_resume": True})
    plain = Sandbox.create(template="base", timeout=600, lifecycle={"on_timeout": "pause"})
    try:
        info = sbx.get_info()
        assert info.lifecycle == {"on_timeout": "pause", "auto_resume": True}
        assert plain.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": False}
        sbx.files.write("/home/user/kept.txt", "before the pause")
        counter = start_counter(sbx)
        boot_id = sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout
        wait_for(lambda: Sandbox.get_info(sbx.sandbox_id).state == SandboxState.PAUSED, "auto-paused at its timeout")
        started = time.monotonic()
        assert sbx.files.read("/home/user/kept.txt") == "before the pause"  # through the edge: wakes it
        print(f"first request after the auto-pause answered in {time.monotonic() - started:.2f}s")
        assert Sandbox.get_info(sbx.sandbox_id).state == SandboxState.RUNNING
        check_counter(sbx, counter)
        assert sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout == boot_id
        plain.pause()
        assert not plain.is_running()  # no auto-resume: "not found" at the edge, as E2B answers
        assert Sandbox.get_info(plain.sandbox_id).state == SandboxState.PAUSED
    finally:
        sbx.kill()
        plain.kill()


def test_pause_to_disk_then_resume_after_a_restart(server: CubeServer) -> None:
    on_disk = Sandbox.create(template="base", timeout=600, lifecycle={"on_timeout": "pause", "auto_resume": True})
    connected = Sandbox.create(template="base", timeout=600)
    try:
        counters = {}
        for sbx in (on_disk, connected):
            sbx.files.write("/home/user/kept.txt", sbx.sandbox_id)
            counters[sbx.sandbox_id] = start_counter(sbx)
        pids = {s.sandbox_id: record(server, s.sandbox_id).runtime.vm.pid for s in (on_disk, connected)}  # type: ignore[union-attr]
        for sbx in (on_disk, connected):
            rss, pss = memory_kib(pids[sbx.sandbox_id])  # type: ignore[arg-type]
            print(f"{sbx.sandbox_id}: QEMU before the pause: RSS {rss >> 10} MiB, PSS {pss >> 10} MiB")
            sbx.pause()
        for sbx in (on_disk, connected):
            wait_for(lambda s=sbx: record(server, s.sandbox_id).runtime.on_disk, "written out to disk",
                     timeout=TO_DISK_AFTER_S + 60)
            saved = record(server, sbx.sandbox_id).runtime.saved
            assert saved is not None
            size = sum(p.stat().st_blocks * 512 for p in saved.memory_file.parent.iterdir())
            print(f"{sbx.sandbox_id}: on disk: {size >> 10} KiB")
            wait_for(lambda s=sbx: not alive(pids[s.sandbox_id]), "its QEMU ended", timeout=10)  # type: ignore[arg-type]

        started = time.monotonic()
        again = Sandbox.connect(connected.sandbox_id)  # from disk, before the restart
        print(f"connect restored the sandbox from disk in {time.monotonic() - started:.2f}s")
        assert again.files.read("/home/user/kept.txt") == connected.sandbox_id
        check_counter(again, counters[connected.sandbox_id])
        saved_dir = record(server, connected.sandbox_id).runtime
        assert saved_dir.saved is None and saved_dir.vm is not None

        on_disk_state = record(server, on_disk.sandbox_id).runtime.saved
        assert on_disk_state is not None
        server.stop()  # a restart of cube serve, the sandbox on disk already
        server.start()
        assert Sandbox.get_info(on_disk.sandbox_id).state == SandboxState.PAUSED  # kept by the restart
        started = time.monotonic()
        assert on_disk.files.read("/home/user/kept.txt") == on_disk.sandbox_id  # traffic restores it
        print(f"first request after the restart restored the sandbox in {time.monotonic() - started:.2f}s")
        check_counter(on_disk, counters[on_disk.sandbox_id])
        assert not on_disk_state.memory_file.parent.exists(), "the saved state was not deleted after the resume"
    finally:
        for sbx in (on_disk, connected):
            runtime = record(server, sbx.sandbox_id).runtime
            sbx.kill()
            if runtime.disk is not None:
                assert not runtime.disk.path.exists(), "its disk is left"
            if runtime.saved is not None:
                assert not runtime.saved.memory_file.parent.exists(), "its saved state is left"


def test_paused_sandbox_survives_a_host_reboot(server: CubeServer) -> None:
    """A sandbox written out to disk is restored after a (simulated) host reboot into a network
    slot built again with its address and egress policy; a running one whose VM the reboot
    ended is recorded failed and freed."""
    paused = Sandbox.create(template="base", timeout=600, lifecycle={"on_timeout": "pause"},
                            allow_internet_access=False)
    running = Sandbox.create(template="base", timeout=600)
    try:
        paused.files.write("/home/user/kept.txt", "across the reboot")
        counter = start_counter(paused)
        before = record(server, paused.sandbox_id).runtime
        assert before.nic is not None
        paused.pause()
        wait_for(lambda: record(server, paused.sandbox_id).runtime.on_disk, "written out to disk",
                 timeout=TO_DISK_AFTER_S + 60)
        lost_disk = record(server, running.sandbox_id).runtime.disk
        assert lost_disk is not None and lost_disk.path.exists()

        server.stop()
        simulate_host_reboot(server)
        assert not Path(f"/run/netns/{before.nic.netns}").exists()
        server.start()

        failed = record(server, running.sandbox_id)
        assert failed.state == RecordState.ERROR and "lost" in (failed.error or "")
        assert not lost_disk.path.exists(), "the lost sandbox's disk was not freed"
        kept = record(server, paused.sandbox_id)
        assert kept.state == RecordState.PAUSED and kept.runtime.on_disk
        assert kept.runtime.nic is not None and kept.runtime.nic.guest_address == before.nic.guest_address
        assert Path(f"/run/netns/{before.nic.netns}").exists(), "its network slot was not built again"
        assert Sandbox.get_info(paused.sandbox_id).state == SandboxState.PAUSED

        started = time.monotonic()
        again = Sandbox.connect(paused.sandbox_id)
        print(f"connect after the reboot restored the sandbox in {time.monotonic() - started:.2f}s")
        assert again.files.read("/home/user/kept.txt") == "across the reboot"
        check_counter(again, counter)
        assert again.commands.run("echo ok").stdout.strip() == "ok"
        # its egress policy came back with the slot: still no internet
        probe = again.commands.run("timeout 5 bash -c 'echo > /dev/tcp/1.1.1.1/80' && echo open || echo closed")
        assert probe.stdout.strip() == "closed"
    finally:
        paused.kill()
        running.kill()


LEGACY_SCRIPT = r'''
from e2b import Sandbox
sbx = Sandbox.create(template="base", timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": True})
try:
    assert sbx.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}, sbx.get_info().lifecycle
    sbx.files.write("/home/user/legacy.txt", "kept")
    sbx.pause()
    assert Sandbox.get_info(sbx.sandbox_id).state.value == "paused"
    assert sbx.files.read("/home/user/legacy.txt") == "kept"  # the edge resumes it
    assert Sandbox.get_info(sbx.sandbox_id).state.value == "running"
finally:
    sbx.kill()
print("LEGACY-LIFECYCLE-OK")
'''


def test_legacy_sdk_auto_resume(server: CubeServer, legacy_python: Path) -> None:  # noqa: F811 - fixture
    """SDK 2.45.1 sends the same lifecycle fields (autoPause, autoResume) as 2.63."""
    result = subprocess.run([str(legacy_python), "-c", LEGACY_SCRIPT], capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", **server.env()})
    assert "LEGACY-LIFECYCLE-OK" in result.stdout, result.stdout + result.stderr
