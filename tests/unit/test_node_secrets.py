"""A ``cube node`` reads the secrets of its sandboxes' network rules from a master, per request,
without the secrets key (cube_core.nodesecrets, cube_core.masterapi).

A real ``create_master_app`` (fakes, SQLite shared with the node, ``[core] secrets_key`` set) and
a real node agent (``node_app``, no key) are served by uvicorn on loopback; the master places
sandboxes on the node over HTTP, and the node's egress proxy side (the fake network's secret
source) asks the master through :class:`~cube_core.nodesecrets.MasterSecrets`."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs
from test_node_contract import served

from cube_core._host import PluginHost
from cube_core.app import create_master_app, create_node_app
from cube_core.config import ClusterSettings, LoadedConfig
from cube_core.credentials import (
    CredentialNotFoundError,
    SecretLookupLimitedError,
    SecretLookupUnavailableError,
    SecretsDisabledError,
)
from cube_core.errors import NodeError
from cube_core.models import SandboxSpec
from cube_core.node import NodeAgent
from cube_core.nodeapi import node_app
from cube_core.nodesecrets import SECRETS_PATH, MasterSecrets, RateBuckets
from cube_core.pool import POOL_TEAM
from cube_core.service import SandboxService
from cube_core.state import SandboxState
from cube_core.store import SqliteStore
from cube_core.testing.fakes import FAKE_CONFIG, FakeNetwork

TOKEN = "cluster-secret-0123456789abcdef-nodesecrets"
VALUE = "sk-live-" + "7" * 24
FAST = ClusterSettings(secret_lookups_per_s=1000, secret_lookup_burst=1000)


@dataclass
class Cluster:
    service: SandboxService
    master_url: str
    node: NodeAgent
    masters: MasterSecrets

    @property
    def network(self) -> FakeNetwork:
        assert isinstance(self.node.network, FakeNetwork)
        return self.node.network

    async def create(self, team: str = "team-a") -> tuple[str, str]:
        """A sandbox the master placed on the node: its id and its network slot there."""
        sandbox = await self.service.create(SandboxSpec(template_id="base", team_id=team))
        assert sandbox.node_id == "node-a"
        record = self.service.store.get_sandbox(sandbox.sandbox_id)
        assert record is not None and record.runtime.nic is not None
        return sandbox.sandbox_id, record.runtime.nic.slot_id


@pytest.fixture
def make_cluster(plugin_host: Callable[..., PluginHost], cube_config_factory: Callable[..., LoadedConfig],
                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    monkeypatch.setenv("CUBE_TEST_CLUSTER_TOKEN", TOKEN)
    monkeypatch.setenv("CUBE_TEST_SECRETS_KEY", base64.b64encode(os.urandom(32)).decode())

    @contextlib.asynccontextmanager
    async def make(*, master_cluster: str = "", secrets_key: bool = True) -> AsyncIterator[Cluster]:
        store = SqliteStore(tmp_path / "cube.db")
        core = 'secrets_key = { env = "CUBE_TEST_SECRETS_KEY" }\n' if secrets_key else ""
        master_text = (FAKE_CONFIG.format(state_dir=tmp_path / "master").replace("[core]\n", "[core]\n" + core, 1)
                       + f'\n[cluster]\ntoken = {{ env = "CUBE_TEST_CLUSTER_TOKEN" }}\n{master_cluster}\n')
        app = create_master_app(plugin_host(cube_config_factory(master_text)), store=store)
        node_text = FAKE_CONFIG.format(state_dir=tmp_path / "node").replace(
            "[core]\n", '[core]\nnode_id = "node-a"\n', 1)
        node = NodeAgent(plugin_host(cube_config_factory(node_text)), store)
        assert node.settings.secrets_key is None  # the node never has the key
        await node.start()
        node.template_ready(await node.templates.ensure("base"))
        try:
            async with app.router.lifespan_context(app), served(app) as master_url, \
                    served(node_app(node, token=TOKEN)) as node_url:
                node.url = node_url
                node.beat()
                masters = MasterSecrets((master_url,), TOKEN, FAST)
                node.secrets = masters.reveal
                try:
                    yield Cluster(service=app.state.service, master_url=master_url, node=node, masters=masters)
                finally:
                    await masters.aclose()
        finally:
            await node.stop()
            store.close()

    return make


async def test_the_node_reads_its_sandboxs_secret_from_the_master_per_request(make_cluster: Any) -> None:
    """Through the node's secret source (what its egress proxy calls with a slot): the value of the
    slot's sandbox's team, read again at each request (an update is used by the next one);
    another team's name or an unknown one is refused. No log line carries the value."""
    with capture_logs() as logs:
        async with make_cluster() as cluster:
            cluster.service.create_secret("team-a", "api-key", VALUE)
            cluster.service.create_secret("team-b", "b-only", "b-value")
            _, slot = await cluster.create("team-a")
            assert await cluster.network.secrets(slot, "api-key") == VALUE
            assert await cluster.network.secrets(slot, "API-KEY") == VALUE  # names are case-insensitive
            cluster.service.update_secret("team-a", "api-key", VALUE + "-2")
            assert await cluster.network.secrets(slot, "api-key") == VALUE + "-2"  # nothing cached
            for name in ("b-only", "missing"):
                with pytest.raises(CredentialNotFoundError, match=name):
                    await cluster.network.secrets(slot, name)
            with pytest.raises(CredentialNotFoundError):  # a slot of no sandbox on this node
                await cluster.network.secrets("no-such-slot", "api-key")
    assert VALUE not in repr(logs)


