"""Volumes with the real ``e2b==2.63.0`` SDK against a real uvicorn server on the fake drivers:
``/volumes`` (team-scoped), the volume content API (its own token, E2B_VOLUME_API_URL), and
``volume_mounts`` on create (an exclusive read-write mount, 409s, no snapshot of a mounting sandbox)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from e2b import Sandbox, SandboxException, Volume
from e2b.exceptions import NotFoundException, VolumeException
from e2b_helpers import serve


@pytest.fixture
async def volume_env(cube, monkeypatch):
    async with serve(cube.app, lifespan="off") as port:
        for name in ("E2B_DOMAIN", "E2B_DEBUG", "E2B_ACCESS_TOKEN"):
            monkeypatch.delenv(name, raising=False)
        url = f"http://127.0.0.1:{port}"
        for name in ("E2B_API_URL", "E2B_SANDBOX_URL", "E2B_VOLUME_API_URL"):
            monkeypatch.setenv(name, url)
        monkeypatch.setenv("E2B_API_KEY", cube.key("team-a"))
        yield cube, cube.key("team-b")


def content_flow(key_b: str) -> str:
    vol = Volume.create("data")
    assert vol.volume_id.startswith("vol_") and vol.token
    with pytest.raises(VolumeException, match="409|taken"):
        Volume.create("data")
    assert [v.name for v in Volume.list()] == ["data"]
    assert Volume.get_info(vol.volume_id).token == vol.token
    # another team sees nothing of it
    assert Volume.list(api_key=key_b) == []
    with pytest.raises(NotFoundException):
        Volume.get_info(vol.volume_id, api_key=key_b)
    assert Volume.destroy(vol.volume_id, api_key=key_b) is False

    entry = vol.write_file("/notes/a.txt", "hello volume", force=True)
    assert (entry.name, entry.size, entry.type.value) == ("a.txt", 12, "file")
    again = Volume.connect(vol.volume_id)
    assert again.read_file("/notes/a.txt") == "hello volume"
    assert again.read_file("notes/a.txt", format="bytes") == b"hello volume"
    assert [e.path for e in again.list("/")] == ["/notes"]
    made = again.make_dir("/x/y", force=True, mode=0o700)
    assert made.mode == 0o700
    assert again.exists("/x/y") and not again.exists("/nope")
    assert again.update_metadata("/notes/a.txt", mode=0o600).mode == 0o600
    assert again.get_info("/notes/a.txt").mode == 0o600
    again.remove("/x")
    assert not again.exists("/x/y")
    with pytest.raises(NotFoundException):
        again.read_file("/x/y/z")
    with pytest.raises(NotFoundException):  # no such volume
        Volume("vol_x", "data", token="nope").read_file("/notes/a.txt")
    forged = Volume(vol.volume_id, "data", token="f" * 32)
    with pytest.raises(Exception, match="401|token"):
        forged.read_file("/notes/a.txt")
    return vol.volume_id


def mount_flow(volume_id: str) -> None:
    first = Sandbox.create(template="base", timeout=60, volume_mounts={"/mnt/data": "data"})
    info = first.get_info()
    assert info.volume_mounts == [{"name": "data", "path": "/mnt/data"}]
    with pytest.raises(SandboxException, match="in use"):
        Sandbox.create(template="base", timeout=60, volume_mounts={"/data": "data"})
    with pytest.raises(VolumeException, match="in use"):
        Volume.destroy(volume_id)
    with pytest.raises(VolumeException, match="in use"):
        Volume.connect(volume_id).read_file("/notes/a.txt")
    with pytest.raises(SandboxException, match="404: volume 'missing' not found"):
        Sandbox.create(template="base", timeout=60, volume_mounts={"/a": "missing"})
    first.kill()
    second = Sandbox.create(template="base", timeout=60, volume_mounts={"/mnt/data": "data"})
    second.kill()
    assert Volume.connect(volume_id).read_file("/notes/a.txt") == "hello volume"
    assert Volume.destroy(volume_id) is True
    assert Volume.destroy(volume_id) is False


async def test_volumes_with_the_sdk(volume_env) -> None:
    cube, key_b = volume_env
    volume_id = await asyncio.to_thread(content_flow, key_b)
    await asyncio.to_thread(mount_flow, volume_id)
    vmm = cube.agent.vmm
    restored = [vm for vm in vmm.vms.values() if vm.get("volumes")]
    assert restored == []  # every VM that mounted it is gone
    assert cube.agent.storage.volume_store().ids() == []


async def test_a_sandbox_with_a_volume_is_not_snapshotted(cube) -> None:
    key = cube.key("team-a")
    headers = cube.headers(key)
    created = await cube.client.post("/volumes", json={"name": "v1", "sizeMB": 64}, headers=headers)
    assert created.status_code == 201 and created.json()["sizeMB"] == 64
    sbx = await cube.client.post("/sandboxes", headers=headers, json={
        "templateID": "base", "volumeMounts": [{"name": "v1", "path": "/v"}]})
    assert sbx.status_code == 201, sbx.text
    sandbox_id = sbx.json()["sandboxID"]
    vm = cube.agent.vmm.vms[sandbox_id]
    assert vm["mounts"] == [{"slot": 0, "path": "/v", "read_only": False}] and len(vm["volumes"]) == 1
    snap = await cube.client.post(f"/sandboxes/{sandbox_id}/snapshots", headers=headers, json={})
    assert snap.status_code == 409 and "volumes mounted" in snap.json()["message"]
    ro = await cube.client.post("/sandboxes", headers=headers, json={
        "templateID": "base", "volumeMounts": [{"name": "v1", "path": "/v", "readOnly": True}]})
    assert ro.status_code == 409  # a read-write mount is exclusive
    bad = await cube.client.post("/sandboxes", headers=headers, json={
        "templateID": "base", "volumeMounts": [{"name": "v1", "path": "relative"}]})
    assert bad.status_code == 400
    with contextlib.suppress(Exception):
        await cube.client.delete(f"/sandboxes/{sandbox_id}", headers=headers)


async def test_read_only_mounts_share_a_volume(cube) -> None:
    headers = cube.headers(cube.key("team-a"))
    await cube.client.post("/volumes", json={"name": "shared"}, headers=headers)
    ids = []
    for _ in range(2):
        r = await cube.client.post("/sandboxes", headers=headers, json={
            "templateID": "base", "volumeMounts": [{"name": "shared", "path": "/s", "readOnly": True}]})
        assert r.status_code == 201, r.text
        ids.append(r.json()["sandboxID"])
    assert cube.agent.vmm.vms[ids[0]]["mounts"][0]["read_only"] is True
    rw = await cube.client.post("/sandboxes", headers=headers, json={
        "templateID": "base", "volumeMounts": [{"name": "shared", "path": "/s"}]})
    assert rw.status_code == 409
