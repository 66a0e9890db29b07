"""A cluster on this box (PostgreSQL + ``cube master`` + two ``cube node``), driven by the
unmodified E2B SDKs through the master only: placement over both nodes by the scheduler
(``spread`` here), sandbox traffic routed master -> node -> guest, secrets of network rules read
by a node from the master, a node crash and its return, a master restart. The order of the
tests matters: they share one cluster."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from cluster_e2e import Cluster
from cube_net_ebpf.nodenames import HostNames, node_tag
from e2b import PtySize, Sandbox, SandboxQuery, SandboxState, Secret
from e2b_code_interpreter import Sandbox as CodeSandbox
from networld import API, Internet, token

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


@pytest.fixture
def sdk(cube_cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    for name, value in cube_cluster.sdk_env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("E2B_DOMAIN", raising=False)
    return cube_cluster


def _node_of(cluster: Cluster, sandbox_id: str) -> str:
    out = cluster.cli("sandbox", "ls", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["sandbox_id"]: r for r in map(json.loads, out.stdout.splitlines())}
    return str(rows[sandbox_id]["node_id"])


def test_sandboxes_spread_over_both_nodes_and_work_through_the_master(sdk: Cluster) -> None:
    sandboxes = [Sandbox.create(template="base", timeout=300) for _ in range(4)]
    try:
        placed = {s.sandbox_id: _node_of(sdk, s.sandbox_id) for s in sandboxes}
        assert set(placed.values()) == {"node-a", "node-b"}, placed  # spread: the emptier node each time
        for i, sbx in enumerate(sandboxes):
            sbx.files.write("/home/user/i.txt", f"{i} on {placed[sbx.sandbox_id]}")
            assert sbx.commands.run("cat /home/user/i.txt").stdout == f"{i} on {placed[sbx.sandbox_id]}"
            assert sbx.commands.run("hostname").stdout.strip() == sbx.sandbox_id[:16]
        # a PTY through master -> node -> guest
        on_b = next(s for s in sandboxes if placed[s.sandbox_id] == "node-b")
        seen: list[bytes] = []
        pty = on_b.pty.create(PtySize(rows=24, cols=80), timeout=120)
        on_b.pty.send_stdin(pty.pid, b"echo pty-$((6*7))\nexit\n")
        assert pty.wait(on_pty=seen.append).exit_code == 0
        assert b"pty-42" in b"".join(seen)
        # list and kill across nodes
        listed = {s.sandbox_id for s in Sandbox.list().next_items()}
        assert set(placed) <= listed
        for sbx in sandboxes:
            sbx.kill()
        assert not set(placed) & {s.sandbox_id for s in Sandbox.list().next_items()}
    finally:
        for sbx in sandboxes:
            try:
                sbx.kill()
            except Exception:
                pass


def test_template_only_on_one_node_goes_there(sdk: Cluster) -> None:
    with CodeSandbox.create(timeout=300) as sbx:
        assert _node_of(sdk, sbx.sandbox_id) == "node-a"  # node-b has no code-interpreter-v1
        assert sbx.run_code("6 * 7").text == "42"


@pytest.mark.root
@pytest.mark.ebpf
def test_a_node_without_the_key_sets_a_secret_header_through_the_master(
        sdk: Cluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    """``network.rules`` with ``Secret.fill`` on a ``cube node`` that has no ``secrets_key``: the
    node's egress proxy asks the master for the value per request, so the header arrives at the
    test internet's server with the secret (an update is used by the next request), an unknown
    secret is a 502 and nothing is sent, and neither the guest nor the node's log sees the value."""
    for proc in sdk.nodes.values():
        assert "CUBE_SECRETS_KEY" not in proc.env and "secrets_key" not in Path(proc.argv[-1]).read_text()
    world = Internet(tmp_path_factory.mktemp("internet"))
    world.start()
    value = f"sk-{uuid.uuid4().hex}"
    Secret.create(name="node-key", value=value)
    sbx = None
    try:
        rule = {API: [{"transform": {"headers": {"Authorization": f"Bearer {Secret.fill('node-key')}",
                                                  "X-Missing": Secret.fill("no-such-key")}}}]}
        sbx = Sandbox.create(template="base", timeout=300, network={
            "allow_out": [API], "deny_out": ["0.0.0.0/0"],
            "rules": {API: [{"transform": {"headers": {"Authorization": f"Bearer {Secret.fill('node-key')}"}}}]}})
        node = _node_of(sdk, sbx.sandbox_id)
        tok = token("cluster-secret")

        def curl(path: str) -> str:
            return sbx.commands.run(f"curl -s -m 10 -D - http://{API}/{tok}-{path}", timeout=60).stdout

        started = time.monotonic()
        seen = curl("first")
        print(f"\nrule request through {node} (secret from the master): {time.monotonic() - started:.2f}s")
        assert " 200 " in seen.splitlines()[0] and value not in seen, seen
        (arrived,) = world.events(kind="http", path=f"{tok}-first")
        assert arrived["headers"]["Authorization"] == f"Bearer {value}"

        Secret.update("node-key", value=value + "-2")
        curl("updated")
        (updated,) = world.events(kind="http", path=f"{tok}-updated")
        assert updated["headers"]["Authorization"] == f"Bearer {value}-2"  # nothing cached on the node

        sbx.update_network({"allow_out": [API], "deny_out": ["0.0.0.0/0"], "rules": rule})
        missing = curl("missing")
        assert " 502 " in missing.splitlines()[0] and "no-such-key" in missing, missing
        assert world.events(kind="http", path=f"{tok}-missing") == []
        view = sbx.commands.run("env; cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n'; true",
                                user="root", timeout=60)
        assert value not in view.stdout
        assert value not in sdk.nodes[node].log.read_text()
    finally:
        if sbx is not None:
            sbx.kill()
        Secret.destroy("node-key")
        world.stop()


