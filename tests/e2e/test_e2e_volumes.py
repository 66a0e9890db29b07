"""Volumes on a real ``cube serve`` with real microVMs and the real e2b SDK (issue 14 section 2).

A volume is created and changed through the content API with no sandbox; sandbox A mounts it
read-write (a volume slot of its VM, restored from the template snapshot with the volume's image
in it), reads that file, writes another and hits the quota (ENOSPC); a second read-write mount
meanwhile is a 409, and so are the content API and the deletion; A is killed (its QEMU and its VM
directory are gone); sandbox B mounts the volume read-only right
away (the journal A left is replayed first) and sees A's write, the guest refuses writes there, a
read-write mount meanwhile is a 409 and the content API can read but not change it; B is killed
and the content API sees and changes what A wrote; another team cannot see the volume; the volume
is deleted and its image is gone.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from cube_e2e import CubeServer
from e2b import NotFoundException, Sandbox, SandboxException, Volume
from e2b.exceptions import VolumeException

from cube_core.store import SqliteStore

pytestmark = [pytest.mark.vm, pytest.mark.e2e]


@pytest.fixture
def volume_env(e2b_env: CubeServer, monkeypatch: pytest.MonkeyPatch) -> CubeServer:
    monkeypatch.setenv("E2B_VOLUME_API_URL", e2b_env.url)  # the content API is Cube's API too
    return e2b_env


def _vm(server: CubeServer, sandbox_id: str) -> tuple[Path, int]:
    """The VM directory and QEMU pid of a sandbox."""
    store = SqliteStore(server.state_dir / "cube.db")
    try:
        record = store.get_sandbox(sandbox_id)
    finally:
        store.close()
    assert record is not None and record.runtime.vm is not None and record.runtime.vm.pid is not None
    return Path(str(record.runtime.vm.model_dump(mode="json")["workdir"])), record.runtime.vm.pid


def _qemus(workdir: Path) -> list[str]:
    return subprocess.run(["pgrep", "-f", str(workdir)], capture_output=True, text=True).stdout.split()


def _mount_options(sbx: Sandbox, path: str) -> list[str]:
    out = sbx.commands.run(f"findmnt -n -o FSTYPE,OPTIONS {path}").stdout.split()
    assert out[0] == "ext4", out
    return out[1].split(",")


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
        vol.make_dir("/scratch")
        vol.write_file("/scratch/tmp.txt", "tmp")
        assert sorted(e.name for e in vol.list("/")) == ["scratch", "seed"]
        vol.remove("/scratch")
        assert [e.name for e in vol.list("/")] == ["seed"]

        a = Sandbox.create(template="base", timeout=120, volume_mounts={"/mnt/data": vol})
        a_dir, a_pid = _vm(volume_env, a.sandbox_id)
        try:
            argv = Path(f"/proc/{a_pid}/cmdline").read_text().split("\0")
            drives = [arg for arg in argv if arg.startswith("if=none,id=vol")]  # slot 1: empty, no file
            assert len(drives) == 2 and f"/{vol.volume_id}.ext4," in drives[0] and "driver=null-co" in drives[1], drives
            assert a.get_info().volume_mounts == [{"name": "e2e-data", "path": "/mnt/data"}]
            assert a.files.read("/mnt/data/seed/hello.txt") == "written with no sandbox\n"
            out = a.commands.run("echo from-a > /mnt/data/from-a.txt && sync && stat -c %U /mnt/data/from-a.txt",
                                 user="user")
            assert out.stdout.strip() == "user"
            assert "rw" in _mount_options(a, "/mnt/data")
            full = a.commands.run("dd if=/dev/zero of=/mnt/data/big bs=1M count=80 2>&1; echo rc=$?", user="user")
            assert "No space left on device" in full.stdout  # the 64 MiB quota
            a.commands.run("rm -f /mnt/data/big", user="user")
            with pytest.raises(SandboxException, match="in use"):
                Sandbox.create(template="base", timeout=60, volume_mounts={"/mnt/data": vol})
            with pytest.raises(VolumeException, match="in use"):
                vol.read_file("/seed/hello.txt")
            with pytest.raises(VolumeException, match="in use"):
                Volume.destroy(vol.volume_id)
        finally:
            a.kill()
        assert not a_dir.exists() and _qemus(a_dir) == []  # no QEMU, nothing of the VM left

        # read-only (Cube's readOnly: the SDK cannot ask for it), right after A was killed
        raw = httpx.post(f"{volume_env.url}/sandboxes", headers={"X-API-Key": volume_env.key_a}, timeout=300,
                         json={"templateID": "base", "timeout": 120,
                               "volumeMounts": [{"name": "e2e-data", "path": "/ro", "readOnly": True}]})
        assert raw.status_code == 201, raw.text
        b = Sandbox.connect(raw.json()["sandboxID"])
        b_dir, _ = _vm(volume_env, b.sandbox_id)
        try:
            assert b.files.read("/ro/from-a.txt") == "from-a\n"
            assert "ro" in _mount_options(b, "/ro")
            refused = b.commands.run("touch /ro/new 2>&1; echo rc=$?", user="root")
            assert "Read-only file system" in refused.stdout and "rc=1" in refused.stdout
            with pytest.raises(SandboxException, match="in use"):
                Sandbox.create(template="base", timeout=60, volume_mounts={"/w": vol})
            assert vol.read_file("/from-a.txt") == "from-a\n"
            with pytest.raises(VolumeException, match="in use"):
                vol.write_file("/new.txt", "no")
        finally:
            b.kill()
        assert not b_dir.exists() and _qemus(b_dir) == []

        # the content API sees and changes what A wrote
        assert sorted(e.name for e in vol.list("/")) == ["from-a.txt", "seed"]
        assert vol.read_file("/from-a.txt") == "from-a\n"
        vol.remove("/from-a.txt")
        assert [e.name for e in vol.list("/")] == ["seed"]

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
