from __future__ import annotations

from pathlib import Path

import pytest
from cow_helpers import copy_guest

from cube_storage_cow import CowConfig, CowStorage


@pytest.fixture(scope="session")
def guest_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_guest(tmp_path_factory.mktemp("guest"))


@pytest.fixture
def make_driver(tmp_path: Path, guest_src: Path):
    """``make_driver(**options)`` -> an unstarted CowStorage under tmp_path (small images)."""

    def make(**options: object) -> CowStorage:
        opts = {"root": tmp_path / "root", "cache": tmp_path / "cache", "guest_src": guest_src,
                "image_size_mb": 64, "agent_runtime": False, **options}
        return CowStorage(CowConfig.model_validate(opts))

    return make
