"""Test harness: the agent runs on the host as a subprocess, driven through the real SDKs.

This is a protocol harness, not a sandbox. Each agent gets a temporary directory
(world-traversable, under /tmp) holding the default user's home, its state dir and a
``--system-root`` for the /etc files that ``personalize`` writes; ``--no-system-calls``
keeps it from touching the host's clock, hostname and kernel RNG.

The agent acts as the Unix account ``user`` (as in the VM image). If the host has no
such account, the ``sandbox_user`` fixture creates it with ``useradd`` (a regular
uid, not necessarily 1000, no home directory of its own) and deletes it again at the
end of the session. Tests must run as root (the agent switches users).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

GUEST_DIR = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(GUEST_DIR))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway import Gateway  # noqa: E402

USER = "user"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def sandbox_user() -> Iterator[pwd.struct_passwd]:
    if os.geteuid() != 0:
        pytest.fail("the guest agent tests must run as root (the agent switches users)")
    created = False
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(["useradd", "-M", "-U", "-s", "/bin/bash", USER], check=True)
        created = True
        pw = pwd.getpwnam(USER)
    yield pw
    if created:
        subprocess.run(["userdel", USER], check=False)


@dataclass
class AgentProc:
    proc: subprocess.Popen[bytes]
    base: Path
    home: Path
    sysroot: Path
    envd_port: int
    interpreter_port: int | None
    log_path: Path

    @property
    def envd_url(self) -> str:
        return f"http://127.0.0.1:{self.envd_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_agent(
    pw: pwd.struct_passwd, *, interpreter: bool = True, ctl: str | None = None
) -> AgentProc:
    base = Path(tempfile.mkdtemp(prefix="cube-guest-test-", dir="/tmp"))
    base.chmod(0o755)
    home = base / "home"
    home.mkdir()
    os.chown(home, pw.pw_uid, pw.pw_gid)
    sysroot = base / "sysroot"
    (sysroot / "etc").mkdir(parents=True)
    envd_port = free_port()
    interp_port = free_port() if interpreter else None
    args = [
        sys.executable, "-m", "cube_guest",
        "--envd-port", str(envd_port),
        "--bind", "127.0.0.1",
        "--home", str(home),
        "--state-dir", str(base / "state"),
        "--system-root", str(sysroot),
        "--no-system-calls",
        "--ctl", ctl or "",
    ]
    if interp_port is None:
        args.append("--no-interpreter")
    else:
        args += ["--interpreter-port", str(interp_port)]
    log_path = base / "agent.log"
    env = dict(os.environ, PYTHONPATH=str(GUEST_DIR), CUBE_GUEST_LOG="DEBUG")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
    agent = AgentProc(proc, base, home, sysroot, envd_port, interp_port, log_path)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"agent exited early:\n{agent.log_text()}")
        if "CUBE_AGENT_READY" in agent.log_text():
            return agent
        time.sleep(0.1)
    agent.stop()
    raise RuntimeError(f"agent not ready in time:\n{agent.log_text()}")


def http(method: str, url: str, *, body: bytes | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="session")
def agent(sandbox_user: pwd.struct_passwd) -> Iterator[AgentProc]:
    a = start_agent(sandbox_user)
    yield a
    a.stop()
    if os.environ.get("CUBE_KEEP_TEST_DIRS") != "1":
        shutil.rmtree(a.base, ignore_errors=True)


@pytest.fixture(scope="session")
def gateway(agent: AgentProc) -> Iterator[Gateway]:
    gw = Gateway(envd_port=agent.envd_port, interpreter_port=agent.interpreter_port)
    gw.start()
    saved = {k: os.environ.get(k) for k in ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL",
                                            "E2B_DOMAIN", "E2B_DEBUG")}
    os.environ.update({
        "E2B_API_KEY": "e2b_0123456789abcdef",
        "E2B_API_URL": gw.url,
        "E2B_SANDBOX_URL": gw.url,
        "E2B_DOMAIN": "cube.localhost",
    })
    os.environ.pop("E2B_DEBUG", None)
    yield gw
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    gw.stop()


@pytest.fixture
def sbx(gateway: Gateway) -> Iterator[object]:
    from e2b import Sandbox

    s = Sandbox.create()
    yield s
    s.kill()


@pytest.fixture
def ci(gateway: Gateway) -> Iterator[object]:
    from e2b_code_interpreter import Sandbox

    s = Sandbox.create()
    yield s
    s.kill()
