"""A hostile guest on a real ``cube serve`` with real microVMs and the real e2b SDK.

Inside sandbox A of team a, root kills the real guest agent (and its restart loop) and puts a
hostile script on the control port in its place. Then the host calls the guest (resume syncs the
clock; a fork personalizes its clone). The server stays healthy, sandbox B of team b keeps working,
new creates succeed, no request of anyone gets a 500, and A ends up stopped (state ``error``) with
a clear reason."""

from __future__ import annotations

import time

import httpx
import pytest
from cube_e2e import CubeServer
from e2b import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

HOSTILE = r'''
import json, os, signal, sys, time

mode = sys.argv[1]
if os.fork():
    sys.exit(0)
os.setsid()
if os.fork():
    os._exit(0)
null = os.open("/dev/null", os.O_RDWR)
for i in (0, 1, 2):
    os.dup2(null, i)
time.sleep(1)  # let envd answer the command that started us

port = None
for d in os.listdir("/sys/class/virtio-ports"):
    with open(f"/sys/class/virtio-ports/{d}/name") as f:
        if f.read().strip() == "cube.ctl":
            port = f"/dev/{d}"
for pid in os.listdir("/proc"):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        continue
    if b"cube_guest" in cmd and pid != str(os.getpid()):
        if ppid > 1:
            os.kill(ppid, signal.SIGKILL)  # cube-init's restart loop for the agent
        os.kill(int(pid), signal.SIGKILL)


def answer(fd, request):
    if mode == "wrong-types":  # the issue's example: a boot id that is an object, a clock that is text
        reply = {"id": request.get("id"), "ok": True, "boot_id": {}, "behind_ms": "a while"}
        os.write(fd, json.dumps(reply).encode() + b"\n")
    elif mode == "flood":
        while True:
            os.write(fd, b'{"event": "spam"}\n' * 1000)
    elif mode == "huge":
        while True:
            os.write(fd, b"x" * 65536)


while True:
    try:
        fd = os.open(port, os.O_RDWR)
    except OSError:
        time.sleep(0.05)
        continue
    buf = b""
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break  # the host side is closed (e.g. across a snapshot): reopen
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                try:
                    answer(fd, json.loads(line))
                except ValueError:
                    pass
    except OSError:
        pass
    os.close(fd)
    time.sleep(0.05)
'''


def _api(server: CubeServer, method: str, path: str, key: str, **kwargs: object) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers={"X-API-Key": key}, timeout=180,
                         **kwargs)  # type: ignore[arg-type]


def _turn_hostile(sbx: Sandbox, mode: str) -> None:
    sbx.files.write("/tmp/hostile.py", HOSTILE)
    sbx.commands.run(f"python3 /tmp/hostile.py {mode}", user="root", timeout=60)
    time.sleep(3)  # the agent is gone, the script holds the control port


def _assert_failed(server: CubeServer, sandbox_id: str, key: str, reason: str) -> None:
    r = _api(server, "GET", f"/sandboxes/{sandbox_id}", key)
    assert r.status_code == 404, r.text
    assert "was stopped: guest of" in r.text and reason in r.text, r.text


def _assert_others_fine(server: CubeServer, other: Sandbox) -> None:
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    assert other.commands.run("echo still-here").stdout.strip() == "still-here"
    for key in (server.key_a, server.key_b):
        assert _api(server, "GET", "/v2/sandboxes", key).status_code == 200


def test_hostile_guest_cannot_hurt_the_host_or_other_teams(e2b_env: CubeServer) -> None:
    server = e2b_env
    log_start = server.log.stat().st_size
    other = Sandbox.create(template="base", timeout=600, api_key=server.key_b)
    made: list[Sandbox] = [other]
    try:
        # 1. wrong types: a fork personalizes its clone (the hostile script came along in memory),
        #    a resume syncs the clock. Both get garbage; no record is poisoned.
        evil = Sandbox.create(template="base", timeout=600)
        made.append(evil)
        _turn_hostile(evil, "wrong-types")
        r = _api(server, "POST", f"/sandboxes/{evil.sandbox_id}/fork", server.key_a, json={"count": 1})
        assert r.status_code == 502, r.text
        assert "broke the control protocol: invalid personalize reply (boot_id" in r.text
        _assert_others_fine(server, other)
        fresh = Sandbox.create(template="base", timeout=120, api_key=server.key_b)  # creates still work
        made.append(fresh)
        assert fresh.commands.run("echo fresh").stdout.strip() == "fresh"

        evil.pause()
        r = _api(server, "POST", f"/sandboxes/{evil.sandbox_id}/connect", server.key_a, json={"timeout": 60})
        assert r.status_code == 502, r.text
        assert "invalid sync_clock reply (behind_ms" in r.text
        _assert_failed(server, evil.sandbox_id, server.key_a, "invalid sync_clock reply")
        _assert_others_fine(server, other)

        # 2. endless stream and 3. huge line, answered to the clock sync after a resume
        for mode, reason in (("flood", "lines or"), ("huge", "a line longer than 1048576 bytes")):
            bad = Sandbox.create(template="base", timeout=600)
            made.append(bad)
            _turn_hostile(bad, mode)
            bad.pause()
            started = time.monotonic()
            r = _api(server, "POST", f"/sandboxes/{bad.sandbox_id}/connect", server.key_a, json={"timeout": 60})
            assert r.status_code == 502, (mode, r.text)
            assert reason in r.text, (mode, r.text)
            assert time.monotonic() - started < 30, mode
            _assert_failed(server, bad.sandbox_id, server.key_a, reason)
            _assert_others_fine(server, other)

        again = Sandbox.create(template="base", timeout=120)  # team a itself can still create
        made.append(again)
        assert again.commands.run("echo ok").stdout.strip() == "ok"
    finally:
        for sbx in made:
            try:
                sbx.kill()
            except Exception:  # noqa: BLE001 - already stopped by the server
                pass
    new_log = server.log.read_bytes()[log_start:].decode(errors="replace")
    assert "Traceback" not in new_log and " 500 " not in new_log, new_log[-3000:]
