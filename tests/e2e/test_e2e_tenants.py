"""Tenant boundaries on a real ``cube serve`` with real microVMs and the real SDK (issue 11).

One server for the module: the session's server, restarted on the same state with a sandbox
domain (``<port>-<id>.<domain>`` routing, what ``Sandbox.get_host`` returns) and quotas for one
team; restored afterwards. A representative subset of the attacks (the whole route table is
covered on the fakes by plugins/api_e2b/tests/test_e2b_tenants.py):

* team B gets 404 with team A's sandbox and snapshot ids (SDK calls and raw routes);
* a team at its quota gets 429 (the SDK's RateLimitException), a paused sandbox counts, killing it
  frees the slot;
* a process in a real sandbox that echoes request headers never sees the caller's API key,
  Authorization or cookies; a malformed port (the byte 0xB2) is a 400, not a 500.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from cube_e2e import CubeServer, free_port, with_e2b_options
from e2b import NotFoundException, RateLimitException, Sandbox, SandboxException

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

QUOTA_TEAM = "team-quota"
ECHO_PORT = 8000
ECHO_SERVER = """
import http.server, json
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("0.0.0.0", ECHO_PORT), H).serve_forever()
""".replace("ECHO_PORT", str(ECHO_PORT))


@dataclasses.dataclass(frozen=True)
class TenantServer:
    server: CubeServer
    domain: str
    key_q: str


@pytest.fixture(scope="module")
def tenants(cube_server: CubeServer) -> Iterator[TenantServer]:
    cube_server.stop()
    domain = f"cube.localhost:{free_port()}"
    config = cube_server.state_dir / "plugins-tenants.toml"
    config.write_text(with_e2b_options(cube_server.config.read_text(), f'domain = "{domain}"')
                      + f"\n[quotas.teams.{QUOTA_TEAM}]\nmax_sandboxes = 1\n")
    server = dataclasses.replace(cube_server, config=config, procs=[])
    try:
        out = server.keys("create", "--team", QUOTA_TEAM)
        assert out.returncode == 0, out.stderr
        server.start()
    except BaseException:  # the other modules still get the shared server back
        server.stop()
        cube_server.start()
        raise
    try:
        yield TenantServer(server=server, domain=domain, key_q=out.stdout.strip())
    finally:
        server.stop()
        cube_server.start()


def opts(server: CubeServer, key: str) -> dict[str, str]:
    return {"api_key": key, "api_url": server.url, "sandbox_url": server.url}


def test_team_b_gets_404_with_team_a_ids(tenants: TenantServer) -> None:
    server = tenants.server
    a, b = opts(server, server.key_a), opts(server, server.key_b)
    sbx = Sandbox.create(template="base", timeout=300, **a)
    try:
        snap = sbx.create_snapshot()
        sid, snap_id = sbx.sandbox_id, snap.snapshot_id
        with pytest.raises(NotFoundException):
            Sandbox.get_info(sid, **b)
        with pytest.raises(NotFoundException):
            Sandbox.connect(sid, **b)
        with pytest.raises(NotFoundException):
            Sandbox.set_timeout(sid, 1, **b)
        with pytest.raises(SandboxException, match="404: template .* not found"):
            Sandbox.create(template=snap_id, **b)  # create from A's snapshot: the SDK has no 404 class here
        assert Sandbox.kill(sid, **b) is False  # the SDK's answer to a 404
        assert sid not in [s.sandbox_id for s in Sandbox.list(**b).next_items()]
        hb = {"X-API-Key": server.key_b}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for method, path, body in [
                ("POST", f"/sandboxes/{sid}/pause", None),
                ("POST", f"/sandboxes/{sid}/fork", {"count": 1}),
                ("POST", f"/sandboxes/{sid}/snapshots", {}),
                ("POST", f"/sandboxes/{sid}/rollback", {"snapshotID": snap_id}),
                ("PUT", f"/sandboxes/{sid}/network", {"allowOut": ["8.8.8.8"]}),
                ("GET", f"/sandboxes/{sid}/network/audit", None),
                ("GET", f"/sandboxes/{sid}/metrics", None),
                ("DELETE", f"/templates/{snap_id}", None),
            ]:
                r = client.request(method, path, headers=hb, **({"json": body} if body is not None else {}))
                assert r.status_code == 404, (method, path, r.status_code, r.text)
                assert r.json()["code"] == 404
            assert client.get("/snapshots", headers=hb).json() == []
        # A's sandbox is untouched: running, its snapshot still there, its timeout not cut to 1 s
        time.sleep(2)
        assert sbx.is_running() and sbx.commands.run("echo ok").stdout.strip() == "ok"
        assert snap_id in [s.snapshot_id for s in Sandbox.list_snapshots(**a).next_items()]
        Sandbox.delete_snapshot(snap_id, **a)
    finally:
        sbx.kill()


def test_quota_is_429_paused_counts_and_a_kill_frees_the_slot(tenants: TenantServer) -> None:
    q = opts(tenants.server, tenants.key_q)
    first = Sandbox.create(template="base", timeout=300, **q)
    second = None
    try:
        first.pause()
        with pytest.raises(RateLimitException) as info:
            Sandbox.create(template="base", timeout=300, **q)
        assert "quota of 1 sandboxes" in str(info.value) and "paused" in str(info.value)
        with httpx.Client(timeout=60) as client:  # the E2B error body, no retry invited
            r = client.post(f"{tenants.server.url}/v2/sandboxes", json={"templateID": "base"},
                            headers={"X-API-Key": tenants.key_q})
            assert r.status_code == 429 and r.json()["code"] == 429 and r.headers["should-retry"] == "false"
        first.kill()
        second = Sandbox.create(template="base", timeout=300, **q)
        assert second.commands.run("echo ok").stdout.strip() == "ok"
    finally:
        for sbx in (first, second):
            if sbx is not None:
                sbx.kill()


def test_guest_never_sees_the_callers_credentials(tenants: TenantServer) -> None:
    server = tenants.server
    sbx = Sandbox.create(template="base", timeout=300, **opts(server, server.key_a))
    try:
        sbx.files.write("/tmp/echo.py", ECHO_SERVER)
        sbx.commands.run("python3 /tmp/echo.py", background=True)
        host = sbx.get_host(ECHO_PORT)  # <port>-<id>.<domain>: the SDK's own port routing
        assert host.startswith(f"{ECHO_PORT}-{sbx.sandbox_id}.")
        attacker_sees = {"X-API-Key": server.key_a, "Authorization": f"Bearer {server.key_a}",
                         "Cookie": f"session={server.key_a}", "X-Custom": "kept"}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            deadline = time.monotonic() + 120
            while True:
                r = client.get("/", headers={"Host": host, **attacker_sees})
                if r.status_code == 200 or time.monotonic() > deadline:
                    break
                assert r.status_code == 502, r.text  # port not open yet
                time.sleep(0.5)
            assert r.status_code == 200, r.text
            seen = r.json()
            assert seen["x-custom"] == "kept" and seen["host"] == host
            assert not {"x-api-key", "authorization", "cookie"} & set(seen), seen
            assert server.key_a not in json.dumps(seen)
            # the same through the E2B routing headers
            r = client.get("/", headers={"E2b-Sandbox-Id": sbx.sandbox_id, "E2b-Sandbox-Port": str(ECHO_PORT),
                                         **attacker_sees})
            assert r.status_code == 200 and server.key_a not in r.text and r.json()["x-custom"] == "kept"
            # a malformed port, with no key at all: 400 from the edge, never 500
            for raw in (b"\xb2", b"8\xb2", b"99999"):
                r = client.get("/", headers=[(b"E2b-Sandbox-Id", sbx.sandbox_id.encode()), (b"E2b-Sandbox-Port", raw)])
                assert r.status_code == 400, (raw, r.status_code, r.text)
            r = client.get("/", headers=[(b"Host", f"\xb2-{sbx.sandbox_id}.{tenants.domain}".encode("latin-1"))])
            assert r.status_code < 500, r.text
        # the SDK's envd user selector (Authorization: Basic) still reaches envd
        assert sbx.commands.run("whoami", user="root").stdout.strip() == "root"
    finally:
        sbx.kill()
