"""Volumes on a real ``cube serve`` with real microVMs and the real e2b SDK (issue 14 section 2).

A volume is created and written through the content API with no sandbox; sandbox A mounts it
(a volume slot of its VM, restored from the template snapshot with the volume's image in it),
reads that file and writes another; a second read-write mount meanwhile is a 409; A is killed;
the content API and sandbox B both see A's write; another team cannot see the volume; a write
past the quota fails in the sandbox (ENOSPC); the volume is deleted and its image is gone.
"""

from __future__ import annotations

import httpx
import pytest
from cube_e2e import CubeServer
from e2b import NotFoundException, Sandbox, SandboxException, Volume
from e2b.exceptions import VolumeException

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


@pytest.fixture
def volume_env(e2b_env: CubeServer, monkeypatch: pytest.MonkeyPatch) -> CubeServer:
    monkeypatch.setenv("E2B_VOLUME_API_URL", e2b_env.url)  # the content API is Cube's API too
    return e2b_env


def test_volume_data_across_two_sandboxes(volume_env: CubeServer) -> None:
    # 64 MiB quota (Cube's sizeMB: the SDK's Volume.create sends a name only), then the SDK's handle
    created = httpx.post(f"{volume_env.url}/volumes", json={"name": "e2e-data", "sizeMB": 64},
                         headers={"X-API-Key": volume_env.key_a}, timeout=60)
    assert created.status_code == 201, created.text
    vol = Volume.connect(created.json()["volumeID"])
    images = list(volume_env.state_dir.glob(f"storage/volumes/{vol.volume_id}.ext4"))
    assert len(images) == 1
    try:
        vol.write_file("/seed/hello.txt", "written with no sandbox\n", force=True)
        assert [e.name for e in vol.list("/")] == ["seed"]

        a = Sandbox.create(template="base", timeout=120, volume_mounts={"/mnt/data": vol})
        try:
            assert a.get_info().volume_mounts == [{"name": "e2e-data", "path": "/mnt/data"}]
            assert a.files.read("/mnt/data/seed/hello.txt") == "written with no sandbox\n"
            out = a.commands.run("echo from-a > /mnt/data/from-a.txt && sync && stat -c %U /mnt/data/from-a.txt "
                                 "&& findmnt -n -o FSTYPE,OPTIONS /mnt/data", user="user")
            assert out.stdout.splitlines()[0] == "user" and out.stdout.splitlines()[1].startswith("ext4 rw")
            with pytest.raises(SandboxException, match="in use"):
                Sandbox.create(template="base", timeout=60, volume_mounts={"/mnt/data": vol})
            with pytest.raises(VolumeException, match="in use"):
                vol.read_file("/seed/hello.txt")
            with pytest.raises(VolumeException, match="in use"):
                Volume.destroy(vol.volume_id)
        finally:
            a.kill()

        # the content API reads what the guest wrote (the journal replayed: A was killed)
        assert vol.read_file("/from-a.txt") == "from-a\n"
        b = Sandbox.create(template="base", timeout=120, volume_mounts={"/work": vol})
        try:
            assert b.files.read("/work/from-a.txt") == "from-a\n"
            full = b.commands.run("dd if=/dev/zero of=/work/big bs=1M count=80 2>&1; echo rc=$?", user="user")
            assert "No space left on device" in full.stdout  # the 64 MiB quota
            b.commands.run("rm -f /work/big", user="user")
        finally:
            b.kill()

        # another team sees nothing of it
        assert Volume.list(api_key=volume_env.key_b) == []
        with pytest.raises(NotFoundException):
            Volume.get_info(vol.volume_id, api_key=volume_env.key_b)
        with pytest.raises(SandboxException, match="not found"):
            Sandbox.create(template="base", timeout=60, volume_mounts={"/x": "e2e-data"}, api_key=volume_env.key_b)
    finally:
        assert Volume.destroy(vol.volume_id)
    assert not images[0].exists()
    assert vol.volume_id not in [v.volume_id for v in Volume.list()]
