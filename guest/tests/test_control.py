"""The host control channel, with a Unix socket standing in for the virtio-serial port."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import socket
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import AgentProc, http, start_agent
from gateway import Gateway

TOKEN = "tok-" + "5" * 20
RANDOM_STATE = (
    "import random, hashlib, numpy\n"
    "hashlib.sha256(repr(random.getstate()).encode()"
    " + repr(numpy.random.get_state()).encode()).hexdigest()"
)


class Port:
    """The host side: listens where the agent's --ctl points, speaks JSON lines."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.buf = b""
        self.next_id = 0

    def accept(self, timeout: float = 60) -> None:
        self.listener.settimeout(timeout)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(timeout)
        self.buf = b""

    def read(self) -> dict[str, Any]:
        assert self.conn is not None
        while b"\n" not in self.buf:
            chunk = self.conn.recv(65536)
            if not chunk:
                raise EOFError("agent closed the control port")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return dict(json.loads(line))

    def call(self, op: str, **fields: Any) -> dict[str, Any]:
        assert self.conn is not None
        self.next_id += 1
        req_id = self.next_id
        self.conn.sendall(json.dumps({"id": req_id, "op": op, **fields}).encode() + b"\n")
        while True:
            msg = self.read()
            if msg.get("id") == req_id:
                return msg

    def close_conn(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@pytest.fixture(scope="module")
def ctl_agent(sandbox_user: Any, tmp_path_factory: Any) -> Iterator[tuple[AgentProc, Port]]:
    sock_dir = tmp_path_factory.mktemp("ctl")
    port = Port(str(sock_dir / "cube.ctl"))
    agent = start_agent(sandbox_user, interpreter=True, ctl=str(sock_dir / "cube.ctl"))
    port.accept()
    yield agent, port
    port.close_conn()
    agent.stop()
    shutil.rmtree(agent.base, ignore_errors=True)


@pytest.fixture(scope="module")
def ctl_gateway(ctl_agent: tuple[AgentProc, Port]) -> Iterator[Gateway]:
    agent, _ = ctl_agent
    gw = Gateway(envd_port=agent.envd_port, interpreter_port=agent.interpreter_port)
    gw.start()
    yield gw
    gw.stop()


def _conn(gw: Gateway) -> dict[str, str]:
    return {"api_key": "e2b_0123456789abcdef", "api_url": gw.url, "sandbox_url": gw.url}


def _entropy() -> str:
    return base64.b64encode(os.urandom(48)).decode()


def test_ready_and_ping(ctl_agent: tuple[AgentProc, Port]) -> None:
    _, port = ctl_agent
    ready = port.read()
    assert ready["event"] == "ready"
    with open("/proc/sys/kernel/random/boot_id") as fh:
        assert ready["boot_id"] == fh.read().strip()
    assert ready["interpreter"] is True
    pong = port.call("ping")
    assert pong["ok"] is True and pong["boot_id"] == ready["boot_id"]
    assert pong["uptime_s"] > 0


def test_errors(ctl_agent: tuple[AgentProc, Port]) -> None:
    _, port = ctl_agent
    bad = port.call("no_such_op")
    assert bad["ok"] is False and "unknown op" in bad["error"]
    short = port.call("reseed", entropy=base64.b64encode(b"x" * 8).decode())
    assert short["ok"] is False and "32 bytes" in short["error"]
    for bad_clock in ("now", None, 1.5, True):
        r = port.call("sync_clock", clock_ns=bad_clock)
        assert r["ok"] is False and "clock_ns" in r["error"], r


def test_sync_clock_without_system_calls(ctl_agent: tuple[AgentProc, Port]) -> None:
    _, port = ctl_agent  # the test agent runs on the host: it must not touch the host's clock
    r = port.call("sync_clock", clock_ns=1)
    assert r["ok"] is True and r["applied"] == [], r


def test_warm_up_runs_a_command_through_envd(ctl_agent: tuple[AgentProc, Port]) -> None:
    _, port = ctl_agent
    r = port.call("warm_up")
    assert r["ok"] is True, r
    assert r["events"] >= 2 and r["ms"] > 0, r  # the process's start and end events came back
    again = port.call("warm_up")  # and it can run again (nothing left in the way)
    assert again["ok"] is True, again


def test_exec_and_prepare_snapshot(ctl_agent: tuple[AgentProc, Port]) -> None:
    _, port = ctl_agent
    r = port.call("exec", cmd=["sh", "-c", "echo out; echo err >&2; exit 4"])
    assert r["ok"] and r["exit_code"] == 4
    assert r["stdout"] == "out\n" and r["stderr"] == "err\n"
    r = port.call("prepare_snapshot")
    assert r["ok"] and isinstance(r["closed_idle"], int)
    assert r["frozen"] > 1000, r  # the agent's objects left the collected generations


NODE_CA = "-----BEGIN CERTIFICATE-----\nTk9ERSBDQQ==\n-----END CERTIFICATE-----\n"


def test_install_trust_replaces_the_block_and_keeps_the_rest(tmp_path: Path) -> None:
    from cube_guest.system import install_trust

    bundle = tmp_path / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True)
    bundle.write_text("-----BEGIN CERTIFICATE-----\nU1lTVEVN\n-----END CERTIFICATE-----")
    system = bundle.read_text()
    assert install_trust(NODE_CA, system_root=str(tmp_path))
    assert not install_trust(NODE_CA, system_root=str(tmp_path))  # idempotent: nothing written
    other = NODE_CA.replace("Tk9ERSBDQQ==", "T1RIRVI=")  # another node's CA (a snapshot moved)
    assert install_trust(other, system_root=str(tmp_path))
    text = bundle.read_text()
    assert text.startswith(system + "\n") and other in text and NODE_CA not in text
    assert install_trust(None, system_root=str(tmp_path))
    assert bundle.read_text() == system + "\n"
    assert not (tmp_path / "usr/local/share/ca-certificates/cube-egress.crt").exists()


