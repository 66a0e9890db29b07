"""Volume slots in the guest: found by serial, requests validated (no mount on the host)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cube_guest import volumes
from cube_guest.control import OpError


def test_slot_device_is_found_by_its_serial(tmp_path: Path) -> None:
    for name, serial in (("vda", ""), ("vdb", "cube-vol1"), ("vdc", "cube-vol0")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "serial").write_text(serial + "\n")
    (tmp_path / "loop0").mkdir()  # no serial file
    assert volumes.slot_device(0, str(tmp_path)) == "/dev/vdc"
    assert volumes.slot_device(1, str(tmp_path)) == "/dev/vdb"
    with pytest.raises(OpError, match="no volume slot 2"):
        volumes.slot_device(2, str(tmp_path))


def test_requests_are_validated() -> None:
    ok = volumes.parse({"volumes": [{"slot": 0, "path": "/mnt/data/", "read_only": True}]})
    assert ok == [(0, "/mnt/data", True)]
    bad_items = [{"slot": "0", "path": "/a"}, {"slot": 0, "path": "a"}, {"slot": 0, "path": "/"},
                 {"slot": 0, "path": "/a", "read_only": 1}, {"slot": True, "path": "/a"}]
    for bad in [{"volumes": "x"}, *({"volumes": [item]} for item in bad_items)]:
        with pytest.raises(OpError):
            volumes.parse(bad)


def test_without_system_calls_nothing_is_mounted() -> None:
    mounted = asyncio.run(volumes.mount_all([(0, "/mnt/a", False)], system_calls=False))
    assert mounted == ["/mnt/a"]