async def test_the_master_answers_only_for_a_live_sandbox_placed_on_the_asking_node(make_cluster: Any) -> None:
    """What the node says is checked against the master's own records: a sandbox placed on
    another node, an unknown sandbox, a warm-pool member, a killed sandbox: all refused alike."""
    async with make_cluster() as cluster:
        cluster.service.create_secret("team-a", "api-key", VALUE)
        sid, _ = await cluster.create("team-a")
        ask = cluster.masters.reveal
        assert await ask("node-a", sid, "api-key") == VALUE
        with capture_logs() as logs:
            for node_id, sandbox_id in (("node-b", sid), ("node-a", "sbx-unknown")):
                with pytest.raises(CredentialNotFoundError, match="api-key"):
                    await ask(node_id, sandbox_id, "api-key")
        assert [e["reason"] for e in logs if e["event"] == "secret look-up refused"] == [
            "placed on another node", "no such sandbox"]
        record = cluster.service.store.get_sandbox(sid)
        assert record is not None
        cluster.service.store.put_sandbox(record.evolve(sandbox_id="sbx-pool", team_id=POOL_TEAM))
        with pytest.raises(CredentialNotFoundError):
            await ask("node-a", "sbx-pool", "api-key")
        await cluster.service.kill("team-a", sid)
        assert cluster.service.store.get_sandbox(sid).state == SandboxState.KILLED  # type: ignore[union-attr]
        with pytest.raises(CredentialNotFoundError):
            await ask("node-a", sid, "api-key")


async def test_a_wrong_or_missing_cluster_token_is_refused_before_anything_is_read(make_cluster: Any) -> None:
    async with make_cluster() as cluster:
        cluster.service.create_secret("team-a", "api-key", VALUE)
        sid, _ = await cluster.create("team-a")
        wrong = MasterSecrets((cluster.master_url,), "x" * 40, FAST)
        try:
            with pytest.raises(NodeError, match="cluster token"):
                await wrong.reveal("node-a", sid, "api-key")
        finally:
            await wrong.aclose()
        body = {"node_id": "node-a", "sandbox_id": sid, "name": "api-key"}
        async with httpx.AsyncClient(base_url=cluster.master_url) as client:
            for headers in ({}, {"x-cube-cluster-token": TOKEN[:-1]}):
                r = await client.post(SECRETS_PATH, json=body, headers=headers)
                assert r.status_code == 401 and VALUE not in r.text
            r = await client.post(SECRETS_PATH, content=b"{", headers={"x-cube-cluster-token": TOKEN})
            assert r.status_code == 422
            r = await client.post(SECRETS_PATH, json=body, headers={"x-cube-cluster-token": TOKEN})
            assert r.status_code == 200 and r.json() == {"value": VALUE}
            assert r.headers["cache-control"] == "no-store"


async def test_the_master_limits_look_ups_per_sandbox(make_cluster: Any) -> None:
    """Over ``secret_lookup_burst`` at once the master refuses (429, rebuilt on the node) before it
    reads anything; another sandbox is not affected."""
    async with make_cluster(master_cluster="secret_lookups_per_s = 0.01\nsecret_lookup_burst = 3") as cluster:
        cluster.service.create_secret("team-a", "api-key", VALUE)
        (one, _), (two, _) = await cluster.create("team-a"), await cluster.create("team-a")
        for _ in range(3):
            assert await cluster.masters.reveal("node-a", one, "api-key") == VALUE
        with pytest.raises(SecretLookupLimitedError, match="too many secret look-ups"):
            await cluster.masters.reveal("node-a", one, "api-key")
        assert await cluster.masters.reveal("node-a", two, "api-key") == VALUE