def test_install_trust_appends_in_place_to_a_bundle_without_it(tmp_path: Path) -> None:
    """A clone's first install (its template never had a node's CA) appends to the bundle in
    place instead of rewriting the whole ~220 KB file (each page written is guest RAM the clone
    owns): same inode, the system's CAs untouched, our block at the end."""
    from cube_guest.system import install_trust

    bundle = tmp_path / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True)
    system = "-----BEGIN CERTIFICATE-----\nU1lTVEVN\n-----END CERTIFICATE-----\n" * 100
    bundle.write_text(system)
    inode = bundle.stat().st_ino
    assert install_trust(NODE_CA, system_root=str(tmp_path))
    assert bundle.stat().st_ino == inode
    text = bundle.read_text()
    assert text.startswith(system)
    assert text.endswith(NODE_CA + "# cube: end of the node's egress CA\n")
    assert not install_trust(NODE_CA, system_root=str(tmp_path))


def test_install_trust_finds_a_block_that_is_no_longer_at_the_end(tmp_path: Path) -> None:
    from cube_guest.system import install_trust

    bundle = tmp_path / "etc/ssl/certs/ca-certificates.crt"
    bundle.parent.mkdir(parents=True)
    bundle.write_text("-----BEGIN CERTIFICATE-----\nU1lTVEVN\n-----END CERTIFICATE-----\n")
    assert install_trust(NODE_CA, system_root=str(tmp_path))
    # more than the tail it reads
    later = "-----BEGIN CERTIFICATE-----\nTEFURVI=\n-----END CERTIFICATE-----\n" * 1000
    with bundle.open("a") as fh:
        fh.write(later)
    other = NODE_CA.replace("Tk9ERSBDQQ==", "T1RIRVI=")
    assert install_trust(other, system_root=str(tmp_path))
    text = bundle.read_text()
    assert NODE_CA not in text and text.count(other) == 1 and later in text


def test_apply_after_identity_at_join(ctl_agent: tuple[AgentProc, Port]) -> None:
    """A pool member personalized as its future sandbox (token included) warms up through envd
    with its own token; at create, ``apply`` sets the env vars and, for a non-secure sandbox,
    clears the token."""
    agent, port = ctl_agent
    r = port.call("personalize", sandbox_id="isbxjoin", template_id="base", env_vars={},
                  access_token=TOKEN, hostname="isbxjoin", clock_ns=time.time_ns(),
                  entropy=_entropy(), trust_pem=NODE_CA)
    assert r["ok"] is True and "trust" in r["applied"], r
    try:
        r = port.call("warm_up")
        assert r["ok"] is True and r["events"] >= 1, r
        for bad in ({"env_vars": {}}, {"clock_ns": "now"}, {"clock_ns": 1, "env_vars": []},
                    {"clock_ns": 1, "keep_token": "no"}):
            assert port.call("apply", **bad)["ok"] is False, bad
        status, _ = http("GET", f"{agent.envd_url}/envs")
        assert status == 401  # still the member's token
        r = port.call("apply", clock_ns=time.time_ns(), env_vars={"A_VAR": "at-create",
                      "NODE_EXTRA_CA_CERTS": "/mine.pem"}, keep_token=False)
        assert r["ok"] is True and "env_vars" in r["applied"], r
        status, body = http("GET", f"{agent.envd_url}/envs")
        assert status == 200, body  # a non-secure sandbox: no token any more
        envs = json.loads(body)
        assert envs["A_VAR"] == "at-create" and envs["E2B_SANDBOX_ID"] == "isbxjoin"
        # the node's CA: in the system bundle, and the tools with their own CA list pointed at
        # it, unless the sandbox's env vars say otherwise
        bundle = agent.sysroot / "etc/ssl/certs/ca-certificates.crt"
        assert bundle.read_text().count(NODE_CA) == 1
        local = agent.sysroot / "usr/local/share/ca-certificates/cube-egress.crt"
        assert local.read_text() == NODE_CA
        system = "/etc/ssl/certs/ca-certificates.crt"
        assert envs["SSL_CERT_FILE"] == envs["REQUESTS_CA_BUNDLE"] == system
        assert envs["NODE_EXTRA_CA_CERTS"] == "/mine.pem"
    finally:
        port.call("personalize", entropy=_entropy(), access_token=None, env_vars={})


