"""A real cluster on this box: a throwaway PostgreSQL, one ``cube master`` and two ``cube node``
processes (real plugins, real microVMs), each node with its own node id, state dir, network
subnet and ports. The SDKs talk to the master only. Masters hold ``[core] secrets_key``; nodes
do not (not even in their environment): they ask a master for each secret (``[cluster] masters``)."""

from __future__ import annotations

import base64
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cube_bench.servertoml import plugins_toml
from cube_e2e import BOOT_TIMEOUT_S, CUBE, free_port

from cube_core.testing.postgres import PostgresServer


def _plugins(name: str, state: Path, subnet: str, scheduler: str, **cluster: Any) -> dict[str, Any]:
    return {"state": state, "vmm": {"mem_dir": f"/dev/shm/cube-cluster-{name}"}, "network": {"subnet": subnet},
            "scheduler": scheduler,
            "cluster": {"token": {"env": "CUBE_CLUSTER_TOKEN"}, "heartbeat_s": 1.0, "down_after_s": 4.0, **cluster}}


def node_toml(name: str, state: Path, *, subnet: str, templates: list[str], port: int, scheduler: str,
              masters: list[str]) -> str:
    return plugins_toml(core={"node_id": name, "state_dir": state, "state": {"env": "CUBE_STATE_URL"},
                              "templates": templates, "pool": {"size": 1}},
                        node={"host": "127.0.0.1", "port": port},
                        **_plugins(name, state, subnet, scheduler, masters=masters))


def master_toml(name: str, state: Path, *, port: int, admin_port: int, subnet: str, scheduler: str) -> str:
    return plugins_toml(core={"node_id": name, "state_dir": state, "state": {"env": "CUBE_STATE_URL"},
                              "host": "127.0.0.1", "port": port, "admin_port": admin_port,
                              "secrets_key": {"env": "CUBE_SECRETS_KEY"}},
                        **_plugins(name, state, subnet, scheduler))


@dataclass
class Proc:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    stopped: bool = False
    """Stopped on purpose (a test killed it): not a failure while it is down."""

    def start(self) -> None:
        self.stopped = False
        with self.log.open("a") as log_file:
            self.proc = subprocess.Popen(self.argv, stdout=log_file, stderr=subprocess.STDOUT,
                                         start_new_session=True, env=self.env)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> None:
        if self.proc is not None and not self.stopped and self.proc.poll() is not None:
            pytest.fail(f"{self.name} exited with {self.proc.returncode}:\n{self.log.read_text()[-5000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: a clean stop. SIGKILL: the agent process alone dies (as in a crash); the VMs
        it started run in sessions of their own and survive it."""
        self.stopped = True
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@dataclass
class ExtraMaster:
    url: str
    proc: Proc

    def stop(self) -> None:
        self.proc.stop()


@dataclass
class Cluster:
    url: str
    master: Proc
    nodes: dict[str, Proc]
    master_config: Path
    root: Path
    env: dict[str, str]
    scheduler: str
    key_a: str = ""
    key_b: str = ""
    extra: list[Proc] = field(default_factory=list)

    def start_master(self, name: str) -> ExtraMaster:
        """Another ``cube master`` on the same database (its own port and state dir)."""
        state = self.root / name
        state.mkdir(exist_ok=True)
        config = state / "plugins.toml"
        port = free_port()
        config.write_text(master_toml(name, state, port=port, admin_port=free_port(), subnet="100.83.0.0/16",
                                      scheduler=self.scheduler))
        proc = Proc(name, [CUBE, "master", "--config", str(config)], state / "master.log", self.env)
        proc.start()
        self.extra.append(proc)
        return ExtraMaster(url=f"http://127.0.0.1:{port}", proc=proc)

    def set_scheduler(self, plugin: str) -> None:
        """The first master's scheduler plugin from its next start on."""
        text = self.master_config.read_text()
        self.master_config.write_text(text.replace(f'[scheduler]\nplugin = "{self.scheduler}"',
                                                   f'[scheduler]\nplugin = "{plugin}"'))
        self.scheduler = plugin

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CUBE, *args, "--config", str(self.master_config)], capture_output=True, text=True,
                              timeout=60, env=self.env)

    def node_records(self) -> dict[str, dict[str, object]]:
        out = self.cli("nodes", "--json")
        assert out.returncode == 0, out.stderr
        return {n["node_id"]: n for n in map(json.loads, out.stdout.splitlines())}

    def wait(self, what: str, predicate: object, timeout: float = BOOT_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for proc in (self.master, *self.nodes.values()):
                proc.check()
            if predicate():  # type: ignore[operator]
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.log.read_text()[-3000:]}"
                                 for p in (self.master, *self.nodes.values()))
                pytest.fail(f"cluster: {what} not within {timeout}s\n{logs}")
            time.sleep(0.5)

    def sdk_env(self, key: str | None = None) -> dict[str, str]:
        return {"E2B_API_URL": self.url, "E2B_SANDBOX_URL": self.url, "E2B_API_KEY": key or self.key_a}


