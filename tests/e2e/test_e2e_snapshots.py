"""Snapshots and fork on real microVMs through the SDK: memory and processes are carried over,
identities are fresh, and the source keeps running."""

from __future__ import annotations

import httpx
import pytest
from cube_e2e import CubeServer
from e2b import Sandbox

pytestmark = [pytest.mark.vm, pytest.mark.e2e]

RANDOM = "python3 -c 'import os; print(os.urandom(8).hex())'"


def test_snapshot_then_create_from_it(e2b_env: CubeServer) -> None:
    source = Sandbox.create(template="base", timeout=300)
    children: list[Sandbox] = []
    try:
        source.files.write("/tmp/state.txt", "before")
        source.commands.run("sleep 3600", background=True)
        snap = source.create_snapshot(name="e2e-snap")
        assert snap.snapshot_id
        source.files.write("/tmp/state.txt", "after")  # the source runs on, unaffected
        assert source.commands.run("cat /tmp/state.txt").stdout.strip() == "after"

        child = Sandbox.create(snap.snapshot_id, timeout=120)
        children.append(child)
        assert child.sandbox_id != source.sandbox_id
        assert child.files.read("/tmp/state.txt") == "before"  # memory (tmpfs) came along
        assert "sleep 3600" in child.commands.run("ps -eo args").stdout  # and the process
        assert child.commands.run(RANDOM).stdout != source.commands.run(RANDOM).stdout
        listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=source.sandbox_id).next_items()]
        assert snap.snapshot_id in listed
    finally:
        for sbx in [*children, source]:
            sbx.kill()


def test_fork(e2b_env: CubeServer) -> None:
    source = Sandbox.create(template="base", timeout=300)
    forks: list[Sandbox] = []
    try:
        source.commands.run("echo parent > /home/user/mark")
        results = source.fork(count=2, timeout=120)
        forks = [f for f in results if isinstance(f, Sandbox)]
        assert len(forks) == 2, results
        ids = {f.sandbox_id for f in forks}
        assert len(ids) == 2 and source.sandbox_id not in ids
        for f in forks:
            assert f.commands.run("cat /home/user/mark").stdout.strip() == "parent"
        forks[0].commands.run("echo changed > /home/user/mark")
        assert forks[1].commands.run("cat /home/user/mark").stdout.strip() == "parent"
        assert source.commands.run("cat /home/user/mark").stdout.strip() == "parent"
        assert forks[0].commands.run(RANDOM).stdout != forks[1].commands.run(RANDOM).stdout
    finally:
        for sbx in [*forks, source]:
            sbx.kill()


def _api(server: CubeServer, method: str, path: str, key: str | None = None, **kwargs: object) -> httpx.Response:
    return httpx.request(method, f"{server.url}{path}", headers={"X-API-Key": key or server.key_a},
                         timeout=120, **kwargs)  # type: ignore[arg-type]


def test_rollback_and_the_snapshot_tree(e2b_env: CubeServer) -> None:
    """Rollback (a Cube extension) on a real microVM: same sandbox id, memory, files and processes
    as they were at the snapshot; snapshots record their parent; a parent cannot be deleted
    before its children."""
    sbx = Sandbox.create(template="base", timeout=300)
    try:
        sbx.files.write("/tmp/state.txt", "v1")
        boot_id = sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout
        v1 = sbx.create_snapshot(name="v1").snapshot_id
        sbx.files.write("/tmp/state.txt", "v2")
        sbx.commands.run("sleep 3600", background=True)
        v2 = sbx.create_snapshot().snapshot_id
        sbx.files.write("/tmp/state.txt", "v3")

        r = _api(e2b_env, "POST", f"/sandboxes/{sbx.sandbox_id}/rollback", json={"snapshotID": v1})
        assert r.status_code == 200, r.text
        assert r.json()["sandboxID"] == sbx.sandbox_id
        assert _api(e2b_env, "GET", f"/sandboxes/{sbx.sandbox_id}").json()["state"] == "running"
        # the same SDK object keeps working: same id, same access token
        assert sbx.files.read("/tmp/state.txt") == "v1"
        assert "sleep 3600" not in sbx.commands.run("ps -eo args").stdout
        assert sbx.commands.run("cat /proc/sys/kernel/random/boot_id").stdout == boot_id
        assert sbx.is_running()

        r = _api(e2b_env, "POST", f"/sandboxes/{sbx.sandbox_id}/rollback", json={"snapshotID": v2})
        assert r.status_code == 200, r.text
        assert sbx.files.read("/tmp/state.txt") == "v2"
        assert "sleep 3600" in sbx.commands.run("ps -eo args").stdout  # the process came back too

        # a snapshot taken after a rollback builds on the snapshot rolled back to
        v2b = sbx.create_snapshot().snapshot_id
        listed = _api(e2b_env, "GET", "/snapshots", params={"sandboxID": sbx.sandbox_id})
        assert listed.status_code == 200, listed.text
        tree = {s["snapshotID"]: s for s in listed.json()}
        assert set(tree) == {v1, v2, v2b}
        assert tree[v2b]["parentID"] == v2
        assert tree[v1]["parentID"] == tree[v2]["parentID"] is not None  # the template's snapshot
        assert all(s["sandboxID"] == sbx.sandbox_id for s in tree.values())
        assert _api(e2b_env, "DELETE", f"/templates/{v2}").status_code == 409  # v2b builds on it
        assert _api(e2b_env, "DELETE", f"/templates/{v2b}").status_code == 204
        assert _api(e2b_env, "DELETE", f"/templates/{v2}").status_code == 204
        after = {s["snapshotID"] for s in _api(e2b_env, "GET", "/snapshots",
                                               params={"sandboxID": sbx.sandbox_id}).json()}
        assert after == {v1}

        # bad input: an unknown or deleted snapshot, another team, a malformed body
        for body in ({"snapshotID": v2}, {"snapshotID": "nope"}):
            assert _api(e2b_env, "POST", f"/sandboxes/{sbx.sandbox_id}/rollback", json=body).status_code == 404
        assert _api(e2b_env, "POST", f"/sandboxes/{sbx.sandbox_id}/rollback", e2b_env.key_b,
                    json={"snapshotID": v1}).status_code == 404
        assert _api(e2b_env, "POST", f"/sandboxes/{sbx.sandbox_id}/rollback", json={}).status_code == 400
        assert sbx.files.read("/tmp/state.txt") == "v2"  # none of that touched the sandbox
    finally:
        sbx.kill()