def test_pause_resume_and_snapshot_on_a_node(sdk: Cluster) -> None:
    sbx = Sandbox.create(template="base", timeout=300)
    try:
        node = _node_of(sdk, sbx.sandbox_id)
        sbx.files.write("/home/user/keep.txt", "kept")
        sbx.pause()
        assert [s.sandbox_id for s in Sandbox.list(query=SandboxQuery(state=[SandboxState.PAUSED])).next_items()] \
            == [sbx.sandbox_id]
        again = Sandbox.connect(sbx.sandbox_id)
        assert again.files.read("/home/user/keep.txt") == "kept"
        snap = again.create_snapshot()
        clone = Sandbox.create(template=snap.snapshot_id, timeout=300)
        try:
            assert clone.files.read("/home/user/keep.txt") == "kept"
            assert _node_of(sdk, clone.sandbox_id) == node  # its snapshot's files are on that node
        finally:
            clone.kill()
    finally:
        sbx.kill()


def test_a_node_that_dies_is_reported_and_reconciled_when_it_returns(sdk: Cluster) -> None:
    sandboxes = [Sandbox.create(template="base", timeout=600) for _ in range(4)]
    try:
        placed = {s.sandbox_id: _node_of(sdk, s.sandbox_id) for s in sandboxes}
        on_b = [s for s in sandboxes if placed[s.sandbox_id] == "node-b"]
        assert len(on_b) >= 2, placed
        victim, doomed = on_b[0], on_b[1]
        victim.files.write("/home/user/alive.txt", "yes")
        doomed_pid = _qemu_pid(sdk, "node-b", doomed.sandbox_id)
        sdk.nodes["node-b"].stop(signal.SIGKILL)  # the agent dies; its VMs keep running
        sdk.wait("node-b marked down", lambda: sdk.node_records()["node-b"]["status"] == "down", timeout=30)
        with pytest.raises(Exception) as failed:
            Sandbox.connect(victim.sandbox_id).commands.run("true")
        assert "unavailable" in str(failed.value) or "could not be reached" in str(failed.value), failed.value
        assert victim.sandbox_id in {s.sandbox_id for s in Sandbox.list().next_items()}  # listed, not dropped
        doomed.kill()  # recorded now, freed by node-b when it returns
        assert _alive(doomed_pid), "nobody should have touched node-b's VMs while it was down"
        # creates keep working, on the node that is up
        fresh = Sandbox.create(template="base", timeout=120)
        assert _node_of(sdk, fresh.sandbox_id) == "node-a"
        fresh.kill()
        # it returns: re-attached, the same VM with its files; the killed one is gone
        sdk.nodes["node-b"].start()
        sdk.wait("node-b up again", lambda: sdk.node_records()["node-b"]["status"] == "up", timeout=300)
        back = Sandbox.connect(victim.sandbox_id)
        assert back.files.read("/home/user/alive.txt") == "yes"
        assert not _alive(doomed_pid), "the sandbox killed while its node was down still runs"
    finally:
        for sbx in sandboxes:
            try:
                sbx.kill()
            except Exception:
                pass


