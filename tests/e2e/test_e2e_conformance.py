"""E2B conformance seen from a new user's seat (issue 14 section 0): the unmodified SDKs against a
real ``cube serve`` with real microVMs, in single-URL mode and in domain mode (TLS) at once.

One server for the module: the session's server, restarted on the same state with a domain
(``[[api]] options.domain``), so plain HTTP on the API port (``E2B_SANDBOX_URL`` mode) and TLS on
the domain port (``E2B_DOMAIN`` mode) reach the same sandboxes. Four sandboxes: one base sandbox
shared by the file/PTY/URL tests, one killed in each mode, one code interpreter. The domain-mode
SDK runs in a child process (its TLS stack reads ``SSL_CERT_FILE`` once per process).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
import subprocess
import sys
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from cube_e2e import CubeServer, free_port, with_e2b_options
from e2b import AsyncSandbox, CommandExitException, PtySize, Sandbox, SandboxNotRunningException

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

MEASURED: dict[str, float] = {}


@dataclasses.dataclass(frozen=True)
class ConformanceServer:
    server: CubeServer
    domain: str
    """``cube.localhost:<tls port>``"""
    ca: str


@pytest.fixture(scope="module")
def conf(cube_server: CubeServer) -> Iterator[ConformanceServer]:
    cube_server.stop()
    domain = f"cube.localhost:{free_port()}"
    config = cube_server.state_dir / "plugins-conformance.toml"
    config.write_text(with_e2b_options(cube_server.config.read_text(), f'domain = "{domain}"'))
    server = dataclasses.replace(cube_server, config=config, procs=[])
    started = time.monotonic()
    try:
        server.start()
    except BaseException:  # the other modules still get the shared server back
        server.stop()
        cube_server.start()
        raise
    MEASURED["serve_restart_s"] = round(time.monotonic() - started, 2)
    try:
        yield ConformanceServer(server=server, domain=domain, ca=str(cube_server.state_dir / "tls" / "ca.pem"))
    finally:
        server.stop()
        cube_server.start()
        print("\nconformance e2e measurements:", json.dumps(MEASURED, indent=1, sort_keys=True))


@pytest.fixture
def header_mode(conf: ConformanceServer, monkeypatch: pytest.MonkeyPatch) -> ConformanceServer:
    for name, value in conf.server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    return conf


@pytest.fixture(scope="module")
def sbx(conf: ConformanceServer) -> Iterator[Sandbox]:
    s = Sandbox.create(timeout=600, api_key=conf.server.key_a, api_url=conf.server.url,
                       sandbox_url=conf.server.url)
    yield s
    s.kill()


# -- files ---------------------------------------------------------------------------------------

def test_write_without_metadata_clears_it(sbx: Sandbox) -> None:
    # in the home directory (ext4): the guest's /tmp is a tmpfs without user xattrs
    sbx.files.write("meta.txt", "1", metadata={"owner": "alice"})
    assert sbx.files.get_info("meta.txt").metadata == {"owner": "alice"}
    info = sbx.files.write("meta.txt", "2")
    assert not info.metadata
    assert not sbx.files.get_info("meta.txt").metadata


# -- PTY -----------------------------------------------------------------------------------------

def _pty_until(handle: Any, marker: bytes) -> bytes:
    out = bytearray()
    for _, _, pty in handle:
        out.extend(pty or b"")
        if marker in out:
            break
    return bytes(out)


def test_pty_connect_gets_what_follows(sbx: Sandbox) -> None:
    h = sbx.pty.create(PtySize(rows=24, cols=80), timeout=120)
    sbx.pty.send_stdin(h.pid, b"echo first-$((6*7))\n")
    assert b"first-42" in _pty_until(h, b"first-42")
    h.disconnect()
    again = sbx.pty.connect(h.pid, timeout=60)
    sbx.pty.send_stdin(h.pid, b"echo second-$((6*8))\n")
    assert b"second-48" in _pty_until(again, b"second-48")
    sbx.pty.send_stdin(h.pid, b"exit\n")
    assert again.wait().exit_code == 0


def test_pty_connect_while_the_first_viewer_stays(sbx: Sandbox) -> None:
    """E2B's own pattern: connect right after create, the first handle never read."""
    out: list[bytes] = []
    terminal = sbx.pty.create(PtySize(80, 24), envs={"ABC": "123"}, cwd="/", timeout=120)
    connected = sbx.pty.connect(terminal.pid, timeout=120)
    assert connected.pid == terminal.pid
    sbx.pty.send_stdin(terminal.pid, b"echo $ABC\nexit\n")
    assert connected.wait(on_pty=out.append).exit_code == 0
    assert b"123" in b"".join(out)


