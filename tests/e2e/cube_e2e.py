"""End-to-end fixtures: a real ``cube serve`` with the real plugins, real microVMs and the real
E2B SDKs. Templates are built on first use and cached by content hash (images under
/var/cache/cube); the server's state lives in a temporary directory."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

CUBE = str(Path(sys.executable).with_name("cube"))
BOOT_TIMEOUT_S = float(os.environ.get("CUBE_E2E_BOOT_TIMEOUT", "1500"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class CubeServer:
    url: str
    config: Path
    state_dir: Path
    log: Path
    key_a: str
    key_b: str
    operator_token: str = ""
    """``[core] operator_token`` (the dashboard's all-teams view, every team's ``GET /events``)."""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    """The running ``cube serve`` (one at a time: only one Cube node may run on a host)."""

    def start(self, timeout: float = BOOT_TIMEOUT_S) -> None:
        with self.log.open("a") as log_file:
            proc = subprocess.Popen([CUBE, "serve", "--config", str(self.config)], stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[:] = [proc]
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                pytest.fail(f"cube serve exited with {proc.returncode}:\n{self.log.read_text()[-5000:]}")
            try:
                health = httpx.get(f"{self.url}/health", timeout=2)
                # 200 once one template serves: the suite needs all of them
                if health.status_code == 200 and all(
                        v == "ready" for v in health.json().get("templates", {}).values()):
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"cube serve not healthy after {timeout}s:\n{self.log.read_text()[-5000:]}")
            time.sleep(0.5)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server process (its sandboxes' VMs keep running; pool members go)."""
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, sig) if sig == signal.SIGKILL else proc.send_signal(sig)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()

    def env(self, key: str | None = None) -> dict[str, str]:
        return {"E2B_API_URL": self.url, "E2B_SANDBOX_URL": self.url, "E2B_API_KEY": key or self.key_a}

    def keys(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CUBE, "keys", *args, "--config", str(self.config)], capture_output=True,
                              text=True, timeout=60)


CONFIG = """
[core]
state_dir = "{state}"
host = "127.0.0.1"
port = {port}
admin_port = {admin_port}
templates = ["base", "code-interpreter-v1"]
pool = {{ size = 1 }}
secrets_key = {{ file = "{state}/secrets.key" }}
operator_token = {{ file = "{state}/operator.token" }}

[vmm]
plugin = "kvm"
options = {{ run_dir = "{state}/vms", mem_dir = "/dev/shm/cube-e2e-{port}" }}

[network]
plugin = "ebpf"

[storage]
plugin = "cow"
options = {{ root = "{state}/storage" }}

[scheduler]
plugin = "binpack"

[[api]]
plugin = "e2b"

[[api]]
plugin = "dashboard"

[webhooks]
allow_networks = ["127.0.0.0/8"]  # the tests' receivers listen on loopback
backoff_s = 1
backoff_max_s = 4
max_attempts = 50
"""


def with_e2b_options(config: str, options: str) -> str:
    """``config`` with ``options = {options}`` in its ``[[api]] plugin = "e2b"`` table (appending
    it would put it in whatever table comes last: [webhooks] today)."""
    table = '[[api]]\nplugin = "e2b"\n'
    assert config.count(table) == 1, "the e2e config has one e2b API table"
    return config.replace(table, f"{table}options = {{ {options} }}\n")


@pytest.fixture(scope="session")
def cube_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CubeServer]:
    state = tmp_path_factory.mktemp("cube-e2e")
    port, admin_port = free_port(), free_port()
    config = state / "plugins.toml"
    config.write_text(CONFIG.format(state=state, port=port, admin_port=admin_port))
    key_file = state / "secrets.key"  # [core] secrets_key: /secrets values and webhook secrets sealed with it
    key_file.write_text(base64.b64encode(os.urandom(32)).decode())
    key_file.chmod(0o600)
    operator_token = os.urandom(24).hex()
    (state / "operator.token").write_text(operator_token)
    (state / "operator.token").chmod(0o600)
    log = state / "serve.log"

    def key(team: str) -> str:
        out = subprocess.run([CUBE, "keys", "create", "--team", team, "--config", str(config)],
                             capture_output=True, text=True, timeout=60, check=True)
        return out.stdout.strip()

    key_a, key_b = key("team-a"), key("team-b")
    server = CubeServer(url=f"http://127.0.0.1:{port}", config=config, state_dir=state, log=log,
                        key_a=key_a, key_b=key_b, operator_token=operator_token)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        # QEMU processes a failed test left behind (their run dir is under the state dir); their
        # network slots are swept by the next Cube start.
        subprocess.run(["pkill", "-f", f"{state}/vms"], check=False)
        shutil.rmtree(f"/dev/shm/cube-e2e-{port}", ignore_errors=True)


@pytest.fixture
def e2b_env(cube_server: CubeServer, monkeypatch: pytest.MonkeyPatch) -> CubeServer:
    for name, value in cube_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    monkeypatch.delenv("E2B_ACCESS_TOKEN", raising=False)
    return cube_server


def oci_layout(layout: Path, layer_tar: Path) -> None:
    """A one-layer OCI image layout (uncompressed layer) from a root filesystem tarball."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def blob(data: bytes) -> tuple[str, int]:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}", len(data)

    h = hashlib.sha256()
    with layer_tar.open("rb") as src, (blobs / "layer.tmp").open("wb") as dst:
        while chunk := src.read(1 << 20):
            h.update(chunk)
            dst.write(chunk)
    (blobs / "layer.tmp").rename(blobs / h.hexdigest())
    layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": f"sha256:{h.hexdigest()}",
             "size": layer_tar.stat().st_size}
    config_digest, config_size = blob(json.dumps({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]}}).encode())
    manifest_digest, manifest_size = blob(json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest,
                   "size": config_size},
        "layers": [layer]}).encode())
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest,
        "size": manifest_size, "platform": {"architecture": "amd64", "os": "linux"}}]}))
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