def test_personalize(ctl_agent: tuple[AgentProc, Port], ctl_gateway: Gateway) -> None:
    from e2b_code_interpreter import Sandbox

    agent, port = ctl_agent
    sbx = Sandbox.create(**_conn(ctl_gateway))
    before = sbx.run_code(RANDOM_STATE).text
    assert before and sbx.run_code(RANDOM_STATE).text == before  # reading does not change it
    bash_before = sbx.run_code("echo $RANDOM $RANDOM", language="bash").logs.stdout
    machine_id_before = (agent.sysroot / "etc/machine-id").read_text() \
        if (agent.sysroot / "etc/machine-id").exists() else ""

    reply = port.call(
        "personalize",
        sandbox_id="isbxtest",
        template_id="code-interpreter-v1",
        env_vars={"P_VAR": "personal"},
        access_token=TOKEN,
        hostname="sbx-test",
        clock_ns=time.time_ns(),
        entropy=_entropy(),
        metadata={"k": "v"},
    )
    assert reply["ok"] is True, reply
    assert reply["boot_id"]
    assert {"agent_random", "kernels", "hostname", "machine_id"} <= set(reply["applied"])

    # /execute now needs the token.
    from e2b import SandboxException

    with pytest.raises(SandboxException, match="401"):
        sbx.run_code("1")
    ctl_gateway.access_token = TOKEN
    # Every running kernel was reseeded (same default context, new state).
    after = Sandbox.create(**_conn(ctl_gateway)).run_code(RANDOM_STATE).text
    ctl_gateway.access_token = None
    assert after and after != before
    # /etc files under the test system root.
    assert (agent.sysroot / "etc/hostname").read_text() == "sbx-test\n"
    assert "127.0.1.1\tsbx-test" in (agent.sysroot / "etc/hosts").read_text()
    machine_id = (agent.sysroot / "etc/machine-id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{32}", machine_id) and machine_id != machine_id_before.strip()

    # The access token now protects envd.
    status, body = http("POST", f"{agent.envd_url}/process.Process/List", body=b"{}",
                        headers={"Content-Type": "application/json"})
    assert status == 401 and json.loads(body)["code"] == 401
    status, _ = http("POST", f"{agent.envd_url}/process.Process/List", body=b"{}",
                     headers={"Content-Type": "application/json", "X-Access-Token": TOKEN})
    assert status == 200
    assert http("GET", f"{agent.envd_url}/health")[0] == 204  # health stays open
    status, _ = http("GET", f"{agent.envd_url}/envs")
    assert status == 401

    # The SDK without the token is refused; with it, env vars are there.
    from e2b import AuthenticationException
    from e2b import Sandbox as BaseSandbox

    with pytest.raises(AuthenticationException):
        BaseSandbox.create(**_conn(ctl_gateway)).commands.run("true")
    ctl_gateway.access_token = TOKEN
    try:
        s2 = BaseSandbox.create(**_conn(ctl_gateway))
        r = s2.commands.run("echo $P_VAR $E2B_SANDBOX_ID")
        assert r.stdout == "personal isbxtest\n"
        # Interpreter contexts pick up the new sandbox env vars too.
        s3 = Sandbox.create(**_conn(ctl_gateway))
        assert s3.run_code("import os; os.environ['P_VAR']").text == "personal"
        _check_signed_urls(agent, s2)
    finally:
        ctl_gateway.access_token = None
        port.call("personalize", entropy=_entropy(), access_token=None, env_vars={})
    assert bash_before  # the bash context existed and was reseeded without error