async def test_pty_reconnect_async(sbx: Sandbox, conf: ConformanceServer) -> None:
    """The async SDK (on the module's sandbox): on_data handlers, disconnect, connect again."""
    asbx = await AsyncSandbox.connect(sbx.sandbox_id, api_key=conf.server.key_a, api_url=conf.server.url,
                                      sandbox_url=conf.server.url)
    first: list[bytes] = []
    again: list[bytes] = []
    terminal = await asbx.pty.create(PtySize(80, 24), on_data=first.append, envs={"FOO": "bar"})
    await asbx.pty.send_stdin(terminal.pid, b"echo $FOO-1\n")
    for _ in range(100):
        if b"bar-1" in b"".join(first):
            break
        await asyncio.sleep(0.1)
    await terminal.disconnect()
    reconnected = await asbx.pty.connect(terminal.pid, on_data=again.append)
    await asbx.pty.send_stdin(terminal.pid, b"echo $FOO-2\nexit\n")
    assert (await reconnected.wait()).exit_code == 0
    assert b"bar-1" in b"".join(first)
    assert b"bar-2" in b"".join(again)


# -- signed file URLs ----------------------------------------------------------------------------

def _signed_round_trip(urls: Sandbox, sbx: Sandbox, client: httpx.Client, name: str, *,
                       headers: dict[str, str], url_of: Any = lambda u: u) -> None:
    """Upload and download through the signed URLs ``urls`` makes; ``sbx`` checks the file."""
    up = url_of(urls.upload_url(name, use_signature_expiration=120))
    assert "signature=" in up and "signature_expiration=" in up
    r = client.post(up, files={"file": (name, b"signed payload")}, headers=headers)
    assert r.status_code == 200, r.text
    assert sbx.files.read(name) == "signed payload"
    down = url_of(urls.download_url(name))
    r = client.get(down, headers=headers)
    assert r.status_code == 200 and r.content == b"signed payload", (r.status_code, r.text)
    # a wrong signature is refused by envd, through the edge
    bad = down.replace("signature=v1_", "signature=v1_x")
    assert client.get(bad, headers=headers).status_code == 401


def test_signed_urls_in_header_mode(sbx: Sandbox, header_mode: ConformanceServer) -> None:
    url = sbx.download_url("/tmp/nothing-here")
    assert url.startswith(header_mode.server.url + "/files?")
    with httpx.Client(timeout=60) as client:
        # the bare URL names no sandbox: a clear 4xx saying so, not the control plane's 404/401
        r = client.get(url)
        assert r.status_code == 400, (r.status_code, r.text)
        assert "E2b-Sandbox-Id" in r.json()["message"] and "E2B_DOMAIN" in r.json()["message"]
        r = client.post(sbx.upload_url("/tmp/x"), files={"file": ("x", b"x")})
        assert r.status_code == 400, (r.status_code, r.text)
        # with the routing headers the SDK itself sends, the signed URL works
        routing = {"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": "49983"}
        _signed_round_trip(sbx, sbx, client, "/tmp/signed-header.txt", headers=routing)