async def test_a_master_without_the_key_says_secrets_are_disabled(make_cluster: Any) -> None:
    async with make_cluster(secrets_key=False) as cluster:
        sid, slot = await cluster.create("team-a")
        with pytest.raises(SecretsDisabledError, match="secrets_key"):
            await cluster.network.secrets(slot, "api-key")


async def test_the_node_tries_the_next_master_and_says_when_none_answers(make_cluster: Any) -> None:
    async with make_cluster() as cluster:
        cluster.service.create_secret("team-a", "api-key", VALUE)
        sid, _ = await cluster.create("team-a")
        dead = "http://127.0.0.1:9"  # discard port: refused
        both = MasterSecrets((dead, cluster.master_url), TOKEN, FAST)
        alone = MasterSecrets((dead,), TOKEN, FAST)
        none = MasterSecrets((), TOKEN, FAST)
        try:
            assert await both.reveal("node-a", sid, "api-key") == VALUE
            assert both.masters == [cluster.master_url, dead]  # the one that answered is asked first now
            with pytest.raises(SecretLookupUnavailableError, match="no master answered") as err:
                await alone.reveal("node-a", sid, "api-key")
            assert dead not in str(err.value)  # the guest sees this message: no internal address
            with pytest.raises(SecretLookupUnavailableError, match=r"\[cluster\] masters"):
                await none.reveal("node-a", sid, "api-key")
        finally:
            for client in (both, alone, none):
                await client.aclose()
        cluster.node.secrets = None
        _, slot = await cluster.create("team-a")
        with pytest.raises(SecretLookupUnavailableError):
            await cluster.network.secrets(slot, "api-key")


async def test_the_node_counts_a_sandboxs_look_ups_before_it_asks() -> None:
    """A guest hammering a rule host: past the burst the node refuses without a request."""
    asked: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(request)
        return httpx.Response(200, json={"value": "v"})

    masters = MasterSecrets(("http://master.test",), TOKEN,
                            ClusterSettings(secret_lookups_per_s=0.01, secret_lookup_burst=2),
                            transport=httpx.MockTransport(answer))
    try:
        assert [await masters.reveal("node-a", "sbx-1", "k") for _ in range(2)] == ["v", "v"]
        with pytest.raises(SecretLookupLimitedError):
            await masters.reveal("node-a", "sbx-1", "k")
        assert await masters.reveal("node-a", "sbx-2", "k") == "v"
    finally:
        await masters.aclose()
    assert len(asked) == 3 and all(r.headers["x-cube-cluster-token"] == TOKEN for r in asked)


def test_rate_buckets_refill_at_the_rate() -> None:
    now = [0.0]
    buckets = RateBuckets(rate=2.0, burst=2, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]
    now[0] = 0.5  # one token back
    assert [buckets.take("a") for _ in range(2)] == [True, False]
    now[0] = 100.0  # never more than the burst
    assert [buckets.take("a") for _ in range(3)] == [True, True, False]


def test_masters_must_be_base_urls() -> None:
    assert ClusterSettings(masters=("http://10.0.0.2:3000/",)).masters == ("http://10.0.0.2:3000",)
    for bad in ("10.0.0.2:3000", "http://m:3000/api", "ftp://m"):
        with pytest.raises(ValueError, match="base URL"):
            ClusterSettings(masters=(bad,))


def test_cube_node_asks_its_masters_and_ignores_a_secrets_key(
        plugin_host: Callable[..., PluginHost], cube_config_factory: Callable[..., LoadedConfig], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``create_node_app``: the agent's secret source is the masters of ``[cluster] masters``; a
    ``secrets_key`` left in a node's config is reported at start and never read."""
    monkeypatch.setenv("CUBE_TEST_CLUSTER_TOKEN", TOKEN)
    monkeypatch.delenv("CUBE_TEST_SECRETS_KEY", raising=False)  # reading it would fail the start
    text = (FAKE_CONFIG.format(state_dir=tmp_path / "node").replace(
        "[core]\n", '[core]\nnode_id = "node-a"\nsecrets_key = { env = "CUBE_TEST_SECRETS_KEY" }\n', 1)
        + '\n[cluster]\ntoken = { env = "CUBE_TEST_CLUSTER_TOKEN" }\nmasters = ["http://10.9.9.9:3000/"]\n')
    store = SqliteStore(tmp_path / "cube.db")
    try:
        with capture_logs() as logs:
            app = create_node_app(plugin_host(cube_config_factory(text)), store=store)
        agent: NodeAgent = app.agent  # type: ignore[attr-defined]
        masters = agent.secrets.__self__  # type: ignore[union-attr]
        assert isinstance(masters, MasterSecrets) and masters.masters == ["http://10.9.9.9:3000"]
    finally:
        store.close()
    assert any("secrets_key is not used by cube node" in e["event"] for e in logs), logs
