"""The QEMU jail, played from the attacker's side on a real ``cube serve`` with real microVMs and
the real e2b SDK: what a compromised QEMU would hold (uid, capabilities, namespaces, the files it
can see, its environment), and a guest flooding its serial console as root."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from cube_e2e import CubeServer
from e2b import Sandbox

from cube_core.store import SqliteStore

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


def _vm(server: CubeServer, sandbox_id: str) -> dict[str, object]:
    store = SqliteStore(server.state_dir / "cube.db")
    try:
        record = store.get_sandbox(sandbox_id)
    finally:
        store.close()
    assert record is not None
    assert record.runtime.vm is not None
    return record.runtime.vm.model_dump(mode="json")


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def _jail_files(root: Path) -> set[str]:
    """Every non-directory in a QEMU's root, as a path inside it (not descending into /usr)."""
    found: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        inside = "/" + os.path.relpath(dirpath, root).removeprefix(".").lstrip("/")
        if inside == "/":
            dirnames[:] = [d for d in dirnames if d != "usr"]
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            found.add(os.path.join(inside, name))
    return found


def test_qemu_of_a_sandbox_is_jailed(e2b_env: CubeServer) -> None:
    first = Sandbox.create(template="base", timeout=300)
    second = Sandbox.create(template="base", timeout=300)
    try:
        handle = _vm(e2b_env, first.sandbox_id)
        vm = handle["data"]
        assert isinstance(vm, dict)
        pid = int(str(handle["pid"]))
        status = _status(pid)
        uids = {int(x) for x in status["Uid"].split()}
        gids = {int(x) for x in status["Gid"].split()}
        assert len(uids) == 1 and 0 not in uids, status["Uid"]
        assert 0 not in gids, status["Gid"]
        assert "0" not in status["Groups"].split()
        for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
            assert int(status[caps], 16) == 0, f"{caps} {status[caps]}"
        assert status["NoNewPrivs"] == "1"
        assert status["Seccomp"] == "2"
        # Each sandbox has its own uid.
        other = _status(int(str(_vm(e2b_env, second.sandbox_id)["pid"])))
        assert other["Uid"] != status["Uid"]
        # Own mount, PID, IPC and UTS namespaces.
        for ns in ("mnt", "pid", "ipc", "uts", "net"):
            assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
        # Inside its PID namespace QEMU is pid 1 and alone.
        assert _status(pid)["NSpid"].split()[-1] == "1"
        # Its root holds only this VM's files: nothing of the host, of Cube or of the other VM.
        root = Path(f"/proc/{pid}/root")
        files = _jail_files(root)
        workdir = str(vm["workdir"])
        ram = str(vm["ram_file"])
        assert ram in files
        assert str(vm["kernel"]) in files
        assert {f"{workdir}/sock/qmp.sock", f"{workdir}/sock/ctl.sock"} <= files
        assert not any(f.startswith(workdir) and not f.startswith(f"{workdir}/sock/") for f in files), files
        assert not (root / str(e2b_env.state_dir / "cube.db").lstrip("/")).exists()
        assert not (root / str(e2b_env.config).lstrip("/")).exists()
        assert not (root / "proc" / "1").exists() and not (root / "etc" / "passwd").exists()
        assert not (root / "dev" / "kvm").exists() or vm["accel"] == "kvm"
        assert not (root / "dev" / "net" / "tun").exists()
        other_workdir = str(_vm(e2b_env, second.sandbox_id)["workdir"]) + "/"
        assert not any(f.startswith(other_workdir) for f in files)
        unexpected = {f for f in files if not f.startswith(("/dev/", "/etc/ld.so.cache", workdir, ram,
                                                              str(vm["kernel"]), str(e2b_env.state_dir / "storage"),
                                                              "/bin", "/sbin", "/lib"))}
        assert not unexpected, unexpected
        # The root and what QEMU only reads are read-only mounts.
        mounts = {line.split()[4]: line.split()[5] for line in
                  Path(f"/proc/{pid}/mountinfo").read_text().splitlines()}
        assert mounts["/"].startswith("ro") and mounts["/usr"].startswith("ro")
        assert mounts[str(vm["kernel"])].startswith("ro")
        assert mounts[f"{workdir}/sock"].startswith("rw")
        # An explicit, minimal environment: nothing of the node agent's.
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert {e.split(b"=", 1)[0] for e in environ if e} <= {b"PATH", b"LC_ALL"}
        # The sandbox works jailed.
        assert first.commands.run("echo hi").stdout == "hi\n"
    finally:
        first.kill()
        second.kill()


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def test_console_flood_stays_bounded(e2b_env: CubeServer) -> None:
    sbx = Sandbox.create(template="base", timeout=300)
    try:
        vm = _vm(e2b_env, sbx.sandbox_id)
        workdir = Path(str(vm["workdir"]))
        before = _du(workdir)
        started = time.monotonic()
        out = sbx.commands.run("timeout 12 sh -c 'yes flood > /dev/ttyS0'; echo done $?", user="root",
                               timeout=60)
        assert "done 124" in out.stdout, out.stdout  # it really wrote for the whole 12 s
        assert time.monotonic() - started >= 12
        grown = _du(workdir) - before
        # Unbounded, this is ~3 MiB of console log per 12 s under TCG (far more under KVM).
        assert grown < 256 * 1024, f"work directory grew by {grown} bytes"
        assert sbx.commands.run("echo alive").stdout == "alive\n"
    finally:
        sbx.kill()


def _timed_echo(sbx: Sandbox) -> float:
    started = time.monotonic()
    assert sbx.commands.run("echo ok", timeout=60).stdout == "ok\n"
    return time.monotonic() - started


def test_a_hostile_neighbour_does_not_starve_another_sandbox(e2b_env: CubeServer) -> None:
    """Sandbox A fills its disk, fork-bombs and eats all its memory as root at once; sandbox B's
    commands keep answering (a generous bound: this host has 2 shared cores and emulates the CPU)."""
    victim = Sandbox.create(template="base", timeout=300)
    attacker = Sandbox.create(template="base", timeout=300)
    try:
        before = sorted(_timed_echo(victim) for _ in range(3))
        handle = _vm(e2b_env, attacker.sandbox_id)
        attacker_pid = int(str(handle["pid"]))
        data = handle["data"]
        assert isinstance(data, dict)
        limit_kib = (int(data["memory_mb"]) + 256) * 1024  # [vmm.options] memory_overhead_mb default
        for hostile in ("dd if=/dev/zero of=/var/fill bs=1M",
                        "python3 -c 'b = []\nwhile True: b.append(bytearray(8 << 20))'",
                        "sh -c 'f() { f | f & }; f'"):
            attacker.commands.run(hostile, background=True, user="root", timeout=5)
        latencies = []
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline:
            latencies.append(_timed_echo(victim))
            time.sleep(0.5)
        latencies.sort()
        median = latencies[len(latencies) // 2]
        assert len(latencies) >= 5, latencies
        assert median < max(3.0, 10 * before[1]), (before, latencies)
        assert latencies[-1] < 15.0, (before, latencies)
        # The attacker's QEMU stayed inside its memory limit (guest RAM + overhead).
        rss_kib = int(_status(attacker_pid)["VmRSS"].split()[0]) if Path(f"/proc/{attacker_pid}").exists() else 0
        assert rss_kib < limit_kib, (rss_kib, limit_kib)
    finally:
        attacker.kill()
        victim.kill()