def test_signed_urls_in_domain_mode(sbx: Sandbox, conf: ConformanceServer) -> None:
    # the API over plain HTTP, sandbox URLs from the domain (the "hybrid" set-up of docs/api.md)
    ds = Sandbox.connect(sbx.sandbox_id, api_key=conf.server.key_a, api_url=conf.server.url,
                         domain=conf.domain)
    host = f"49983-{sbx.sandbox_id}.{conf.domain}"
    assert ds.download_url("/tmp/x").startswith(f"https://{host}/files?")
    hostname, port = host.rsplit(":", 1)

    def via_loopback(u: str) -> str:
        # *.localhost is loopback, but the system resolver httpx uses may not know it: connect to
        # 127.0.0.1 and keep the name for SNI and Host
        return urllib.parse.urlsplit(u)._replace(netloc=f"127.0.0.1:{port}").geturl()

    class SniTransport(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            request.extensions["sni_hostname"] = hostname
            request.headers["Host"] = host
            return super().handle_request(request)

    tls = ssl.create_default_context(cafile=conf.ca)
    with httpx.Client(timeout=60, transport=SniTransport(verify=tls)) as client:
        _signed_round_trip(ds, sbx, client, "/tmp/signed-domain.txt", headers={}, url_of=via_loopback)


# -- the SDK in domain mode, in a process of its own (the SDK's TLS stack reads SSL_CERT_FILE once)


def run_sdk(conf: ConformanceServer, script: str, timeout: float = 600) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env.update(E2B_API_KEY=conf.server.key_a, E2B_DOMAIN=conf.domain, SSL_CERT_FILE=conf.ca)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


KILL_SCRIPT = """
import json, threading, time
from e2b import Sandbox
victim = Sandbox.create(timeout=600)
handle = victim.commands.run("while true; do echo tick; sleep 0.5; done", background=True, timeout=0)
outcome = []
def wait():
    try:
        outcome.append(("result", repr(handle.wait())))
    except BaseException as exc:
        outcome.append((type(exc).__name__, str(exc)))
waiter = threading.Thread(target=wait, daemon=True)
waiter.start()
time.sleep(2)
alive_before = not outcome
killed_at = time.monotonic()
victim.kill()
waiter.join(60)
print(json.dumps({"alive_before": alive_before, "outcome": outcome,
                  "after_kill_s": round(time.monotonic() - killed_at, 2),
                  "running": victim.is_running()}))
"""


def _check_kill(out: dict[str, Any], mode: str) -> None:
    MEASURED[f"stream_end_after_kill_{mode}_s"] = out["after_kill_s"]
    assert out["alive_before"], out
    assert out["outcome"], f"the command's stream did not end after kill(): {out}"
    kind, message = out["outcome"][0]
    assert kind == "SandboxNotRunningException", out
    assert "killed or reached its" in message, out
    assert out["running"] is False, out


def test_kill_ends_a_streaming_command_in_domain_mode(conf: ConformanceServer) -> None:
    _check_kill(run_sdk(conf, KILL_SCRIPT), "domain")


RESTART_SCRIPT = """
import json, threading, time
from e2b_code_interpreter import Sandbox
ci = Sandbox.create(timeout=600)
probes = []
def probe(stop):
    while not stop.is_set():
        try:
            probes.append(ci.is_running())
        except Exception as exc:
            probes.append(f"{type(exc).__name__}: {exc}")
        time.sleep(0.2)
def restart(ctx):
    stop = threading.Event()
    prober = threading.Thread(target=probe, args=(stop,))
    prober.start()
    started = time.monotonic()
    try:
        ci.restart_code_context(ctx)
        error = None
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    stop.set()
    prober.join()
    return error, round(time.monotonic() - started, 2)
try:
    ctx = ci.create_code_context()
    ci.run_code("kept = 1", context=ctx)
    ci.run_code("kept_default = 1")
    error, took = restart(ctx)
    after = ci.run_code("kept", context=ctx)
    default_ctx = next(c for c in ci.list_code_contexts() if c.id != ctx.id and c.language == "python")
    default_error, default_took = restart(default_ctx)
    default_after = ci.run_code("kept_default")
    out = {"error": error, "took_s": took, "running": ci.is_running(),
           "after": after.error.name if after.error else after.text,
           "fresh": ci.run_code("21 * 2", context=ctx).text,
           "default_error": default_error, "default_took_s": default_took,
           "default_after": default_after.error.name if default_after.error else default_after.text,
           "default": ci.run_code("40 + 2").text,
           "probes_not_running": [p for p in probes if p is not True], "probes": len(probes)}
    # then a kill under a running cell: the SDK tells it was killed
    killed = []
    def long_cell():
        try:
            code = "import time\\nfor i in range(600):\\n    print(i); time.sleep(0.5)"
            killed.append(("result", repr(ci.run_code(code))))
        except Exception as exc:
            killed.append((type(exc).__name__, str(exc)))
    cell = threading.Thread(target=long_cell)
    cell.start()
    time.sleep(3)
    ci.kill()
    cell.join(60)
    out["killed_cell"] = killed
    print(json.dumps(out))
finally:
    ci.kill()
"""


def test_restart_context_then_kill_under_a_cell_in_domain_mode(conf: ConformanceServer) -> None:
    out = run_sdk(conf, RESTART_SCRIPT)
    MEASURED["restart_context_domain_s"] = out["took_s"]
    MEASURED["restart_default_context_domain_s"] = out["default_took_s"]
    assert out == {**out, "error": None, "running": True, "after": "NameError", "fresh": "42",
                   "default_error": None, "default_after": "NameError", "default": "42",
                   "probes_not_running": []}, out
    assert out["probes"] > 0
    (kind, message), = out["killed_cell"]
    assert kind == "TimeoutException" and "sandbox was killed" in message, out["killed_cell"]


# -- kill ----------------------------------------------------------------------------------------

def test_kill_ends_a_streaming_command_as_e2b_does(conf: ConformanceServer) -> None:
    victim = Sandbox.create(timeout=600, api_key=conf.server.key_a, api_url=conf.server.url,
                            sandbox_url=conf.server.url)
    handle = victim.commands.run("while true; do echo tick; sleep 0.5; done", background=True,
                                 timeout=0)
    outcome: list[BaseException | object] = []

    def wait() -> None:
        try:
            outcome.append(handle.wait())
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    time.sleep(2)
    assert not outcome, outcome
    killed_at = time.monotonic()
    assert victim.kill()
    waiter.join(60)
    MEASURED["stream_end_after_kill_s"] = round(time.monotonic() - killed_at, 2)
    assert outcome, "the command's stream did not end after kill()"
    err = outcome[0]
    assert isinstance(err, SandboxNotRunningException), repr(err)
    assert not isinstance(err, CommandExitException)
    assert "killed or reached its" in str(err)
    assert not victim.is_running()
    # the edge answers for the dead sandbox as E2B does: 502 "... was not found"
    r = httpx.get(f"{conf.server.url}/health", headers={"E2b-Sandbox-Id": victim.sandbox_id,
                                                       "E2b-Sandbox-Port": "49983"})
    assert r.status_code == 502 and "was not found" in r.json()["message"], r.text
