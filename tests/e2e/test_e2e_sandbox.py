"""The E2B SDK against a real Cube server on real microVMs: lifecycle, commands, files, isolation."""

from __future__ import annotations

import os
import platform
import re
import time
import uuid

import pytest
from cube_e2e import CubeServer
from e2b import AsyncSandbox, Sandbox, SandboxQuery, SandboxState
from e2b.exceptions import AuthenticationException, NotFoundException, SandboxException

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


@pytest.fixture
def sandbox(e2b_env: CubeServer):
    sbx = Sandbox.create(template="base", timeout=300)
    yield sbx
    try:
        sbx.kill()
    except Exception:
        pass


def test_hello_runs_in_a_guest_with_its_own_kernel(sandbox: Sandbox, e2b_env: CubeServer) -> None:
    result = sandbox.commands.run("echo hello from $(hostname) && uname -r")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("hello from ")
    assert lines[1] != platform.release(), "the sandbox must run its own kernel, not the host's"
    info = sandbox.get_info()
    assert info.sandbox_id == sandbox.sandbox_id and info.template_id == "base"


def test_guest_cannot_see_host_files_or_processes(sandbox: Sandbox, tmp_path) -> None:
    marker = tmp_path / f"host-marker-{uuid.uuid4().hex}"
    marker.write_text("secret")
    assert sandbox.commands.run(f"test -e {marker} && echo visible || echo absent").stdout.strip() == "absent"
    procs = sandbox.commands.run("ps -eo comm= | sort -u").stdout
    assert "pytest" not in procs and "qemu-system-x86" not in procs
    with open("/proc/1/comm") as f:
        host_pid1 = f.read().strip()
    guest_pid1 = sandbox.commands.run("cat /proc/1/comm").stdout.strip()
    assert guest_pid1 != host_pid1 or host_pid1 not in ("systemd", "init", "bash")


def test_two_sandboxes_are_independent(e2b_env: CubeServer) -> None:
    a = Sandbox.create(template="base", timeout=120)
    b = Sandbox.create(template="base", timeout=120)
    try:
        a.files.write("/home/user/only-in-a.txt", "a")
        a.commands.run("sleep 600", background=True)
        assert not b.files.exists("/home/user/only-in-a.txt")
        assert "sleep 600" not in b.commands.run("ps -eo args=").stdout
        rand_a = a.commands.run("python3 -c 'import os; print(os.urandom(16).hex())'").stdout
        rand_b = b.commands.run("python3 -c 'import os; print(os.urandom(16).hex())'").stdout
        assert rand_a != rand_b, "clones of one snapshot must not share RNG state"
        boot_a = a.commands.run("cat /proc/sys/kernel/random/boot_id").stdout
        assert boot_a.strip()
    finally:
        a.kill()
        b.kill()


IDENTITY = (
    "python3 -c 'import os, random, socket; print(open(\"/dev/urandom\", \"rb\").read(16).hex(), "
    "random.getrandbits(64), open(\"/etc/machine-id\").read().strip(), socket.gethostname(), "
    "os.environ.get(\"E2B_SANDBOX_ID\", \"\"), os.environ.get(\"FIRST\", \"\"))'"
)


def _served_by(server: CubeServer, sandbox_id: str) -> str:
    """How the server started ``sandbox_id`` (its ``sandbox ready`` log line): pool or start."""
    for line in server.log.read_text().splitlines():
        if "sandbox ready" in line and sandbox_id in line:
            found = re.search(r'served_by\W+(\w+)', line)
            return found.group(1) if found else ""
    return ""