def _check_signed_urls(agent: AgentProc, sbx: Any) -> None:
    from e2b.sandbox.signature import get_signature

    sbx.files.write("signed.txt", "secret content")

    def url(op: str, expiration: int | None = None, user: str | None = None) -> str:
        path = f"{agent.home}/signed.txt"
        sig = get_signature(path, op, user, TOKEN, expiration)
        q = {"path": path, "signature": sig["signature"]}
        if user:
            q["username"] = user
        if sig.get("expiration"):
            q["signature_expiration"] = str(sig["expiration"])
        return f"{agent.envd_url}/files?{urllib.parse.urlencode(q)}"

    assert http("GET", url("read")) == (200, b"secret content")
    assert http("GET", url("read", expiration=60))[0] == 200
    status, body = http("GET", url("read", expiration=-10))
    assert status == 401
    assert json.loads(body) == {"code": 401, "message": "signature is already expired"}
    assert http("GET", url("write"))[0] == 401  # signed for another operation
    assert http("GET", url("read", user="root"))[0] == 200
    status, _ = http("POST", url("write"), body=b"via signed url",
                     headers={"Content-Type": "application/octet-stream"})
    assert status == 200
    assert sbx.files.read("signed.txt") == "via signed url"
    no_sig = f"{agent.envd_url}/files?path=signed.txt"
    assert http("GET", no_sig)[0] == 401


def test_reconnect_resends_ready(ctl_agent: tuple[AgentProc, Port]) -> None:
    _, port = ctl_agent
    port.close_conn()
    port.accept(timeout=30)
    ready = port.read()
    assert ready["event"] == "ready"
    assert port.call("ping")["ok"] is True


def test_observe_metrics_and_process_events(
    ctl_agent: tuple[AgentProc, Port], ctl_gateway: Gateway
) -> None:
    """``observe``: a metrics sample and the event log after a cursor (process start, exit with
    its code, a failed start); ``personalize`` clears the log (earlier events are not the new
    sandbox's)."""
    from e2b import CommandExitException
    from e2b import Sandbox as BaseSandbox

    _, port = ctl_agent
    assert port.call("personalize", entropy=_entropy(), access_token=None, env_vars={},
                     sandbox_id="isbxlogs")["ok"]
    first = port.call("observe", after=0, limit=100)
    assert first["ok"], first
    metrics = first["metrics"]
    assert metrics["cpu_count"] >= 1 and metrics["mem_total"] > metrics["mem_used"] > 0
    assert metrics["disk_total"] > 0 and 0 <= metrics["cpu_used_pct"] <= 100
    assert [e["message"] for e in first["logs"]] == ["sandbox started"]
    assert first["logs"][0]["fields"]["sandbox_id"] == "isbxlogs"
    cursor = first["last_seq"]

    sbx = BaseSandbox.create(**_conn(ctl_gateway))
    assert sbx.commands.run("echo hi").exit_code == 0
    with pytest.raises(CommandExitException):
        sbx.commands.run("exit 3")
    with pytest.raises(Exception, match="does-not-exist"):
        sbx.commands.run("true", cwd="/does-not-exist")
    got = port.call("observe", after=cursor, limit=100)["logs"]
    started = [e for e in got if e["message"] == "process started"]
    exited = [e for e in got if e["message"] == "process exited"]
    assert [e["fields"]["cmd"] for e in started] == [
        "/bin/bash -l -c echo hi", "/bin/bash -l -c exit 3"]
    assert [(e["fields"]["exit_code"], e["level"]) for e in exited] == [
        ("0", "info"), ("3", "warn")]
    assert exited[1]["fields"]["status"] == "exit status 3"
    [failed] = [e for e in got if e["level"] == "error"]
    assert failed["message"] == "process failed to start: cwd '/does-not-exist' does not exist"
    assert [e["fields"]["pid"] for e in exited] == [e["fields"]["pid"] for e in started]
    assert all(e["seq"] > cursor for e in got)
    assert [e["seq"] for e in got] == sorted(e["seq"] for e in got)
    assert got[0]["ts_ms"] <= got[-1]["ts_ms"] and got[0]["ts_ms"] > (time.time() - 600) * 1000
    assert port.call("observe", after=got[-1]["seq"], limit=100)["logs"] == []
    assert len(port.call("observe", after=cursor, limit=1)["logs"]) == 1
    assert not port.call("observe", after=-1, limit=5)["ok"]

    port.call("personalize", entropy=_entropy(), access_token=None, env_vars={})
    again = port.call("observe", after=0, limit=100)["logs"]
    assert [e["message"] for e in again] == ["sandbox started"]


def test_set_aslr_writes_only_a_change(tmp_path: Path) -> None:
    from cube_guest.system import set_aslr

    knob = tmp_path / "randomize_va_space"
    knob.write_text("2\n")
    assert not set_aslr(True, path=str(knob)) and knob.read_text() == "2\n"
    assert set_aslr(False, path=str(knob)) and knob.read_text() == "0\n"
    assert not set_aslr(False, path=str(knob))
    assert set_aslr(True, path=str(knob)) and knob.read_text() == "2\n"
    knob.write_text("1\n")  # the image's own choice of "on" is kept
    assert not set_aslr(True, path=str(knob)) and knob.read_text() == "1\n"
