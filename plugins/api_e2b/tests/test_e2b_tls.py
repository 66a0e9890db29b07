"""Domain mode: the generated CA and certificate, Hypercorn serving TLS with h2 + HTTP/1.1, Host-based
routing over TLS, and the real SDK (in a subprocess, with E2B_DOMAIN and SSL_CERT_FILE) against it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import stat
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cube_core import ConfigError
from cube_core.app import create_app
from cube_core.config import parse_config
from e2b_helpers import Upstream, e2b_config_text, free_port, serve

from cube_api_e2b.server import serve as hypercorn_serve
from cube_api_e2b.tls import ensure_certificates


def test_certificates(tmp_path: Path) -> None:
    files = ensure_certificates(tmp_path / "tls", "cube.localhost")
    assert files.names == ("*.cube.localhost", "api.cube.localhost", "cube.localhost")
    for key in (files.key, tmp_path / "tls" / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    leaf, ca = x509.load_pem_x509_certificates(files.cert.read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert ca.subject == x509.load_pem_x509_certificate(files.ca_cert.read_bytes()).subject
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == set(files.names)
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # a TLS server can load it and a client trusting only ca.pem accepts it
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(files.cert, files.key)
    client = ssl.create_default_context(cafile=str(files.ca_cert))
    assert client.cert_store_stats()["x509_ca"] == 1
    # idempotent: the same files, not rewritten; another domain gets its own leaf from the same CA
    mtime = files.cert.stat().st_mtime_ns
    assert ensure_certificates(tmp_path / "tls", "cube.localhost") == files
    assert files.cert.stat().st_mtime_ns == mtime
    other = ensure_certificates(tmp_path / "tls", "sbx.example.test")
    assert other.cert != files.cert and other.ca_cert == files.ca_cert
    with pytest.raises(ConfigError, match="one label"):
        ensure_certificates(tmp_path / "tls", "localhost")


@contextlib.asynccontextmanager
async def domain_server(plugin_host, tmp_path: Path):
    """A Cube app served by Hypercorn: TLS (h2 + http/1.1) on one port, plain HTTP on another."""
    tls_port, plain_port = free_port(), free_port()
    domain = f"cube.localhost:{tls_port}"
    host = plugin_host(parse_config(e2b_config_text(tmp_path / "state", {"domain": domain, "admin_port": 0})))
    app = create_app(host, build_templates=True)
    plugin = host.plugins["api:e2b"]
    tls = plugin.tls_files()
    config = plugin.domain_server_config("127.0.0.1", plain_port)
    assert tls is not None and config is not None
    assert config.bind == [f"127.0.0.1:{tls_port}"] and config.insecure_bind == [f"127.0.0.1:{plain_port}"]
    stop = asyncio.Event()
    task = asyncio.create_task(hypercorn_serve(app, config, shutdown_trigger=stop.wait))
    try:
        await asyncio.wait_for(app.state.agent.ready.wait(), timeout=30)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", tls_port)
                writer.close()
                break
            assert time.monotonic() < deadline, "hypercorn did not start"
            await asyncio.sleep(0.05)
        yield app, tls, tls_port, plain_port
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=15)


def tls_client(tls, http2: bool = True) -> httpx.AsyncClient:
    ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
    return httpx.AsyncClient(verify=ctx, http2=http2, timeout=10)


async def test_domain_mode_over_tls(plugin_host, tmp_path, upstream) -> None:
    up, up_port = upstream
    async with domain_server(plugin_host, tmp_path) as (app, tls, tls_port, plain_port):
        key = app.state.service.create_api_key("tls-team")[1]
        api_host = "api.cube.localhost"
        async with tls_client(tls) as client:
            r = await client.post(f"https://127.0.0.1:{tls_port}/v2/sandboxes", json={"templateID": "base"},
                                  headers={"Host": f"{api_host}:{tls_port}", "X-API-Key": key},
                                  extensions={"sni_hostname": api_host})
            assert r.status_code == 201 and r.http_version == "HTTP/2"
            sid = r.json()["sandboxID"]
            assert r.json()["domain"] == f"cube.localhost:{tls_port}"
            sbx_host = f"{up_port}-{sid}.cube.localhost"
            started, arrivals = time.monotonic(), []
            async with client.stream("GET", f"https://127.0.0.1:{tls_port}/stream?n=3&delay=0.3",
                                     headers={"Host": f"{sbx_host}:{tls_port}"},
                                     extensions={"sni_hostname": sbx_host}) as r:
                assert r.status_code == 200 and r.http_version == "HTTP/2"
                async for line in r.aiter_lines():
                    if line:
                        arrivals.append(time.monotonic() - started)
            assert len(arrivals) == 3 and arrivals[0] < 0.5 and arrivals[-1] - arrivals[0] > 0.4

            async def body():
                for _ in range(3):
                    yield b"z" * 5000
                    await asyncio.sleep(0.2)

            r = await client.post(f"https://127.0.0.1:{tls_port}/upload", content=body(),
                                  headers={"Host": f"{sbx_host}:{tls_port}"}, extensions={"sni_hostname": sbx_host})
            assert r.status_code == 200 and r.json()["bytes"] == 15000  # an h2 body with no length, streamed
            r = await client.get(f"https://127.0.0.1:{tls_port}/health",
                                 headers={"Host": f"{free_port()}-{sid}.cube.localhost:{tls_port}"},
                                 extensions={"sni_hostname": sbx_host})
            assert r.status_code == 502 and "port is not open" in r.text
        async with tls_client(tls, http2=False) as client:  # downloads and the interpreter force HTTP/1.1
            r = await client.get(f"https://127.0.0.1:{tls_port}/headers",
                                 headers={"Host": f"{sbx_host}:{tls_port}"}, extensions={"sni_hostname": sbx_host})
            assert r.status_code == 200 and r.http_version == "HTTP/1.1"
            assert r.json()["x-forwarded-proto"] == "https"
        async with httpx.AsyncClient() as client:  # the plain listener serves the same app
            r = await client.get(f"http://127.0.0.1:{plain_port}/v2/sandboxes", headers={"X-API-Key": key})
            assert r.status_code == 200 and [s["sandboxID"] for s in r.json()] == [sid]
            # the app's lifespan started the metrics server (admin_port 0: any free port)
            metrics = app.state.host.plugins["api:e2b"].metrics_server
            assert metrics is not None
            r = await client.get(f"http://127.0.0.1:{metrics.port}/metrics")
            assert 'cube_sandboxes{state="running"} 1.0' in r.text
            assert 'cube_edge_requests_total{kind="http",outcome="forwarded"}' in r.text
    assert app.state.host.plugins["api:e2b"].metrics_server is None  # stopped with the app


SDK_SCRIPT = textwrap.dedent("""
    import sys
    from e2b import Sandbox, SandboxState
    sbx = Sandbox.create(template="base", metadata={"mode": "domain"})
    assert sbx.get_info().state == SandboxState.RUNNING
    assert sbx.is_running(), "envd /health through the TLS edge"
    assert [s.sandbox_id for s in Sandbox.list().next_items()] == [sbx.sandbox_id]
    assert sbx.get_host(8080) == f"8080-{sbx.sandbox_id}." + sys.argv[1]
    assert sbx.kill() is True
    assert not sbx.is_running()
    print("SDK-OK", sbx.sandbox_id)
""")


async def test_sdk_in_domain_mode(plugin_host, tmp_path, monkeypatch) -> None:
    envd = Upstream()
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(serve(envd.app, host="127.0.0.2", port=49983, lifespan="off"))
        app, tls, tls_port, _ = await stack.enter_async_context(domain_server(plugin_host, tmp_path))
        network = app.state.agent.network
        allocate = network.allocate

        async def allocate_on_envd_host(*args, **kwargs):
            return (await allocate(*args, **kwargs)).model_copy(update={"guest_address": "127.0.0.2"})

        monkeypatch.setattr(network, "allocate", allocate_on_envd_host)
        key = app.state.service.create_api_key("sdk-domain")[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
        env.update(E2B_API_KEY=key, E2B_DOMAIN=f"cube.localhost:{tls_port}", SSL_CERT_FILE=str(tls.ca_cert))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", SDK_SCRIPT, f"cube.localhost:{tls_port}", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), timeout=120)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert b"SDK-OK" in out