def test_two_sandboxes_from_one_pool_share_no_identity(e2b_env: CubeServer) -> None:
    """Fork safety: two sandboxes taken from one warm pool (each member personalized as its
    sandbox when it joined) share no kernel or Python RNG output, machine-id, hostname or access
    token; and the first request right after create already sees the create's env vars (the edge
    held it until the guest applied them)."""
    seen: list[list[str]] = []
    tokens: list[str | None] = []
    sandboxes: list[Sandbox] = []
    try:
        for i in range(2):
            deadline = time.monotonic() + 120
            while True:  # the pool (one member) refills after every hit: wait for a hit
                sbx = Sandbox.create(template="base", timeout=120, secure=True, envs={"FIRST": f"env-{i}"})
                sandboxes.append(sbx)
                if _served_by(e2b_env, sbx.sandbox_id) == "pool" or time.monotonic() > deadline:
                    break
                sbx.kill()
                time.sleep(3)
            assert _served_by(e2b_env, sbx.sandbox_id) == "pool"
            out = sbx.commands.run(IDENTITY).stdout.split()  # the first request after create
            assert len(out) == 6, out
            assert out[3] == sbx.sandbox_id[:16] and out[4] == sbx.sandbox_id
            assert out[5] == f"env-{i}", "the first command must see the create's env vars"
            seen.append(out[:4])
            tokens.append(sbx._envd_access_token)
        (rand_a, py_a, mid_a, host_a), (rand_b, py_b, mid_b, host_b) = seen
        assert rand_a != rand_b, "kernel RNG output shared"
        assert py_a != py_b, "Python RNG output shared"
        assert mid_a != mid_b and len(mid_a) == 32, "machine-id shared"
        assert host_a != host_b
        assert tokens[0] and tokens[1] and tokens[0] != tokens[1]
    finally:
        for sbx in sandboxes:
            try:
                sbx.kill()
            except Exception:
                pass


def test_commands(sandbox: Sandbox) -> None:
    out = sandbox.commands.run("echo $FOO-$BAR", envs={"FOO": "foo", "BAR": "bar"})
    assert out.stdout.strip() == "foo-bar"
    assert sandbox.commands.run("echo $FOO").stdout.strip() == ""  # per-call envs do not leak
    assert sandbox.commands.run("whoami").stdout.strip() == "user"
    assert sandbox.commands.run("whoami", user="root").stdout.strip() == "root"
    with pytest.raises(SandboxException):
        sandbox.commands.run("exit 3")
    handle = sandbox.commands.run("read line; echo got:$line", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "ping\n")
    assert handle.wait().stdout.strip() == "got:ping"
    sleeper = sandbox.commands.run("sleep 300", background=True)
    assert sleeper.pid in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(sleeper.pid)
    time.sleep(0.5)
    assert sleeper.pid not in [p.pid for p in sandbox.commands.list()]
    ticker = sandbox.commands.run("for i in 1 2 3; do echo tick$i; sleep 0.3; done", background=True)
    again = sandbox.commands.connect(ticker.pid)
    assert "tick3" in again.wait().stdout


def test_pty(sandbox: Sandbox) -> None:
    from e2b import PtySize

    out = bytearray()
    pty = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(pty.pid, b"stty size; echo pty-$((6*7)); exit\n")
    for _, _, data in pty:
        out.extend(data or b"")
    assert pty.wait().exit_code == 0
    assert b"pty-42" in out and b"24 80" in out


def test_files(sandbox: Sandbox) -> None:
    info = sandbox.files.write("notes/a.txt", "hello")
    assert info.path == "/home/user/notes/a.txt"
    assert sandbox.files.read("/home/user/notes/a.txt") == "hello"
    assert sandbox.files.exists("notes/a.txt")
    assert [e.name for e in sandbox.files.list("/home/user/notes")] == ["a.txt"]
    stat = sandbox.files.get_info("notes/a.txt")
    assert stat.size == 5 and stat.owner == "user"
    sandbox.files.make_dir("/home/user/d1")
    sandbox.files.rename("notes/a.txt", "/home/user/d1/b.txt")
    assert not sandbox.files.exists("notes/a.txt")
    big = os.urandom(3 * 1024 * 1024)
    sandbox.files.write("/home/user/big.bin", big)
    assert sandbox.files.read("/home/user/big.bin", format="bytes") == big
    watcher = sandbox.files.watch_dir("/home/user/d1")
    sandbox.files.write("/home/user/d1/new.txt", "x")
    events = []
    deadline = time.time() + 10
    while not any(e.name == "new.txt" for e in events) and time.time() < deadline:
        time.sleep(0.2)
        events += watcher.get_new_events()
    watcher.stop()
    assert any(e.name == "new.txt" for e in events)
    packed = sandbox.files.read("/home/user/big.bin", format="bytes", gzip=True) if "gzip" in \
        sandbox.files.read.__code__.co_varnames else big
    assert packed == big
    sandbox.files.remove("/home/user/d1")
    assert not sandbox.files.exists("/home/user/d1")