def test_two_masters_at_once_and_a_restart_with_another_scheduler(sdk: Cluster) -> None:
    """A second master beside the first (one database): creates through both at once all land,
    each master sees every sandbox. Then the first restarts with ``binpack`` instead of
    ``spread``: new sandboxes go to the fullest node instead of the emptiest."""
    import concurrent.futures

    second = sdk.start_master("master-2")
    try:
        sdk.wait("second master", lambda: _healthy(second.url))

        def create(url: str) -> Sandbox:
            return Sandbox.create(template="base", timeout=300, api_key=sdk.key_a, **_urls(url))

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            made = list(pool.map(create, [sdk.url, second.url, sdk.url, second.url]))
        try:
            ids = {s.sandbox_id for s in made}
            assert len(ids) == 4
            for url in (sdk.url, second.url):
                assert ids <= {s.sandbox_id for s in Sandbox.list(**_urls(url)).next_items()}
            for sbx in made:
                assert sbx.commands.run("echo ok").stdout.strip() == "ok"
            # restart the first master with binpack: placement follows the swapped plugin
            sdk.master.stop()
            sdk.set_scheduler("binpack")
            sdk.master.start()
            sdk.wait("master back", lambda: _healthy(sdk.url))
            assert ids <= {s.sandbox_id for s in Sandbox.list().next_items()}  # nothing lost
            packed = [Sandbox.create(template="base", timeout=120) for _ in range(2)]
            nodes = {_node_of(sdk, s.sandbox_id) for s in packed}
            for sbx in packed:
                sbx.kill()
            assert len(nodes) == 1, nodes  # binpack: the fuller node takes both
        finally:
            for sbx in made:
                sbx.kill()
    finally:
        second.stop()


