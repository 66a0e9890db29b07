"""Plain envd routes, Connect wire details and robustness, against the agent directly."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import threading
import time
from http.client import HTTPConnection, HTTPResponse
from typing import Any

from conftest import AgentProc, http

JSON = {"Content-Type": "application/json"}
# The SDK's connection pool holds 200 connections and each attached command stream
# takes one, so the SDK-driven test stays below that; the raw test goes higher.
N_SDK = 150
N_RAW = 300


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def envelope(msg: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(msg).encode()
    return struct.pack(">BI", flags, len(data)) + data


def read_envelopes(resp: HTTPResponse) -> Any:
    while True:
        head = resp.read(5)
        if len(head) < 5:
            return
        flags, size = struct.unpack(">BI", head)
        yield flags, json.loads(resp.read(size))


def start_stream(agent: AgentProc, cmd: str) -> tuple[HTTPConnection, Any]:
    conn = HTTPConnection("127.0.0.1", agent.envd_port, timeout=60)
    body = envelope({"process": {"cmd": "/bin/bash", "args": ["-c", cmd]}})
    conn.request("POST", "/process.Process/Start", body=body,
                 headers={"Content-Type": "application/connect+json"})
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "application/connect+json"
    return conn, resp


def test_health_metrics_envs_init(agent: AgentProc) -> None:
    assert http("GET", f"{agent.envd_url}/health")[0] == 204
    status, body = http("GET", f"{agent.envd_url}/metrics")
    m = json.loads(body)
    assert status == 200
    for key in ("ts", "cpu_count", "cpu_used_pct", "mem_total", "mem_used", "disk_used",
                "disk_total"):
        assert key in m
    assert m["mem_total"] > m["mem_used"] > 0
    status, _ = http("POST", f"{agent.envd_url}/init",
                     body=json.dumps({"envVars": {"INIT_VAR": "x"}}).encode(), headers=JSON)
    assert status == 204
    assert json.loads(http("GET", f"{agent.envd_url}/envs")[1])["INIT_VAR"] == "x"


def test_connect_errors(agent: AgentProc) -> None:
    url = f"{agent.envd_url}/filesystem.Filesystem/Stat"
    status, body = http("POST", url, body=json.dumps({"path": "/nope/x"}).encode(), headers=JSON)
    assert status == 404
    assert json.loads(body) == {"code": "not_found", "message": "path '/nope/x' does not exist"}
    status, body = http("POST", url, body=b"{not json", headers=JSON)
    assert status == 400 and json.loads(body)["code"] == "invalid_argument"
    status, body = http("POST", url, body=b"{}",
                        headers={**JSON, "Authorization": "Basic bm9zdWNodXNlcjo="})  # nosuchuser:
    assert status == 401 and json.loads(body)["code"] == "unauthenticated"
    # A streaming call that fails still answers 200 with an end-of-stream error.
    conn = HTTPConnection("127.0.0.1", agent.envd_port, timeout=30)
    conn.request("POST", "/process.Process/Connect", body=envelope({"process": {"pid": 1 << 30}}),
                 headers={"Content-Type": "application/connect+json"})
    resp = conn.getresponse()
    assert resp.status == 200
    frames = list(read_envelopes(resp))
    assert frames == [(2, {"error": {"code": "not_found",
                                     "message": f"process with pid {1 << 30} not found"}})]
    conn.close()
    assert http("GET", f"{agent.envd_url}/health")[0] == 204  # still alive


def test_start_stream_wire_format(agent: AgentProc) -> None:
    conn, resp = start_stream(agent, "printf abc; exit 2")
    frames = list(read_envelopes(resp))
    conn.close()
    assert frames[0][0] == 0 and "pid" in frames[0][1]["event"]["start"]
    assert frames[1] == (0, {"event": {"data": {"stdout": "YWJj"}}})
    assert frames[2] == (0, {"event": {"end": {"exited": True, "status": "exit status 2",
                                               "exitCode": 2, "error": "exit status 2"}}})
    assert frames[3] == (2, {})


def test_disconnect_does_not_kill_or_leak(agent: AgentProc) -> None:
    conn, resp = start_stream(agent, "yes cube")
    gen = read_envelopes(resp)
    pid = next(gen)[1]["event"]["start"]["pid"]
    for _ in range(5):
        next(gen)
    conn.close()  # client goes away mid-stream
    time.sleep(0.5)
    listed = json.loads(http("POST", f"{agent.envd_url}/process.Process/List", body=b"{}",
                             headers=JSON)[1])
    assert pid in [p["pid"] for p in listed.get("processes", [])]
    # Nobody attached: output is dropped, the agent does not buffer it.
    before = rss_kib(agent.proc.pid)
    time.sleep(1.0)
    assert rss_kib(agent.proc.pid) - before < 20_000
    kill = {"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"}
    status, _ = http("POST", f"{agent.envd_url}/process.Process/SendSignal",
                     body=json.dumps(kill).encode(), headers=JSON)
    assert status == 200
    time.sleep(0.5)
    listed = json.loads(http("POST", f"{agent.envd_url}/process.Process/List", body=b"{}",
                             headers=JSON)[1])
    assert pid not in [p["pid"] for p in listed.get("processes", [])]


def test_100mb_output_streams_with_backpressure(agent: AgentProc) -> None:
    conn, resp = start_stream(agent, "head -c 100000000 /dev/urandom")
    total = 0
    peak = 0
    base = rss_kib(agent.proc.pid)
    for i, (flags, msg) in enumerate(read_envelopes(resp)):
        if flags == 0 and "data" in msg["event"]:
            total += len(base64.b64decode(msg["event"]["data"]["stdout"]))
        if i % 200 == 0:
            time.sleep(0.05)  # a slow reader
            peak = max(peak, rss_kib(agent.proc.pid) - base)
        if flags == 2:
            assert msg == {}
    conn.close()
    assert 99_990_000 < total <= 100_000_000
    assert peak < 64_000, f"agent grew by {peak} KiB"


def test_1gb_upload_streams_to_disk(agent: AgentProc) -> None:
    target = agent.home / "big.bin"
    size = 1 << 30
    block = os.urandom(1 << 20)
    peak = [0]
    base = rss_kib(agent.proc.pid)
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss_kib(agent.proc.pid) - base)
            time.sleep(0.1)

    t = threading.Thread(target=watch)
    t.start()
    conn = HTTPConnection("127.0.0.1", agent.envd_port, timeout=300)
    try:
        conn.putrequest("POST", f"/files?path={target}")
        conn.putheader("Content-Type", "application/octet-stream")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        for _ in range(size // len(block)):
            conn.send(b"%x\r\n" % len(block) + block + b"\r\n")
        conn.send(b"0\r\n\r\n")
        resp = conn.getresponse()
        body = json.loads(resp.read())
    finally:
        done.set()
        t.join()
        conn.close()
    assert resp.status == 200 and body[0]["path"] == str(target)
    assert target.stat().st_size == size
    target.unlink()
    assert peak[0] < 100_000, f"agent grew by {peak[0]} KiB during the upload"


def test_hundreds_of_concurrent_processes(gateway: Any) -> None:
    from e2b import AsyncSandbox

    async def main() -> None:
        s = await AsyncSandbox.create()
        try:
            barrier = "/tmp/cube-test-barrier-" + os.urandom(4).hex()
            wait = f"while [ ! -e {barrier} ]; do sleep 1; done"
            handles = await asyncio.gather(
                *(s.commands.run(f"{wait}; echo {i}", background=True) for i in range(N_SDK))
            )
            running = await s.commands.list()
            assert len({h.pid for h in handles} & {p.pid for p in running}) == N_SDK
            await s.files.write(barrier, "go")
            results = await asyncio.gather(*(h.wait() for h in handles))
            assert [r.stdout for r in results] == [f"{i}\n" for i in range(N_SDK)]
            await s.files.remove(barrier)
        finally:
            await s.kill()

    asyncio.run(main())


def test_300_detached_processes(agent: AgentProc) -> None:
    barrier = agent.home / "raw-barrier"
    pids = []
    for i in range(N_RAW):
        conn, resp = start_stream(
            agent, f"while [ ! -e {barrier} ]; do sleep 1; done; exit {i % 7}"
        )
        pids.append(next(read_envelopes(resp))[1]["event"]["start"]["pid"])
        conn.close()  # detach at once: the process keeps running
    listed = json.loads(http("POST", f"{agent.envd_url}/process.Process/List", body=b"{}",
                             headers=JSON)[1])
    assert set(pids) <= {p["pid"] for p in listed["processes"]}
    barrier.write_text("go")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        listed = json.loads(http("POST", f"{agent.envd_url}/process.Process/List", body=b"{}",
                                 headers=JSON)[1])
        if not set(pids) & {p["pid"] for p in listed.get("processes", [])}:
            break
        time.sleep(0.2)
    else:
        raise AssertionError("processes were not reaped")
    # Finished processes can still be connected to; their end is replayed.
    conn = HTTPConnection("127.0.0.1", agent.envd_port, timeout=30)
    conn.request("POST", "/process.Process/Connect", body=envelope({"process": {"pid": pids[3]}}),
                 headers={"Content-Type": "application/connect+json"})
    frames = list(read_envelopes(conn.getresponse()))
    conn.close()
    assert frames[1][1]["event"]["end"]["exitCode"] == 3
    barrier.unlink()