def test_timeout_info_list_and_metrics(e2b_env: CubeServer) -> None:
    tag = uuid.uuid4().hex
    sbx = Sandbox.create(template="base", timeout=120, metadata={"suite": "e2e", "tag": tag})
    try:
        first_end = sbx.get_info().end_at
        sbx.set_timeout(600)
        assert sbx.get_info().end_at > first_end
        found = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
        assert [s.sandbox_id for s in found] == [sbx.sandbox_id]
        assert Sandbox.list(query=SandboxQuery(metadata={"tag": "nope"})).next_items() == []
        assert sbx.is_running()
    finally:
        sbx.kill()
    assert not sbx.is_running()


def test_expiry_kills(e2b_env: CubeServer) -> None:
    sbx = Sandbox.create(template="base", timeout=2)
    time.sleep(5)
    assert not sbx.is_running()
    with pytest.raises(NotFoundException):
        Sandbox.connect(sbx.sandbox_id)


def test_pause_resume_keeps_memory_and_processes(e2b_env: CubeServer) -> None:
    sbx = Sandbox.create(template="base", timeout=300)
    try:
        boot_id = sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()
        sleeper = sbx.commands.run("sleep 900", background=True)
        sbx.files.write("/tmp/in-memory.txt", "kept")
        sbx.pause()
        info = Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()
        assert sbx.sandbox_id in [s.sandbox_id for s in info]
        time.sleep(3)  # the paused guest's clock stands still meanwhile
        resumed = Sandbox.connect(sbx.sandbox_id)
        guest_now = float(resumed.commands.run("date +%s.%N").stdout)
        assert abs(guest_now - time.time()) < 1.0, "the guest's clock was not set again after the resume"
        assert resumed.commands.run("cat /proc/sys/kernel/random/boot_id").stdout.strip() == boot_id
        assert resumed.files.read("/tmp/in-memory.txt") == "kept"
        assert sleeper.pid in [p.pid for p in resumed.commands.list()]
    finally:
        sbx.kill()


def test_teams_and_keys(e2b_env: CubeServer) -> None:
    sbx = Sandbox.create(template="base", timeout=120)
    try:
        other = {"api_key": e2b_env.key_b}
        assert sbx.sandbox_id not in [s.sandbox_id for s in Sandbox.list(**other).next_items()]
        with pytest.raises(NotFoundException):
            Sandbox.connect(sbx.sandbox_id, **other)
        with pytest.raises(AuthenticationException):
            Sandbox.create(template="base", api_key="e2b_" + "0" * 40)
    finally:
        sbx.kill()


def test_bad_requests(e2b_env: CubeServer) -> None:
    with pytest.raises(SandboxException):
        Sandbox.create(template="no-such-template")


async def test_async_client(e2b_env: CubeServer) -> None:
    sbx = await AsyncSandbox.create(template="base", timeout=120)
    try:
        result = await sbx.commands.run("echo async")
        assert result.stdout.strip() == "async"
        await sbx.files.write("/home/user/x.txt", "y")
        assert await sbx.files.read("/home/user/x.txt") == "y"
    finally:
        await sbx.kill()