def test_a_snapshot_is_copied_to_the_other_node_when_its_own_is_drained(sdk: Cluster) -> None:
    """Two snapshots of one sandbox; its node drained; creates from both land on the other node,
    which copies the files first. The second copy sends only that snapshot's own files (its
    memory diff, device state, disk layer): the base it shares with the first stays."""
    sbx = Sandbox.create(template="base", timeout=300)
    copies: list[Sandbox] = []
    try:
        origin = _node_of(sdk, sbx.sandbox_id)
        other = "node-b" if origin == "node-a" else "node-a"
        sbx.files.write("/home/user/moved.txt", f"first on {origin}")
        first = sbx.create_snapshot()
        sbx.files.write("/home/user/moved.txt", f"second on {origin}")
        sbx.commands.run("head -c 8000000 /dev/urandom > /home/user/noise.bin")
        second = sbx.create_snapshot()
        drained = sdk.cli("node", "drain", origin)
        assert drained.returncode == 0, drained.stderr
        try:
            for snap, text in ((first, f"first on {origin}"), (second, f"second on {origin}")):
                copy = Sandbox.create(template=snap.snapshot_id, timeout=300)
                copies.append(copy)
                assert _node_of(sdk, copy.sandbox_id) == other
                assert copy.files.read("/home/user/moved.txt") == text
                assert copy.commands.run("echo copied").stdout.strip() == "copied"
        finally:
            undrained = sdk.cli("node", "undrain", origin)
            assert undrained.returncode == 0, undrained.stderr
        held = sdk.node_records()[other]["snapshots"]
        assert {first.snapshot_id, second.snapshot_id} <= set(held), held  # type: ignore[call-overload]
        copied = _copied(sdk, other)
        one, two = copied[first.snapshot_id], copied[second.snapshot_id]
        print(f"copy of {first.snapshot_id}: {one}\ncopy of {second.snapshot_id}: {two}")
        assert one["fetched"][-1] == first.snapshot_id and one["bytes"] > 0
        assert two["fetched"] == [second.snapshot_id], two  # its base came with the first copy
        assert any(k.startswith("layer:") for k in two["skipped"]), two  # the shared disk layers stayed
        assert any(k.startswith("sha256:") for k in two["skipped"]), two  # and the template image
        assert two["bytes"] < one["bytes"], (one, two)
        # deleting a snapshot deletes the other node's copy
        assert httpx.delete(f"{sdk.url}/templates/{first.snapshot_id}", headers={"X-API-Key": sdk.key_a},
                            timeout=30).status_code in (200, 204)
        sdk.wait("the copy deleted", lambda: first.snapshot_id not in sdk.node_records()[other]["snapshots"],
                 timeout=30)
    finally:
        for each in [*copies, sbx]:
            try:
                each.kill()
            except Exception:
                pass


def _copied(cluster: Cluster, node: str) -> dict[str, dict[str, object]]:
    """The node's ``snapshot copied`` log lines (JSON), by snapshot id."""
    out: dict[str, dict[str, object]] = {}
    for line in cluster.nodes[node].log.read_text().splitlines():
        if '"snapshot copied"' in line:
            event = json.loads(line)
            out[str(event["snapshot_id"])] = event
    return out


def test_nothing_is_left_running_after_kills(sdk: Cluster) -> None:
    deadline = time.monotonic() + 30
    while True:
        live = {name: n for name, n in sdk.node_records().items() if n["sandboxes"]}
        if not live or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not live, live
    for name in ("node-a", "node-b"):
        state = sdk.root / name
        qemu = subprocess.run(["pgrep", "-f", f"{state}/vms"], capture_output=True, text=True).stdout.split()
        pool_members = sum(sdk.node_records()[name]["pool"].values())  # type: ignore[union-attr]
        assert len(qemu) == pool_members, (name, qemu, pool_members)  # only the warm pool is left
        disks = list((state / "storage" / "disks").glob("*.*"))
        assert len(disks) == pool_members, (name, disks)
        prefix = HostNames(node_tag(name)).netns_prefix
        netns = [n for n in os.listdir("/run/netns") if n.startswith(prefix)]
        # the pool members' slots and the network plugin's pre-built ones (pool_size 2), no more
        assert len(netns) <= pool_members + 2, (name, netns)


def _urls(url: str) -> dict[str, str]:
    return {"api_url": url, "sandbox_url": url}


def _qemu_pid(cluster: Cluster, node: str, sandbox_id: str) -> int:
    """The pid of the sandbox's QEMU, from its record (a warm-pool member's VM keeps the member's name)."""
    out = cluster.cli("sandbox", "ls", "--json")
    row = next(r for r in map(json.loads, out.stdout.splitlines()) if r["sandbox_id"] == sandbox_id)
    assert row["node_id"] == node and row["vm_pid"], row
    return int(row["vm_pid"])


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while True:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(")")[-1].split()[0] == "Z":
                    return False
        except FileNotFoundError:
            return False
        if time.monotonic() > deadline:
            return True
        time.sleep(0.2)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
