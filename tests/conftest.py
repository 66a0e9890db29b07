from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CUBE = str(Path(sys.executable).with_name("cube"))


@pytest.fixture
def run_cube(tmp_path: Path):
    """Run the real ``cube`` command line in a subprocess; returns CompletedProcess."""

    def run(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
        return subprocess.run([CUBE, *args], capture_output=True, text=True, env=full_env, timeout=timeout)

    return run
