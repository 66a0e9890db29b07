"""The core's storage contract suite, run against CowStorage (qcow2 overlays and reflink=auto)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cube_core.testing.contract import StorageContract

pytestmark = pytest.mark.root


@pytest.fixture
def base_image(tmp_path: Path) -> Path:
    path = tmp_path / "base.ext4"
    with open(path, "wb") as fh:
        fh.truncate(16 << 20)
    path.chmod(0o444)
    return path


class TestCowStorageContract(StorageContract):
    @pytest.fixture(params=["never", "auto"])
    async def driver(self, request, make_driver):
        d = make_driver(reflink=request.param)
        await d.start()
        yield d
        await d.close()