def _ready(cluster: Cluster, templates: dict[str, set[str]]) -> bool:
    try:
        if httpx.get(f"{cluster.url}/health", timeout=2).status_code != 200:
            return False
    except httpx.HTTPError:
        return False
    records = cluster.node_records()
    return all(n in records and records[n]["status"] == "up"
               and want <= set(records[n]["templates"])  # type: ignore[call-overload]
               for n, want in templates.items())


@pytest.fixture(scope="module")
def cube_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("cube-cluster")
    pg = PostgresServer()
    pg.start()
    url = pg.create_database()
    node_env = {**os.environ, "CUBE_STATE_URL": url, "CUBE_CLUSTER_TOKEN": secrets.token_hex(32)}
    node_env.pop("CUBE_SECRETS_KEY", None)
    env = {**node_env, "CUBE_SECRETS_KEY": base64.b64encode(os.urandom(32)).decode()}  # masters only
    scheduler = os.environ.get("CUBE_CLUSTER_SCHEDULER", "spread")
    procs: list[Proc] = []
    cluster: Cluster | None = None
    try:
        port = free_port()
        nodes = {}
        for name, subnet, templates in (("node-a", "100.80.0.0/16", ["base", "code-interpreter-v1"]),
                                        ("node-b", "100.81.0.0/16", ["base"])):
            state = root / name
            state.mkdir()
            config = state / "plugins.toml"
            config.write_text(node_toml(name, state, subnet=subnet, templates=templates, port=free_port(),
                                        scheduler=scheduler, masters=[f"http://127.0.0.1:{port}"]))
            nodes[name] = Proc(name, [CUBE, "node", "--config", str(config)], state / "node.log", node_env)
        mstate = root / "master"
        mstate.mkdir()
        mconfig = mstate / "plugins.toml"
        mconfig.write_text(master_toml("master-1", mstate, port=port, admin_port=free_port(), subnet="100.82.0.0/16",
                                       scheduler=scheduler))
        master = Proc("master", [CUBE, "master", "--config", str(mconfig)], mstate / "master.log", env)
        cluster = Cluster(url=f"http://127.0.0.1:{port}", master=master, nodes=nodes, master_config=mconfig,
                          root=root, env=env, scheduler=scheduler)
        procs = [master, *nodes.values()]
        for proc in procs:
            proc.start()
        cluster.wait("both nodes ready", lambda: _ready(cluster, {"node-a": {"base", "code-interpreter-v1"},
                                                                   "node-b": {"base"}}))
        for team in ("team-a", "team-b"):
            out = cluster.cli("keys", "create", "--team", team)
            assert out.returncode == 0, out.stderr
            setattr(cluster, "key_a" if team == "team-a" else "key_b", out.stdout.strip())
        yield cluster
    finally:
        for proc in [*procs, *(cluster.extra if cluster else [])]:
            proc.stop()
        for name in ("node-a", "node-b"):
            subprocess.run(["pkill", "-f", f"{root / name}/vms"], check=False)
            shutil.rmtree(f"/dev/shm/cube-cluster-{name}", ignore_errors=True)
        pg.stop()
